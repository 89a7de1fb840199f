"""Headless output: one line per finished exchange or connection, written to stderr."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from engine import grpc
from engine.flow import ConnectionSummary, EventKind, Flow, FlowEvent, FlowKind, cut_short

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

    def __init__(self, out: TextIO | None = None, colour: bool | None = None) -> None:
        self.out = out or sys.stderr
        self.colour = self.out.isatty() if colour is None else colour
        self.lock = threading.Lock()

    def __call__(self, event: FlowEvent) -> None:
        if event.kind != EventKind.DONE:
            return
        flow = event.flow
        if flow.request is not None:
            self._write(exchange_line(flow, self.colour))
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

    def _write(self, line: str) -> None:
        with self.lock:
            try:
                self.out.write("tapui: " + line + "\n")
                self.out.flush()
            except (OSError, ValueError):
                pass
