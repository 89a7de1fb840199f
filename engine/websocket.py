"""Passive WebSocket (RFC 6455) frame decoding, with permessage-deflate (RFC 7692)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable

from engine.flow import Headers, header

OP_CONTINUATION = 0
OP_TEXT = 1
OP_BINARY = 2
OP_CLOSE = 8
OP_PING = 9
OP_PONG = 10


class WebSocketError(ValueError):
    pass


def permessage_deflate(response_headers: Headers) -> bool:
    """Whether the server's 101 accepted permessage-deflate."""
    value = header(response_headers, "sec-websocket-extensions") or ""
    return any(
        ext.split(";", 1)[0].strip().lower() == "permessage-deflate" for ext in value.split(",")
    )


def unmask(payload: bytes | memoryview, mask: bytes) -> bytes:
    """XOR `payload` with the 4-byte `mask`, in C speed (one big-int XOR)."""
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(n, "little")


MessageCallback = Callable[[int, bytes, float], None]


class FrameParser:
    """Turns one direction's bytes into whole messages (control frames included).

    `on_message(opcode, payload, timestamp)` is called per message; fragmented messages are
    joined and compressed messages inflated. Raises WebSocketError on a protocol violation.
    """

    def __init__(self, on_message: MessageCallback, deflate: bool = False, max_message: int = 0):
        self._on_message = on_message
        self._deflate = deflate
        self._max = max_message  # 0 = keep everything
        self._buf = bytearray()
        self._opcode: int | None = None  # opcode of the fragmented message in progress
        self._compressed = False
        self._parts: list[bytes] = []
        self._kept = 0
        self._inflater: zlib._Decompress | None = None

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            masked = b1 & 0x80
            if masked:
                head += 4
            if end - pos < head + length:
                break
            with memoryview(buf) as view:
                payload = view[pos + head : pos + head + length]
                if masked:
                    payload = unmask(payload, bytes(buf[pos + head - 4 : pos + head]))
                else:
                    payload = bytes(payload)
            pos += head + length
            self._frame(b0, payload)
        if pos:
            del buf[:pos]

    def _frame(self, b0: int, payload: bytes) -> None:
        fin = b0 & 0x80
        rsv1 = b0 & 0x40
        opcode = b0 & 0x0F
        now = time.time()
        if opcode >= 8:
            if not fin or len(payload) > 125:
                raise WebSocketError("invalid control frame")
            self._on_message(opcode, payload, now)
            return
        if opcode == OP_CONTINUATION:
            if self._opcode is None:
                raise WebSocketError("continuation frame without a message")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._opcode is not None:
                raise WebSocketError("new message inside a fragmented message")
            self._opcode = opcode
            self._compressed = bool(rsv1) and self._deflate
            self._parts = []
            self._kept = 0
        else:
            raise WebSocketError(f"unknown opcode {opcode}")
        if self._compressed or not self._max or self._kept < self._max:
            self._parts.append(payload)
            self._kept += len(payload)
        if fin:
            data = b"".join(self._parts)
            op = self._opcode
            self._opcode = None
            self._parts = []
            if self._compressed:
                data = self._inflate(data)
            if self._max:
                data = data[: self._max]
            assert op is not None
            self._on_message(op, data, now)

    def _inflate(self, data: bytes) -> bytes:
        if self._inflater is None or self._inflater.eof:
            self._inflater = zlib.decompressobj(-15)
        try:
            return self._inflater.decompress(data + b"\x00\x00\xff\xff")
        except zlib.error as exc:
            raise WebSocketError(f"permessage-deflate: {exc}") from exc
