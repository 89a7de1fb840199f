"""Passive HTTP/2 decoding of a relayed connection: hyperframe frames, one HPACK decoder per
direction.

Every header block (HEADERS, CONTINUATION and PUSH_PROMISE, pushed streams included) goes
through its direction's decoder in order, so the dynamic tables stay in step with the peers'.
"""

from __future__ import annotations

import base64
import struct
import time

import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
)

from engine.flow import (
    DEFAULT_BODY_CAP,
    Body,
    Connection,
    Flow,
    FlowBus,
    FlowState,
    Headers,
    Request,
    Response,
    Timings,
    header,
)
from engine.http1 import UPDATE_INTERVAL, format_authority, new_flow, text
from engine.observer import unfinished_reason

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DEFAULT_MAX_FRAME = 16384
_MAX_HEADER_LIST = 64 * 1024 * 1024
_SETTINGS_HEADER_TABLE_SIZE = 0x1
_SETTINGS_MAX_FRAME_SIZE = 0x5


def looks_like_h2_settings(data: bytes | bytearray) -> bool:
    """The first bytes of an HTTP/2 server: a SETTINGS frame (not an ACK) on stream 0."""
    if len(data) < 9:
        return False
    length = int.from_bytes(data[:3], "big")
    return data[3] == 0x04 and data[4] == 0 and data[5:9] == b"\0\0\0\0" and length % 6 == 0


class H2DecodeError(ValueError):
    pass


def error_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


class _Direction:
    """Decoding state of one direction (client→server or server→client)."""

    __slots__ = ("from_client", "buf", "decoder", "preface", "block", "block_frame", "max_frame",
                 "framed")

    def __init__(self, from_client: bool) -> None:
        self.from_client = from_client
        self.buf = bytearray()
        self.decoder = hpack.Decoder(max_header_list_size=_MAX_HEADER_LIST)
        self.preface = from_client  # client preface still to be read
        self.block: bytearray | None = None  # header block waiting for CONTINUATION
        self.block_frame: HeadersFrame | PushPromiseFrame | None = None
        self.max_frame = _DEFAULT_MAX_FRAME  # largest frame the receiver accepts
        self.framed = False  # a frame has been read (so its bytes are HTTP/2 at all)


class _Stream:
    __slots__ = ("flow", "last_update")

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.last_update = time.monotonic()


def _split_headers(raw: list[tuple[bytes, bytes]]) -> tuple[dict[str, str], Headers]:
    pseudo: dict[str, str] = {}
    regular: Headers = []
    for name, value in raw:
        if name.startswith(b":"):
            pseudo[text(name)] = text(value)
        else:
            regular.append((text(name), text(value)))
    return pseudo, regular


