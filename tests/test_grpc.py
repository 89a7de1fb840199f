"""gRPC through tapui with grpcio on both ends: h2c and TLS, trailers, and the messages shown
decoded without their .proto."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trustme

from engine.flow import FlowBus
from engine.har import load_har
from engine.replay import Replayer, ReplayOptions
from engine.session_db import SessionDB
from engine.session_store import SessionStore
from engine.sqlfilter import compile_expr
from tapui.widgets.body_format import format_body
from tapui.widgets.flow_detail import summary
from tapui.widgets.flow_list import cells, row_class
from tests.conftest import HOST, client, run_tapui

pytestmark = pytest.mark.usefixtures("sandbox")
PY = sys.executable


def reply_to(name: bytes) -> bytes:
    """The server's answer: field 1 a greeting, field 2 the number 42 (a varint)."""
    greeting = b"hello, " + name
    return b"\x0a" + bytes([len(greeting)]) + greeting + b"\x10\x2a"


class Echo(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != "/echo.Echo/Say":
            return None
        return grpc.unary_unary_rpc_method_handler(say)


def say(request: bytes, context: grpc.ServicerContext) -> bytes:
    name = request[2:]
    if name == b"nobody":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such name: nobody")
    return reply_to(name)


@pytest.fixture(scope="module")
def grpc_ports(ca: trustme.CA) -> Iterator[dict[str, int]]:
    """One grpcio server on the host's loopback: a plain (h2c) port and a TLS port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[Echo()])
    plain = server.add_insecure_port("127.0.0.1:0")
    cert = ca.issue_cert(HOST)
    credentials = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), b"".join(c.bytes() for c in cert.cert_chain_pems))]
    )
    tls = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield {"plain": plain, "tls": tls}
    finally:
        server.stop(None).wait(5)


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_a_grpc_call_is_decoded_with_its_messages_and_trailers(
    mode: str, grpc_ports: dict[str, int], ca: trustme.CA, tmp_path: Path
) -> None:
    upstream_ca = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(upstream_ca))
    har = tmp_path / "s.har"
    result = run_tapui(
        "--no-ui", "--upstream-ca", str(upstream_ca), "--har", str(har), "--",
        PY, client("grpc_client.py"), f"{HOST}:{grpc_ports[mode]}", mode, "tapui",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == reply_to(b"tapui").hex()
    flows = list(load_har(har))
    assert len([f for f in flows if f.request is not None]) == 1, (flows, result.stderr)
    [flow] = [f for f in flows if f.request is not None]
    assert flow.request.path == "/echo.Echo/Say" and flow.request.method == "POST"
    assert flow.response is not None and flow.response.http_version == "HTTP/2"
    assert ("grpc-status", "0") in flow.response.trailers
    shown = [line.plain for line in format_body(
        flow.response.body.read(), "application/grpc").lines]
    assert shown == ["# message 1 of 1, 16 bytes", '1: "hello, tapui"', "2: 42"]
    asked = [line.plain for line in format_body(
        flow.request.body.read(), "application/grpc").lines]
    assert asked == ["# message 1 of 1, 7 bytes", '1: "tapui"']


def test_a_failed_rpc_shows_its_grpc_status(grpc_ports: dict[str, int], tmp_path: Path) -> None:
    """An RPC that fails still has HTTP status 200: the line, the list's type column and the
    row's colour say how it failed."""
    har = tmp_path / "s.har"
    result = run_tapui(
        "--no-ui", "--har", str(har), "--",
        PY, client("grpc_client.py"), f"{HOST}:{grpc_ports['plain']}", "plain", "nobody",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["failed", "NOT_FOUND"]
    [line] = [line for line in result.stderr.splitlines() if "/echo.Echo/Say" in line]
    assert " 200 " in line and line.endswith("grpc NOT_FOUND: no such name: nobody"), line
    [flow] = [f for f in load_har(har) if f.request is not None]
    assert cells(flow)["type"] == "grpc NOT_FOUND" and row_class(flow) == "error"
    assert "  → 200   0b  ✗ grpc NOT_FOUND: no such name: nobody  " in summary(flow).plain


@pytest.mark.parametrize(("call", "status"), [("fail", "NOT_FOUND"), ("ok", None), ("text", None)])
def test_a_grpc_web_status_is_read_from_the_end_of_its_body(
    http_port: int, tmp_path: Path, call: str, status: str | None
) -> None:
    """gRPC-Web carries its trailers in the body's last frame: they become the flow's trailers,
    so a failed call shows as failed in the line, the HAR and a session file's ~e."""
    har, session = tmp_path / "s.har", tmp_path / "s.tapui"
    request = tmp_path / "request"
    request.write_bytes(b"\x00\x00\x00\x00\x04\x0a\x02me")  # one gRPC-Web message
    result = run_tapui(
        "--no-ui", "--har", str(har), "--save", str(session), "--",
        "curl", "-sS", "-o", "/dev/null", "--data-binary", f"@{request}",
        "-H", "content-type: application/grpc-web+proto",
        f"http://{HOST}:{http_port}/grpc-web/{call}",
    )
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "/grpc-web/" in line]
    [flow] = [f for f in load_har(har) if f.request is not None]
    db = SessionDB(session)
    try:
        where = compile_expr("~e")
        errors = db.conn.execute(f"SELECT count(*) FROM flows f WHERE {where.where}",
                                 where.params).fetchone()[0]
    finally:
        db.close()
    if status is None:
        assert line.endswith(" HTTP/1.1") and errors == 0, line  # no "grpc NAME" at its end
        assert ("grpc-status", "0") in flow.response.trailers  # type: ignore[union-attr]
    else:
        assert line.endswith("grpc NOT_FOUND: no such user"), line
        assert ("grpc-status", "5") in flow.response.trailers  # type: ignore[union-attr]
        assert errors == 1


def test_a_replayed_grpc_call_is_answered_again(
    grpc_ports: dict[str, int], ca: trustme.CA, tmp_path: Path
) -> None:
    """Replay keeps HTTP/2 and the `te: trailers` that gRPC servers require."""
    upstream_ca = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(upstream_ca))
    session = tmp_path / "s.tapui"
    result = run_tapui(
        "--no-ui", "-q", "--upstream-ca", str(upstream_ca), "--save", str(session), "--",
        PY, client("grpc_client.py"), f"{HOST}:{grpc_ports['tls']}", "tls", "again",
    )
    assert result.returncode == 0, result.stderr
    [flow] = [f for f in SessionStore(session) if f.request is not None]
    replayer = Replayer(FlowBus(), ReplayOptions(upstream_ca=[str(upstream_ca)]))
    replayed = replayer.replay(flow)
    assert replayed.error is None and replayed.conn.alpn == "h2"
    assert replayed.response is not None and ("grpc-status", "0") in replayed.response.trailers
    shown = [line.plain for line in format_body(
        replayed.response.body.read(), "application/grpc").lines]
    assert shown == ["# message 1 of 1, 16 bytes", '1: "hello, again"', "2: 42"]
