"""Passive HTTP/1.x decoding of a relayed connection, with h11.

Two h11 connections mirror the conversation: `_req` plays the server and reads the client's
bytes, `_resp` plays the client and reads the server's bytes. `_resp` is told each request
(method, Host, Connection, Upgrade) so it frames responses as the real client does (HEAD, 1xx,
CONNECT, Upgrade, keep-alive). `_req` is told a stand-in response as soon as a request ends so
it can parse pipelined requests ahead; only upgrade requests wait for the real answer.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

import h11
from h11 import _readers as h11_readers

from engine.flow import (
    DEFAULT_BODY_CAP,
    Body,
    Connection,
    Flow,
    FlowBus,
    FlowKind,
    FlowState,
    Headers,
    Request,
    Response,
    Timings,
    WebSocketMessage,
    header,
)
from engine.websocket import FrameParser, WebSocketError, permessage_deflate

#: Seconds between two body-progress updates of one flow.
UPDATE_INTERVAL = 0.1
_MAX_HEADERS = 1024 * 1024


def text(value: bytes) -> str:
    """Header bytes as str: UTF-8 when valid, else Latin-1 (lossless)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def h11_headers(headers: h11._headers.Headers) -> Headers:
    return [(text(name), text(value)) for name, value in headers.raw_items()]


def skippable_body(conn: h11.Connection, available: int) -> int:
    """How many of the next `available` bytes are body bytes that may bypass h11.

    h11 copies every byte through its receive buffer (about 0.5 GB/s). When it is in the middle
    of a body and has nothing buffered, the body's bytes are taken directly and its reader's
    count moved on by the same amount; the last byte of each chunk or message still goes
    through h11, so it ends messages and validates framing itself. This reads h11's private
    reader state: any surprise there turns the fast path off (`_FAST_BODY`).
    """
    global _FAST_BODY
    if not _FAST_BODY or conn.their_state is not h11.SEND_BODY:
        return 0
    try:
        if len(conn._receive_buffer):
            return 0
        reader = conn._reader
        kind = type(reader)
        if kind is h11_readers.ContentLengthReader:
            n = min(available, reader._remaining - 1)
            if n > 0:
                reader._remaining -= n
                return n
        elif kind is h11_readers.ChunkedReader:
            if not reader._reading_trailer and not reader._bytes_to_discard:
                n = min(available, reader._bytes_in_chunk - 1)
                if n > 0:
                    reader._bytes_in_chunk -= n
                    return n
        elif kind is h11_readers.Http10Reader:
            return available
    except AttributeError:
        _FAST_BODY = False
    return 0


_FAST_BODY = True


def format_authority(address: tuple[str, int], scheme: str) -> str:
    host, port = address[0], address[1]
    if ":" in host:
        host = f"[{host}]"
    if (scheme, port) in (("http", 80), ("https", 443)):
        return host
    return f"{host}:{port}"


def new_flow(conn: Connection, base: Timings | None) -> Flow:
    """A flow on `conn`; the first flow of a connection inherits its dns/connect/tls timings."""
    flow = Flow(conn=conn)
    if base is not None:
        flow.timings = dataclasses.replace(base)
    return flow


class _Exchange:
    __slots__ = ("flow", "request_event", "ended", "sent", "upgrade", "last_update")

    def __init__(self, flow: Flow, request_event: h11.Request) -> None:
        self.flow = flow
        self.request_event = request_event
        self.ended = False  # the client finished the request
        self.sent = False  # `_resp` was told about the request
        self.upgrade = _has_upgrade(request_event)  # CONNECT or Upgrade: may switch protocols
        self.last_update = 0.0


def _has_upgrade(event: h11.Request) -> bool:
    return event.method == b"CONNECT" or any(name == b"upgrade" for name, _ in event.headers)


