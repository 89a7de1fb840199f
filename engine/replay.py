"""Replay: send a recorded request again, from tapui (the host's side), to the server the
original went to, and record the new exchange as a flow of its own.

The request goes to the address tapui dialled for the original (so the host alias and
`--add-host` keep their meaning), over TLS verified as the relay verifies (`--insecure`,
`--upstream-ca`), in the original's HTTP version: HTTP/2 flows as HTTP/2 (with `h2`),
others as HTTP/1.1. Both directions' bytes go through the same decoders as live traffic.
Blocking: run it in a worker thread.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from engine import tls
from engine.addresses import HOST_ALIAS
from engine.curl import sendable_headers
from engine.flow import (
    DEFAULT_BODY_CAP,
    Body,
    Connection,
    EventKind,
    Flow,
    FlowBus,
    FlowEvent,
    FlowKind,
    Request,
    Timings,
    next_connection_id,
)
from engine.http1 import Http1Observer
from engine.http2 import Http2Observer

#: Seconds a replay waits to connect, and then for each read of the answer.
TIMEOUT = 30.0
_READ = 256 * 1024


class ReplayError(Exception):
    """Why a flow cannot be replayed, in words for the user."""


@dataclass
class ReplayOptions:
    insecure: bool = False
    upstream_ca: list[str] = field(default_factory=list)
    body_cap: int = DEFAULT_BODY_CAP


class Replayer:
    def __init__(self, bus: FlowBus, options: ReplayOptions) -> None:
        self.bus = bus
        self.options = options
        self._context: tls.ResumingContext | None = None
        self._sockets: set[socket.socket] = set()  # of replays under way
        self._lock = threading.Lock()
        self._stopped = False

    def stop(self) -> None:
        """End the replays under way at once (tapui is quitting: their threads must not keep
        it waiting on a slow server); later ones fail."""
        with self._lock:
            self._stopped = True
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def check(self, flow: Flow) -> None:
        """Raises ReplayError when `flow` cannot be replayed (before any work is started)."""
        _replayable(flow)

    def replay(self, flow: Flow, edited: Request | None = None) -> Flow:
        """Send `flow`'s request again (or `edited`, a changed copy, to the same server);
        returns the new flow (finished: done or with an error). Raises ReplayError when the
        flow cannot be replayed at all."""
        request, body = _replayable(flow, edited)
        original = flow.conn
        http2 = request.http_version.upper().startswith("HTTP/2")
        https = request.scheme == "https"
        conn = Connection(
            id=next_connection_id(), client=("", 0), server=original.server,
            upstream=original.upstream or _url_address(request), hostname=original.hostname,
            tunnel=original.tunnel,
            sni=(original.sni or request.host) if https else None,
            pid=os.getpid(), timings=Timings(),
            command=f"replay of #{flow.id}" + (", edited" if edited else ""),
        )
        try:
            sock = self._connect(conn, https, http2)
        except (OSError, ssl.SSLError, ssl.CertificateError) as exc:
            return self._failed(conn, request, body, exc)
        observer: Http1Observer | Http2Observer
        if conn.alpn == "h2" or (http2 and not https):
            observer = Http2Observer(conn, self.bus, request.scheme, self.options.body_cap,
                                     conn.timings)
            exchange = _exchange_h2
        else:
            observer = Http1Observer(conn, self.bus, request.scheme, self.options.body_cap,
                                     conn.timings)
            exchange = _exchange_h1
        made: list[Flow] = []

        def new_flows(event: FlowEvent) -> None:
            if event.kind is EventKind.NEW and event.flow.conn is conn:
                made.append(event.flow)

        error = None
        self.bus.subscribe(new_flows)
        try:
            try:
                exchange(sock, request, body, observer)
            except (OSError, ssl.SSLError, h2.exceptions.ProtocolError) as exc:
                error = f"replay: {_reason(exc)}"
            finally:
                self._forget(sock)
            observer.close(error)
        finally:
            self.bus.unsubscribe(new_flows)
        if not made:  # the decoder made no flow of it (it could not read the request)
            return self._failed(conn, request, body, error or "the request was not decoded")
        return made[0]

    def _connect(self, conn: Connection, https: bool, http2: bool) -> socket.socket:
        assert conn.upstream is not None
        if self._stopped:
            raise ConnectionAbortedError(errno.ECONNABORTED, "tapui is quitting")
        sock = socket.create_connection(conn.upstream, timeout=TIMEOUT)
        with self._lock:
            if self._stopped:  # (stopped while it connected)
                sock.close()
                raise ConnectionAbortedError(errno.ECONNABORTED, "tapui is quitting")
            self._sockets.add(sock)
        conn.client = sock.getsockname()[:2]
        if conn.tunnel is not None:  # (the original went through a proxy's tunnel)
            kind, far_end = conn.tunnel
            try:
                (_open_socks5 if kind == "socks" else _open_tunnel)(sock, far_end)
            except BaseException:
                self._forget(sock)
                raise
        conn.timings.connect = time.time()
        if not https:
            return sock
        try:
            with self._lock:  # (replays may run at once: the ALPN list is the context's)
                if self._context is None:
                    self._context = tls.new_upstream_context(self.options.insecure,
                                                             self.options.upstream_ca)
                self._context.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
                tls_sock = self._context.wrap_socket(  # (the list is copied in here)
                    sock, server_hostname=conn.sni, do_handshake_on_connect=False)
                self._sockets.discard(sock)  # (the SSLSocket took over its fd)
                self._sockets.add(tls_sock)
        except BaseException:
            self._forget(sock)
            raise
        try:
            tls_sock.do_handshake()
        except BaseException:
            self._forget(tls_sock)
            raise
        conn.timings.tls = time.time()
        conn.alpn = tls_sock.selected_alpn_protocol()
        conn.tls_version = tls_sock.version()
        der = tls_sock.getpeercert(binary_form=True)
        if der:
            conn.certificate = tls.cert_info(der)
        return tls_sock

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        sock.close()

    def _failed(self, conn: Connection, request: Request, body: bytes,
                reason: BaseException | str) -> Flow:
        flow = Flow(conn=conn, timings=conn.timings.copy())
        flow.request = Request(request.method, request.scheme, request.authority, request.path,
                               request.http_version, list(request.headers), Body.of(body))
        self.bus.new(flow)
        reason = reason if isinstance(reason, str) else _reason(reason)
        self.bus.done(flow, error=f"replay: {reason}")
        return flow


def _replayable(flow: Flow, edited: Request | None = None) -> tuple[Request, bytes]:
    request = flow.request
    if request is None or flow.kind is not FlowKind.HTTP:
        raise ReplayError(f"Flow #{flow.id} has no HTTP request to replay.")
    if flow.conn.inbound:
        raise ReplayError(f"Flow #{flow.id} came in from the host (a published port): "
                          "replay sends only what the command sent.")
    if request.method.upper() == "CONNECT":
        raise ReplayError(f"Flow #{flow.id} is a CONNECT tunnel: it cannot be replayed.")
    request = edited or request
    if request.body.truncated:
        raise ReplayError(f"Flow #{flow.id}'s request body was kept only in part "
                          f"({request.body.kept:,} of {request.body.size:,} bytes).")
    return request, request.body.read() if request.body.kept else b""


def _url_address(request: Request) -> tuple[str, int]:
    """Where to send a request whose flow does not say which address was dialled (one read
    from another tool's HAR file): its URL's host and port, the host alias being the host's
    loopback, as inside the sandbox."""
    url = urlsplit(request.url)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:  # (not a port number: the scheme's)
        port = 443 if url.scheme == "https" else 80
    host = url.hostname or request.host
    return ("127.0.0.1" if host == HOST_ALIAS else host), port


def _open_tunnel(sock: socket.socket, target: str) -> None:
    """Ask the proxy at the other end of `sock` for a tunnel to `target`, as the original's
    client did (without its proxy credentials: a proxy that wants them answers 407)."""
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode("latin-1"))
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # a byte at a time: what follows is the far end's
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError("the proxy closed the connection instead of opening a tunnel")
        head += byte
        if len(head) > 65536:
            raise ConnectionError("the proxy's answer to CONNECT does not end")
    status = head[: head.find(b"\r\n")].decode("latin-1")
    parts = status.split(" ", 2)
    if len(parts) < 2 or not parts[1].startswith("2"):
        raise ConnectionError(f"the proxy did not open a tunnel to {target}: {status}")


def _open_socks5(sock: socket.socket, target: str) -> None:
    """The same through a SOCKS proxy, in SOCKS5 by name and without a login (whatever the
    original's version: SOCKS4 servers are rare and most speak 5 too)."""
    host, _, port = target.rpartition(":")
    name = host.strip("[]").encode("idna")
    sock.sendall(b"\x05\x01\x00")  # version 5, one method: no login
    if _recv_exact(sock, 2) != b"\x05\x00":
        raise ConnectionError("the SOCKS proxy wants a login (replay has none to give)")
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + int(port).to_bytes(2, "big"))
    reply = _recv_exact(sock, 4)
    if reply[1] != 0:
        raise ConnectionError(f"the SOCKS proxy did not open a tunnel to {target} "
                              f"(reply code {reply[1]})")
    size = {1: 4, 4: 16}.get(reply[3]) or _recv_exact(sock, 1)[0]
    _recv_exact(sock, size + 2)  # the proxy's bound address and port


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the proxy closed the connection instead of opening a tunnel")
        data += chunk
    return data


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the server's certificate failed verification: {exc.verify_message}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT:.0f} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _headers(request: Request) -> list[tuple[str, str]]:
    """The recorded headers a replay sends as they are (the body goes at once, so no Expect:
    100-continue either)."""
    return [(name, value) for name, value in sendable_headers(request)
            if name.lower() != "expect"]


def _exchange_h1(sock: socket.socket, request: Request, body: bytes,
                 observer: Http1Observer) -> None:
    headers = _headers(request)
    if not any(name.lower() == "host" for name, _ in headers):
        headers.insert(0, ("Host", request.authority))
    if body or request.method.upper() in ("POST", "PUT", "PATCH"):
        headers.append(("Content-Length", str(len(body))))
    headers.append(("Connection", "close"))
    version = "HTTP/1.0" if request.http_version.upper() == "HTTP/1.0" else "HTTP/1.1"
    head = f"{request.method} {request.path} {version}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    data = head.encode("utf-8", "surrogateescape") + body
    sock.sendall(data)
    observer.client_data(data)
    observer.client_eof()
    while observer.answers_pending():
        chunk = sock.recv(_READ)
        if not chunk:
            observer.server_eof()
            return
        observer.server_data(chunk)


def _exchange_h2(sock: socket.socket, request: Request, body: bytes,
                 observer: Http2Observer) -> None:
    h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2conn.initiate_connection()
    stream = h2conn.get_next_available_stream_id()
    headers = [(":method", request.method), (":scheme", request.scheme),
               (":authority", request.authority), (":path", request.path)]
    headers += [(name.lower(), value) for name, value in _headers(request)
                if name.lower() != "host"]
    if any(name.lower() == "te" and value.strip().lower() == "trailers"
           for name, value in request.headers):
        headers.append(("te", "trailers"))  # (the one TE HTTP/2 allows; gRPC servers want it)
    h2conn.send_headers(stream, headers, end_stream=not body)

    def flush() -> None:
        out = h2conn.data_to_send()
        if out:
            sock.sendall(out)
            observer.client_data(out)

    def read() -> bool:
        """One read of the server's bytes; False once the stream or connection ended."""
        chunk = sock.recv(_READ)
        if not chunk:
            observer.server_eof()
            return False
        observer.server_data(chunk)
        going = True
        for event in h2conn.receive_data(chunk):
            if isinstance(event, h2.events.DataReceived):
                h2conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                going = going and event.stream_id != stream
            elif isinstance(event, h2.events.ConnectionTerminated):
                going = False
        flush()
        return going

    sent = 0
    while sent < len(body):  # as the server's flow-control windows allow
        room = min(h2conn.local_flow_control_window(stream), h2conn.max_outbound_frame_size)
        if room <= 0:
            flush()
            if not read():
                return
            continue
        piece = body[sent : sent + room]
        sent += len(piece)
        h2conn.send_data(stream, piece, end_stream=sent == len(body))
    flush()
    while read():
        pass
