"""Getting official files onto the disk: the weights directory, a resumable download, and `fetch`.

`download(url, dest)` streams with requests into `dest.part`, shows tqdm progress, and only
renames the file into place once its size and checksum are right, so `dest` is either complete
and verified or absent. What a server sends is not trusted:

- the body is written as sent (`Accept-Encoding: identity`; a `Content-Encoding` is refused, never
  inflated) and never past the expected length (registry size, else Hugging Face's
  `X-Linked-Size`, else the announced length; with none of them there is no download);
- an HTML page (a login or error page, a captive portal) is refused for a weights file; Google Drive's
  pages (its "can't scan this file for viruses" confirmation for large files, its download-quota and sign-in
  pages) are named as such, with what to do: the `confirm=t` form of the URL, or a browser;
- a partial `.part` is resumed with `Range` and `If-Range` (the ETag or Last-Modified that the
  first response gave, kept beside it in `.part.json`), so a file changed upstream restarts
  instead of being spliced; a `.part` with neither a validator nor a checksum is not resumed;
- Hugging Face publishes the LFS sha256 of every weights file (`X-Linked-Etag`): it is checked
  when the registry has none, and must agree with the registry's when it has one;
- a transfer slower than `min_rate` bytes/s over `rate_window` seconds is cut (and resumed), and
  `deadline` bounds the whole call;
- the `.part` is opened without following symlinks and locked, so two processes fetching the
  same file wait for each other instead of writing into one file;
- every failure is `WeightsUnavailable` (or `ChecksumMismatch`) saying what to do;
- a file without a published checksum (ClipCap's captioners on Google Drive) gets its sha256 printed once
  downloaded, so that a user can compare it with another copy's.

`fetch("gpt2/model.safetensors")` looks the name up in REGISTRY and returns, in this order: the
file already in the weights directory (size checked), the copy committed in weights/vocab/, a
copy in a local Hugging Face hub cache, or a fresh download. When it cannot, it raises
`WeightsUnavailable` with one message naming the URL and the path where the file belongs, so
that a user behind a firewall can fetch it some other way and put it there by hand.
"""
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests
from tqdm import tqdm
from urllib3.exceptions import HTTPError as TransportError  # requests' transport: what a raw read raises

from .registry import REGISTRY

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent fetches of one file are not guarded there
    fcntl = None

PACKAGE_DIR = Path(__file__).resolve().parent
CHUNK_BYTES = 1 << 16  # a cut connection loses at most one chunk of progress
PAGE_BYTES = 1 << 16  # how much of an HTML answer is read to tell which page it is
DRIVE_HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")


class WeightsUnavailable(RuntimeError):
    """A file could not be found locally nor downloaded; the message says what to do."""

    def __init__(self, url, dest, reason, sha256=None, size=None):
        self.url, self.dest, self.reason = url, Path(dest), reason
        expected = "".join([f"\n  size:   {size:,} bytes" if size else "",
                            f"\n  sha256: {sha256}" if sha256 else ""])
        super().__init__(f"{reason}\n  url:    {url}\n  put the file here by hand: {dest}{expected}")


class ChecksumMismatch(WeightsUnavailable):
    """The downloaded bytes do not have the published checksum; the file was deleted."""


def weights_dir(root=None):
    """Where checkpoints live: `root`, else $MINIMODAL_WEIGHTS, else this package's directory."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get("MINIMODAL_WEIGHTS"):
        return Path(os.environ["MINIMODAL_WEIGHTS"]).expanduser()
    return PACKAGE_DIR


def sha256_of(path, algorithm="sha256"):
    return _digests(path, [algorithm])[algorithm]


def _digests(path, algorithms):
    """{algorithm: hex digest} of a file, read once whatever the number of algorithms."""
    found = {algorithm: hashlib.new(algorithm) for algorithm in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            for digest in found.values():
                digest.update(chunk)
    return {algorithm: digest.hexdigest() for algorithm, digest in found.items()}


class _Retry(Exception):
    """This attempt ended early (cut connection, too slow, resume refused): retried, resumed."""


class _Refused(Exception):
    """The server's answer is wrong for this file (HTML, compressed, too long, ...): not retried."""


def _headers_for(url):
    # Gated Hugging Face repositories need a token; nothing is sent anywhere else.
    token = os.environ.get("HF_TOKEN")
    if token and url.startswith("https://huggingface.co/"):
        return {"Authorization": f"Bearer {token}"}
    return {}