class Http1Observer:
    """StreamObserver decoding HTTP/1.x exchanges (and WebSocket after an Upgrade) into flows."""

    def __init__(
        self,
        conn: Connection,
        bus: FlowBus,
        scheme: str = "http",
        body_cap: int = DEFAULT_BODY_CAP,
        timings: Timings | None = None,
    ) -> None:
        self.conn = conn
        self.bus = bus
        self.scheme = scheme
        self.body_cap = body_cap
        self._base_timings = timings
        self._req = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADERS)
        self._resp = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEADERS)
        self._parsing: _Exchange | None = None  # request being read from the client
        self._queue: deque[_Exchange] = deque()  # requests waiting for (or reading) a response
        self._dead = False  # decoding stopped (error, or a non-WebSocket protocol switch)
        self._ws_flow: Flow | None = None
        self._ws_client: FrameParser | None = None
        self._ws_server: FrameParser | None = None
        self._server_eof = False
        self._closed = False

    # -- StreamObserver -----------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        if self._dead:
            return
        try:
            if self._ws_client is not None:
                self._ws_client.feed(data)
                return
            skip = skippable_body(self._req, len(data))
            if skip and self._parsing is not None:
                self._parsing.flow.request.body.append(data[:skip])  # type: ignore[union-attr]
                if skip == len(data):
                    return
                data = data[skip:]
            self._req.receive_data(data)
            self._pump_requests()
        except Exception as exc:  # noqa: BLE001 - a decoder must never break the relay
            self._fail(exc)

    def server_data(self, data: bytes) -> None:
        if self._dead:
            return
        try:
            if self._ws_server is not None:
                self._ws_server.feed(data)
                return
            skip = skippable_body(self._resp, len(data))
            if skip and self._queue and self._queue[0].flow.response is not None:
                self._response_body(self._queue[0], data[:skip])
                if skip == len(data):
                    return
                data = data[skip:]
            self._resp.receive_data(data)
            self._pump_responses()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _response_body(self, ex: _Exchange, data: bytes) -> None:
        flow = ex.flow
        flow.response.body.append(data)  # type: ignore[union-attr]
        now = time.monotonic()
        if now - ex.last_update >= UPDATE_INTERVAL:
            ex.last_update = now
            self.bus.update(flow)

    def client_eof(self) -> None:
        if self._dead or self._ws_client is not None:
            return
        try:
            self._req.receive_data(b"")
            self._pump_requests()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def server_eof(self) -> None:
        if self._server_eof:
            return
        self._server_eof = True
        if self._dead or self._ws_server is not None:
            return
        try:
            self._resp.receive_data(b"")
            self._pump_responses()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def close(self, error: str | None = None) -> None:
        if self._closed:
            return
        self.server_eof()  # completes responses delimited by the connection's end
        self._closed = True
        self._dead = True
        if self._ws_flow is not None and not self._ws_flow.finished:
            self.bus.done(self._ws_flow, error=error)
        reason = error or "connection closed before the response was complete"
        for flow in self._open_flows():
            self.bus.done(flow, error=reason)

    # -- requests -----------------------------------------------------------------------------

    def _pump_requests(self) -> None:
        while not self._dead and self._ws_client is None:
            event = self._req.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.Data):
                if self._parsing is not None:
                    self._parsing.flow.request.body.append(event.data)  # type: ignore[union-attr]
            elif isinstance(event, h11.EndOfMessage):
                self._on_request_end(event)
            elif isinstance(event, h11.ConnectionClosed):
                return

    def _on_request(self, event: h11.Request) -> None:
        headers = h11_headers(event.headers)
        host = header(headers, "host")
        flow = new_flow(self.conn, self._base_timings)
        self._base_timings = None
        flow.request = Request(
            method=text(event.method),
            scheme=self.scheme,
            authority=host or format_authority(self.conn.server, self.scheme),
            path=text(event.target),
            http_version=f"HTTP/{event.http_version.decode()}",
            headers=headers,
            body=Body(self.body_cap),
        )
        flow.state = FlowState.REQUEST
        ex = _Exchange(flow, event)
        ex.last_update = time.monotonic()
        self._parsing = ex
        self._queue.append(ex)
        self.bus.new(flow)
        self._advance_resp()

    def _on_request_end(self, event: h11.EndOfMessage) -> None:
        ex = self._parsing
        self._parsing = None
        if ex is None:
            return
        ex.ended = True
        assert ex.flow.request is not None
        if event.headers:
            ex.flow.request.trailers = h11_headers(event.headers)
        ex.flow.timings.request_sent = time.time()
        if ex.sent and self._resp.our_state is h11.SEND_BODY:
            self._resp.send(h11.EndOfMessage())
            self._advance_resp()
            self._pump_responses()
        if self._req.their_state is h11.MIGHT_SWITCH_PROTOCOL:
            return  # wait for the server's verdict on the Upgrade/CONNECT
        self._answer_req(200)

    def _answer_req(self, status: int) -> None:
        """Tell `_req` a (stand-in) final response so it reads the next request."""
        self._req.send(h11.Response(status_code=status, headers=[(b"content-length", b"0")]))
        self._req.send(h11.EndOfMessage())
        self._req = _next_cycle(self._req, h11.SERVER)

    # -- responses ----------------------------------------------------------------------------

    def _advance_resp(self) -> None:
        """Move `_resp` on to the next queued request once the current exchange is over."""
        resp = self._resp
        if resp.our_state in (h11.DONE, h11.MUST_CLOSE) and resp.their_state in (
            h11.DONE,
            h11.MUST_CLOSE,
        ):
            self._resp = resp = _next_cycle(resp, h11.CLIENT)
        if resp.our_state is h11.IDLE and self._queue and not self._queue[0].sent:
            ex = self._queue[0]
            resp.send(_stand_in_request(ex.request_event))
            ex.sent = True
            if ex.ended:
                resp.send(h11.EndOfMessage())

    def _pump_responses(self) -> None:
        while not self._dead and self._ws_server is None:
            event = self._resp.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            ex = self._queue[0] if self._queue else None
            if ex is None:
                raise h11.RemoteProtocolError("response without a request")
            flow = ex.flow
            if isinstance(event, h11.InformationalResponse):
                if flow.timings.first_byte is None:
                    flow.timings.first_byte = time.time()
                if event.status_code == 101:
                    self._on_switch(ex, event)
                    return
            elif isinstance(event, h11.Response):
                self._on_response(ex, event)
                if self._resp.our_state is h11.SWITCHED_PROTOCOL:  # CONNECT accepted
                    self._on_switch(ex, event)
                    return
            elif isinstance(event, h11.Data):
                assert flow.response is not None
                self._response_body(ex, event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert flow.response is not None
                if event.headers:
                    flow.response.trailers = h11_headers(event.headers)
                self._queue.popleft()
                self.bus.done(flow)
                self._advance_resp()
            elif isinstance(event, h11.ConnectionClosed):
                return

    def _on_response(self, ex: _Exchange, event: h11.Response) -> None:
        flow = ex.flow
        if flow.timings.first_byte is None:
            flow.timings.first_byte = time.time()
        flow.response = Response(
            status=event.status_code,
            reason=text(event.reason),
            http_version=f"HTTP/{event.http_version.decode()}",
            headers=h11_headers(event.headers),
            body=Body(self.body_cap),
        )
        flow.state = FlowState.RESPONSE
        ex.last_update = time.monotonic()
        self.bus.update(flow)
        if ex.upgrade and self._req.their_state is h11.MIGHT_SWITCH_PROTOCOL:
            if self._resp.our_state is not h11.SWITCHED_PROTOCOL:
                self._answer_req(event.status_code)  # upgrade refused: back to HTTP
                self._pump_requests()

    def _on_switch(self, ex: _Exchange, event: h11.InformationalResponse | h11.Response) -> None:
        """The connection leaves HTTP/1 (101 Switching Protocols, or CONNECT accepted)."""
        flow = ex.flow
        self._queue.popleft()
        if flow.response is None:
            flow.response = Response(
                status=event.status_code,
                reason=text(event.reason),
                http_version=f"HTTP/{event.http_version.decode()}",
                headers=h11_headers(event.headers),
                body=Body(self.body_cap),
            )
            flow.state = FlowState.RESPONSE
        upgrade = (header(flow.response.headers, "upgrade") or "").lower()
        if event.status_code != 101 or "websocket" not in upgrade:
            self._dead = True  # h2c, TLS upgrades, tunnels: not decoded
            self.bus.done(flow)
            return
        flow.kind = FlowKind.WEBSOCKET
        self._ws_flow = flow
        deflate = permessage_deflate(flow.response.headers)
        self._ws_client = FrameParser(self._ws_message(True), deflate, self.body_cap)
        self._ws_server = FrameParser(self._ws_message(False), deflate, self.body_cap)
        self.bus.update(flow)
        client_rest = self._req.trailing_data[0]
        server_rest = self._resp.trailing_data[0]
        if client_rest:
            self._ws_client.feed(client_rest)
        if server_rest:
            self._ws_server.feed(server_rest)

    def _ws_message(self, from_client: bool):  # noqa: ANN202
        def on_message(opcode: int, payload: bytes, timestamp: float) -> None:
            flow = self._ws_flow
            assert flow is not None
            flow.websocket_messages.append(
                WebSocketMessage(from_client, opcode, payload, timestamp)
            )
            self.bus.update(flow)

        return on_message

    # -- errors -------------------------------------------------------------------------------

    def _open_flows(self) -> list[Flow]:
        flows = [ex.flow for ex in self._queue]
        if self._parsing is not None and self._parsing not in self._queue:
            flows.append(self._parsing.flow)
        return [f for f in flows if not f.finished]

    def _fail(self, exc: Exception) -> None:
        self._dead = True
        if isinstance(exc, WebSocketError):
            message = f"WebSocket decoding error: {exc}"
        elif isinstance(exc, h11.ProtocolError):
            message = f"HTTP/1 decoding error: {exc}"
        else:
            message = f"HTTP/1 decoder failed: {type(exc).__name__}: {exc}"
        flows = self._open_flows()
        if self._ws_flow is not None and not self._ws_flow.finished:
            flows.append(self._ws_flow)
        for flow in flows:
            self.bus.done(flow, error=message)


def _stand_in_request(event: h11.Request) -> h11.Request:
    """What `_resp` needs to know about a request: method, target, Host, Connection, Upgrade."""
    headers: list[tuple[bytes, bytes]] = []
    host = b"unknown"
    connection = b""
    for name, value in event.headers:
        if name == b"host":
            host = value
        elif name == b"connection":
            connection += b"," + value if connection else value
        elif name == b"upgrade":
            headers.append((name, value))
    if event.http_version == b"1.0" and b"keep-alive" not in connection.lower():
        connection = connection + b",close" if connection else b"close"
    if connection:
        headers.append((b"connection", connection))
    headers.insert(0, (b"host", host))
    return h11.Request(method=event.method, target=event.target, headers=headers)


def _next_cycle(conn: h11.Connection, role: type[h11._util.Sentinel]) -> h11.Connection:
    """Start the next request/response cycle; a connection h11 would close gets a fresh
    parser (HTTP/1.0 keep-alive, or bytes after Connection: close)."""
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
        return conn
    rest, closed = conn.trailing_data
    fresh = h11.Connection(role, max_incomplete_event_size=_MAX_HEADERS)
    if rest:
        fresh.receive_data(rest)
    if closed:
        fresh.receive_data(b"")
    return fresh
