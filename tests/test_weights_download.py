"""weights/ downloads against a local HTTP server on 127.0.0.1 that the test starts: resume after
a cut connection, servers that ignore Range, wrong checksums, 404, refused connections, retries,
offline mode, the Hugging Face hub cache, and the weights-directory override; then hostile and broken
servers (endless, compressed, HTML, trickling, changed upstream) and broken disks."""
import gzip
import hashlib
import http.server
import io
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

import weights
from bounded import run_bounded
from conftest import local_server
from weights import REGISTRY, WeightsFile
from weights.downloader import PACKAGE_DIR

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: several chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"backoff": 0.0, "progress": False}


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD under a few paths, each one a server behaviour:

    /file      honours Range (206 + Content-Range)
    /cut       announces the whole length but closes after half, on its first `cuts` requests
    /norange   ignores Range and always answers 200 with the whole file
    /flaky     answers 503 to its first request
    anything else: 404"""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.log.append((self.path, self.headers.get("Range")))
        count = sum(path == self.path for path, _ in server.log)
        if self.path == "/flaky" and count == 1:
            return self.send_error(503)
        if self.path not in ("/file", "/cut", "/norange", "/flaky"):
            return self.send_error(404)
        start = 0
        range_header = self.headers.get("Range")
        if range_header and self.path != "/norange":
            start = int(range_header.removeprefix("bytes=").partition("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/cut" and count <= server.cuts:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection dies mid-file
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    with local_server(Handler, cuts=1) as httpd:
        yield httpd


@pytest.fixture
def closed_port_url():
    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/file"


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def test_download_verifies_and_renames_into_place(server, tmp_path):
    dest = tmp_path / "sub" / "model.bin"
    assert weights.download(f"{server.url}/file", dest, PAYLOAD_SHA, len(PAYLOAD), **FAST) == dest
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == ["model.bin"]
    # already there, right size: no request at all
    requests_before = len(server.log)
    weights.download(f"{server.url}/file", dest, PAYLOAD_SHA, len(PAYLOAD), **FAST)
    assert len(server.log) == requests_before


def test_download_resumes_after_the_connection_is_cut(server, tmp_path):
    dest = tmp_path / "model.bin"
    weights.download(f"{server.url}/cut", dest, PAYLOAD_SHA, len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    (first, first_range), (second, second_range) = server.log
    assert first_range is None and second_range.startswith("bytes=")
    resumed_at = int(second_range.removeprefix("bytes=").rstrip("-"))
    assert len(PAYLOAD) // 2 - (1 << 16) <= resumed_at <= len(PAYLOAD) // 2  # resumed, not restarted
    assert leftovers(tmp_path) == ["model.bin"]


def test_download_resumes_an_existing_part_file(server, tmp_path):
    dest = tmp_path / "model.bin"
    (tmp_path / "model.bin.part").write_bytes(PAYLOAD[:1000])
    weights.download(f"{server.url}/file", dest, PAYLOAD_SHA, None, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert server.log == [("/file", "bytes=1000-")]


def test_complete_part_file_gets_416_and_is_used(server, tmp_path):
    dest = tmp_path / "model.bin"
    (tmp_path / "model.bin.part").write_bytes(PAYLOAD)
    weights.download(f"{server.url}/file", dest, PAYLOAD_SHA, None, **FAST)
    assert dest.read_bytes() == PAYLOAD and server.log == [("/file", f"bytes={len(PAYLOAD)}-")]


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "model.bin"
    (tmp_path / "model.bin.part").write_bytes(b"stale bytes of some other attempt")
    weights.download(f"{server.url}/norange", dest, PAYLOAD_SHA, len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD  # the 200 body replaced the .part instead of being appended


def test_wrong_checksum_deletes_the_file_and_says_so(server, tmp_path):
    dest = tmp_path / "model.bin"
    wrong = "0" * 64
    with pytest.raises(weights.ChecksumMismatch) as error:
        weights.download(f"{server.url}/file", dest, wrong, len(PAYLOAD), **FAST)
    message = str(error.value)
    assert "sha256 mismatch" in message and PAYLOAD_SHA in message and wrong in message
    assert f"{server.url}/file" in message and str(dest) in message
    assert isinstance(error.value, weights.WeightsUnavailable) and isinstance(error.value, RuntimeError)
    assert leftovers(tmp_path) == []


def test_wrong_size_deletes_the_file(server, tmp_path):
    with pytest.raises(weights.WeightsUnavailable, match="expected 5"):
        weights.download(f"{server.url}/norange", tmp_path / "model.bin", None, 5, **FAST)
    assert leftovers(tmp_path) == []


def test_404_fails_at_once_with_url_and_path(server, tmp_path):
    dest = tmp_path / "missing.bin"
    with pytest.raises(weights.WeightsUnavailable) as error:
        weights.download(f"{server.url}/missing", dest, retries=3, **FAST)
    message = str(error.value)
    assert "HTTP 404" in message and f"{server.url}/missing" in message and str(dest) in message
    assert len(server.log) == 1  # a 404 is not retried
    assert leftovers(tmp_path) == []


def test_refused_connection_retries_then_names_url_and_path(closed_port_url, tmp_path):
    dest = tmp_path / "model.bin"
    with pytest.raises(weights.WeightsUnavailable) as error:
        weights.download(closed_port_url, dest, retries=2, **FAST)
    message = str(error.value)
    assert "after 3 attempts" in message and "ConnectionError" in message
    assert closed_port_url in message and f"put the file here by hand: {dest}" in message


def test_server_error_is_retried(server, tmp_path):
    weights.download(f"{server.url}/flaky", tmp_path / "model.bin", PAYLOAD_SHA, **FAST)
    assert [path for path, _ in server.log] == ["/flaky", "/flaky"]


def test_persistent_cuts_keep_the_part_file_for_the_next_run(server, tmp_path):
    server.cuts = 100
    dest = tmp_path / "model.bin"
    with pytest.raises(weights.WeightsUnavailable, match="a rerun resumes"):
        weights.download(f"{server.url}/cut", dest, PAYLOAD_SHA, len(PAYLOAD), retries=1, **FAST)
    kept = (tmp_path / "model.bin.part").stat().st_size
    assert 0 < kept < len(PAYLOAD) and not dest.exists()
    server.cuts = 0
    weights.download(f"{server.url}/cut", dest, PAYLOAD_SHA, len(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD and server.log[-1] == ("/cut", f"bytes={kept}-")


# ----------------------------------------------------------------------------- fetch


@pytest.fixture
def registered(server, monkeypatch, tmp_path):
    """A registry entry served by the local server, and no hub cache of the real user."""
    monkeypatch.setitem(REGISTRY, "test-model/model.bin", WeightsFile(
        f"{server.url}/file", len(PAYLOAD), PAYLOAD_SHA, "torch-pickle",
        hf_repos=("test-org/test-model",), hf_file="model.bin"))
    for variable in ("HF_HUB_CACHE", "HF_HOME", "MINIMODAL_WEIGHTS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))
    return "test-model/model.bin"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(requests, "get", refuse)


def test_fetch_downloads_into_the_weights_dir_then_reuses_it(server, registered, tmp_path, monkeypatch):
    root = tmp_path / "weights"
    path = weights.fetch(registered, root=root, progress=False)
    assert path == root / "test-model" / "model.bin" and path.read_bytes() == PAYLOAD
    monkeypatch.setattr(requests, "get", None)  # offline or not, an existing file is simply used
    assert weights.fetch(registered, root=root, offline=True) == path
    assert weights.fetch(registered, root=root) == path


def test_fetch_offline_never_touches_the_network(registered, no_network, tmp_path):
    target = tmp_path / "weights" / registered
    with pytest.raises(weights.WeightsUnavailable) as error:
        weights.fetch(registered, root=tmp_path / "weights", offline=True)
    message = str(error.value)
    assert "offline" in message and REGISTRY[registered].url in message and str(target) in message
    assert PAYLOAD_SHA in message and f"{len(PAYLOAD):,} bytes" in message


def test_fetch_replaces_a_file_of_the_wrong_size(server, registered, tmp_path):
    target = tmp_path / registered
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated copy")
    with pytest.raises(weights.WeightsUnavailable, match="instead of"):
        weights.fetch(registered, root=tmp_path, offline=True)
    assert weights.fetch(registered, root=tmp_path, progress=False).read_bytes() == PAYLOAD


def make_hub_cache(cache, repo, file, content, sha256):
    """The huggingface_hub layout: blobs named by sha256, snapshots holding symlinks to them."""
    model = cache / f"models--{repo.replace('/', '--')}"
    (model / "blobs").mkdir(parents=True)
    (model / "blobs" / sha256).write_bytes(content)
    snapshot = model / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (snapshot / file).symlink_to(os.path.relpath(model / "blobs" / sha256, snapshot))
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text(snapshot.name)
    return snapshot / file


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"])
def test_fetch_uses_a_matching_file_in_the_hub_cache(registered, no_network, tmp_path, monkeypatch, variable):
    base = tmp_path / "elsewhere"
    cache = {"HF_HUB_CACHE": base, "HF_HOME": base / "hub", "XDG_CACHE_HOME": base / "huggingface" / "hub"}[variable]
    cached = make_hub_cache(cache, "test-org/test-model", "model.bin", PAYLOAD, PAYLOAD_SHA)
    monkeypatch.setenv(variable, str(base))
    assert weights.fetch(registered, root=tmp_path / "weights", offline=True) == cached
    assert not (tmp_path / "weights").exists()  # nothing copied, nothing downloaded


def test_fetch_ignores_a_hub_cache_copy_that_does_not_match(server, registered, tmp_path, monkeypatch):
    corrupted = PAYLOAD[:-1] + b"X"
    make_hub_cache(tmp_path / "hub", "test-org/test-model", "model.bin", corrupted,
                   hashlib.sha256(corrupted).hexdigest())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = weights.fetch(registered, root=tmp_path / "weights", progress=False)
    assert path == tmp_path / "weights" / registered and path.read_bytes() == PAYLOAD


def test_weights_dir_root_then_env_then_package(registered, server, tmp_path, monkeypatch):
    assert weights.weights_dir() == PACKAGE_DIR and (PACKAGE_DIR / "__init__.py").is_file()
    monkeypatch.setenv("MINIMODAL_WEIGHTS", str(tmp_path / "from-env"))
    assert weights.weights_dir() == tmp_path / "from-env"
    assert weights.weights_dir(tmp_path / "from-arg") == tmp_path / "from-arg"
    assert weights.fetch(registered, progress=False) == tmp_path / "from-env" / registered


def test_fetch_unknown_name_lists_the_registry():
    with pytest.raises(KeyError, match="gpt2/model.safetensors"):
        weights.fetch("gpt2/model.safetensor")


# ----------------------------------------------------------------------------- the registry itself


def test_registry_entries_are_well_formed():
    formats = {"safetensors", "torch-pickle", "torchscript", "json", "text", "gzip"}
    for name, entry in REGISTRY.items():
        assert name.count("/") >= 1 and not name.startswith("/"), name
        assert entry.url.startswith("https://"), name
        assert entry.format in formats, name
        assert entry.size is None or entry.size > 0, name
        assert entry.sha256 is None or (len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0), name
        if entry.hf_file:
            assert entry.url.endswith("/" + entry.hf_file) and entry.hf_repos, name
    # OpenAI puts the sha256 of each CLIP file in its URL (openai/CLIP clip.py `_download`)
    clip = REGISTRY["clip-vit-b-32/ViT-B-32.pt"]
    assert clip.url.split("/")[-2] == clip.sha256
    for required in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert {f"{required}/model.safetensors", f"{required}/pytorch_model.bin"} <= set(REGISTRY)
    assert {"sd15/v1-5-pruned-emaonly.safetensors", "sd15/v1-5-pruned-emaonly.ckpt",
            "clip-vit-b-32/open_clip_model.safetensors", "clip/bpe_simple_vocab_16e6.txt.gz"} <= set(REGISTRY)


def test_bundled_vocabulary_files_match_their_registry_entries(no_network):
    bundled = {name: entry for name, entry in REGISTRY.items() if entry.bundled}
    assert len(bundled) >= 5
    for name, entry in bundled.items():
        path = PACKAGE_DIR / entry.bundled
        data = path.read_bytes()
        assert len(data) == entry.size and hashlib.sha256(data).hexdigest() == entry.sha256, name
        assert weights.fetch(name, offline=True) == path


# ----------------------------------------------------------------------------- hostile and broken servers
# Each case is a server that lies, loops or trickles. Where a failing bound would write without end, the
# download runs in a bounded child (tests/bounded.py) whose files cannot grow past 32 MB.

PAYLOAD2 = bytes(reversed(PAYLOAD))  # the "same" file after it changed upstream
HTML = b"<!DOCTYPE html><html><body>Please log in</body></html>"


class HostileHandler(http.server.BaseHTTPRequestHandler):
    """/endless  200 without a length, zeros until the client hangs up
    /gzip       PAYLOAD compressed, Content-Encoding: gzip (a 1 MB body that inflates to 1 GiB in the attack)
    /html       an HTML login page as text/html; /sniff the same page as application/octet-stream
    /nolength   PAYLOAD without Content-Length, the connection closed after half of it
    /trickle    PAYLOAD one byte every 20 ms; /slow PAYLOAD in 16 pieces 50 ms apart
    /etag       server.body with ETag server.etag, honouring Range and If-Range; cut after half on request 1
    /resolve    302 to /cdn with Hugging Face's X-Linked-Size / X-Linked-Etag of PAYLOAD; /cdn sends server.body
    /416        always 416 (range not satisfiable)"""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body=b"", length=True, **headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        return body

    def do_GET(self):
        server, path = self.server, self.path
        server.log.append((path, self.headers.get("Range"), self.headers.get("If-Range")))
        try:
            if path == "/endless":
                self.send(200, length=False)
                while True:
                    self.wfile.write(bytes(1 << 16))
            elif path == "/gzip":
                self.wfile.write(self.send(200, gzip.compress(PAYLOAD), Content_Encoding="gzip"))
            elif path in ("/html", "/sniff"):
                kind = "text/html; charset=utf-8" if path == "/html" else "application/octet-stream"
                self.wfile.write(self.send(200, HTML, Content_Type=kind))
            elif path == "/nolength":
                self.send(200, length=False)
                self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            elif path == "/trickle":
                self.send(200, b"x" * len(PAYLOAD))
                for byte in PAYLOAD:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.02)
            elif path == "/slow":
                self.send(200, PAYLOAD)
                for start in range(0, len(PAYLOAD), len(PAYLOAD) // 16):
                    self.wfile.write(PAYLOAD[start: start + len(PAYLOAD) // 16])
                    self.wfile.flush()
                    time.sleep(0.05)
            elif path == "/etag":
                self.serve_etag()
            elif path == "/resolve":
                self.send(302, Location="/cdn", X_Linked_Size=str(len(PAYLOAD)), X_Linked_Etag=f'"{PAYLOAD_SHA}"')
            elif path == "/cdn":
                self.wfile.write(self.send(200, server.body))
            elif path == "/416":
                self.send(416, Content_Range=f"bytes */{len(PAYLOAD)}")
            else:
                self.send(404)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def serve_etag(self):
        server, body = self.server, self.server.body
        start, range_header = 0, self.headers.get("Range")
        if range_header and self.headers.get("If-Range") in (None, server.etag):  # RFC 9110 13.1.5
            start = int(range_header.removeprefix("bytes=").partition("-")[0])
            self.send(206, body[start:], ETag=server.etag,
                      Content_Range=f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send(200, body, ETag=server.etag)
        if sum(path == "/etag" for path, _, _ in server.log) == 1:
            self.wfile.write(body[start: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def hostile():
    with local_server(HostileHandler, body=PAYLOAD, etag='"v1"') as httpd:
        yield httpd


def fetch_in_child(url, dest, sha256, size, options):
    """Runs in a bounded child: the download and what it left in dest's directory."""
    try:
        weights.download(url, dest, sha256, size, backoff=0.0, progress=False, **options)
        outcome = "complete"
    except weights.WeightsUnavailable as error:
        outcome = f"{type(error).__name__}: {error}"
    return outcome, sorted((p.name, p.stat().st_size) for p in Path(dest).parent.iterdir())


