"""Realistic, deterministic flows for UI tests: fixed ids, timestamps and addresses."""

from __future__ import annotations

import gzip
import json

from engine.flow import (
    Body,
    Certificate,
    Connection,
    Flow,
    FlowKind,
    FlowState,
    Request,
    Response,
    Timings,
    WebSocketMessage,
)

#: 2024-05-01 12:00:00 UTC
T0 = 1714564800.0


def make_flow(
    flow_id: int,
    *,
    method: str = "GET",
    scheme: str = "https",
    authority: str = "api.example.test",
    path: str = "/",
    version: str = "HTTP/1.1",
    request_headers: list[tuple[str, str]] | None = None,
    request_body: bytes = b"",
    status: int | None = 200,
    reason: str = "OK",
    response_headers: list[tuple[str, str]] | None = None,
    response_body: bytes = b"",
    start: float | None = None,
    duration: float | None = 0.120,
    error: str | None = None,
    pid: int = 4242,
    command: str = "python3 app.py",
    kind: FlowKind = FlowKind.HTTP,
) -> Flow:
    """An HTTP flow; `status=None` leaves it without a response, `duration=None` in progress."""
    start = T0 + flow_id if start is None else start
    host = authority.split(":")[0]
    port = 443 if scheme == "https" else 80
    if ":" in authority:
        port = int(authority.rsplit(":", 1)[1])
    conn = Connection(
        id=1000 + flow_id,
        client=("10.0.0.2", 40000 + flow_id),
        server=("203.0.113.10", port),
        upstream=("127.0.0.1", port),
        hostname=host,
        sni=host if scheme == "https" else None,
        alpn=("h2" if version == "HTTP/2" else "http/1.1") if scheme == "https" else None,
        tls_version="TLSv1.3" if scheme == "https" else None,
        certificate=Certificate(
            subject=f"CN={host}", issuer="CN=Example Test CA", not_before="2024-01-01T00:00:00Z",
            not_after="2025-01-01T00:00:00Z", sans=[host],
        ) if scheme == "https" else None,
        pid=pid,
        command=command,
    )
    if request_headers is None:
        request_headers = [("Host", authority), ("User-Agent", "demo/1.0"), ("Accept", "*/*")]
    request = Request(method, scheme, authority, path, version, list(request_headers),
                      Body.of(request_body))
    timings = Timings(start=start)
    timings.dns = start + 0.005
    timings.connect = start + 0.015
    if scheme == "https":
        timings.tls = start + 0.040
    timings.request_sent = start + 0.045
    flow = Flow(conn=conn, kind=kind, id=flow_id, request=request, timings=timings)
    flow.state = FlowState.REQUEST
    if status is not None:
        if response_headers is None:
            response_headers = [("Content-Type", "text/plain"),
                                ("Content-Length", str(len(response_body)))]
        flow.response = Response(status, reason, version, list(response_headers),
                                 Body.of(response_body))
        timings.first_byte = start + 0.090
        flow.state = FlowState.RESPONSE
    if duration is not None:
        timings.done = start + duration
        flow.state = FlowState.DONE
    if error is not None:
        flow.error = error
        flow.state = FlowState.ERROR
        timings.done = start + (duration or 0.05)
    return flow


def raw_flow(flow_id: int, kind: FlowKind = FlowKind.TCP, port: int = 5432) -> Flow:
    conn = Connection(id=1000 + flow_id, client=("10.0.0.2", 41000 + flow_id),
                      server=("203.0.113.20", port), hostname="db.example.test", pid=4242,
                      command="python3 app.py", transport="udp" if kind != FlowKind.TCP else "tcp")
    flow = Flow(conn=conn, kind=kind, id=flow_id, timings=Timings(start=T0 + flow_id))
    flow.bytes_sent, flow.bytes_received = 512, 2048
    flow.timings.done = T0 + flow_id + 0.3
    flow.state = FlowState.DONE
    return flow


JSON_BODY = json.dumps({
    "user": {"id": 7, "name": "Ada Lovelace", "roles": ["admin", "dev"]},
    "items": [{"sku": "A-1", "qty": 2, "price": 9.5}, {"sku": "B-7", "qty": 1, "price": 120}],
    "next": None,
}, separators=(",", ":")).encode()


def sample_flows() -> list[Flow]:
    """A small session: JSON API, HTML page, gzip JSON, POST form, 404, 500, error, pending,
    a binary download, a WebSocket and a raw TCP connection."""
    json_headers = [("Content-Type", "application/json; charset=utf-8"),
                    ("Content-Length", str(len(JSON_BODY))), ("Cache-Control", "no-store")]
    gz = gzip.compress(b'{"ok":true,"count":3}', mtime=0)
    flows = [
        make_flow(1, path="/v1/users/7?expand=items", response_headers=json_headers,
                  response_body=JSON_BODY, version="HTTP/2",
                  request_headers=[(":method", "GET"), (":authority", "api.example.test"),
                                   ("user-agent", "demo/1.0"), ("accept", "application/json"),
                                   ("accept-encoding", "gzip, br")]),
        make_flow(2, authority="www.example.test", path="/index.html",
                  response_headers=[("Content-Type", "text/html")],
                  response_body=b"<html><head><title>Hi</title></head><body><p>Hello</p></body></html>"),
        make_flow(3, path="/v1/stats", response_headers=[("Content-Type", "application/json"),
                                                         ("Content-Encoding", "gzip")],
                  response_body=gz),
        make_flow(4, method="POST", path="/login",
                  request_headers=[("Host", "api.example.test"),
                                   ("Content-Type", "application/x-www-form-urlencoded")],
                  request_body=b"user=ada&password=s3cret", status=302, reason="Found",
                  response_headers=[("Location", "/home")], duration=0.080),
        make_flow(5, path="/missing", status=404, reason="Not Found", duration=0.030),
        make_flow(6, authority="cdn.example.test", path="/boom", status=500,
                  reason="Internal Server Error", duration=1.5),
        make_flow(7, authority="flaky.example.test", path="/timeout", status=None,
                  error="upstream connection reset"),
        make_flow(8, authority="slow.example.test", path="/stream", status=None, duration=None),
        make_flow(9, authority="cdn.example.test", path="/logo.png",
                  response_headers=[("Content-Type", "image/png")],
                  response_body=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(48)),
                  pid=4250, command="curl -O https://cdn.example.test/logo.png"),
        make_flow(10, scheme="https", authority="ws.example.test", path="/chat", status=101,
                  reason="Switching Protocols", kind=FlowKind.WEBSOCKET,
                  response_headers=[("Upgrade", "websocket")], duration=2.0),
        raw_flow(11),
    ]
    flows[9].websocket_messages = [
        WebSocketMessage(True, 1, b'{"hello":"world"}', T0 + 10.1),
        WebSocketMessage(False, 1, b'{"welcome":true}', T0 + 10.2),
        WebSocketMessage(False, 2, b"\x00\x01\xff", T0 + 10.3),
    ]
    return flows