class Http2Observer:
    """StreamObserver decoding HTTP/2 streams into flows (one flow per request stream)."""

    tunnel = False  # (CONNECT over HTTP/2 is not followed)

    def __init__(
        self,
        conn: Connection,
        bus: FlowBus,
        scheme: str = "https",
        body_cap: int = DEFAULT_BODY_CAP,
        timings: Timings | None = None,
        upgraded: Flow | None = None,
    ) -> None:
        """`upgraded`: the HTTP/1.1 request of an upgrade to h2c, which is stream 1."""
        self.conn = conn
        self.bus = bus
        self.scheme = scheme
        self.body_cap = body_cap
        self._base_timings = timings
        self._client = _Direction(True)
        self._server = _Direction(False)
        self._streams: dict[int, _Stream] = {}
        self._pushed: set[int] = set()  # promised streams: decoded for HPACK, otherwise ignored
        self._dead = False
        self._closed = False
        self._server_eof = False  # the server closed its side
        if upgraded is not None:
            self._streams[1] = _Stream(upgraded)
            assert upgraded.request is not None
            self._client_settings(header(upgraded.request.headers, "http2-settings") or "")

    # -- StreamObserver -----------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        self._feed(self._client, data)

    def server_data(self, data: bytes) -> None:
        self._feed(self._server, data)

    def client_eof(self) -> None:
        pass

    def server_eof(self) -> None:
        self._server_eof = True

    def close(self, error: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._dead = True
        self._finish_open(error, server_closed=self._server_eof)

    # -- framing ------------------------------------------------------------------------------

    def _feed(self, d: _Direction, data: bytes) -> None:
        if self._dead:
            return
        try:
            self._parse(d, data)
        except Exception as exc:  # noqa: BLE001 - a decoder must never break the relay
            self._dead = True
            why = str(exc) if isinstance(exc, H2DecodeError) else f"{type(exc).__name__}: {exc}"
            self._finish_open(f"HTTP/2 decoding error: {why}")

    def _parse(self, d: _Direction, data: bytes) -> None:
        buf = d.buf
        buf += data
        pos = 0
        end = len(buf)
        if d.preface:
            n = min(end, len(PREFACE))
            if buf[:n] != PREFACE[:n]:
                raise H2DecodeError("client did not send the HTTP/2 connection preface")
            if n < len(PREFACE):
                return
            d.preface = False
            pos = len(PREFACE)
        if not d.from_client and not d.framed and (
                buf.startswith(b"HTTP/") or (end >= 9 and not looks_like_h2_settings(buf))):
            said = bytes(buf.split(b"\r\n", 1)[0][:40])
            raise H2DecodeError(f"the server's answer is not HTTP/2 (it begins {said!r}, not with "
                                "a SETTINGS frame)")
        frames = []
        with memoryview(buf) as view:
            while end - pos >= 9:
                length = int.from_bytes(view[pos : pos + 3], "big")
                if length > d.max_frame:
                    raise H2DecodeError(f"frame of {length} bytes exceeds the maximum frame size")
                if end - pos - 9 < length:
                    break
                frame, _ = Frame.parse_frame_header(view[pos : pos + 9])
                frame.parse_body(view[pos + 9 : pos + 9 + length])
                pos += 9 + length
                frames.append(frame)
                d.framed = True
        if pos:
            del buf[:pos]
        for frame in frames:
            self._on_frame(d, frame)

    def _on_frame(self, d: _Direction, frame: Frame) -> None:
        if d.block is not None:
            if (
                not isinstance(frame, ContinuationFrame)
                or frame.stream_id != d.block_frame.stream_id
            ):  # type: ignore[union-attr]
                raise H2DecodeError("header block interrupted by another frame")
            d.block += frame.data
            if "END_HEADERS" in frame.flags:
                block, start = bytes(d.block), d.block_frame
                d.block = d.block_frame = None
                self._on_header_block(d, start, block)  # type: ignore[arg-type]
            return
        if isinstance(frame, DataFrame):
            self._on_data(d, frame)
        elif isinstance(frame, HeadersFrame | PushPromiseFrame):
            if isinstance(frame, PushPromiseFrame) and d.from_client:
                raise H2DecodeError("PUSH_PROMISE from the client")
            if "END_HEADERS" in frame.flags:
                self._on_header_block(d, frame, frame.data)
            else:
                d.block = bytearray(frame.data)
                d.block_frame = frame
        elif isinstance(frame, ContinuationFrame):
            raise H2DecodeError("CONTINUATION without HEADERS")
        elif isinstance(frame, RstStreamFrame):
            stream = self._streams.get(frame.stream_id)
            if stream is not None and not stream.flow.finished:
                self.bus.done(stream.flow, error=f"stream reset: {error_name(frame.error_code)}")
        elif isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                # The sender's settings bind what the *other* direction may send.
                self._apply_settings(self._server if d.from_client else self._client,
                                     frame.settings)
        elif isinstance(frame, GoAwayFrame) and not d.from_client:
            for sid, stream in self._streams.items():
                if sid > frame.last_stream_id and not stream.flow.finished:
                    self.bus.done(
                        stream.flow,
                        error=f"refused by GOAWAY: {error_name(frame.error_code)}",
                    )

    def _apply_settings(self, other: _Direction, settings: dict[int, int]) -> None:
        size = settings.get(_SETTINGS_HEADER_TABLE_SIZE)
        if size is not None:
            other.decoder.max_allowed_table_size = size
        max_frame = settings.get(_SETTINGS_MAX_FRAME_SIZE)
        if max_frame is not None:
            other.max_frame = max(other.max_frame, max_frame)

    def _client_settings(self, value: str) -> None:
        """The client's SETTINGS of an h2c upgrade, sent in its HTTP2-Settings header (base64url
        of the frame's payload) rather than in a frame."""
        value = value.strip()
        try:
            payload = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except ValueError:
            return
        settings = dict(struct.iter_unpack(">HI", payload[: len(payload) // 6 * 6]))
        self._apply_settings(self._server, settings)

    # -- streams ------------------------------------------------------------------------------

    def _on_header_block(
        self, d: _Direction, frame: HeadersFrame | PushPromiseFrame, block: bytes
    ) -> None:
        raw = d.decoder.decode(block, raw=True)
        if isinstance(frame, PushPromiseFrame):
            self._pushed.add(frame.promised_stream_id)
            return
        sid = frame.stream_id
        if sid in self._pushed:
            return
        end_stream = "END_STREAM" in frame.flags
        pseudo, headers = _split_headers(raw)  # type: ignore[arg-type]
        stream = self._streams.get(sid)
        if d.from_client:
            if stream is None:
                stream = self._new_stream(sid, pseudo, headers)
            elif stream.flow.request is not None:
                stream.flow.request.trailers = headers
            if end_stream and stream.flow.timings.request_sent is None:
                stream.flow.timings.request_sent = time.time()
            return
        if stream is None or stream.flow.finished:
            return
        flow = stream.flow
        if flow.timings.first_byte is None:
            flow.timings.first_byte = time.time()
        if flow.response is None:
            status = int(pseudo.get(":status", "0"))
            if 100 <= status < 200:
                return  # informational: not the final response
            flow.response = Response(
                status=status,
                reason="",
                http_version="HTTP/2",
                headers=headers,
                body=Body(self.body_cap),
            )
            flow.state = FlowState.RESPONSE
            stream.last_update = time.monotonic()
            if not end_stream:
                self.bus.update(flow)
        else:
            flow.response.trailers = headers
        if end_stream:
            self.bus.done(flow)

    def _new_stream(self, sid: int, pseudo: dict[str, str], headers: Headers) -> _Stream:
        flow = new_flow(self.conn, self._base_timings)
        self._base_timings = None
        authority = (
            pseudo.get(":authority")
            or header(headers, "host")
            or format_authority(self.conn.server, self.scheme)
        )
        flow.request = Request(
            method=pseudo.get(":method", ""),
            scheme=pseudo.get(":scheme", self.scheme),
            authority=authority,
            path=pseudo.get(":path", ""),
            http_version="HTTP/2",
            headers=headers,
            body=Body(self.body_cap),
        )
        flow.state = FlowState.REQUEST
        stream = _Stream(flow)
        self._streams[sid] = stream
        self.bus.new(flow)
        return stream

    def _on_data(self, d: _Direction, frame: DataFrame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream.flow.finished:
            return
        flow = stream.flow
        end_stream = "END_STREAM" in frame.flags
        if d.from_client:
            assert flow.request is not None
            if frame.data:
                flow.request.body.append(frame.data)
            if end_stream:
                flow.timings.request_sent = time.time()
            return
        if flow.response is None:
            raise H2DecodeError(f"DATA before HEADERS on stream {frame.stream_id}")
        if frame.data:
            flow.response.body.append(frame.data)
        if end_stream:
            self.bus.done(flow)
            return
        now = time.monotonic()
        if now - stream.last_update >= UPDATE_INTERVAL:
            stream.last_update = now
            self.bus.update(flow)

    def answers_pending(self) -> bool:
        return any(not stream.flow.finished for stream in self._streams.values())

    def _finish_open(self, error: str | None, server_closed: bool = False) -> None:
        for stream in self._streams.values():
            if not stream.flow.finished:
                self.bus.done(stream.flow, error=unfinished_reason(stream.flow, error, server_closed))
