"""Getting official files onto the disk: the weights directory, a resumable download, and `fetch`.

`download(url, dest)` streams with requests into `dest.part`, shows tqdm progress, resumes a
partial `.part` with an HTTP Range request (and starts over when a server ignores Range and
answers 200), retries network failures with exponential back-off, checks size and sha256, and
only then renames the file into place, so `dest` is either complete and verified or absent.

`fetch("gpt2/model.safetensors")` looks the name up in REGISTRY and returns, in this order: the
file already in the weights directory (size checked), the copy committed in weights/vocab/, a
copy in a local Hugging Face hub cache, or a fresh download. When it cannot, it raises
`WeightsUnavailable` with one message naming the URL and the path where the file belongs, so
that a user behind a firewall can fetch it some other way and put it there by hand.
"""
import hashlib
import os
import time
from pathlib import Path

import requests
from tqdm import tqdm

from .registry import REGISTRY

PACKAGE_DIR = Path(__file__).resolve().parent
CHUNK_BYTES = 1 << 16  # a cut connection loses at most one chunk of progress


class WeightsUnavailable(RuntimeError):
    """A file could not be found locally nor downloaded; the message says what to do."""

    def __init__(self, url, dest, reason, sha256=None, size=None):
        self.url, self.dest, self.reason = url, Path(dest), reason
        expected = "".join([f"\n  size:   {size:,} bytes" if size else "",
                            f"\n  sha256: {sha256}" if sha256 else ""])
        super().__init__(f"{reason}\n  url:    {url}\n  put the file here by hand: {dest}{expected}")


class ChecksumMismatch(WeightsUnavailable):
    """The downloaded bytes do not have the published sha256; the file was deleted."""