def bounded_fetch(url, dest, sha256=None, size=None, **options):
    outcome = run_bounded("test_weights_download:fetch_in_child", url, str(dest), sha256, size, options,
                          memory_mb=512, seconds=60, file_mb=32)
    assert outcome.status == "returned", str(outcome)
    return eval(outcome.result), outcome


@pytest.mark.parametrize("size", [len(PAYLOAD), None])
def test_endless_body_stops_at_the_expected_size(hostile, tmp_path, size):
    (message, left), outcome = bounded_fetch(f"{hostile.url}/endless", tmp_path / "model.bin", size=size, retries=0)
    expected = "more than the 1,048,580 bytes expected" if size else "announces no length"
    assert expected in message and left == [], message
    assert outcome.seconds < 10, outcome


def test_compressed_body_is_refused_not_inflated(hostile, tmp_path):
    (message, left), _ = bounded_fetch(f"{hostile.url}/gzip", tmp_path / "model.bin", retries=0)
    assert "Content-Encoding: gzip" in message and left == [], message
    assert hostile.log[0][0] == "/gzip"


@pytest.mark.parametrize("path", ["/html", "/sniff"])
def test_html_page_is_refused_for_a_weights_file(hostile, tmp_path, path):
    (message, left), _ = bounded_fetch(f"{hostile.url}{path}", tmp_path / "model.bin", retries=0)
    assert "HTML page" in message and left == [], message


