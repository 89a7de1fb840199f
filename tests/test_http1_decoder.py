"""HTTP/1 (and WebSocket) decoding, fed with bytes recorded from real clients and servers on
127.0.0.1 through a recording relay."""

from __future__ import annotations

import http.client
import http.server
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator

import h11
import pytest

from engine.flow import Connection, EventKind, Flow, FlowBus, FlowEvent, FlowKind, FlowState
from engine.http1 import Http1Observer
from engine.observer import RawObserver
from engine.sniff import begins_like_http, classify, make_observer

LOCAL = "127.0.0.1"


class RecordingRelay:
    """Relays TCP connections from a loopback port to `target_port`, recording every chunk
    (in the order it passed) per connection: ("c" | "s", bytes); b"" marks a half-close."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server((LOCAL, 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[list[tuple[str, bytes]]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((LOCAL, self.target_port))
            record: list[tuple[str, bytes]] = []
            with self._lock:
                self.connections.append(record)
                self._sockets += [client, upstream]
            for src, dst, tag in ((client, upstream, "c"), (upstream, client, "s")):
                t = threading.Thread(target=self._pump, args=(src, dst, tag, record), daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, tag: str, record: list) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with self._lock:
                record.append((tag, data))
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Wait until every relayed connection has closed both ways."""
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.01, deadline - time.monotonic()))

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        for s in self._sockets:
            s.close()
        self._accepter.join(2)
        for t in self._threads:
            t.join(2)


def replay(record: list[tuple[str, bytes]], observer, chunk: int | None = None) -> None:
    """Feed a recording to an observer (optionally re-split into `chunk`-byte pieces)."""
    for tag, data in record:
        if not data:
            (observer.client_eof if tag == "c" else observer.server_eof)()
            continue
        pieces = (
            [data] if chunk is None else [data[i : i + chunk] for i in range(0, len(data), chunk)]
        )
        for piece in pieces:
            (observer.client_data if tag == "c" else observer.server_data)(piece)
    observer.close()


class Collector:
    def __init__(self) -> None:
        self.bus = FlowBus()
        self.events: list[FlowEvent] = []
        self.bus.subscribe(self.events.append)

    @property
    def flows(self) -> list[Flow]:
        seen: dict[int, Flow] = {}
        for e in self.events:
            seen.setdefault(e.flow.id, e.flow)
        return list(seen.values())

    def kinds(self, flow: Flow) -> list[EventKind]:
        return [e.kind for e in self.events if e.flow is flow]


def conn() -> Connection:
    return Connection(id=1, client=(LOCAL, 40000), server=(LOCAL, 8080))


def decode(record, scheme: str = "http", chunk: int | None = None, body_cap: int = 0) -> Collector:
    c = Collector()
    replay(record, Http1Observer(conn(), c.bus, scheme, body_cap), chunk)
    return c


