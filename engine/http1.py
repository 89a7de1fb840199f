"""Passive HTTP/1.x decoding of a relayed connection, with h11's parser.

h11's `Connection` is a state machine for one endpoint: mirroring both ends of a conversation
with two of them costs about 250 µs per exchange (ten state-machine events, plus stand-in
messages sent only to keep the two in step), more than the rest of a relayed connection. So
the observer drives h11's wire-level readers itself: `maybe_read_from_IDLE_client` and
`maybe_read_from_SEND_RESPONSE_server` parse and validate each head into h11 events, and
h11's body readers frame bodies (chunked, Content-Length, until close). The framing rules
that depend on both sides (HEAD, 1xx, 204/304, CONNECT, Upgrade) are the short ones below.
These are h11's private modules: the `h11` version is pinned in pyproject.toml and the
decoder tests cover each case.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
from h11 import _readers as h11_readers
from h11._receivebuffer import ReceiveBuffer

from engine.addresses import host_port
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
from engine.observer import unfinished_reason
from engine.websocket import FrameParser, WebSocketError, permessage_deflate

if TYPE_CHECKING:
    from engine.http2 import Http2Observer

#: Seconds between two body-progress updates of one flow.
UPDATE_INTERVAL = 0.1
_MAX_HEADERS = 1024 * 1024

read_request_head = h11_readers.maybe_read_from_IDLE_client
read_response_head = h11_readers.maybe_read_from_SEND_RESPONSE_server
BodyReader = Any  # one of h11's ContentLengthReader, ChunkedReader, Http10Reader


def text(value: bytes) -> str:
    """Header bytes as str: UTF-8 when valid, else Latin-1 (lossless)."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def h11_headers(headers: h11._headers.Headers) -> Headers:
    try:  # (text() for each would cost a call per name and value)
        return [(name.decode(), value.decode()) for name, value in headers.raw_items()]
    except UnicodeDecodeError:
        return [(text(name), text(value)) for name, value in headers.raw_items()]


class _Framing:
    """The headers that frame a message, read in one pass over h11's header list."""

    __slots__ = ("chunked", "length", "upgrade")

    def __init__(self, event: h11.Request | h11.Response) -> None:
        self.chunked = False  # h11 accepts no Transfer-Encoding but "chunked"
        self.length: int | None = None  # h11 checked it is one non-negative number
        self.upgrade = False
        for _, name, value in event.headers._full_items:
            if name == b"transfer-encoding":
                self.chunked = True
            elif name == b"content-length":
                self.length = int(value)
            elif name == b"upgrade":
                self.upgrade = True

    def reader(self, *, until_close: bool) -> BodyReader:
        """h11's reader for the body these headers frame; with neither header, a request has
        no body and a response runs until the connection closes (RFC 9112 section 6.3)."""
        if self.chunked:
            return h11_readers.ChunkedReader()
        if self.length is not None:
            return h11_readers.ContentLengthReader(self.length)
        return h11_readers.Http10Reader() if until_close else h11_readers.ContentLengthReader(0)


def response_body_reader(event: h11.Response, request_method: bytes) -> BodyReader:
    """h11's reader for the body that follows response `event` (RFC 9112 section 6.3)."""
    if (
        event.status_code in (204, 304)
        or request_method == b"HEAD"
        or (request_method == b"CONNECT" and 200 <= event.status_code < 300)
    ):
        return h11_readers.ContentLengthReader(0)
    return _Framing(event).reader(until_close=True)


def bypass(reader: BodyReader, buffered: int, available: int) -> int:
    """How many of the next `available` body bytes can skip h11's receive buffer.

    h11's readers copy every byte through their buffer (about 0.5 GB/s). In the middle of a
    body with nothing buffered, bytes are taken directly and the reader's count moved on by
    the same amount; the last byte of each chunk or message still goes through the reader,
    so it ends messages and checks chunk framing itself.
    """
    if buffered:
        return 0
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
    return 0


def format_authority(address: tuple[str, int], scheme: str) -> str:
    host, port = address[0], address[1]
    if (scheme, port) in (("http", 80), ("https", 443)):
        return f"[{host}]" if ":" in host else host
    return host_port(host, port)


def new_flow(conn: Connection, base: Timings | None) -> Flow:
    """A flow on `conn`; the first flow of a connection inherits its dns/connect/tls timings."""
    if base is not None:
        return Flow(conn=conn, timings=base.copy())
    return Flow(conn=conn)