def test_truncated_body_without_a_length_is_never_complete(hostile, tmp_path):
    (message, left), _ = bounded_fetch(f"{hostile.url}/nolength", tmp_path / "model.bin", retries=1)
    assert "announces no length" in message and left == [], message


def test_unverifiable_stale_part_is_not_resumed(hostile, tmp_path):
    """A .part of some other file, and nothing (no checksum, no validator) that would catch a splice."""
    (tmp_path / "model.bin.part").write_bytes(PAYLOAD2[:1000])
    hostile.log.append(("/etag", None, None))  # no cut on this run
    weights.download(f"{hostile.url}/etag", tmp_path / "model.bin", **FAST)
    assert (tmp_path / "model.bin").read_bytes() == PAYLOAD
    assert hostile.log[-1] == ("/etag", None, None)  # started over: no Range asked for
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_file_changed_upstream_between_cut_and_resume_restarts(hostile, tmp_path):
    dest = tmp_path / "model.bin"
    with pytest.raises(weights.WeightsUnavailable, match="a rerun resumes"):
        weights.download(f"{hostile.url}/etag", dest, retries=0, **FAST)  # cut after half, ETag "v1" kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin.part", "model.bin.part.json"]
    hostile.body, hostile.etag = PAYLOAD2, '"v2"'
    weights.download(f"{hostile.url}/etag", dest, **FAST)
    assert dest.read_bytes() == PAYLOAD2  # the whole new file, not half of each
    assert hostile.log[-1][1:] == (f"bytes={len(PAYLOAD) // 2}-", '"v1"')  # If-Range sent the old ETag
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_unchanged_file_resumes_with_if_range(hostile, tmp_path):
    dest = tmp_path / "model.bin"
    weights.download(f"{hostile.url}/etag", dest, **FAST)
    assert dest.read_bytes() == PAYLOAD
    (first, _, _), (second, resumed_at, validator) = hostile.log
    assert resumed_at == f"bytes={len(PAYLOAD) // 2}-" and validator == '"v1"'