# -- a small HTTP/1.1 server ----------------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, extra: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._send(200, b"x" * 1234)

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Checksum")
            self.end_headers()
            for part in (b"first,", b"second,", b"third"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nX-Checksum: abc\r\n\r\n")
        elif self.path == "/gzip":
            body = zlib.compress(b"compressed " * 100, wbits=31)
            self._send(200, body, [("Content-Encoding", "gzip")])
        else:
            self._send(200, f"hello {self.path}".encode())

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        self._send(201, b"got %d bytes" % len(body))


@pytest.fixture
def server() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer((LOCAL, 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture
def relay(server: int) -> Iterator[RecordingRelay]:
    r = RecordingRelay(server)
    yield r
    r.close()


# -- tests ----------------------------------------------------------------------------------


def test_keep_alive_three_requests(relay: RecordingRelay) -> None:
    client = http.client.HTTPConnection(LOCAL, relay.port, timeout=5)
    for i in range(3):
        client.request("GET", f"/r{i}", headers={"X-N": str(i)})
        assert client.getresponse().read() == f"hello /r{i}".encode()
    client.close()
    relay.wait_idle()
    assert len(relay.connections) == 1
    c = decode(relay.connections[0])
    flows = c.flows
    assert [f.request.path for f in flows] == ["/r0", "/r1", "/r2"]
    for i, f in enumerate(flows):
        assert f.state is FlowState.DONE and f.error is None
        assert f.request.authority == f"{LOCAL}:{relay.port}"
        assert f.request.url == f"http://{LOCAL}:{relay.port}/r{i}"
        assert f.response.status == 200 and f.response.reason == "OK"
        assert f.response.body.read() == f"hello /r{i}".encode()
        assert ("X-N", str(i)) in f.request.headers
        kinds = c.kinds(f)  # (an UPDATE for the head only when the body came later)
        assert kinds[0] is EventKind.NEW and kinds[-1] is EventKind.DONE
        assert kinds.count(EventKind.DONE) == 1 and len(kinds) <= 3
        t = f.timings
        assert t.start <= t.request_sent <= t.first_byte <= t.done


def test_keep_alive_split_into_small_pieces(relay: RecordingRelay) -> None:
    client = http.client.HTTPConnection(LOCAL, relay.port, timeout=5)
    for i in range(3):
        client.request("GET", f"/s{i}")
        client.getresponse().read()
    client.close()
    relay.wait_idle()
    c = decode(relay.connections[0], chunk=3)
    assert [f.response.body.read() for f in c.flows] == [f"hello /s{i}".encode() for i in range(3)]
    assert all(f.error is None for f in c.flows)


def test_pipelining(relay: RecordingRelay) -> None:
    with socket.create_connection((LOCAL, relay.port), timeout=5) as s:
        s.sendall(
            b"GET /p1 HTTP/1.1\r\nHost: a.test\r\n\r\n"
            b"POST /p2 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /p3 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 ") == 3
    relay.wait_idle()
    record = relay.connections[0]
    assert record[0][0] == "c" and b"/p3" in record[0][1]  # all three requests in one chunk
    c = decode(record)
    flows = c.flows
    assert [(f.request.method, f.request.path) for f in flows] == [
        ("GET", "/p1"),
        ("POST", "/p2"),
        ("GET", "/p3"),
    ]
    assert [f.response.status for f in flows] == [200, 201, 200]
    assert flows[1].request.body.read() == b"hello"
    assert flows[1].response.body.read() == b"got 5 bytes"
    assert flows[2].response.body.read() == b"hello /p3"
    assert all(f.state is FlowState.DONE for f in flows)
    assert flows[0].request.url == "http://a.test/p1"


def test_head_then_get(relay: RecordingRelay) -> None:
    client = http.client.HTTPConnection(LOCAL, relay.port, timeout=5)
    client.request("HEAD", "/h")
    resp = client.getresponse()
    assert resp.read() == b"" and resp.headers["Content-Length"] == "1234"
    client.request("GET", "/after-head")
    assert client.getresponse().read() == b"hello /after-head"
    client.close()
    relay.wait_idle()
    head, get = decode(relay.connections[0]).flows
    assert head.request.method == "HEAD" and head.response.status == 200
    assert head.response.body.size == 0 and head.state is FlowState.DONE
    assert get.response.body.read() == b"hello /after-head" and get.error is None


def test_expect_100_continue_with_curl(relay: RecordingRelay, tmp_path) -> None:
    payload = tmp_path / "payload"
    payload.write_bytes(b"z" * 5000)
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-H", "Expect: 100-continue",
         "--data-binary", f"@{payload}", f"http://{LOCAL}:{relay.port}/upload"],
        capture_output=True, check=True,
    )  # fmt: skip
    assert out.stdout == b"got 5000 bytes"
    relay.wait_idle()
    record = relay.connections[0]
    assert any(tag == "s" and data.startswith(b"HTTP/1.1 100") for tag, data in record)
    (flow,) = decode(record).flows
    assert flow.request.method == "POST"
    assert flow.response.status == 201  # the 100 is not the final response
    assert flow.request.body.read() == b"z" * 5000
    assert flow.response.body.read() == b"got 5000 bytes"
    assert flow.state is FlowState.DONE


def test_chunked_both_ways_with_trailers(relay: RecordingRelay) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-H", "Transfer-Encoding: chunked",
         "--data-binary", "chunky request", f"http://{LOCAL}:{relay.port}/up",
         "--next", f"http://{LOCAL}:{relay.port}/chunked"],
        capture_output=True, check=True,
    )  # fmt: skip
    assert out.stdout == b"got 14 bytesfirst,second,third"
    relay.wait_idle()
    assert len(relay.connections) == 1  # curl reused the connection
    up, down = decode(relay.connections[0]).flows
    assert up.request.body.read() == b"chunky request"
    assert up.response.status == 201
    assert down.response.body.read() == b"first,second,third"
    assert down.response.trailers == [("X-Checksum", "abc")]
    assert down.state is FlowState.DONE


def test_gzip_body_kept_raw(relay: RecordingRelay) -> None:
    client = http.client.HTTPConnection(LOCAL, relay.port, timeout=5)
    client.request("GET", "/gzip")
    raw = client.getresponse().read()
    client.close()
    relay.wait_idle()
    (flow,) = decode(relay.connections[0]).flows
    assert flow.response.body.read() == raw
    assert zlib.decompress(raw, wbits=31) == b"compressed " * 100