class _Exchange:
    __slots__ = ("flow", "method", "upgrade", "last_update")

    def __init__(self, flow: Flow, method: bytes, upgrade: bool) -> None:
        self.flow = flow
        self.method = method
        self.upgrade = upgrade  # CONNECT or Upgrade: the protocol may switch after the response
        self.last_update = time.monotonic()


class Http1Observer:
    """StreamObserver decoding HTTP/1.x exchanges (and WebSocket after an Upgrade) into flows.

    Requests are read ahead of responses (pipelining); each response is framed by the request
    at the head of `_queue`. After a request that may switch protocols (Upgrade, CONNECT) the
    client's bytes wait in their buffer for the server's verdict.
    """

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
        self._client_buf = ReceiveBuffer()
        self._server_buf = ReceiveBuffer()
        self._request_body: BodyReader | None = None  # None: the next request head is due
        self._response_body: BodyReader | None = None  # None: the next response head is due
        self._parsing: _Exchange | None = None  # request being read from the client
        self._queue: deque[_Exchange] = deque()  # requests waiting for (or reading) a response
        self._awaiting_switch = False  # an Upgrade/CONNECT request ended; its answer is due
        self._dead = False  # decoding stopped (error, or a non-WebSocket protocol switch)
        self._ws_flow: Flow | None = None
        self._ws_client: FrameParser | None = None
        self._ws_server: FrameParser | None = None
        self._server_eof = False
        #: After a 101 to h2c: the HTTP/2 decoder the rest of the connection goes to.
        self._h2: Http2Observer | None = None
        self._announce: Flow | None = None  # a response head not yet told (see _announce_response)
        self._closed = False
        #: A proxy accepted a CONNECT: the bytes that follow are the app's with the far end,
        #: `tunnel_target` ("host:port", as the CONNECT asked).
        self.tunnel = False
        self.tunnel_target: str | None = None

    # -- StreamObserver -----------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        if self._h2 is not None:
            self._h2.client_data(data)
            return
        if self._dead:
            return
        try:
            if self._ws_client is not None:
                self._ws_client.feed(data)
                return
            reader = self._request_body
            if reader is not None and not self._awaiting_switch:
                skip = bypass(reader, len(self._client_buf), len(data))
                if skip:
                    self._parsing.flow.request.body.append(data[:skip])  # type: ignore[union-attr]
                    if skip == len(data):
                        return
                    data = data[skip:]
            self._client_buf += data
            self._pump_requests()
        except Exception as exc:  # noqa: BLE001 - a decoder must never break the relay
            self._fail(exc)

    def server_data(self, data: bytes) -> None:
        if self._h2 is not None:
            self._h2.server_data(data)
            return
        if self._dead:
            return
        try:
            if self._ws_server is not None:
                self._ws_server.feed(data)
                return
            reader = self._response_body
            if reader is not None:
                skip = bypass(reader, len(self._server_buf), len(data))
                if skip:
                    self._body_progress(self._queue[0], data[:skip])
                    if skip == len(data):
                        return
                    data = data[skip:]
            self._server_buf += data
            self._pump_responses()
            self._announce_response()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def client_eof(self) -> None:
        if self._h2 is not None:
            self._h2.client_eof()
            return
        if self._dead or self._ws_client is not None:
            return
        try:
            self._pump_requests()
            if self._request_body is not None and not self._awaiting_switch:
                self._request_body.read_eof()  # raises: the request body is incomplete
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def server_eof(self) -> None:
        if self._h2 is not None:
            self._h2.server_eof()
            return
        if self._server_eof:
            return
        self._server_eof = True
        self._end_responses(server_closed=True)

    def close(self, error: str | None = None) -> None:
        if self._h2 is not None:
            self._h2.close(error)
            return
        if self._closed:
            return
        if not self._server_eof:
            self._end_responses(server_closed=False, error=error)
        self._closed = True
        self._dead = True
        if self._ws_flow is not None and not self._ws_flow.finished:
            self.bus.done(self._ws_flow, error=error)
        self._end_open(error, self._server_eof)

    def _end_responses(self, server_closed: bool, error: str | None = None) -> None:
        """The connection's end: completes a response delimited by it, or ends the flows
        whose responses it cut short."""
        if self._dead or self._ws_server is not None:
            return
        try:
            self._pump_responses()
            reader = self._response_body
            if reader is not None:
                try:
                    reader.read_eof()  # raises, unless the body is delimited by the close
                except h11.RemoteProtocolError as exc:  # cut short: not a decoding error
                    self._dead = True
                    self._end_open(error, server_closed, detail=str(exc) if server_closed else None)
                    return
                self._response_end(h11.EndOfMessage())
            self._announce_response()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    # -- requests -----------------------------------------------------------------------------

    def _pump_requests(self) -> None:
        buf = self._client_buf
        while not self._dead and not self._awaiting_switch and self._ws_client is None:
            reader = self._request_body
            if reader is None:
                if not buf:
                    return
                event = read_request_head(buf)
                if event is None:
                    if len(buf) > _MAX_HEADERS:
                        raise h11.RemoteProtocolError("request head too large")
                    return
                self._on_request(event)
                continue
            event = reader(buf)
            if event is None:
                return
            if type(event) is h11.Data:
                self._parsing.flow.request.body.append(event.data)  # type: ignore[union-attr]
            else:
                self._request_body = None
                self._on_request_end(event)

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
        framing = _Framing(event)
        self._request_body = framing.reader(until_close=False)
        ex = _Exchange(flow, event.method, framing.upgrade or event.method == b"CONNECT")
        self._parsing = ex
        self._queue.append(ex)
        self.bus.new(flow)

    def _on_request_end(self, event: h11.EndOfMessage) -> None:
        ex = self._parsing
        self._parsing = None
        if ex is None:
            return
        request = ex.flow.request
        assert request is not None
        if event.headers:
            request.trailers = h11_headers(event.headers)
        ex.flow.timings.request_sent = time.time()
        if ex.upgrade and not ex.flow.finished and ex.flow.response is None:
            self._awaiting_switch = True  # the server's answer tells what follows

    # -- responses ----------------------------------------------------------------------------

    def _pump_responses(self) -> None:
        buf = self._server_buf
        while not self._dead and self._ws_server is None:
            reader = self._response_body
            if reader is None:
                if not buf:
                    return
                try:
                    event = read_response_head(buf)
                except h11.ProtocolError as exc:
                    if not str(exc).startswith("illegal request line"):
                        raise
                    raise h11.RemoteProtocolError(not_an_http1_answer(bytes(buf))) from None
                if event is None:
                    if len(buf) > _MAX_HEADERS:
                        raise h11.RemoteProtocolError("response head too large")
                    return
                if not self._queue:
                    raise h11.RemoteProtocolError("response without a request")
                ex = self._queue[0]
                if ex.flow.timings.first_byte is None:
                    ex.flow.timings.first_byte = time.time()
                if type(event) is h11.InformationalResponse:
                    if event.status_code == 101:
                        self._on_switch(ex, event)
                        return
                    continue  # 100 Continue, 103 Early Hints: the final response follows
                self._on_response(ex, event)
                if ex.method == b"CONNECT" and 200 <= event.status_code < 300:
                    self._on_switch(ex, event)  # a tunnel: not decoded
                    return
                self._response_body = response_body_reader(event, ex.method)
                if ex.upgrade and self._awaiting_switch:
                    self._awaiting_switch = False  # upgrade refused: back to HTTP
                    self._pump_requests()
                continue
            event = reader(buf)
            if event is None:
                return
            if type(event) is h11.Data:
                self._body_progress(self._queue[0], event.data)
            else:
                self._response_end(event)

    def _on_response(self, ex: _Exchange, event: h11.Response) -> None:
        flow = ex.flow
        flow.response = Response(
            status=event.status_code,
            reason=text(event.reason),
            http_version=f"HTTP/{event.http_version.decode()}",
            headers=h11_headers(event.headers),
            body=Body(self.body_cap),
        )
        flow.state = FlowState.RESPONSE
        ex.last_update = time.monotonic()
        self._announce = flow

    def _announce_response(self) -> None:
        """A response head goes out as an UPDATE once the bytes at hand are decoded, unless
        the whole response came with it: then its DONE says it all, one event instead of two."""
        flow, self._announce = self._announce, None
        if flow is not None and not flow.finished:
            self.bus.update(flow)

    def _body_progress(self, ex: _Exchange, data: bytes) -> None:
        flow = ex.flow
        flow.response.body.append(data)  # type: ignore[union-attr]
        now = time.monotonic()
        if now - ex.last_update >= UPDATE_INTERVAL:
            ex.last_update = now
            self.bus.update(flow)

    def _response_end(self, event: h11.EndOfMessage) -> None:
        self._response_body = None
        flow = self._queue.popleft().flow
        assert flow.response is not None
        if event.headers:
            flow.response.trailers = h11_headers(event.headers)
        self.bus.done(flow)

    def _on_switch(self, ex: _Exchange, event: h11.InformationalResponse | h11.Response) -> None:
        """The connection leaves HTTP/1 (101 Switching Protocols, or CONNECT accepted)."""
        flow = ex.flow
        self._queue.popleft()
        if flow.response is None:
            self._on_response(ex, event)  # type: ignore[arg-type]
        self._announce = None  # told below
        assert flow.response is not None
        upgrade = (header(flow.response.headers, "upgrade") or "").lower()
        if event.status_code == 101 and upgrade.strip() == "h2c":
            self._to_h2c(flow)
            return
        if event.status_code != 101 or "websocket" not in upgrade:
            self._dead = True  # h2c, TLS upgrades, tunnels: not decoded here
            self.tunnel = ex.method == b"CONNECT"
            self.tunnel_target = flow.request.path if self.tunnel and flow.request else None
            self.bus.done(flow)
            return
        flow.kind = FlowKind.WEBSOCKET
        self._ws_flow = flow
        deflate = permessage_deflate(flow.response.headers)
        self._ws_client = FrameParser(self._ws_message(True), deflate, self.body_cap)
        self._ws_server = FrameParser(self._ws_message(False), deflate, self.body_cap)
        self.bus.update(flow)
        self._hand_over(self._ws_client.feed, self._ws_server.feed)

    def _to_h2c(self, flow: Flow) -> None:
        """HTTP/1.1 upgraded to HTTP/2 over plain TCP (RFC 7540 3.2, as curl --http2 and Java's
        HttpClient ask for): the request becomes stream 1, answered in HTTP/2, and the rest of
        the connection is decoded as HTTP/2."""
        from engine.http2 import Http2Observer  # (it builds on this module)

        self._dead = True
        flow.response = None  # (the 101: the answer comes on stream 1)
        flow.state = FlowState.REQUEST
        self._h2 = Http2Observer(self.conn, self.bus, self.scheme, self.body_cap, upgraded=flow)
        self._hand_over(self._h2.client_data, self._h2.server_data)

    def _hand_over(self, client: Callable[[bytes], None], server: Callable[[bytes], None]) -> None:
        """What each side sent past the switch, to the protocol's own decoder."""
        client_rest = self._client_buf.maybe_extract_at_most(len(self._client_buf))
        server_rest = self._server_buf.maybe_extract_at_most(len(self._server_buf))
        if client_rest:
            client(bytes(client_rest))
        if server_rest:
            server(bytes(server_rest))

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

    def answers_pending(self) -> bool:
        if self._h2 is not None:
            return self._h2.answers_pending()
        return any(not ex.flow.finished for ex in self._queue)

    def _open_flows(self) -> list[Flow]:
        flows = [ex.flow for ex in self._queue]
        if self._parsing is not None and self._parsing not in self._queue:
            flows.append(self._parsing.flow)
        return [f for f in flows if not f.finished]

    def _end_open(self, error: str | None, server_closed: bool, detail: str | None = None) -> None:
        """End the flows the connection's end leaves open (`detail` goes to one whose
        response had begun)."""
        for flow in self._open_flows():
            reason = unfinished_reason(flow, error, server_closed)
            if detail and flow.response is not None:
                reason += f" ({detail})"
            self.bus.done(flow, error=reason)

    def _fail(self, exc: Exception, message: str | None = None) -> None:
        """Stop decoding; open flows end with `message` (by default, what `exc` was)."""
        self._dead = True
        message = message or _decoding_failure(exc)
        flows = self._open_flows()
        if self._ws_flow is not None and not self._ws_flow.finished:
            flows.append(self._ws_flow)
        for flow in flows:
            self.bus.done(flow, error=message)


def not_an_http1_answer(data: bytes | bytearray) -> str:
    """What to say of a server's answer that does not begin with an HTTP/1 status line (h11
    calls it an "illegal request line", whichever side sent it)."""
    from engine.http2 import looks_like_h2_settings  # (it builds on this module)

    if looks_like_h2_settings(data):
        return "the server answered in HTTP/2 frames, not HTTP/1 (it does not heed ALPN)"
    return f"the server's answer does not begin with an HTTP/1 status line: {bytes(data[:24])!r}"


def _decoding_failure(exc: Exception) -> str:
    if isinstance(exc, WebSocketError):
        return f"WebSocket decoding error: {exc}"
    if isinstance(exc, h11.ProtocolError):
        return f"HTTP/1 decoding error: {exc}"
    return f"HTTP/1 decoder failed: {type(exc).__name__}: {exc}"
