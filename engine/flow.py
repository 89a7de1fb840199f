"""The flow model: one record per HTTP exchange or raw connection, read by the UI and exports.

A flow is created by the engine when a connection or request starts and is updated in place as
it progresses; every change is announced as a `FlowEvent` on a `FlowBus`. Readers (UI, JSON
lines, HAR) treat flows as read-only.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO

#: Body bytes kept in memory before a body spills to a temporary file.
MEMORY_THRESHOLD = 256 * 1024
#: Body bytes kept at most per body (the full size is still counted). 0 means no cap.
DEFAULT_BODY_CAP = 64 * 1024 * 1024


class FlowKind(StrEnum):
    HTTP = "http"
    WEBSOCKET = "websocket"
    TCP = "tcp"
    UDP = "udp"
    DNS = "dns"


class FlowState(StrEnum):
    OPEN = "open"  # connection or request started
    REQUEST = "request"  # request headers seen
    RESPONSE = "response"  # response headers seen, body may be streaming
    DONE = "done"
    ERROR = "error"


class Body:
    """Raw body bytes: in memory up to a threshold, then in an anonymous temporary file.

    `cap` bytes are kept at most; `size` counts every byte seen, so `truncated` tells whether
    the kept bytes are the whole body.
    """

    __slots__ = ("size", "cap", "_buf", "_file", "_lock")

    def __init__(self, cap: int = DEFAULT_BODY_CAP) -> None:
        self.size = 0
        self.cap = cap
        self._buf = bytearray()
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()

    @classmethod
    def of(cls, data: bytes) -> Body:
        body = cls(cap=0)
        body.append(data)
        return body

    @property
    def kept(self) -> int:
        return self.size if not self.cap else min(self.size, self.cap)

    @property
    def truncated(self) -> bool:
        return self.kept < self.size

    def append(self, data: bytes) -> None:
        with self._lock:
            room = len(data) if not self.cap else max(0, self.cap - self.size)
            chunk = data[:room] if room < len(data) else data
            self.size += len(data)
            if not chunk:
                return
            if self._file is None and len(self._buf) + len(chunk) <= MEMORY_THRESHOLD:
                self._buf += chunk
                return
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="tapui-body-")
                self._file.write(self._buf)
                self._buf = bytearray()
            self._file.seek(0, os.SEEK_END)
            self._file.write(chunk)

    def read(self, limit: int | None = None, offset: int = 0) -> bytes:
        """The kept bytes from `offset`, at most `limit` of them."""
        with self._lock:
            if self._file is None:
                end = None if limit is None else offset + limit
                return bytes(self._buf[offset:end])
            self._file.seek(offset)
            return self._file.read(-1 if limit is None else limit)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._buf = bytearray()

    def __len__(self) -> int:
        return self.size


Headers = list[tuple[str, str]]


def header(headers: Headers, name: str, default: str | None = None) -> str | None:
    """First value of header `name` (case-insensitive)."""
    name = name.lower()
    for key, value in headers:
        if key.lower() == name:
            return value
    return default


@dataclass
class Request:
    method: str
    scheme: str  # "http" or "https"
    authority: str  # Host header or :authority, e.g. "example.test:8443"
    path: str  # request target, e.g. "/a?b=1"
    http_version: str  # "HTTP/1.1", "HTTP/2"
    headers: Headers = field(default_factory=list)
    body: Body = field(default_factory=Body)
    trailers: Headers = field(default_factory=list)

    @property
    def host(self) -> str:
        """The authority without its port."""
        auth = self.authority
        if auth.startswith("["):
            return auth[1 : auth.index("]")]
        return auth.rsplit(":", 1)[0] if auth.count(":") == 1 else auth

    @property
    def url(self) -> str:
        if self.path.startswith(("http://", "https://")):
            return self.path  # absolute-form (proxy style) target
        if self.method == "CONNECT" and self.path and not self.path.startswith("/"):
            return f"{self.scheme}://{self.path}"  # authority-form: the tunnel's far end
        return f"{self.scheme}://{self.authority}{self.path}"


@dataclass
class Response:
    status: int
    reason: str
    http_version: str
    headers: Headers = field(default_factory=list)
    body: Body = field(default_factory=Body)
    trailers: Headers = field(default_factory=list)


@dataclass
class WebSocketMessage:
    from_client: bool
    opcode: int  # 1 text, 2 binary, 8 close, 9 ping, 10 pong
    content: bytes
    timestamp: float


@dataclass
class Timings:
    """Wall-clock timestamps (time.time()) of each phase; None when the phase did not happen."""

    start: float = field(default_factory=time.time)
    dns: float | None = None  # DNS answer for this host, when tapui answered it
    connect: float | None = None  # upstream TCP connected
    tls: float | None = None  # upstream TLS handshake done
    request_sent: float | None = None  # request fully sent by the client
    first_byte: float | None = None  # first response byte from the server
    done: float | None = None

    def copy(self) -> Timings:
        return Timings(
            self.start, self.dns, self.connect, self.tls, self.request_sent, self.first_byte,
            self.done,
        )


@dataclass
class Certificate:
    subject: str
    issuer: str
    not_before: str
    not_after: str
    sans: list[str] = field(default_factory=list)


@dataclass
class Connection:
    """What the flow's TCP (or UDP) connection looked like."""

    id: int
    client: tuple[str, int]  # address inside the sandbox
    server: tuple[str, int]  # destination the app dialled (inside the sandbox's view)
    upstream: tuple[str, int] | None = None  # address tapui dialled from the host
    hostname: str | None = None  # name the app resolved through tapui's DNS, if known
    sni: str | None = None
    alpn: str | None = None
    tls_version: str | None = None
    certificate: Certificate | None = None  # upstream's leaf certificate
    pid: int | None = None
    command: str | None = None
    transport: str = "tcp"
    #: Made from the host to a published port: the client is on the host, the server (the
    #: command's) in the sandbox.
    inbound: bool = False
    #: Through a proxy's tunnel: ("connect" or "socks", the far end "host:port" asked for);
    #: `server` and `upstream` are then the proxy's.
    tunnel: tuple[str, str] | None = None
    #: Connection-level phases (start, dns, connect, tls); the first flow on it copies them.
    timings: Timings = field(default_factory=Timings)