def test_hub_sha256_is_checked_when_the_registry_has_none(hostile, tmp_path):
    hostile.body = PAYLOAD2[: len(PAYLOAD)]  # right size, wrong bytes: only a checksum can tell
    with pytest.raises(weights.ChecksumMismatch, match=PAYLOAD_SHA):
        weights.download(f"{hostile.url}/resolve", tmp_path / "model.bin", **FAST)
    assert list(tmp_path.iterdir()) == []
    hostile.body = PAYLOAD
    weights.download(f"{hostile.url}/resolve", tmp_path / "model.bin", **FAST)
    assert (tmp_path / "model.bin").read_bytes() == PAYLOAD


def test_hub_sha256_that_disagrees_with_the_registry_is_refused_before_downloading(hostile, tmp_path):
    with pytest.raises(weights.WeightsUnavailable, match="changed upstream"):
        weights.download(f"{hostile.url}/resolve", tmp_path / "model.bin", "0" * 64, **FAST)
    assert list(tmp_path.iterdir()) == []  # requests followed the redirect, but no byte of the body was read


def test_two_fetchers_of_one_file_wait_for_each_other(hostile, tmp_path):
    """Two downloads of one file at once (threads here: flock locks per open file, so they exclude
    each other exactly as two processes do): one downloads, the other waits and finds the file done."""
    dest, results = tmp_path / "model.bin", []

    def fetch():
        try:
            results.append(weights.download(f"{hostile.url}/slow", dest, PAYLOAD_SHA, len(PAYLOAD), **FAST))
        except Exception as error:  # collected: the assertion below shows it
            results.append(error)

    threads = threading.Thread(target=fetch), threading.Thread(target=fetch)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == [dest, dest], results
    assert dest.read_bytes() == PAYLOAD and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
    assert [path for path, _, _ in hostile.log] == ["/slow"]  # one download; the other found it done


