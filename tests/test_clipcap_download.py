"""ClipCap's released captioners come from Google Drive: the registry entries, and the downloader against a
Drive-like server on 127.0.0.1 that the test starts. It plays what Drive does: `uc?id=...&export=download` answers a
large file with an HTML "can't scan this file for viruses" page (or its quota page); with `confirm=t` it redirects
(303) to the file's host, which may or may not honour Range. The page is named in one error and nothing is saved;
the file downloads through the redirect, a cut download resumes (or restarts when Range is ignored, or when there is
no validator to resume safely), and the sha256 of what arrived is printed, none being published."""
import hashlib
import http.server
import socket
from urllib.parse import parse_qs, urlsplit

import pytest

import weights
from conftest import local_server
from weights import REGISTRY, WeightsFile

PAYLOAD = bytes(range(256)) * 3000 + b"end of the checkpoint"  # 768 KB: several chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FILE_ID = "1IdaBtMSvtyzF0ByVaBHtvM0JYSXRExRX"  # COCO, MLP mapper (the registry's)
LAST_MODIFIED = "Wed, 06 Oct 2021 12:00:00 GMT"
FAST = {"backoff": 0.0, "progress": False}

VIRUS_PAGE = b"""<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>
<div class="uc-main"><p class="uc-warning-caption">Google Drive can't scan this file for viruses.</p>
<p class="uc-warning-subcaption">coco_weights.pt (607M) is too large for Google to scan for viruses. Would you
still like to download this file?</p><form id="download-form" action="/download" method="get">
<input type="submit" value="Download anyway"><input type="hidden" name="id" value="%s">
<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="0f6c5d8e-1111-2222-3333-444455556666"></form></div></body></html>"""
QUOTA_PAGE = b"""<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>
<p class="uc-error-caption">Sorry, you can't view or download this file at this time.</p>
<p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently. Please try accessing
the file again later.</p></body></html>"""


class DriveHandler(http.server.BaseHTTPRequestHandler):
    """/uc?id=..&export=download           -> the virus-scan page (200, text/html), or the quota page (server.quota)
    /uc?id=..&export=download&confirm=t -> 303 to /download?<same query>
    /download?id=..                     -> the file: Content-Disposition, Content-Length; Range honoured (206)
                                           unless server.ranges is False; Last-Modified and If-Range unless
                                           server.validator is False; the first server.cuts answers die halfway"""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body=b"", **headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return body

    def do_GET(self):
        server, url = self.server, urlsplit(self.path)
        query = parse_qs(url.query)
        server.log.append((url.path, query.get("confirm"), self.headers.get("Range"), self.headers.get("If-Range")))
        if url.path == "/uc" and query.get("id") and not query.get("confirm"):
            page = QUOTA_PAGE if server.quota else VIRUS_PAGE % query["id"][0].encode()
            self.wfile.write(self.send(200, page, Content_Type="text/html; charset=utf-8"))
        elif url.path == "/uc" and query.get("id"):
            self.send(303, Location=f"/download?{url.query}")
        elif url.path == "/download" and query.get("confirm"):
            self.serve_file()
        else:
            self.send(404)

    def serve_file(self):
        server, start = self.server, 0
        headers = {"Content_Type": "application/octet-stream",
                   "Content_Disposition": 'attachment; filename="coco_weights.pt"'}
        if server.validator:
            headers["Last_Modified"] = LAST_MODIFIED
        asked = self.headers.get("Range")
        if asked and server.ranges and self.headers.get("If-Range") in (None, LAST_MODIFIED):
            start = int(asked.removeprefix("bytes=").partition("-")[0])
            body = self.send(206, PAYLOAD[start:], Content_Range=f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}",
                             **headers)
        else:
            body = self.send(200, PAYLOAD, **headers)
        server.served += 1
        if server.served <= server.cuts:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection dies mid-file
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def drive():
    with local_server(DriveHandler, quota=False, ranges=True, validator=True, cuts=0, served=0) as httpd:
        httpd.confirm_url = f"{httpd.url}/uc?id={FILE_ID}&export=download&confirm=t"
        yield httpd


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_registry_has_the_two_released_mlp_captioners():
    coco, conceptual = REGISTRY["clipcap/coco_weights.pt"], REGISTRY["clipcap/conceptual_weights.pt"]
    assert coco.url == f"https://drive.google.com/uc?id={FILE_ID}&export=download&confirm=t"
    assert conceptual.url == ("https://drive.google.com/uc?id=14pXWwB4Zm82rsDdvbGguLfx9F8aM7ovT"
                              "&export=download&confirm=t")
    for entry in (coco, conceptual):
        assert entry.format == "torch-pickle" and entry.sha256 is None and entry.size is None and entry.note
    # the transformer mapper's file maps CLIP RN50x4 features (640-d): not a file this project can use
    assert not any("1GYPToCqFREwi285wPLhuVExlz7DDUDfJ" in entry.url for entry in REGISTRY.values())
    assert not any("transformer" in name for name in REGISTRY if name.startswith("clipcap/"))


def test_virus_scan_page_is_named_with_what_to_do_and_nothing_saved(drive, tmp_path):
    dest = tmp_path / "coco_weights.pt"
    url = f"{drive.url}/uc?id={FILE_ID}&export=download"
    with pytest.raises(weights.WeightsUnavailable) as error:
        weights.download(url, dest, retries=3, **FAST)
    message = str(error.value)
    print(message)
    assert "Google Drive answered with an HTML page, not the file" in message
    assert "can't scan this file for viruses" in message
    assert f"https://drive.google.com/uc?id={FILE_ID}&export=download&confirm=t" in message  # the confirm form
    assert f"https://drive.google.com/file/d/{FILE_ID}/view" in message and "browser" in message
    assert f"put the file here by hand: {dest}" in message and message.count("Google Drive") == 1
    assert "nothing was saved" in message
    assert listing(tmp_path) == [] and len(drive.log) == 1  # refused, not retried, nothing saved