@dataclass
class ConnectionSummary:
    """A finished connection: what the headless output prints one line for."""

    info: Connection
    start: float
    end: float
    sent: int  # bytes from the app (as on the wire, TLS included)
    received: int
    error: str | None = None


_flow_ids = itertools.count(1)
_conn_ids = itertools.count(1)


def next_connection_id() -> int:
    return next(_conn_ids)


def _next_flow_id() -> int:
    return next(_flow_ids)


def continue_flow_ids_after(last: int) -> None:
    """Number new flows from `last` + 1: flows added to a saved session (replays in `tapui
    open`) then have the ids its rows get, as a live session's do. (For the one session a
    process browses: flows numbered before are not looked at again.)"""
    global _flow_ids
    _flow_ids = itertools.count(last + 1)


@dataclass
class Flow:
    conn: Connection
    kind: FlowKind = FlowKind.HTTP
    id: int = field(default_factory=_next_flow_id)
    state: FlowState = FlowState.OPEN
    request: Request | None = None
    response: Response | None = None
    timings: Timings = field(default_factory=Timings)
    error: str | None = None
    websocket_messages: list[WebSocketMessage] = field(default_factory=list)
    bytes_sent: int = 0  # raw bytes client -> server (raw TCP/UDP flows)
    bytes_received: int = 0  # raw bytes server -> client

    @property
    def finished(self) -> bool:
        return self.state in (FlowState.DONE, FlowState.ERROR)

    @property
    def host(self) -> str:
        if self.request is not None:
            return self.request.host
        return self.conn.sni or self.conn.hostname or self.conn.server[0]

    @property
    def duration(self) -> float | None:
        if self.timings.done is None:
            return None
        return self.timings.done - self.timings.start


def cut_short(flow: Flow, of_request: bool = False) -> tuple[int, int] | None:
    """(bytes that came, bytes its Content-Length promised) when a finished flow's response
    body (or request body) ended short of its length: a side gave up or the connection broke
    midway. None when the body is whole, has no length, or has none by definition (HEAD, 1xx,
    204, 304)."""
    request, response = flow.request, flow.response
    message = request if of_request else response
    if message is None or request is None or not flow.finished:
        return None
    if not of_request and (
        request.method == "HEAD" or response.status in (204, 304) or response.status < 200  # type: ignore[union-attr]
    ):
        return None
    try:
        promised = int(header(message.headers, "content-length") or "")
    except ValueError:
        return None
    came = message.body.size
    return (came, promised) if came < promised else None


class EventKind(StrEnum):
    NEW = "new"
    UPDATE = "update"  # headers arrived, body progress, messages
    DONE = "done"  # finished, successfully or with flow.error set


@dataclass(frozen=True, slots=True)
class FlowEvent:
    kind: EventKind
    flow: Flow


FlowListener = Callable[[FlowEvent], None]


class FlowBus:
    """Fan-out of flow events to listeners. Thread-safe; listeners must not block."""

    def __init__(self) -> None:
        # A tuple, replaced whole on (un)subscribe: emitting reads it without the lock.
        self._listeners: tuple[FlowListener, ...] = ()
        self._lock = threading.Lock()

    @property
    def listeners(self) -> tuple[FlowListener, ...]:
        return self._listeners

    def subscribe(self, listener: FlowListener) -> None:
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def unsubscribe(self, listener: FlowListener) -> None:
        with self._lock:
            listeners = list(self._listeners)
            listeners.remove(listener)
            self._listeners = tuple(listeners)

    def emit(self, kind: EventKind, flow: Flow) -> None:
        event = FlowEvent(kind, flow)
        for listener in self._listeners:
            listener(event)

    def new(self, flow: Flow) -> None:
        self.emit(EventKind.NEW, flow)

    def update(self, flow: Flow) -> None:
        self.emit(EventKind.UPDATE, flow)

    def done(self, flow: Flow, error: str | None = None) -> None:
        if error is not None:
            flow.error = error
        response = flow.response
        if response is not None and not response.trailers and response.body.size:
            from engine.grpc import web_trailers  # (engine.grpc imports this module)

            response.trailers = web_trailers(response)  # gRPC-Web's, from the body's end
        flow.state = FlowState.ERROR if flow.error else FlowState.DONE
        if flow.timings.done is None:
            flow.timings.done = time.time()
        self.emit(EventKind.DONE, flow)
