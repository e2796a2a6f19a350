"""Downloads against a real HTTP server on 127.0.0.1."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cvaesim.download import USER_AGENT, DownloadError, fetch
from cvaesim.steps import download

from conftest import EMBEDDED_TARBALL


class Server:
    """Serves ``files``; ``cut_once`` names paths whose first response stops halfway."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_once: set[str] = set()
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, **dict(self.headers)})
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path in server.cut_once:
                    server.cut_once.discard(self.path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    payload = EMBEDDED_TARBALL.read_bytes()
    running = Server({"/matrix.tar.gz": payload})
    yield running
    running.close()


def test_normal_download_writes_file_and_digest(server, tmp_path):
    target = tmp_path / "matrix.tar.gz"
    expected = hashlib.sha256(EMBEDDED_TARBALL.read_bytes()).hexdigest()
    assert fetch(f"{server.url}/matrix.tar.gz", target, expected) == expected
    assert target.read_bytes() == EMBEDDED_TARBALL.read_bytes()
    assert (tmp_path / "matrix.tar.gz.sha256").read_text().startswith(expected)
    assert server.requests[0]["User-Agent"] == USER_AGENT
    assert not (tmp_path / "matrix.tar.gz.part").exists()


def test_cut_off_download_is_resumed_with_a_range_request(server, tmp_path):
    server.cut_once.add("/matrix.tar.gz")
    target = tmp_path / "matrix.tar.gz"
    fetch(f"{server.url}/matrix.tar.gz", target, backoff_seconds=0.01)
    assert target.read_bytes() == EMBEDDED_TARBALL.read_bytes()
    assert len(server.requests) == 2
    half = len(EMBEDDED_TARBALL.read_bytes()) // 2
    assert server.requests[1]["Range"] == f"bytes={half}-"


def test_checksum_mismatch_fails_and_leaves_nothing(server, tmp_path):
    target = tmp_path / "matrix.tar.gz"
    actual = hashlib.sha256(EMBEDDED_TARBALL.read_bytes()).hexdigest()
    with pytest.raises(DownloadError) as error:
        fetch(f"{server.url}/matrix.tar.gz", target, "0" * 64)
    message = str(error.value)
    assert str(target) in message and "0" * 64 in message and actual in message
    assert list(tmp_path.iterdir()) == []


def test_missing_remote_file_fails_at_once(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.url}/nothing.tsv", tmp_path / "a.tsv", backoff_seconds=0.01)
    assert len(server.requests) == 1  # a 404 is not retried
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_gives_up_after_retries(tmp_path):
    with pytest.raises(DownloadError, match="failed after 2 attempts"):
        fetch("http://127.0.0.1:9/x.tsv", tmp_path / "x.tsv", retries=2, backoff_seconds=0.01, timeout=2)
    assert list(tmp_path.iterdir()) == []


def test_local_path_and_file_url(tmp_path):
    by_path = tmp_path / "a.tar.gz"
    by_url = tmp_path / "b.tar.gz"
    fetch(str(EMBEDDED_TARBALL), by_path)
    fetch(EMBEDDED_TARBALL.as_uri(), by_url)
    assert by_path.read_bytes() == by_url.read_bytes() == EMBEDDED_TARBALL.read_bytes()
    with pytest.raises(DownloadError, match="no such file"):
        fetch(str(tmp_path / "absent.tsv"), tmp_path / "c.tsv")
    with pytest.raises(DownloadError, match="unsupported address scheme 'ftp'"):
        fetch("ftp://example.org/x", tmp_path / "d.tsv")


@pytest.mark.parametrize("name", ["matrix.h5ad", "matrix.tar.gz"])
def test_a_truncated_source_is_refused_under_its_own_name(tmp_path, small_cells, name):
    whole = tmp_path / f"whole_{name}"
    if name.endswith(".h5ad"):
        small_cells.write_h5ad(whole)
    else:
        whole.write_bytes(EMBEDDED_TARBALL.read_bytes())
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    download(str(whole), str(tmp_path / "good" / name))
    assert (tmp_path / "good" / name).read_bytes() == whole.read_bytes()
    target = tmp_path / "bad" / name
    with pytest.raises(DownloadError, match=f"^{cut}: not a readable .* as {name} must be") as error:
        download(str(cut), str(target))
    assert str(target) in str(error.value)
    assert list(target.parent.iterdir()) == []
