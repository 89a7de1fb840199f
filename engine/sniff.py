"""Guess a connection's protocol from its first client bytes, and pick the matching observer."""

from __future__ import annotations

import re
from typing import Literal

from engine.flow import DEFAULT_BODY_CAP, Connection, FlowBus, Timings
from engine.http1 import Http1Observer
from engine.http2 import Http2Observer
from engine.observer import RawObserver, StreamObserver
from engine.socks import SocksObserver, looks_like_socks

Kind = Literal["tls", "http1", "h2", "socks5", "socks4", "unknown", "need-more"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

METHODS = frozenset(
    {
        b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE",
        b"PATCH", b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK",
        b"REPORT", b"SEARCH", b"MKCALENDAR", b"MKACTIVITY", b"CHECKOUT", b"MERGE", b"PURGE",
        b"LINK", b"UNLINK", b"QUERY",
    }
)  # fmt: skip
_MAX_METHOD = max(len(m) for m in METHODS)
# Any other token method is accepted once the whole request line is there.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/1\.[01]\r?\n")
_LINE_LIMIT = 8192


def classify(first_bytes: bytes) -> Kind:
    """ "tls", "http1", "h2" (prior knowledge), "socks5" or "socks4" (a SOCKS proxy's client),
    "unknown" (raw TCP) or "need-more"."""
    data = first_bytes
    if not data:
        return "need-more"
    socks = looks_like_socks(data)
    if socks is not None:
        return socks  # type: ignore[return-value]
    if data[0] == 0x16:
        if len(data) < 3:
            return "need-more"
        return "tls" if data[1] == 3 and data[2] <= 4 else "unknown"
    if H2_PREFACE.startswith(data[: len(H2_PREFACE)]):
        return "h2" if len(data) >= len(H2_PREFACE) else "need-more"
    space = data.find(b" ", 0, _MAX_METHOD + 1)
    if space > 0 and data[:space] in METHODS:
        return "http1"
    if space < 0 and len(data) <= _MAX_METHOD and any(m.startswith(data) for m in METHODS):
        return "need-more"
    line_end = data.find(b"\n", 0, _LINE_LIMIT)
    if line_end >= 0:
        return "http1" if _REQUEST_LINE.match(data, 0, line_end + 1) else "unknown"
    if len(data) < _LINE_LIMIT and re.match(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+( |$)", data):
        return "need-more"
    return "unknown"


def begins_like_http(first_bytes: bytes) -> bool:
    """The bytes so far start a request with a known method (or part of one)."""
    space = first_bytes.find(b" ", 0, _MAX_METHOD + 1)
    if space > 0:
        return first_bytes[:space] in METHODS
    return 0 < len(first_bytes) <= _MAX_METHOD and any(m.startswith(first_bytes) for m in METHODS)


def make_observer(
    kind: str,
    conn: Connection,
    bus: FlowBus,
    scheme: str = "http",
    body_cap: int = DEFAULT_BODY_CAP,
    timings: Timings | None = None,
) -> StreamObserver:
    """The observer for plaintext of `kind` ("http1", "h2", "socks5" or "socks4", anything
    else: raw bytes).

    `timings` (optional) carries the connection's dns/connect/tls times into its first flow.
    """
    if kind == "http1":
        return Http1Observer(conn, bus, scheme, body_cap, timings)
    if kind == "h2":
        return Http2Observer(conn, bus, scheme, body_cap, timings)
    if kind in ("socks5", "socks4"):
        return SocksObserver(conn, bus, timings)
    return RawObserver(conn, bus, timings)
