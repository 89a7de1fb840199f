"""Headless output: one line per finished exchange or connection, written to stderr."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from engine import grpc
from engine.content import media_type, text_for_search
from engine.flow import (
    Body,
    ConnectionSummary,
    EventKind,
    Flow,
    FlowEvent,
    FlowKind,
    Headers,
    cut_short,
)

_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_STATUS_COLOURS = {2: "\x1b[32m", 3: "\x1b[36m", 4: "\x1b[33m", 5: "\x1b[31m"}
_ERROR = "\x1b[1;31m"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def exchange_line(flow: Flow, colour: bool) -> str:
    req, resp = flow.request, flow.response
    assert req is not None
    parts = [clock(flow.timings.start), req.method, req.url]
    status = ""
    if resp is not None:
        status = str(resp.status)
        if colour:
            status = _STATUS_COLOURS.get(resp.status // 100, "") + status + _RESET
    parts.append(status or "---")
    size = human_size(resp.body.size if resp is not None else 0)
    short = cut_short(flow)
    if short is not None:  # e.g. "208.0 KiB of 1.0 MiB": the rest never came
        size += f" of {human_size(short[1])}"
    parts.append(size)
    parts.append(human_duration(flow.duration))
    parts.append((resp.http_version if resp is not None else req.http_version) or "")
    if flow.kind == FlowKind.WEBSOCKET:
        parts.append(f"websocket {len(flow.websocket_messages)} messages")
    failed = grpc.failure(resp)
    if failed:
        rpc = f"grpc {failed}"
        parts.append((_ERROR + rpc + _RESET) if colour else rpc)
    if flow.conn.inbound:
        parts.append("(inbound, to a published port)")
    line = " ".join(p for p in parts if p)
    if flow.error:
        err = f" error: {flow.error}"
        line += (_ERROR + err + _RESET) if colour else err
    return line


#: Body bytes printed at most per body with -vv.
BODY_PREVIEW = 4096


def detail_lines(flow: Flow, level: int) -> list[str]:
    """What -v (`level` 1: headers) and -vv (2: and bodies, the first BODY_PREVIEW bytes of
    text ones) add under an exchange's line: "> " the request, "< " the response."""
    lines: list[str] = []
    for mark, message in (("> ", flow.request), ("< ", flow.response)):
        if message is None:
            continue
        lines += [f"{mark}{name}: {value}" for name, value in message.headers]
        if level >= 2 and message.body.size:
            lines.append(mark.rstrip())
            lines += [mark + line for line in _body_preview(message.body, message.headers)]
        if message.trailers:
            lines += [f"{mark}{name}: {value} (trailer)" for name, value in message.trailers]
    return [_printable(line) for line in lines]


def _body_preview(body: Body, headers: Headers) -> list[str]:
    text = text_for_search(body, headers, limit=BODY_PREVIEW)
    kind = media_type(headers) or "no content type"
    if text is None:
        return [f"[{body.size:,} bytes, {kind}, not text]"]
    lines = text.splitlines() or [""]
    if body.size > BODY_PREVIEW or body.truncated or len(text) >= BODY_PREVIEW:
        lines.append(f"[… {body.size:,} bytes in all]")  # (as sent: a compressed body's)
    return lines


def _printable(line: str) -> str:
    """No terminal control codes from the network reach the terminal."""
    return "".join(ch if ch.isprintable() or ch == "\t" else "\ufffd" for ch in line)


def connection_line(summary: ConnectionSummary, colour: bool) -> str:
    conn = summary.info
    host = conn.sni or conn.hostname or conn.server[0]
    where = f"{host}:{conn.server[1]}"
    if conn.inbound:  # (from a client on the host to the command's server)
        where = f"{conn.client[0]}:{conn.client[1]} -> published port {conn.server[1]}"
    line = (
        f"{clock(summary.start)} {conn.transport} {where} "
        f"sent {human_size(summary.sent)} received {human_size(summary.received)} "
        f"{human_duration(summary.end - summary.start)}"
    )
    if summary.error:
        err = f" error: {summary.error}"
        line += (_ERROR + err + _RESET) if colour else err
    return (_DIM + line + _RESET) if colour and not summary.error else line


class LinePrinter:
    """Prints finished HTTP exchanges (a FlowBus listener), closed connections and failed DNS
    lookups."""

    def __init__(self, out: TextIO | None = None, colour: bool | None = None,
                 detail: int = 0) -> None:
        """`detail`: 1 adds each exchange's headers, 2 its bodies too (see detail_lines)."""
        self.out = out or sys.stderr
        self.colour = self.out.isatty() if colour is None else colour
        self.detail = detail
        self.lock = threading.Lock()

    def __call__(self, event: FlowEvent) -> None:
        if event.kind != EventKind.DONE:
            return
        flow = event.flow
        if flow.request is not None:
            lines = [exchange_line(flow, self.colour)]
            if self.detail:
                lines += ["  " + line for line in detail_lines(flow, self.detail)]
            self._write(*lines)
        elif flow.kind == FlowKind.DNS and flow.error:  # a lookup that failed: often the why
            line = f"{clock(flow.timings.start)} dns {flow.conn.hostname} error: {flow.error}"
            self._write((_ERROR + line + _RESET) if self.colour else line)
        elif flow.kind == FlowKind.UDP:
            self.connection_closed(
                ConnectionSummary(flow.conn, flow.timings.start, flow.timings.done or time.time(),
                                  flow.bytes_sent, flow.bytes_received, flow.error)
            )

    def connection_closed(self, summary: ConnectionSummary) -> None:
        self._write(connection_line(summary, self.colour))

    def _write(self, *lines: str) -> None:
        with self.lock:  # (an exchange's lines stay together)
            try:
                self.out.write("".join(f"tapui: {line}\n" for line in lines))
                self.out.flush()
            except (OSError, ValueError):
                pass
