"""Copy as curl: the command is run with bash against a local server that records raw requests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from engine.curl import CurlError, printf_quote, to_curl
from tests.ui_fixtures import make_flow, raw_flow

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


class RecordingServer:
    """Accepts HTTP/1.1 requests on 127.0.0.1, keeps each raw request, answers 200 OK."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value.strip())
                    while len(body) < length:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        body += chunk
                    self.requests.append(head + b"\r\n\r\n" + body)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\nok")
                except OSError:
                    pass

    def close(self) -> None:
        # Closing alone would leave the socket listening while _serve's thread waits in
        # accept(); a later test could then reach this server. shutdown() wakes that thread.
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    srv = RecordingServer()
    yield srv
    srv.close()


def run(command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["bash", "-c", command + " --silent --show-error --max-time 10"],
                          capture_output=True, timeout=30, check=False)


def parse_request(raw: bytes) -> tuple[str, str, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    return method, target, headers, body


def names(headers: list[tuple[str, str]]) -> list[str]:
    return [n.lower() for n, _ in headers]


def replay(server: RecordingServer, **kwargs) -> tuple[str, str, list[tuple[str, str]], bytes]:
    flow = make_flow(1, scheme="http", authority=f"127.0.0.1:{server.port}", **kwargs)
    command = to_curl(flow)
    result = run(command)
    assert result.returncode == 0, (command, result.stderr)
    assert result.stdout == b"ok"
    assert len(server.requests) == 1
    return parse_request(server.requests[0])


def test_get_with_headers(server: RecordingServer) -> None:
    method, target, headers, body = replay(
        server, path="/a/b?x=1&y=%20z",
        request_headers=[("Host", f"127.0.0.1:{server.port}"), ("User-Agent", "demo/1.0"),
                         ("X-Quote", "it's \"quoted\" $HOME `x`"), ("Cookie", "a=1; b=2")])
    assert (method, target, body) == ("GET", "/a/b?x=1&y=%20z", b"")
    assert ("User-Agent", "demo/1.0") in headers
    assert ("X-Quote", "it's \"quoted\" $HOME `x`") in headers
    assert ("Cookie", "a=1; b=2") in headers
    assert names(headers).count("host") == 1
    assert "accept" not in names(headers)  # the client sent none; curl must not add one


def test_post_text_body(server: RecordingServer) -> None:
    payload = '{"name": "Ada", "quote": "it\'s $5 `ok`\\n", "emoji": "✓"}'.encode()
    method, target, headers, body = replay(
        server, method="POST", path="/submit",
        request_headers=[("Host", f"127.0.0.1:{server.port}"),
                         ("Content-Type", "application/json"),
                         ("Content-Length", str(len(payload)))],
        request_body=payload)
    assert method == "POST" and target == "/submit"
    assert body == payload
    assert names(headers).count("content-length") == 1
    assert ("Content-Type", "application/json") in headers


def test_put_binary_body_byte_exact(server: RecordingServer) -> None:
    payload = bytes(range(256)) + b"\x00\x00\xff\xfe%s%%\\'\"\n\r\n@x" + b"\x00"
    method, target, headers, body = replay(
        server, method="PUT", path="/upload",
        request_headers=[("Host", f"127.0.0.1:{server.port}"),
                         ("Content-Type", "application/octet-stream")],
        request_body=payload)
    assert method == "PUT"
    assert body == payload
    assert ("Content-Length", str(len(payload))) in headers


def test_body_starting_with_at_sign_is_not_a_file(server: RecordingServer) -> None:
    _, _, headers, body = replay(server, method="POST", path="/", request_body=b"@/etc/passwd")
    assert body == b"@/etc/passwd"
    assert "content-type" not in names(headers)


def test_methods(server: RecordingServer) -> None:
    method, _, _, body = replay(server, method="DELETE", path="/item/3")
    assert (method, body) == ("DELETE", b"")
    server.requests.clear()
    method, _, _, _ = replay(server, method="POST", path="/empty")
    assert method == "POST"


def test_accept_encoding_becomes_compressed(server: RecordingServer) -> None:
    flow = make_flow(1, scheme="http", authority=f"127.0.0.1:{server.port}",
                     request_headers=[("Accept-Encoding", "gzip, br")])
    command = to_curl(flow)
    assert "--compressed" in command and "Accept-Encoding: gzip" not in command
    assert run(command).returncode == 0
    _, _, headers, _ = parse_request(server.requests[0])
    assert names(headers).count("accept-encoding") == 1


def test_http2_flags_and_pseudo_headers() -> None:
    flow = make_flow(1, version="HTTP/2", request_headers=[
        (":method", "GET"), (":authority", "api.example.test"), (":path", "/"),
        (":scheme", "https"), ("accept", "*/*")])
    command = to_curl(flow)
    assert command.startswith("curl --http2 ")
    assert ":authority" not in command and ":method" not in command
    assert command.endswith("https://api.example.test/")
    h1 = to_curl(make_flow(2))
    assert "--http1.1" in h1
    cleartext = to_curl(make_flow(3, scheme="http", version="HTTP/2"))
    assert "--http2-prior-knowledge" in cleartext


def test_host_kept_when_different_and_url_quoted() -> None:
    flow = make_flow(1, authority="api.example.test", path="/a b/[x]?q='1'&r=2",
                     request_headers=[("Host", "other.example.test")])
    command = to_curl(flow)
    assert "-H 'Host: other.example.test'" in command
    assert "--globoff" in command
    assert "'https://api.example.test/a b/[x]?q='\"'\"'1'\"'\"'&r=2'" in command


def test_printf_quote_round_trip() -> None:
    data = bytes(range(256))
    out = subprocess.run(["bash", "-c", f"printf {printf_quote(data)}"], capture_output=True,
                         check=True).stdout
    assert out == data


def test_raw_flow_has_no_curl() -> None:
    with pytest.raises(CurlError):
        to_curl(raw_flow(1))
