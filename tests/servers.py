"""Real servers the tests start on the host's loopback (127.0.0.1 and ::1), in threads."""

from __future__ import annotations

import base64
import hashlib
import http.server
import random
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Deterministic random bytes both the stress client and the server slice their data from.
POOL_SEED = 20261122
POOL_SIZE = 13 * 1024 * 1024


def random_pool() -> bytes:
    return random.Random(POOL_SEED).randbytes(POOL_SIZE)


class _ThreadingServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


def _serve(server: socketserver.BaseServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    return thread


@contextmanager
def running(server: socketserver.TCPServer) -> Iterator[int]:
    """Serve until the block ends; yields the port."""
    thread = _serve(server)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class DigestHandler(socketserver.BaseRequestHandler):
    """The stress protocol: the client sends (n_up, n_down, offset) as 3 x u32, then n_up
    bytes; the server sends n_down bytes of the pool from `offset` while reading, then the
    SHA-256 of what it received. Both directions run at once."""

    pool: bytes = b""

    def handle(self) -> None:
        sock: socket.socket = self.request
        header = _recv_exact(sock, 12)
        if header is None:
            return
        n_up, n_down, offset = struct.unpack("!III", header)
        sender = threading.Thread(
            target=_send_all, args=(sock, memoryview(self.pool)[offset : offset + n_down])
        )
        sender.start()
        digest = hashlib.sha256()
        left = n_up
        while left:
            chunk = sock.recv(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        sender.join()
        sock.sendall(digest.digest())


class HalfCloseHandler(socketserver.BaseRequestHandler):
    """Reads until the client's FIN, then answers with SHA-256(received) + 2 MiB of pool."""

    pool: bytes = b""

    def handle(self) -> None:
        sock: socket.socket = self.request
        digest = hashlib.sha256()
        while chunk := sock.recv(1 << 20):
            digest.update(chunk)
        sock.sendall(digest.digest() + self.pool[: 2 * 1024 * 1024])


class SinkHandler(socketserver.BaseRequestHandler):
    """After a nap of 0.2 s (so bytes pile up on their way, in tapui too), reads until the
    client's FIN and records the SHA-256 and size of what came."""

    received: list[tuple[str, int]]

    def handle(self) -> None:
        sock: socket.socket = self.request
        time.sleep(0.2)
        digest, size = hashlib.sha256(), 0
        while chunk := sock.recv(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        self.received.append((digest.hexdigest(), size))


def sink_server(received: list[tuple[str, int]]) -> _ThreadingServer:
    return _ThreadingServer(("127.0.0.1", 0), type("Handler", (SinkHandler,), {"received": received}))


class HoldOpenHandler(socketserver.BaseRequestHandler):
    """Reads until the client's FIN, then keeps its own side open until the test ends."""

    release: threading.Event

    def handle(self) -> None:
        sock: socket.socket = self.request
        while sock.recv(1 << 16):
            pass
        self.release.wait(30)


class EchoHandler(socketserver.BaseRequestHandler):
    """Sends back whatever arrives, as it arrives, until the client's FIN."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(1 << 16):
            sock.sendall(data)


class ConnectProxyHandler(socketserver.BaseRequestHandler):
    """A forward proxy for CONNECT only: it records the target and joins the client to the
    target's port on 127.0.0.1 (whatever host was named: tests never leave the loopback)."""

    def handle(self) -> None:
        client: socket.socket = self.request
        head = b""
        while b"\r\n\r\n" not in head:
            data = client.recv(4096)
            if not data:
                return
            head += data
        target = head.split()[1].decode()
        self.server.targets.append(target)  # type: ignore[attr-defined]
        upstream = socket.create_connection(("127.0.0.1", int(target.rsplit(":", 1)[1])))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        _join(client, upstream)


def _join(client: socket.socket, upstream: socket.socket) -> None:
    """Pipe bytes both ways until both sides are done (a proxy's tunnel), then close."""

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    other = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
    other.start()
    pipe(client, upstream)
    other.join(10)
    upstream.close()


class SocksProxyHandler(socketserver.BaseRequestHandler):
    """A SOCKS proxy (4, 4a, 5 with no login or a username and password) for CONNECT only: it
    records (target, login) and joins the client to the target's port on 127.0.0.1 (whatever
    host was named: tests never leave the loopback)."""

    def handle(self) -> None:
        client: socket.socket = self.request
        first = _recv_exact(client, 2)
        if first is None:
            return
        login = None
        if first[0] == 4:
            rest = _recv_exact(client, 6) or bytes(6)  # port, address
            _recv_until_nul(client)  # the user id
            port = int.from_bytes(rest[:2], "big")
            if rest[2:5] == b"\0\0\0" and rest[5] != 0:  # SOCKS4a: a name follows
                host = _recv_until_nul(client).decode()
            else:
                host = socket.inet_ntoa(rest[2:6])
            reply = b"\0\x5a" + rest
        else:
            methods = _recv_exact(client, first[1]) or b""
            if 2 in methods:
                client.sendall(b"\x05\x02")
                head = _recv_exact(client, 2) or b"\1\0"
                user = _recv_exact(client, head[1]) or b""
                size = _recv_exact(client, 1) or b"\0"
                password = _recv_exact(client, size[0]) or b""
                login = f"{user.decode()}:{password.decode()}"
                client.sendall(b"\x01\x00")
            else:
                client.sendall(b"\x05\x00")
            head = _recv_exact(client, 4) or b"\0\0\0\0"
            if head[3] == 3:
                size = _recv_exact(client, 1) or b"\0"
                host = (_recv_exact(client, size[0]) or b"").decode()
            else:
                raw = _recv_exact(client, 4 if head[3] == 1 else 16) or b""
                host = socket.inet_ntop(socket.AF_INET if head[3] == 1 else socket.AF_INET6, raw)
            port = int.from_bytes(_recv_exact(client, 2) or b"\0\0", "big")
            reply = b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big")
        self.server.targets.append((f"{host}:{port}", login))  # type: ignore[attr-defined]
        upstream = socket.create_connection(("127.0.0.1", port))
        client.sendall(reply)
        _join(client, upstream)


def socks_proxy() -> _ThreadingServer:
    server = _ThreadingServer(("127.0.0.1", 0), SocksProxyHandler)
    server.targets = []  # type: ignore[attr-defined]
    return server


def connect_proxy() -> _ThreadingServer:
    server = _ThreadingServer(("127.0.0.1", 0), ConnectProxyHandler)
    server.targets = []  # type: ignore[attr-defined]
    return server


def echo_server() -> _ThreadingServer:
    return _ThreadingServer(("127.0.0.1", 0), EchoHandler)


def hold_open_server(release: threading.Event) -> _ThreadingServer:
    return _ThreadingServer(
        ("127.0.0.1", 0), type("Handler", (HoldOpenHandler,), {"release": release})
    )


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _recv_until_nul(sock: socket.socket) -> bytes:
    buf = b""
    while (byte := sock.recv(1)) not in (b"", b"\0"):
        buf += byte
    return buf


def _send_all(sock: socket.socket, data: memoryview) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def digest_server(pool: bytes, family: int = socket.AF_INET, port: int = 0) -> _ThreadingServer:
    handler = type("Handler", (DigestHandler,), {"pool": pool})
    if family == socket.AF_INET6:
        return _ThreadingServer6(("::1", port), handler)
    return _ThreadingServer(("127.0.0.1", port), handler)


def half_close_server(pool: bytes) -> _ThreadingServer:
    return _ThreadingServer(("127.0.0.1", 0), type("Handler", (HalfCloseHandler,), {"pool": pool}))


class RecordingHTTPHandler(http.server.BaseHTTPRequestHandler):
    """GET /hello -> text; GET /bytes/N -> N bytes of pool; POST/PUT echo their body's digest.
    Every request is recorded on the server (method, path, headers, body)."""

    protocol_version = "HTTP/1.1"
    pool: bytes = b""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _record(self, body: bytes) -> None:
        self.server.requests.append(  # type: ignore[attr-defined]
            {
                "method": self.command,
                "path": self.path,
                "headers": list(self.headers.items()),
                "body": body,
                "client": self.client_address,
            }
        )

    def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._record(b"")
        if self.path.startswith("/bytes/"):
            n = int(self.path.rsplit("/", 1)[1])
            self._reply(200, self.pool[:n], "application/octet-stream")
        elif self.path.startswith("/json"):
            self._reply(200, b'{"hello": "world", "n": [1, 2, 3]}', "application/json")
        else:
            self._reply(200, b"hello from the host\n")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self._record(body)
        if self.path.startswith("/grpc-web/"):
            self._reply(200, *grpc_web_answer(self.path.rsplit("/", 1)[1]))
            return
        self._reply(200, hashlib.sha256(body).hexdigest().encode())

    do_PUT = do_POST


def grpc_web_answer(name: str) -> tuple[bytes, str]:
    """A gRPC-Web response body: a message, then the trailers as the body's last frame
    (flag 0x80); `name` "fail" ends the RPC with NOT_FOUND, "text" answers in base64."""
    message = b"\x0a\x02hi"
    if name == "fail":
        trailers = b"grpc-status: 5\r\ngrpc-message: no%20such%20user\r\n"
    else:
        trailers = b"grpc-status: 0\r\n"
    body = (b"\x00" + len(message).to_bytes(4, "big") + message
            + b"\x80" + len(trailers).to_bytes(4, "big") + trailers)
    if name == "text":
        return base64.b64encode(body), "application/grpc-web-text"
    return body, "application/grpc-web+proto"


def http_server(
    pool: bytes = b"", family: int = socket.AF_INET, port: int = 0
) -> _ThreadingServer:
    handler = type("Handler", (RecordingHTTPHandler,), {"pool": pool})
    cls = _ThreadingServer6 if family == socket.AF_INET6 else _ThreadingServer
    server = cls(("::1" if family == socket.AF_INET6 else "127.0.0.1", port), handler)
    server.requests = []  # type: ignore[attr-defined]
    return server


class UdpEcho(threading.Thread):
    """Answers each datagram with b"echo:" + datagram, on 127.0.0.1."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind(("127.0.0.1", port))
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sock.sendto(b"echo:" + data, addr)

    def stop(self) -> None:
        self.stopped.set()
        self.join(2)
        self.sock.close()


def free_port(family: int = socket.AF_INET) -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]