def _hub_facts(response):
    """(size, sha256) that Hugging Face's resolve redirect announces for an LFS file, else None."""
    size = sha256 = None
    for answer in [*response.history, response]:
        linked_size = answer.headers.get("X-Linked-Size", "")
        linked_etag = answer.headers.get("X-Linked-Etag", "").removeprefix("W/").strip('"').lower()
        size = int(linked_size) if linked_size.isdigit() else size
        sha256 = linked_etag if re.fullmatch(r"[0-9a-f]{64}", linked_etag) else sha256  # small files: git sha1
    return size, sha256


def _drive_advice(url):
    """What to do about a Google Drive page: its file id comes from our own URL, never from the page."""
    query = parse_qs(urlsplit(url).query)
    file_id = next((v for v in query.get("id", []) if re.fullmatch(r"[A-Za-z0-9_-]{10,100}", v)), None)
    if file_id is None:
        return "download the file in a browser and put it at the path below"
    browser = f"download it in a browser from https://drive.google.com/file/d/{file_id}/view"
    if query.get("confirm"):
        return f"{browser} and put it at the path below (this URL already asks Drive to skip its confirmation)"
    return (f"use the confirm form of the URL, https://drive.google.com/uc?id={file_id}&export=download&confirm=t, "
            f"or {browser} and put it at the path below")


def _on_drive(url, response):
    return any(urlsplit(u).hostname in DRIVE_HOSTS for u in (url, *(r.url for r in response.history), response.url))


def _html_refusal(url, drive, page):
    """The reason an HTML answer is refused. Google Drive's pages (told by the host, or by the page itself, e.g. a
    mirror or a test server playing Drive) get named; the page's text is only matched, never repeated."""
    text = page.decode("utf-8", "replace").lower()
    if not (drive or "google drive" in text):
        return "the server answered with an HTML page, not the file (a login page, an error page or a captive portal?)"
    if "virus" in text or 'id="download-form"' in text:
        what = "its \"can't scan this file for viruses\" confirmation, which it shows for large files"
    elif "quota" in text or "too many users" in text:
        what = ("its download-quota page (too many people downloaded the file recently; Drive lifts this after a "
                "while, usually within a day)")
    elif "accounts.google.com" in text or "sign in" in text:
        what = "a sign-in page (the file is not shared publicly, or it was removed)"
    else:
        what = "a page this program does not recognise"
    return f"Google Drive answered with an HTML page, not the file: {what}; {_drive_advice(url)}"


def _read_page(response):
    try:
        return response.raw.read(PAGE_BYTES, decode_content=False) or b""
    except (TransportError, OSError):
        return b""