def test_body_cap_counts_everything(relay: RecordingRelay) -> None:
    client = http.client.HTTPConnection(LOCAL, relay.port, timeout=5)
    client.request("POST", "/big", body=b"q" * 100_000)
    client.getresponse().read()
    client.close()
    relay.wait_idle()
    (flow,) = decode(relay.connections[0], body_cap=1000).flows
    assert flow.request.body.size == 100_000
    assert flow.request.body.read() == b"q" * 1000 and flow.request.body.truncated


# -- errors (crafted server bytes, client bytes from h11) -----------------------------------


def client_bytes(*requests: h11.Request) -> bytes:
    c = h11.Connection(h11.CLIENT)
    out = b""
    for r in requests:
        out += c.send(r) + c.send(h11.EndOfMessage())
        if c.our_state is h11.DONE:
            break
    return out


def test_malformed_chunk_size_marks_flow() -> None:
    req = client_bytes(h11.Request(method="GET", target="/", headers=[("Host", "x.test")]))
    bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz-not-hex\r\n"
    c = decode([("c", req), ("s", bad), ("s", b"more bytes after the error\r\n")])
    (flow,) = c.flows
    assert flow.state is FlowState.ERROR
    assert "HTTP/1 decoding error" in flow.error
    assert flow.response.body.read() == b"hello"
    assert c.kinds(flow).count(EventKind.DONE) == 1


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (b"\0\0\x12\x04\0\0\0\0\0\0\x03\0\0\0\x64\0\x04\0\x01\0\0\0\x05\0\0\x40\0",
         "the server answered in HTTP/2 frames, not HTTP/1"),
        (b"\x15\x03\x03\0\x02\x02\x28", "does not begin with an HTTP/1 status line: b'\\x15"),
    ],
    ids=["http2-frames", "tls-alert"],
)
def test_an_answer_that_is_not_http1_says_what_it_is(answer: bytes, said: str) -> None:
    req = client_bytes(h11.Request(method="GET", target="/", headers=[("Host", "x.test")]))
    (flow,) = decode([("c", req), ("s", answer)]).flows
    assert flow.state is FlowState.ERROR
    assert said in flow.error and "request line" not in flow.error


def test_response_head_is_announced_before_its_body_ends() -> None:
    req = client_bytes(h11.Request(method="GET", target="/", headers=[("Host", "x.test")]))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    c = decode([("c", req), ("s", head + b"first"), ("s", b"later")])
    (flow,) = c.flows
    assert c.kinds(flow) == [EventKind.NEW, EventKind.UPDATE, EventKind.DONE]


