"""HTTP/2 decoding, fed with bytes produced by real h2 client/server state machines and by
curl (--http2-prior-knowledge) talking to an h2 server on 127.0.0.1 through a recording relay."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from engine.ca import CertificateAuthority
from engine.flow import Connection, EventKind, Flow, FlowBus, FlowEvent, FlowState
from engine.http2 import Http2Observer

LOCAL = "127.0.0.1"


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


def decode(record: list[tuple[str, bytes]], chunk: int | None = None) -> Collector:
    c = Collector()
    obs = Http2Observer(Connection(1, (LOCAL, 40000), (LOCAL, 8443)), c.bus, "https", 0)
    for tag, data in record:
        if not data:
            continue
        step = chunk or len(data)
        for i in range(0, len(data), step):
            (obs.client_data if tag == "c" else obs.server_data)(data[i : i + step])
    obs.close()
    return c


class H2Pair:
    """An h2 client and server talking in memory; every byte is recorded in order."""

    def __init__(self) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.record: list[tuple[str, bytes]] = []
        self.server_events: list[h2.events.Event] = []
        self.client_events: list[h2.events.Event] = []
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.flush()

    def flush(self) -> None:
        while True:
            c, s = self.client.data_to_send(), self.server.data_to_send()
            if not c and not s:
                return
            if c:
                self.record.append(("c", c))
                self.server_events += self.server.receive_data(c)
            if s:
                self.record.append(("s", s))
                self.client_events += self.client.receive_data(s)

    def request(self, path: str, end: bool = True, extra=()) -> int:
        sid = self.client.get_next_available_stream_id()
        headers = [(":method", "GET" if end else "POST"), (":scheme", "https"),
                   (":authority", "api.test"), (":path", path), *extra]  # fmt: skip
        self.client.send_headers(sid, headers, end_stream=end)
        return sid

    def respond(self, sid: int, status: int = 200, body: bytes = b"", end: bool = True, extra=()):
        self.server.send_headers(
            sid, [(":status", str(status)), *extra], end_stream=not body and end
        )
        for i in range(0, len(body), 16384):
            last = i + 16384 >= len(body)
            self.server.send_data(sid, body[i : i + 16384], end_stream=end and last)


def test_concurrent_streams_interleaved() -> None:
    p = H2Pair()
    sids = [p.request(f"/item/{i}", end=False) for i in range(3)]
    for round_ in range(3):
        for i, sid in enumerate(sids):
            p.client.send_data(sid, f"req{i}-part{round_};".encode(), end_stream=round_ == 2)
        p.flush()
    for sid in reversed(sids):
        p.server.send_headers(sid, [(":status", "200"), ("content-type", "text/plain")])
    for round_ in range(3):
        for i, sid in enumerate(sids):
            p.server.send_data(sid, f"resp{i}-{round_};".encode(), end_stream=round_ == 2)
        p.flush()
    c = decode(p.record)
    flows = c.flows
    assert [f.request.path for f in flows] == ["/item/0", "/item/1", "/item/2"]
    for i, f in enumerate(flows):
        assert f.request.method == "POST"
        assert f.request.url == f"https://api.test/item/{i}"
        assert f.request.http_version == "HTTP/2" and f.response.http_version == "HTTP/2"
        assert f.request.body.read() == b"".join(f"req{i}-part{r};".encode() for r in range(3))
        assert f.response.body.read() == b"".join(f"resp{i}-{r};".encode() for r in range(3))
        assert f.response.headers == [("content-type", "text/plain")]
        assert f.state is FlowState.DONE and f.error is None
        assert c.kinds(f)[0] is EventKind.NEW and c.kinds(f)[-1] is EventKind.DONE
        assert EventKind.UPDATE in c.kinds(f)


def test_byte_by_byte_feeding() -> None:
    p = H2Pair()
    for i in range(2):
        sid = p.request(f"/b{i}", extra=[("x-repeat", "same value")])
        p.flush()
        p.respond(sid, body=b"x" * 30000)  # several DATA frames
        p.flush()
    flows = decode(p.record, chunk=1).flows
    assert [f.response.body.size for f in flows] == [30000, 30000]
    assert all(f.state is FlowState.DONE for f in flows)
    assert all(("x-repeat", "same value") in f.request.headers for f in flows)


def test_grpc_style_trailers() -> None:
    p = H2Pair()
    sid = p.request(
        "/pkg.Service/Method", end=False,
        extra=[("content-type", "application/grpc"), ("te", "trailers")],
    )  # fmt: skip
    p.client.send_data(sid, b"\x00\x00\x00\x00\x03abc")
    p.client.send_headers(sid, [("x-client-trailer", "yes")], end_stream=True)
    p.flush()
    p.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    p.server.send_data(sid, b"\x00\x00\x00\x00\x02ok")
    p.server.send_headers(sid, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True)
    p.flush()
    (flow,) = decode(p.record).flows
    assert flow.request.body.read() == b"\x00\x00\x00\x00\x03abc"
    assert flow.request.trailers == [("x-client-trailer", "yes")]
    assert flow.response.body.read() == b"\x00\x00\x00\x00\x02ok"
    assert flow.response.trailers == [("grpc-status", "0"), ("grpc-message", "")]
    assert flow.state is FlowState.DONE and flow.timings.request_sent is not None


def test_rst_stream_marks_error() -> None:
    p = H2Pair()
    cancelled = p.request("/slow")
    refused = p.request("/refused")
    ok = p.request("/ok")
    p.flush()
    p.server.send_headers(cancelled, [(":status", "200")])
    p.server.send_data(cancelled, b"partial")
    p.server.reset_stream(refused, ErrorCodes.REFUSED_STREAM)
    p.respond(ok, body=b"fine")
    p.flush()
    p.client.reset_stream(cancelled, ErrorCodes.CANCEL)
    p.flush()
    flows = {f.request.path: f for f in decode(p.record).flows}
    assert flows["/slow"].state is FlowState.ERROR
    assert flows["/slow"].error == "stream reset: CANCEL"
    assert flows["/slow"].response.body.read() == b"partial"
    assert flows["/refused"].error == "stream reset: REFUSED_STREAM"
    assert flows["/refused"].response is None
    assert flows["/ok"].state is FlowState.DONE and flows["/ok"].response.body.read() == b"fine"


def test_server_push_is_ignored_but_hpack_stays_in_step() -> None:
    p = H2Pair()
    sid = p.request("/index.html")
    p.flush()
    p.server.push_stream(sid, 2, [(":method", "GET"), (":scheme", "https"),
                                  (":authority", "api.test"), (":path", "/style.css"),
                                  ("x-pushed", "indexed value")])  # fmt: skip
    p.server.send_headers(2, [(":status", "200"), ("x-pushed", "indexed value")])
    p.server.send_data(2, b"body{}", end_stream=True)
    p.respond(sid, body=b"<html>", extra=[("x-pushed", "indexed value")])
    p.flush()
    sid2 = p.request("/next")
    p.flush()
    p.respond(sid2, body=b"next", extra=[("x-pushed", "indexed value"), ("x-new", "v")])
    p.flush()
    flows = decode(p.record).flows
    assert [f.request.path for f in flows] == ["/index.html", "/next"]
    assert flows[1].response.headers == [("x-pushed", "indexed value"), ("x-new", "v")]
    assert [f.response.body.read() for f in flows] == [b"<html>", b"next"]
    assert all(f.state is FlowState.DONE for f in flows)


@pytest.mark.parametrize(
    ("who", "size"), [("server", 65536), ("server", 0), ("client", 100), ("client", 16384)]
)
def test_hpack_table_size_change(who: str, size: int) -> None:
    p = H2Pair()
    big = [(f"x-header-{i}", "v" * 300) for i in range(20)]  # > 4096 bytes of table entries
    sid = p.request("/before", extra=big)
    p.flush()
    p.respond(sid, body=b"1", extra=big)
    p.flush()
    (p.server if who == "server" else p.client).update_settings(
        {SettingCodes.HEADER_TABLE_SIZE: size}
    )
    p.flush()
    for i in range(3):
        sid = p.request(f"/after{i}", extra=big)
        p.flush()
        p.respond(sid, body=b"2", extra=big)
        p.flush()
    flows = decode(p.record).flows
    assert [f.request.path for f in flows] == ["/before", "/after0", "/after1", "/after2"]
    for f in flows:
        assert f.error is None, f.error
        assert f.request.headers == big and f.response.headers == big


def test_garbage_frame_marks_open_flows() -> None:
    p = H2Pair()
    sid = p.request("/open")
    done = p.request("/done")
    p.flush()
    p.server.send_headers(sid, [(":status", "200")])
    p.respond(done, body=b"ok")
    p.flush()
    # A SETTINGS frame whose length is not a multiple of 6.
    record = [*p.record, ("s", b"\x00\x00\x05\x04\x00\x00\x00\x00\x00hello"), ("s", b"\x00" * 50)]
    c = decode(record)
    flows = {f.request.path: f for f in c.flows}
    assert flows["/open"].state is FlowState.ERROR
    assert "HTTP/2 decoding error" in flows["/open"].error
    assert flows["/done"].state is FlowState.DONE and flows["/done"].error is None
    assert c.kinds(flows["/open"]).count(EventKind.DONE) == 1


@pytest.mark.parametrize("answer", [b"HTTP/1.1 400 Bad Request\r\n\r\n",
                                    b"<!DOCTYPE HTML>\n<html>"], ids=["http1", "http09"])
def test_a_server_that_does_not_speak_http2_is_said_so(answer: bytes) -> None:
    p = H2Pair()
    p.request("/x")
    p.flush()
    (flow,) = decode([*[r for r in p.record if r[0] == "c"], ("s", answer)]).flows
    begins = answer.split(b"\r\n")[0]
    assert flow.state is FlowState.ERROR
    assert flow.error.startswith("HTTP/2 decoding error: the server's answer is not HTTP/2 "
                                 f"(it begins {begins!r}"), flow.error


def test_garbage_header_block_marks_error() -> None:
    p = H2Pair()
    p.request("/x")
    p.flush()
    # HEADERS (END_HEADERS) on stream 1 with an HPACK index far past the tables.
    record = [*p.record, ("s", b"\x00\x00\x01\x01\x04\x00\x00\x00\x01\xff")]
    (flow,) = decode(record).flows
    assert flow.state is FlowState.ERROR


def test_bad_preface_never_raises() -> None:
    c = decode([("c", b"GET / HTTP/1.1\r\n\r\n"), ("s", b"HTTP/1.1 200 OK\r\n\r\n")])
    assert c.flows == []


def test_connection_close_marks_unfinished() -> None:
    p = H2Pair()
    p.request("/never")
    p.flush()
    (flow,) = decode(p.record).flows
    assert flow.state is FlowState.ERROR and "closed" in flow.error


def test_a_server_closing_first_is_why_a_stream_ended() -> None:
    p = H2Pair()
    p.request("/never")
    p.flush()
    c = Collector()
    obs = Http2Observer(Connection(1, (LOCAL, 40000), (LOCAL, 8443)), c.bus, "https", 0)
    for tag, data in p.record:
        (obs.client_data if tag == "c" else obs.server_data)(data)
    obs.server_eof()
    obs.close("app reset the connection")
    (flow,) = c.flows
    assert flow.error == "the server closed the connection before responding"


# -- curl against a real h2 server ----------------------------------------------------------


class H2Server:
    """A one-thread-per-connection h2c server on 127.0.0.1 answering with the request path."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOCAL, 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        paths: dict[int, str] = {}
        with sock:
            while data := sock.recv(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        paths[ev.stream_id] = dict(ev.headers)[b":path"].decode()
                        bodies[ev.stream_id] = b""
                    elif isinstance(ev, h2.events.DataReceived):
                        bodies[ev.stream_id] += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        body = f"{paths[ev.stream_id]}:{len(bodies[ev.stream_id])}".encode()
                        conn.send_headers(ev.stream_id, [(":status", "200"),
                                                         ("content-length", str(len(body)))])  # fmt: skip
                        conn.send_data(ev.stream_id, body, end_stream=True)
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.accepter.join(2)
        for t in self.threads:
            t.join(2)


class RecordingRelay:
    """Relays one loopback TCP connection at a time to `target_port`, recording the chunks."""

    def __init__(self, target_port: int, tls: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server((LOCAL, 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.tls = tls  # terminate TLS from the client (records the plaintext)
        self.record: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
            if self.tls is not None:
                client = self.tls.wrap_socket(client, server_side=True)
        except OSError:
            return
        upstream = socket.create_connection((LOCAL, self.target_port))
        for src, dst, tag in ((client, upstream, "c"), (upstream, client, "s")):
            t = threading.Thread(target=self._pump, args=(src, dst, tag), daemon=True)
            self.threads.append(t)
            t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, tag: str) -> None:
        with src:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                with self.lock:
                    self.record.append((tag, data))
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.accepter.join(2)
        for t in self.threads:
            t.join(5)


@pytest.fixture
def h2_server() -> Iterator[H2Server]:
    server = H2Server()
    yield server
    server.close()


def test_curl_prior_knowledge(h2_server: H2Server) -> None:
    relay = RecordingRelay(h2_server.port)
    try:
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--http2-prior-knowledge",
             "--data-binary", "payload!", f"http://{LOCAL}:{relay.port}/pk"],
            capture_output=True, check=True,
        )  # fmt: skip
        assert out.stdout == b"/pk:8"
    finally:
        relay.close()
    (flow,) = decode(relay.record).flows
    assert flow.request.method == "POST" and flow.request.body.read() == b"payload!"
    assert flow.request.url == f"http://{LOCAL}:{relay.port}/pk"  # :scheme wins
    assert flow.response.body.read() == b"/pk:8" and flow.state is FlowState.DONE


def test_curl_h2_over_tls_parallel_streams(h2_server: H2Server, tmp_path) -> None:
    """curl negotiates h2 by ALPN with a tapui leaf certificate; three multiplexed streams."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    relay = RecordingRelay(h2_server.port, tls=ca.server_context(None, LOCAL, ["h2"]))
    base = f"https://{LOCAL}:{relay.port}"
    try:
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--cacert", str(ca.cert_path), "-Z",
             f"{base}/one", f"{base}/two", f"{base}/three"],
            capture_output=True, check=True,
        )  # fmt: skip
        assert sorted(out.stdout.split(b"/")[1:]) == [b"one:0", b"three:0", b"two:0"]
    finally:
        relay.close()
    c = decode(relay.record)
    flows = sorted(c.flows, key=lambda f: f.request.path)
    assert [f.request.path for f in flows] == ["/one", "/three", "/two"]
    for f in flows:
        assert f.request.url == f"{base}{f.request.path}"
        assert f.state is FlowState.DONE and f.error is None
        assert f.response.status == 200
        assert f.response.body.read() == f"{f.request.path}:0".encode()
    # The relay takes a single connection: curl multiplexed the three transfers over it.
    assert len({id(f.conn) for f in flows}) == 1