def weights_dir(root=None):
    """Where checkpoints live: `root`, else $MINIMODAL_WEIGHTS, else this package's directory."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("MINIMODAL_WEIGHTS"):
        return Path(os.environ["MINIMODAL_WEIGHTS"]).expanduser()
    return PACKAGE_DIR


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class _Incomplete(Exception):
    """The connection ended before the announced number of bytes arrived (retried, resumed)."""


def _headers_for(url):
    # Gated Hugging Face repositories need a token; nothing is sent anywhere else.
    token = os.environ.get("HF_TOKEN")
    if token and url.startswith("https://huggingface.co/"):
        return {"Authorization": f"Bearer {token}"}
    return {}


def _stream_once(url, part, size, timeout, progress):
    """One HTTP request that appends to (or restarts) `part`. Returns when the body is complete."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # a stale partial of some other file
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    headers = _headers_for(url)
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416:  # nothing left to send: complete, or a .part too long
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return
            part.unlink()
            raise _Incomplete("server rejected the resume range; starting over")
        response.raise_for_status()
        if have and response.status_code == 200:  # Range ignored: the body is the whole file
            have = 0
        elif response.status_code == 206:
            start = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")[0]
            if start != str(have):
                part.unlink()
                raise _Incomplete(f"server resumed at byte {start}, not {have}; starting over")
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length and length.isdigit() else size
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=expected, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name.removesuffix(".part"), disable=not progress or None) as bar:
            for chunk in response.iter_content(CHUNK_BYTES):
                f.write(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
    written = part.stat().st_size
    if expected is not None and written < expected:
        raise _Incomplete(f"connection closed after {written} of {expected} bytes")


def download(url, dest, sha256=None, size=None, *, retries=4, backoff=1.0, timeout=30, progress=True):
    """Download `url` to `dest` (resumable, verified, atomic). Returns `dest` as a Path.

    An existing `dest` of the right size (any size when `size` is None) is returned as it is.
    Network errors and server errors (5xx, 429) are retried `retries` times, waiting
    backoff * 2**attempt seconds; each retry resumes the `.part` file. Other HTTP errors (404,
    403, ...) stop at once. Raises WeightsUnavailable (ChecksumMismatch for a wrong sha256)."""
    dest = Path(dest)
    if dest.is_file() and (size is None or dest.stat().st_size == size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    def unavailable(reason):
        return WeightsUnavailable(url, dest, reason, sha256, size)

    for attempt in range(retries + 1):
        try:
            _stream_once(url, part, size, timeout, progress)
            break
        except requests.HTTPError as error:
            status = error.response.status_code
            if status < 500 and status != 429:
                raise unavailable(f"download failed: HTTP {status} {error.response.reason}") from None
            reason = f"HTTP {status}"
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                _Incomplete) as error:
            reason = f"{type(error).__name__}: {error}"
        except requests.RequestException as error:  # malformed URL and the like: not retryable
            raise unavailable(f"download failed: {type(error).__name__}: {error}") from None
        if attempt == retries:
            kept = f" ({part.stat().st_size:,} bytes kept in {part.name}; a rerun resumes)" if part.exists() else ""
            raise unavailable(f"download failed after {retries + 1} attempts: {reason}{kept}")
        time.sleep(backoff * 2 ** attempt)

    have = part.stat().st_size
    if size is not None and have != size:
        part.unlink()
        raise unavailable(f"downloaded {have:,} bytes, expected {size:,}; the partial file was deleted")
    if sha256 is not None:
        actual = sha256_of(part)
        if actual != sha256:
            part.unlink()
            raise ChecksumMismatch(url, dest, f"sha256 mismatch: got {actual}; the downloaded file "
                                              f"was deleted (corrupted transfer or changed upstream)",
                                   sha256, size)
    os.replace(part, dest)
    return dest


def hub_cache_dirs():
    """Hugging Face hub caches on this machine, in huggingface_hub's order of precedence."""
    candidates = []
    if os.environ.get("HF_HUB_CACHE"):
        candidates.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        candidates.append(Path(os.environ["HF_HOME"]) / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    candidates.append((Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub")
    seen, found = set(), []
    for directory in candidates:
        directory = directory.expanduser()
        if directory.is_dir() and directory.resolve() not in seen:
            seen.add(directory.resolve())
            found.append(directory)
    return found


def _matches(path, entry):
    """Is `path` the registered file? Size first; for sha256, a hub-cache blob is named by its
    sha256 (LFS files), so resolving the snapshot symlink usually avoids hashing gigabytes."""
    if not path.is_file() or (entry.size is not None and path.stat().st_size != entry.size):
        return False
    if entry.sha256 is None:
        return True
    return path.resolve().name == entry.sha256 or sha256_of(path) == entry.sha256


def find_in_hub_cache(entry):
    """A copy of a registered file in a Hugging Face hub cache, or None.

    Layout (huggingface_hub): <cache>/models--<org>--<name>/snapshots/<commit>/<file>."""
    if not entry.hf_file:
        return None
    for cache in hub_cache_dirs():
        for repo in entry.hf_repos:
            snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
            for candidate in sorted(snapshots.glob(f"*/{entry.hf_file}")):
                if _matches(candidate, entry):
                    return candidate
    return None


def fetch(name, root=None, offline=False, *, progress=True, retries=4, backoff=1.0):
    """Path to the registered file `name` ("gpt2/model.safetensors"), downloading it if needed.

    offline=True never touches the network: it returns a local copy or raises WeightsUnavailable."""
    if name not in REGISTRY:
        raise KeyError(f"unknown weights file {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    target = weights_dir(root) / name
    if target.is_file():
        if entry.size is None or target.stat().st_size == entry.size:
            return target
        if offline:
            raise WeightsUnavailable(entry.url, target, f"offline, and {target} has "
                                     f"{target.stat().st_size:,} bytes instead of {entry.size:,}",
                                     entry.sha256, entry.size)
    if entry.bundled and _matches(PACKAGE_DIR / entry.bundled, entry):
        return PACKAGE_DIR / entry.bundled
    cached = find_in_hub_cache(entry)
    if cached is not None:
        return cached
    if offline:
        raise WeightsUnavailable(entry.url, target, f"offline: {name} is not in {target.parent} "
                                 f"nor in a Hugging Face hub cache", entry.sha256, entry.size)
    # a wrong-sized file at `target` is replaced (atomically) only once the new copy is verified
    return download(entry.url, target, entry.sha256, entry.size, retries=retries, backoff=backoff,
                    progress=progress)


def fetch_first(names, root=None, offline=False):
    """The first of several registered files holding the same weights (the preferred one first): the first
    already on disk, else the first that downloads. On failure the error is the preferred file's (its URL and
    where to put it)."""
    first_error = None
    attempts = [(name, True) for name in names] + [(name, False) for name in names if not offline]
    for name, local_only in attempts:  # every file on disk first, then every download
        try:
            return fetch(name, root=root, offline=local_only)
        except WeightsUnavailable as e:
            first_error = e if name == names[0] else first_error
    raise first_error