def test_quota_page_on_the_confirm_url_says_wait_or_use_a_browser(drive, tmp_path):
    drive.quota = True
    url = f"{drive.url}/uc?id={FILE_ID}&export=download"  # Drive answers the quota page whatever the query
    with pytest.raises(weights.WeightsUnavailable, match="download-quota page") as error:
        weights.download(url, tmp_path / "coco_weights.pt", **FAST)
    assert "usually within a day" in str(error.value) and listing(tmp_path) == []


def test_a_page_on_a_url_that_already_confirms_points_to_the_browser(drive, tmp_path, monkeypatch):
    monkeypatch.setattr(DriveHandler, "serve_file", lambda self: self.wfile.write(
        self.send(200, VIRUS_PAGE % FILE_ID.encode(), Content_Type="text/html")))
    with pytest.raises(weights.WeightsUnavailable) as error:
        weights.download(drive.confirm_url, tmp_path / "coco_weights.pt", **FAST)
    message = str(error.value)
    assert "already asks Drive to skip its confirmation" in message and "/file/d/" in message
    assert "confirm=t, or" not in message and listing(tmp_path) == []


@pytest.fixture
def registered(drive, monkeypatch, tmp_path):
    """The registry's COCO entry, served by the local Drive."""
    entry = REGISTRY["clipcap/coco_weights.pt"]
    monkeypatch.setitem(REGISTRY, "clipcap/coco_weights.pt", WeightsFile(drive.confirm_url, entry.size, entry.sha256,
                                                                         entry.format, note=entry.note))
    for variable in ("HF_HUB_CACHE", "HF_HOME", "MINIMODAL_WEIGHTS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))
    return "clipcap/coco_weights.pt"


def test_fetch_follows_drives_redirect_and_prints_the_sha256(drive, registered, tmp_path, capsys):
    path = weights.fetch(registered, root=tmp_path / "weights", progress=False)
    assert path == tmp_path / "weights" / "clipcap" / "coco_weights.pt" and path.read_bytes() == PAYLOAD
    assert [(p, confirm) for p, confirm, _, _ in drive.log] == [("/uc", ["t"]), ("/download", ["t"])]
    printed = capsys.readouterr().err
    assert f"sha256 {PAYLOAD_SHA}" in printed and f"{len(PAYLOAD):,} bytes" in printed
    assert "no checksum is published" in printed
    assert listing(path.parent) == ["coco_weights.pt"]
    assert weights.fetch(registered, root=tmp_path / "weights", offline=True) == path  # then used as it is


def test_cut_download_resumes_through_the_redirect(drive, tmp_path):
    drive.cuts = 1
    dest = tmp_path / "coco_weights.pt"
    weights.download(drive.confirm_url, dest, **FAST)
    assert dest.read_bytes() == PAYLOAD and listing(tmp_path) == ["coco_weights.pt"]
    downloads = [(rng, validator) for p, _, rng, validator in drive.log if p == "/download"]
    (first, _), (resumed, validator) = downloads
    assert first is None and validator == LAST_MODIFIED  # If-Range: the copy is the one the first part came from
    assert len(PAYLOAD) // 2 - (1 << 16) <= int(resumed.removeprefix("bytes=").rstrip("-")) <= len(PAYLOAD) // 2


def test_range_ignored_restarts_cleanly(drive, tmp_path):
    drive.cuts, drive.ranges = 1, False
    dest = tmp_path / "coco_weights.pt"
    weights.download(drive.confirm_url, dest, **FAST)
    assert dest.read_bytes() == PAYLOAD  # the whole file once, not half of it twice
    assert [rng is not None for p, _, rng, _ in drive.log if p == "/download"] == [False, True]


def test_no_validator_means_no_resume_but_a_clean_restart(drive, tmp_path):
    """Without ETag or Last-Modified nor a published checksum, nothing would catch a file changed between the two
    requests: the partial file is not resumed but downloaded again from its start."""
    drive.cuts, drive.validator = 1, False
    dest = tmp_path / "coco_weights.pt"
    weights.download(drive.confirm_url, dest, **FAST)
    assert dest.read_bytes() == PAYLOAD and listing(tmp_path) == ["coco_weights.pt"]
    assert [rng for p, _, rng, _ in drive.log if p == "/download"] == [None, None]


def test_content_length_bounds_a_download_without_a_registered_size(drive, tmp_path, monkeypatch):
    """No size is registered, so Drive's Content-Length is the bound: a server that sends more than it announced
    is read up to the announced length and not a byte further."""
    original = DriveHandler.send

    def lying(self, status, body=b"", **headers):  # announces one byte less than it then writes
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(max(len(body) - 1, 0)))
        self.end_headers()
        return body

    monkeypatch.setattr(DriveHandler, "send", lambda self, status, body=b"", **headers:
                        (lying if status == 200 and body == PAYLOAD else original)(self, status, body, **headers))
    dest = tmp_path / "coco_weights.pt"
    weights.download(drive.confirm_url, dest, **FAST)
    assert dest.read_bytes() == PAYLOAD[:-1]  # what was announced, not a byte more