def test_a_whole_response_in_one_read_is_one_done_event() -> None:
    req = client_bytes(h11.Request(method="GET", target="/", headers=[("Host", "x.test")]))
    c = decode([("c", req), ("s", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")])
    (flow,) = c.flows
    assert c.kinds(flow) == [EventKind.NEW, EventKind.DONE]
    assert flow.response.status == 200 and flow.response.body.read() == b"ok"


def test_truncated_body_at_eof_marks_flow() -> None:
    req = client_bytes(h11.Request(method="GET", target="/", headers=[("Host", "x.test")]))
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"
    (flow,) = decode([("c", req), ("s", resp), ("s", b"")]).flows
    assert flow.state is FlowState.ERROR and flow.response.body.size == 10


def test_invalid_header_bytes_marks_flow_and_never_raises() -> None:
    req = client_bytes(h11.Request(method="GET", target="/", headers=[("Host", "x.test")]))
    c = decode([("c", req), ("s", b"HTTP/1.1 200 OK\r\nBad Header\x00: x\r\n\r\n")])
    (flow,) = c.flows
    assert flow.state is FlowState.ERROR


def test_response_delimited_by_close() -> None:
    req = client_bytes(h11.Request(method="GET", target="/", headers=[("Host", "x.test")]))
    resp = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    (flow,) = decode([("c", req), ("s", resp), ("s", b"")]).flows
    assert flow.state is FlowState.DONE and flow.response.body.read() == b"until the end"


def _cut_short(server_closes: bool, error: str) -> tuple[Flow, Flow]:
    """Two pipelined requests; the first response stops 5 bytes short; then the connection
    ends with `error`, the server having closed first or not."""
    c = Collector()
    observer = Http1Observer(conn(), c.bus, "https", 0)
    observer.client_data(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
    observer.server_data(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart")
    if server_closes:
        observer.server_eof()
    observer.close(error)
    first, second = c.flows
    return first, second


def test_a_server_closing_first_is_why_an_exchange_ended_whatever_follows() -> None:
    """An app answers the server's close (a TLS alert, a reset): the close is the reason."""
    first, second = _cut_short(True, "TLS error from the app: TLSV1_ALERT_DECODE_ERROR")
    assert first.error.startswith(
        "the server closed the connection before the response was complete (")
    assert "received 4 bytes, expected 9" in first.error
    assert second.error == "the server closed the connection before responding"
    assert first.state is second.state is FlowState.ERROR


def test_an_exchange_cut_short_by_the_app_ends_with_the_apps_error() -> None:
    first, second = _cut_short(False, "app reset the connection")
    assert first.error == second.error == "app reset the connection"


def test_no_host_uses_server_address() -> None:
    c = decode([("c", b"GET /x HTTP/1.0\r\n\r\n"), ("s", b"HTTP/1.0 204 No Content\r\n\r\n")])
    (flow,) = c.flows
    assert flow.request.url == f"http://{LOCAL}:8080/x"
    assert flow.request.http_version == "HTTP/1.0"


def test_http10_keep_alive() -> None:
    req = b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    resp = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\na"
    rec = [("c", req), ("s", resp), ("c", req.replace(b"/a", b"/b")), ("s", resp)]
    flows = decode(rec).flows
    assert [f.request.path for f in flows] == ["/a", "/b"]
    assert all(f.state is FlowState.DONE for f in flows)


def test_an_upgrade_to_another_protocol_is_done_at_101() -> None:
    req = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo/1\r\n\r\n"
    resp = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: foo/1\r\n\r\n"
    (flow,) = decode([("c", req), ("s", resp + b"foo speaks now")]).flows
    assert flow.state is FlowState.DONE and flow.response.status == 101


def test_an_upgrade_to_h2c_is_answered_on_stream_1() -> None:
    import h2.config
    import h2.connection

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = client.initiate_upgrade_connection()
    req = (b"GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n")
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_upgrade_connection(settings)
    server.send_headers(1, [(":status", "200"), ("content-type", "text/plain")])
    server.send_data(1, b"ok", end_stream=True)
    resp = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    c = decode([("c", req), ("s", resp), ("c", client.data_to_send()),
                ("s", server.data_to_send())])
    (flow,) = c.flows
    assert flow.state is FlowState.DONE, flow.error
    assert (flow.request.path, flow.response.status, flow.response.http_version) == (
        "/up", 200, "HTTP/2")
    assert flow.response.body.read() == b"ok"


def test_refused_upgrade_continues_http() -> None:
    req = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    resp = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    req2 = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    resp2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    flows = decode([("c", req + req2), ("s", resp), ("s", resp2)]).flows
    assert [f.response.status for f in flows] == [404, 200]
    assert all(f.state is FlowState.DONE for f in flows)



def test_204_and_304_have_no_body_whatever_their_headers_say() -> None:
    req = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    no_content = b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"
    not_modified = b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    flows = decode([("c", req * 3), ("s", no_content + not_modified + ok)]).flows
    assert [(f.response.status, f.response.body.read()) for f in flows] == [
        (204, b""), (304, b""), (200, b"ok"),
    ]
    assert all(f.state is FlowState.DONE for f in flows)


def test_early_hints_then_final_response() -> None:
    req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    (flow,) = decode([("c", req), ("s", hints), ("s", final)]).flows
    assert flow.state is FlowState.DONE
    assert (flow.response.status, flow.response.body.read()) == (200, b"ok")


def test_accepted_connect_becomes_an_undecoded_tunnel() -> None:
    req = b"CONNECT db.test:5432 HTTP/1.1\r\nHost: db.test:5432\r\n\r\n"
    ok = b"HTTP/1.1 200 Connection established\r\n\r\n"
    c = decode([("c", req), ("s", ok), ("c", b"\x00\x01 tunnelled bytes"), ("s", b"\xff\xfe")])
    (flow,) = c.flows
    assert flow.state is FlowState.DONE and flow.response.status == 200
    assert flow.request.method == "CONNECT"
    assert flow.request.url == "http://db.test:5432"  # not the target glued to the Host header


def test_client_closing_mid_request_body_marks_the_flow() -> None:
    req = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
    (flow,) = decode([("c", req), ("c", b"")]).flows
    assert flow.state is FlowState.ERROR
    assert flow.request.body.read() == b"abc"


def test_a_response_nobody_asked_for_stops_decoding_without_raising() -> None:
    req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    c = decode([("c", req), ("s", ok + ok), ("c", req)])
    first, *rest = c.flows
    assert first.state is FlowState.DONE and c.kinds(first).count(EventKind.DONE) == 1
    assert rest == []  # the decoder stopped at the unrequested response


# -- WebSocket ------------------------------------------------------------------------------


@pytest.fixture
def ws_server() -> Iterator[int]:
    from websockets.sync.server import serve

    def echo(ws) -> None:
        for message in ws:
            ws.send(message)

    srv = serve(echo, LOCAL, 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.socket.getsockname()[1]
    srv.shutdown()
    t.join(5)


@pytest.mark.parametrize("compression", ["deflate", None])
def test_websocket_echo(ws_server: int, compression: str | None) -> None:
    from websockets.sync.client import connect

    relay = RecordingRelay(ws_server)
    try:
        with connect(f"ws://{LOCAL}:{relay.port}/chat", compression=compression) as ws:
            ws.send("hello")
            assert ws.recv() == "hello"
            ws.send(b"\x00\x01binary" * 100)
            assert ws.recv() == b"\x00\x01binary" * 100
            ws.send(["frag-", "mented"])  # one message in several frames
            assert ws.recv() == "frag-mented"
            ws.send("big " * 20000)
            assert ws.recv() == "big " * 20000
            ws.ping(b"p1").wait(5)
        relay.wait_idle()
        record = relay.connections[0]
    finally:
        relay.close()
    c = decode(record)
    (flow,) = c.flows
    assert flow.kind is FlowKind.WEBSOCKET
    assert flow.response.status == 101
    assert flow.state is FlowState.DONE and flow.error is None
    data = [(m.from_client, m.opcode, m.content) for m in flow.websocket_messages]
    expected = [
        (True, 1, b"hello"),
        (False, 1, b"hello"),
        (True, 2, b"\x00\x01binary" * 100),
        (False, 2, b"\x00\x01binary" * 100),
        (True, 1, b"frag-mented"),
        (False, 1, b"frag-mented"),
        (True, 1, b"big " * 20000),
        (False, 1, b"big " * 20000),
        (True, 9, b"p1"),
        (False, 10, b"p1"),
    ]
    assert data[: len(expected)] == expected
    assert {(fc, op) for fc, op, _ in data[len(expected) :]} == {(True, 8), (False, 8)}
    if compression:
        ext = [v for k, v in flow.response.headers if k.lower() == "sec-websocket-extensions"]
        assert ext and "permessage-deflate" in ext[0]


# -- sniffing and raw flows -----------------------------------------------------------------


def test_classify() -> None:
    assert classify(b"") == "need-more"
    assert classify(b"\x16\x03\x01\x02\x00\x01") == "tls"
    assert classify(b"\x16") == "need-more"
    assert classify(b"GET / HTTP/1.1\r\n") == "http1"
    assert classify(b"GE") == "need-more"
    assert classify(b"CONNECT a.test:443 HTTP/1.1\r\n") == "http1"
    assert classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == "h2"
    assert classify(b"PRI * HTTP/2.0\r\n") == "need-more"
    assert classify(b"PR") == "need-more"
    assert classify(b"FOOBAR /x HTTP/1.1\r\n") == "http1"
    assert classify(b"SSH-2.0-OpenSSH_9.6\r\n") == "unknown"
    assert classify(b"\x00\x01\x02garbage") == "unknown"


def test_bytes_left_open_are_guessed_http_only_when_they_begin_a_known_method() -> None:
    assert classify(b"message 0000") == "need-more"  # a token and a space: a method, maybe
    assert not begins_like_http(b"message 0000")
    assert begins_like_http(b"GE") and begins_like_http(b"POST /upl")
    assert not begins_like_http(b"\x16\x03") and not begins_like_http(b"")


def test_raw_observer_counts_bytes() -> None:
    c = Collector()
    obs = make_observer("unknown", conn(), c.bus, "http", 0)
    assert isinstance(obs, RawObserver)
    obs.client_data(b"abc")
    obs.server_data(b"defgh")
    obs.client_eof()
    obs.close()
    (flow,) = c.flows
    assert flow.kind is FlowKind.TCP
    assert (flow.bytes_sent, flow.bytes_received) == (3, 5)
    assert flow.state is FlowState.DONE
    assert c.kinds(flow)[0] is EventKind.NEW and c.kinds(flow)[-1] is EventKind.DONE


def test_make_observer_kinds() -> None:
    from engine.http2 import Http2Observer

    bus = FlowBus()
    assert isinstance(make_observer("http1", conn(), bus, "http", 0), Http1Observer)
    assert isinstance(make_observer("h2", conn(), bus, "https", 0), Http2Observer)