def test_trickling_server_is_cut_by_the_minimum_rate(hostile, tmp_path):
    (message, left), outcome = bounded_fetch(f"{hostile.url}/trickle", tmp_path / "model.bin", PAYLOAD_SHA,
                                             len(PAYLOAD), retries=0, min_rate=10_000, rate_window=0.5)
    assert "slower than 10,000 bytes/s" in message and "a rerun resumes" in message, message
    assert outcome.seconds < 10, outcome


def test_deadline_bounds_the_whole_download(hostile, tmp_path):
    (message, _), outcome = bounded_fetch(f"{hostile.url}/trickle", tmp_path / "model.bin", PAYLOAD_SHA,
                                          len(PAYLOAD), deadline=1.0)
    assert "longer than its deadline" in message and "a rerun resumes" in message and outcome.seconds < 10, message


def test_planted_part_symlink_is_refused_and_its_target_untouched(hostile, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (tmp_path / "model.bin.part").symlink_to(victim)
    with pytest.raises(weights.WeightsUnavailable, match="symbolic link"):
        weights.download(f"{hostile.url}/cdn", tmp_path / "model.bin", **FAST)
    assert victim.read_bytes() == b"precious" and hostile.log == []


def test_416_without_a_part_file_is_the_downloaders_own_error(hostile, tmp_path):
    with pytest.raises(weights.WeightsUnavailable, match="416"):
        weights.download(f"{hostile.url}/416", tmp_path / "model.bin", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_directory_at_the_destination_is_the_downloaders_own_error(hostile, tmp_path):
    (tmp_path / "model.bin").mkdir()
    with pytest.raises(weights.WeightsUnavailable, match="is a directory"):
        weights.download(f"{hostile.url}/cdn", tmp_path / "model.bin", **FAST)
    assert hostile.log == []


def test_unwritable_directory_is_the_downloaders_own_error(hostile, tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):  # chmod would not stop root, so the file system's answer is played
        if str(path).endswith(".part"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(weights.WeightsUnavailable, match="MINIMODAL_WEIGHTS"):
        weights.download(f"{hostile.url}/cdn", tmp_path / "model.bin", **FAST)
    monkeypatch.undo()
    with pytest.raises(weights.WeightsUnavailable, match="cannot write"):  # a file where the directory should be
        (tmp_path / "file").write_bytes(b"")
        weights.download(f"{hostile.url}/cdn", tmp_path / "file" / "model.bin", **FAST)


def test_full_disk_is_the_downloaders_own_error_and_frees_the_space(hostile, tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    class FullDisk(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 300_000:
                raise OSError(28, "No space left on device")
            return super().write(data)

    def fdopen(fd, mode="r", *args, **kwargs):
        return FullDisk(fd, "r+", closefd=True) if mode == "r+b" else real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(weights.WeightsUnavailable, match="disk is full"):
        weights.download(f"{hostile.url}/cdn", tmp_path / "model.bin", PAYLOAD_SHA, len(PAYLOAD), **FAST)
    assert list(tmp_path.iterdir()) == []
