"""JSON lines: one compact object per finished flow (headless mode, scripting)."""

from __future__ import annotations

import datetime as dt
import json
import threading
from typing import IO, Any

from engine.addresses import host_port
from engine.flow import EventKind, Flow, FlowEvent


def _address(addr: tuple[str, int] | None) -> str | None:
    return host_port(addr[0], addr[1]) if addr else None


def flow_to_json(flow: Flow) -> dict[str, Any]:
    """A compact summary of `flow` for one JSON line."""
    req, resp, conn = flow.request, flow.response, flow.conn
    duration = flow.duration
    return {
        "id": flow.id,
        "kind": str(flow.kind),
        "time": dt.datetime.fromtimestamp(flow.timings.start, dt.UTC).isoformat(
            timespec="milliseconds"
        ),
        "method": req.method if req else None,
        "url": req.url if req else None,
        "status": resp.status if resp else None,
        "http_version": (resp.http_version if resp else req.http_version) if req else None,
        "duration_ms": None if duration is None else round(duration * 1000, 3),
        "request_size": req.body.size if req else flow.bytes_sent,
        "response_size": resp.body.size if resp else flow.bytes_received,
        "websocket_messages": len(flow.websocket_messages) or None,
        "host": flow.host,
        "server": _address(conn.server),
        "sni": conn.sni,
        "alpn": conn.alpn,
        "pid": conn.pid,
        "command": conn.command,
        "inbound": conn.inbound,
        "error": flow.error,
        "request_headers": [list(h) for h in req.headers] if req else None,
        "response_headers": [list(h) for h in resp.headers] if resp else None,
    }


class JsonLinesWriter:
    """FlowBus listener writing one line per finished flow to a text file, flushed at once."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        self._lock = threading.Lock()

    def __call__(self, event: FlowEvent) -> None:
        if event.kind is not EventKind.DONE:
            return
        line = json.dumps(flow_to_json(event.flow), ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            self.file.write(line + "\n")
            self.file.flush()