class _Transfer:
    """One file's download state: what is expected, and the `.part` (locked, no symlinks followed)."""

    def __init__(self, url, part, f, sha256, md5, size):
        self.url, self.part, self.f, self.sha256, self.md5, self.size = url, part, f, sha256, md5, size
        self.meta = part.with_name(part.name + ".json")  # the validator for If-Range, and the total size
        self.validator = None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            with os.fdopen(os.open(self.meta, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))) as meta:
                saved = json.loads(meta.read(4096))
            if saved.get("url") == url and saved.get("size") in (None, size):
                self.validator = saved.get("validator")

    def have(self):
        self.f.flush()  # bytes still in the write buffer count (and survive a cut)
        return os.fstat(self.f.fileno()).st_size

    def restart(self):
        self.f.seek(0)
        self.f.truncate()
        self.validator = None

    def remember(self, validator):
        self.validator = validator
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(self.meta, flags, 0o666), "w") as meta:
            meta.write(json.dumps({"url": self.url, "size": self.size, "validator": validator}))

    def discard(self):
        """Delete the .part and its .json (while still holding the lock)."""
        self.restart()
        for path in (self.part, self.meta):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def forget(self):
        with contextlib.suppress(OSError):
            self.meta.unlink()

    def stream(self, timeout, progress, min_rate, rate_window, deadline_at):
        """One HTTP request that appends to (or restarts) the `.part`; returns when it is complete."""
        have = self.have()
        if self.size is not None and have > self.size:  # a stale partial of some other file
            self.restart()
            have = 0
        if have and not (self.validator or self.sha256 or self.md5):  # nothing would catch a splice
            self.restart()
            have = 0
        if self.size is not None and have == self.size:
            return
        headers = {**_headers_for(self.url), "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            if self.validator:
                headers["If-Range"] = self.validator
        with requests.get(self.url, headers=headers, stream=True, timeout=timeout) as response:
            hub_size, hub_sha256 = _hub_facts(response)
            if hub_sha256 and self.sha256 and hub_sha256 != self.sha256:
                raise _Refused(f"the server announces sha256 {hub_sha256}, not the registered one: the file "
                               f"changed upstream or the URL is wrong")
            self.sha256 = self.sha256 or hub_sha256
            if response.status_code == 416:  # nothing left to send: complete, or a .part too long
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                if have and total.isdigit() and int(total) == have:
                    return
                if not have:
                    raise _Refused("the server answered 416 (range not satisfiable) to a request without a range")
                self.restart()
                raise _Retry("the server rejected the resume range; starting over")
            status, drive = response.status_code, _on_drive(self.url, response)
            if response.headers.get("Content-Type", "").lower().startswith("text/html") and (
                    status < 400 or drive and status < 500 and status != 429):  # Drive's 403 pages say why
                raise _Refused(_html_refusal(self.url, drive, _read_page(response)))
            response.raise_for_status()
            encoding = response.headers.get("Content-Encoding", "identity").lower()
            if encoding not in ("", "identity"):
                raise _Refused(f"the server sent the file compressed (Content-Encoding: {encoding}); "
                               f"weights files are never decoded on the fly")
            length = response.headers.get("Content-Length", "")
            if response.status_code == 206:
                start, _, total = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("-")
                total = total.rpartition("/")[2]
                if start != str(have):
                    self.restart()
                    raise _Retry(f"the server resumed at byte {start}, not {have}; starting over")
            else:  # 200: the whole file, whether Range was ignored or If-Range found it changed
                if have:
                    self.restart()
                    have = 0
                total = length
            announced = int(total) if total.isdigit() else None
            expected = next((n for n in (self.size, hub_size, announced) if n is not None), None)
            if expected is None:
                raise _Refused("the server announces no length and the registry has none: refusing an unbounded "
                               "download")
            for claim in (hub_size, announced):
                if claim is not None and claim != expected:
                    raise _Refused(f"the server announces {claim:,} bytes, expected {expected:,}: the file "
                                   f"changed upstream or the URL is wrong")
            validator = response.headers.get("ETag", "")  # If-Range takes a strong ETag or a date
            if not validator or validator.startswith("W/"):
                validator = response.headers.get("Last-Modified")
            if validator != self.validator:
                self.remember(validator)
            self._write(response, have, expected, progress, min_rate, rate_window, deadline_at)

    def _write(self, response, have, expected, progress, min_rate, rate_window, deadline_at):
        """Copy the raw body (never decoded) to the .part, stopping at `expected` bytes."""
        raw = response.raw
        read = getattr(raw, "read1", None) or raw.read  # read1: whatever has arrived, so a trickle is seen
        self.f.seek(have)
        window_start, window_bytes = time.monotonic(), 0
        with tqdm(total=expected, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=self.part.name.removesuffix(".part"), disable=not progress or None) as bar:
            while chunk := _read_chunk(read):
                if have == 0 and re.match(rb"\s*<(!doctype html|html)", chunk[:64], re.IGNORECASE):
                    raise _Refused(_html_refusal(self.url, _on_drive(self.url, response), chunk[:PAGE_BYTES]))
                if have + len(chunk) > expected:
                    raise _Refused(f"the server sent more than the {expected:,} bytes expected (an endless or "
                                   f"wrong body)")
                self.f.write(chunk)
                have += len(chunk)
                window_bytes += len(chunk)
                bar.update(len(chunk))
                now = time.monotonic()
                if deadline_at is not None and now > deadline_at:
                    raise _Retry("the download took longer than its deadline")  # _attempts stops; .part kept
                if now - window_start >= rate_window:
                    if window_bytes < min_rate * (now - window_start):
                        raise _Retry(f"slower than {min_rate:,} bytes/s for {now - window_start:.0f} s")
                    window_start, window_bytes = now, 0
                if have == expected:
                    break
            self.f.flush()
            os.fsync(self.f.fileno())
        if have < expected:
            raise _Retry(f"connection closed after {have:,} of {expected:,} bytes")


def _read_chunk(read):
    try:
        return read(CHUNK_BYTES, decode_content=False)
    except (TransportError, OSError) as error:  # a cut or stalled connection, seen by the transport
        raise _Retry(f"connection broken ({type(error).__name__}: {error})") from None


@contextlib.contextmanager
def _locked_part(part, unavailable):
    """The `.part` opened for read/write without following a symlink, and locked (waiting for
    another process that holds it). Re-opened if the holder renamed or deleted the one we waited on."""
    if part.is_symlink():
        raise unavailable(f"{part} is a symbolic link, not a partial download: remove it (nothing was written)")
    while True:
        try:
            fd = os.open(part, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise unavailable(f"{part} is a symbolic link, not a partial download: remove it") from None
            raise
        f = os.fdopen(fd, "r+b")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            raise unavailable(f"{part} is not a regular file: remove it")
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process that is downloading {part.name.removesuffix('.part')}",
                      file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(part, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        yield f
    finally:
        f.close()


def download(url, dest, sha256=None, size=None, *, md5=None, retries=4, backoff=1.0, timeout=30, progress=True,
             min_rate=1024, rate_window=60.0, deadline=None):
    """Download `url` to `dest` (resumable, verified, atomic). Returns `dest` as a Path.

    An existing `dest` of the right size (any size when `size` is None) is returned as it is.
    `md5` is for archives whose publishers give only that (COCO, CIFAR). Network errors, server
    errors (5xx, 429), cut connections and transfers slower than `min_rate` bytes/s (averaged over
    `rate_window` s) are retried `retries` times, waiting backoff * 2**attempt seconds, each retry
    resuming the `.part`; other HTTP errors (404, 403, ...) and wrong answers stop at once.
    `deadline` (seconds) bounds the whole call. Raises WeightsUnavailable (ChecksumMismatch for a
    wrong checksum)."""
    dest = Path(dest)
    started = time.monotonic()
    deadline_at = None if deadline is None else started + deadline

    def unavailable(reason, kind=WeightsUnavailable):
        return kind(url, dest, reason, sha256, size)

    if dest.is_dir():
        raise unavailable(f"{dest} is a directory: remove it or choose another place for the file")
    if dest.is_file() and (size is None or dest.stat().st_size == size):
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _locked_part(part, unavailable) as f:
            transfer = _Transfer(url, part, f, sha256, md5, size)
            if dest.is_file() and (size is None or dest.stat().st_size == size):  # done while we waited
                if not transfer.have():
                    part.unlink()
                return dest
            try:
                _attempts(transfer, unavailable, retries, backoff, timeout, progress, min_rate, rate_window,
                          deadline_at)
                published = transfer.sha256 or transfer.md5
                digest = _verify(transfer, unavailable)
            except BaseException:
                if not transfer.have():  # nothing worth resuming: leave no empty .part behind
                    transfer.discard()
                raise
            os.replace(part, dest)
            transfer.forget()
            if not published:  # nothing to check it against here: say what arrived, so a user can compare
                print(f"downloaded {dest} ({dest.stat().st_size:,} bytes), sha256 {digest}; no checksum is published "
                      f"for this file: compare it with another copy's", file=sys.stderr)
    except OSError as error:  # the file system's answer: read-only, full, permissions, ...
        if error.errno == errno.ENOSPC:
            for leftover in (part, part.with_name(part.name + ".json")):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            raise unavailable(f"the disk is full while writing {part}; the partial file was deleted. Free "
                              f"{size or 'enough'} bytes, or set MINIMODAL_WEIGHTS to another disk") from None
        raise unavailable(f"cannot write {part} ({error.strerror or error}): make {dest.parent} writable, or set "
                          f"MINIMODAL_WEIGHTS to a directory you can write") from None
    return dest


def _attempts(transfer, unavailable, retries, backoff, timeout, progress, min_rate, rate_window, deadline_at):
    for attempt in range(retries + 1):
        try:
            transfer.stream(timeout, progress, min_rate, rate_window, deadline_at)
            return
        except requests.HTTPError as error:
            status = error.response.status_code
            if status < 500 and status != 429:
                raise unavailable(f"download failed: HTTP {status} {error.response.reason}") from None
            reason = f"HTTP {status}"
        except _Retry as error:
            reason = str(error)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
            reason = f"{type(error).__name__}: {error}"
        except requests.RequestException as error:  # malformed URL and the like: not retryable
            raise unavailable(f"download failed: {type(error).__name__}: {error}") from None
        except _Refused as error:
            kept = transfer.have()
            transfer.discard()
            raise unavailable(f"download refused: {error}; "
                              f"{'the partial file was deleted' if kept else 'nothing was saved'}") from None
        if attempt == retries or (deadline_at is not None and time.monotonic() > deadline_at):
            kept = transfer.have()
            kept = f" ({kept:,} bytes kept in {transfer.part.name}; a rerun resumes)" if kept else ""
            raise unavailable(f"download failed after {attempt + 1} attempts: {reason}{kept}")
        time.sleep(backoff * 2 ** attempt)


def _verify(transfer, unavailable):
    """Size and checksums of the finished `.part`, read once; a wrong file is deleted. Returns its sha256."""
    have = transfer.have()
    wrong = f"downloaded {have:,} bytes, expected {transfer.size:,}" if transfer.size not in (None, have) else None
    digests = {}
    if wrong is None:
        digests = _digests(transfer.part, ["sha256", "md5"] if transfer.md5 else ["sha256"])
        for algorithm, value in (("sha256", transfer.sha256), ("md5", transfer.md5)):
            if value and digests[algorithm] != value:
                wrong = f"{algorithm} mismatch: got {digests[algorithm]}, expected {value}"
                break
    if wrong:
        transfer.discard()
        kind = ChecksumMismatch if "mismatch" in wrong else WeightsUnavailable
        raise unavailable(f"{wrong}; the downloaded file was deleted (corrupted transfer, or changed upstream: "
                          f"a rerun downloads it again)", kind)
    return digests["sha256"]


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


def file_or_fetch(name_or_path, root=None, offline=False, flag="weights", inside=()):
    """What a --*-weights flag names: an existing file as it is, a directory holding one of the files `inside`
    (Hugging Face's layout: the first found), else a registered file, fetched (fetch)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if inside and path.is_dir():
        found = [path / name for name in inside if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{flag} {path}: a directory holding none of {', '.join(inside)}")
        return found[0]
    if name_or_path not in REGISTRY:
        raise FileNotFoundError(f"{flag} {name_or_path}: no such file, nor a registered name")
    return fetch(name_or_path, root, offline)


# ---------------------------------------------------------------------------------------------------------------------
# The datasets' official archives, fetched for data.py's --download (it reads what they unpack): COCO 2017, Karpathy's
# splits of it, CIFAR-100. None has a sha256 published: a pinned size and md5 vouch for the bytes where known.

COCO_URL = "http://images.cocodataset.org/"  # plain http only: the size and the md5 below vouch for the bytes
COCO_ARCHIVES = {  # name -> (path under COCO_URL, size in bytes as served, md5 as pinned by many independent
    # download scripts, e.g. PaddleDetection's ppdet/utils/download.py; the COCO site publishes no checksum)
    "annotations": ("annotations/annotations_trainval2017.zip", 252907541, "f4bbac642086de4f52a3fdda2de5fa2c"),
    "train2017": ("zips/train2017.zip", 19336861798, "cced6f7f71b7629ddf16f17bbcfab6b2"),
    "val2017": ("zips/val2017.zip", 815585330, "442b8da7639aecaf257c1dceb8ba8c80")}
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5, CIFAR100_SIZE = "eb9058c3a382ffc7106e4002c42a8d85", 169001437  # md5 from the authors' page
# Karpathy & Fei-Fei 2015's splits of COCO, Flickr8k and Flickr30k (dataset_coco.json, ...), from Karpathy's page
KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


def fetch_coco(name, root):
    """Fetch one official COCO archive (progress, resume) and unpack it into root, once."""
    if (done := root / f".{name}.unpacked").exists():
        return
    url_path, size, md5 = COCO_ARCHIVES[name]
    archive = download(COCO_URL + url_path, root / Path(url_path).name, size=size, md5=md5)
    with zipfile.ZipFile(archive) as zf:
        for member in tqdm(zf.namelist(), desc=f"unpacking {archive.name}", unit="file", disable=None):
            if not (root / member).resolve().is_relative_to(root.resolve()):  # "../" or an absolute path
                raise ValueError(f"{archive}: member {member!r} points outside {root}")
            zf.extract(member, root)
    done.touch()


def fetch_karpathy(root):
    """--download for Karpathy's splits: the COCO 2017 images (2014's, renamed) and his dataset_coco.json, once."""
    for name in ("train2017", "val2017"):
        fetch_coco(name, root)
    if not (target := root / "dataset_coco.json").exists():
        archive = download(KARPATHY_URL, root / Path(KARPATHY_URL).name)
        with zipfile.ZipFile(archive) as zf, zf.open("dataset_coco.json") as src, \
                open(part := target.with_name(target.name + ".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(part, target)


def fetch_cifar100(archive):
    """The CIFAR-100 python tarball to `archive`, checked against the md5 its authors publish (a bad one is kept
    aside as .gz.bad, never used)."""
    download(CIFAR100_URL, archive, size=CIFAR100_SIZE)
    if (md5 := hashlib.md5(archive.read_bytes()).hexdigest()) != CIFAR100_MD5:
        archive.rename(bad := archive.with_suffix(".gz.bad"))
        raise ValueError(f"{CIFAR100_URL}: md5 {md5} is not the published {CIFAR100_MD5}; kept as {bad}")
