"""HTTPS test servers on the host's loopback: HTTP/1.1 (http.server over TLS) and HTTP/2 (h2),
with certificates for host.tapui.internal from a trustme CA."""

from __future__ import annotations

import gzip
import hashlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import brotli
import h2.config
import h2.connection
import h2.events
import trustme
import zstandard

from tests import servers

NAMES = ["host.tapui.internal", "api.example.test", "localhost", "127.0.0.1", "::1"]

ENCODED_BODY = b'{"message": "decoded by tapui", "items": [1, 2, 3]}' * 20


def encoded(encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(ENCODED_BODY)
    if encoding == "br":
        return brotli.compress(ENCODED_BODY)
    if encoding == "zstd":
        return zstandard.ZstdCompressor().compress(ENCODED_BODY)
    if encoding == "gzip, br":
        return brotli.compress(gzip.compress(ENCODED_BODY))
    raise ValueError(encoding)


class TLSRecordingHandler(servers.RecordingHTTPHandler):
    """The recording handler, plus /encoded/<encoding> and /chunked/<n> (n chunks)."""

    def do_GET(self) -> None:
        if self.path.startswith("/encoded/"):
            self._record(b"")
            encoding = ", ".join(self.path.split("/", 2)[2].split(","))
            body = encoded(encoding)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/chunked/"):
            self._record(b"")
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            gate = getattr(self.server, "chunk_gate", None)
            for i in range(n):
                chunk = f"chunk {i}\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                if i == 0 and gate is not None:
                    gate.wait(30)  # the test lets the rest go once it saw the first chunk
            self.wfile.write(b"0\r\n\r\n")
        else:
            super().do_GET()


class _TLSServer(servers._ThreadingServer):
    context: ssl.SSLContext

    def get_request(self):  # type: ignore[no-untyped-def]
        sock, addr = super().get_request()
        return self.context.wrap_socket(sock, server_side=True), addr


def server_context(ca: trustme.CA, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*NAMES).configure_cert(ctx)
    ctx.set_alpn_protocols(alpn)
    return ctx


def https_server(ca: trustme.CA, pool: bytes) -> _TLSServer:
    handler = type("Handler", (TLSRecordingHandler,), {"pool": pool})
    server = _TLSServer(("127.0.0.1", 0), handler)
    server.context = server_context(ca, ["http/1.1"])
    server.requests = []  # type: ignore[attr-defined]
    return server


class H2Server(threading.Thread):
    """A small HTTP/2 server (ALPN h2): GET /hello, GET /bytes/N, POST echoes the body's digest,
    GET /trailers answers with trailers (as gRPC does), GET /late-trailers sends them 0.1 s
    after the body. With tls=False it speaks h2c: with prior knowledge, or after an HTTP/1.1
    Upgrade: h2c (the request answered on stream 1). With TLS or prior knowledge it sends its
    SETTINGS as soon as it accepts, before it reads anything, as h2 servers do."""

    def __init__(self, ca: trustme.CA, pool: bytes, tls: bool = True) -> None:
        super().__init__(daemon=True)
        self.context = server_context(ca, ["h2"]) if tls else None
        self.pool = pool
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.requests: list[dict] = []
        self.threads: list[threading.Thread] = []

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, raw: socket.socket) -> None:
        try:
            sock = raw if self.context is None else self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        streams: dict[int, dict] = {}
        upgrade = self.context is None and raw.recv(4, socket.MSG_PEEK) != b"PRI "
        if upgrade:  # an HTTP/1.1 request asking for h2c
            head = b""
            while b"\r\n\r\n" not in head:
                head += raw.recv(65536)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ")
            fields = {k.strip().lower(): v.strip() for k, _, v in
                      (line.partition(":") for line in lines[1:] if line)}
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: h2c\r\n\r\n")
            conn.initiate_upgrade_connection(fields["http2-settings"].encode())
            self._respond(conn, sock, 1, {"headers": {b":path": path.encode(),
                                                      b":method": method.encode()}, "body": b""})
        else:
            conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        sock.settimeout(0.5)
        try:
            while not self.stopped.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        streams[event.stream_id] = {"headers": dict(event.headers), "body": b""}
                    elif isinstance(event, h2.events.DataReceived):
                        streams[event.stream_id]["body"] += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        self._respond(conn, sock, event.stream_id, streams.pop(event.stream_id))
                sock.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            sock.close()

    def _respond(self, conn: h2.connection.H2Connection, sock: ssl.SSLSocket, stream: int,
                 request: dict) -> None:
        headers = {k.decode(): v.decode() for k, v in request["headers"].items()}
        self.requests.append({"headers": headers, "body": request["body"]})
        path, method = headers[":path"], headers[":method"]
        trailers = None
        if method == "POST":
            body = hashlib.sha256(request["body"]).hexdigest().encode()
        elif path.startswith("/bytes/"):
            body = self.pool[: int(path.rsplit("/", 1)[1])]
        elif path in ("/trailers", "/late-trailers"):
            body = b"\x00\x00\x00\x00\x02hi"
            trailers = [("grpc-status", "0"), ("grpc-message", "ok")]
        else:
            body = b"hello over h2\n"
        conn.send_headers(stream, [(":status", "200"), ("content-length", str(len(body))),
                                   ("content-type", "text/plain")])
        view = memoryview(body)
        while view:
            window = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size)
            if window <= 0:
                sock.sendall(conn.data_to_send())
                data = sock.recv(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            conn.send_data(stream, view[:window].tobytes())
            view = view[window:]
            sock.sendall(conn.data_to_send())
        if trailers is not None:
            if path == "/late-trailers":
                time.sleep(0.1)  # a client that stops at Content-Length has gone by then
            conn.send_headers(stream, trailers, end_stream=True)
        else:
            conn.end_stream(stream)

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        self.join(5)
        for thread in self.threads:
            thread.join(5)


@contextmanager
def running_h2(ca: trustme.CA, pool: bytes, tls: bool = True) -> Iterator[H2Server]:
    server = H2Server(ca, pool, tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
