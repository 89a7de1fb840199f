"""Decoding through the real sandbox: WebSockets, streaming responses, malformed traffic."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from engine.capture import Capture, CaptureOptions
from engine.flow import EventKind, FlowBus, FlowEvent, FlowState
from engine.runstatus import RunStatus
from tests import servers, tls_servers
from tests.conftest import (
    HOST,
    ROOT,
    client,
    need,
    run_measuring_peak_rss,
    run_tapui,
    tapui_command,
)

pytestmark = pytest.mark.usefixtures("sandbox")
PY = sys.executable


@pytest.fixture
def ws_port() -> Iterator[int]:
    """A websockets echo server on 127.0.0.1, in its own event loop thread."""
    from websockets.asyncio.server import serve

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port_box: list[int] = []
    stop = loop.create_future()

    async def echo(ws) -> None:  # type: ignore[no-untyped-def]
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", 0) as server:
            port_box.append(server.sockets[0].getsockname()[1])
            ready.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)
    yield port_box[0]
    loop.call_soon_threadsafe(stop.set_result, None)
    thread.join(10)
    loop.close()


def test_websocket_messages_are_recorded(ws_port: int, tmp_path: Path) -> None:
    har = tmp_path / "ws.har"
    result = run_tapui(
        "--no-ui", "--har", str(har), "--", PY, client("wsclient.py"), f"ws://{HOST}:{ws_port}/chat"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["'hello'", "'tapui'", "b'\\x00\\x01binary'"]
    [entry] = json.loads(har.read_text())["log"]["entries"]
    assert entry["response"]["status"] == 101
    messages = [(m["type"], m["opcode"], m["data"]) for m in entry["_webSocketMessages"]]
    assert messages[:4] == [("send", 1, "hello"), ("receive", 1, "hello"),
                            ("send", 1, "tapui"), ("receive", 1, "tapui")]
    assert [m[:2] for m in messages[4:6]] == [("send", 2), ("receive", 2)]


def test_streaming_response_is_seen_before_it_completes(pool: bytes, tmp_path: Path) -> None:
    """The engine in this process: its bus shows the first chunk while the server holds the rest."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = tls_servers.https_server(ca, pool)
    gate = threading.Event()
    server.chunk_gate = gate  # type: ignore[attr-defined]
    seen_partial = threading.Event()
    events: list[tuple[EventKind, FlowState, bytes]] = []

    def listener(event: FlowEvent) -> None:
        resp = event.flow.response
        body = resp.body.read() if resp is not None else b""
        events.append((event.kind, event.flow.state, body))
        if resp is not None and b"chunk 0" in body and not event.flow.finished:
            seen_partial.set()
            gate.set()

    bus = FlowBus()
    bus.subscribe(listener)
    with servers.running(server) as port:
        url = f"https://{HOST}:{port}/chunked/3"
        options = CaptureOptions(
            argv=["curl", "-sS", "-N", url], upstream_ca=[str(ca_file)], interactive=False
        )
        capture = Capture(options, bus, RunStatus(command=options.argv))
        capture.start()
        code = asyncio.run(capture.run())
    assert code == 0
    assert seen_partial.is_set()
    kinds = [e[0] for e in events]
    assert kinds[-1] == EventKind.DONE
    assert events[-1][2] == b"chunk 0\nchunk 1\nchunk 2\n"
    first_partial = next(i for i, e in enumerate(events) if b"chunk 0" in e[2])
    assert first_partial < len(events) - 1  # an update came before the end


MALFORMED = {
    "/bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "/truncated": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b",
    "/bad-header": b"HTTP/1.1 200 OK\r\nX-Bad\x00Header: \x01\x02\r\nContent-Length: 2\r\n\r\nok",
}
H2_GARBAGE = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + b"\xab" * 64


class CannedServer(threading.Thread):
    """Answers each connection with the canned bytes its first request asks for, then closes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = conn.recv(65536)
                if data.startswith(b"PRI * HTTP/2.0"):
                    conn.sendall(H2_GARBAGE)
                else:
                    path = data.split(b" ", 2)[1].decode()
                    conn.sendall(MALFORMED[path])
                conn.shutdown(socket.SHUT_WR)
                time.sleep(0.2)

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        self.join(5)


@pytest.fixture
def canned() -> Iterator[CannedServer]:
    server = CannedServer()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("path", sorted(MALFORMED))
def test_malformed_http1_is_relayed_unchanged_and_marked(canned: CannedServer, path: str, tmp_path: Path) -> None:
    jsonl = tmp_path / "flows.jsonl"
    result = run_tapui(
        "--no-ui", "--jsonl", str(jsonl), "--",
        PY, client("rawclient.py"), HOST, str(canned.port), "http1", path,
    )
    assert result.returncode == 0, result.stderr
    raw = MALFORMED[path]
    assert result.stdout.split() == [str(len(raw)), hashlib.sha256(raw).hexdigest()]
    flows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert any(f["error"] for f in flows), flows


def test_a_response_cut_short_says_how_much_of_it_came(canned: CannedServer) -> None:
    result = run_tapui(
        "--no-ui", "--", PY, client("rawclient.py"), HOST, str(canned.port), "http1", "/truncated"
    )
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "GET " in line]
    assert " 200 10 B of 100 B " in line, line


def test_garbage_http2_frame_is_relayed_unchanged_and_marked(canned: CannedServer, tmp_path: Path) -> None:
    jsonl = tmp_path / "flows.jsonl"
    result = run_tapui(
        "--no-ui", "--jsonl", str(jsonl), "--", PY, client("rawclient.py"), HOST, str(canned.port), "h2"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(len(H2_GARBAGE)), hashlib.sha256(H2_GARBAGE).hexdigest()]
    flows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    exchanges = [f for f in flows if f["kind"] == "http"]  # the DNS lookups are flows too
    assert exchanges and all(f["error"] for f in exchanges), flows


def test_large_https_download_keeps_memory_bounded(tmp_path: Path) -> None:
    """500 MiB over HTTPS through tapui: its peak resident memory stays under 200 MB."""
    ca = trustme.CA()
    cert = ca.issue_cert(*tls_servers.NAMES)
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import subprocess

    server = subprocess.Popen(
        [PY, str(ROOT / "bench" / "loopback_server.py"), str(port), str(cert_file), str(key_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        script = (
            f"curl -4 -sS -o /dev/null -w '%{{size_download}}' https://{HOST}:{port}/500 && sleep 1"
        )
        proc, out, err, peak = run_measuring_peak_rss(
            tapui_command("--no-ui", "-q", "--upstream-ca", str(ca_file), "--", "sh", "-c", script),
            cwd=ROOT,
        )
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.wait(10)
    assert proc.returncode == 0, err
    assert out == str(500 * 1024 * 1024)
    assert 0 < peak < 200 * 1000, f"peak RSS {peak} KiB"


@pytest.mark.parametrize("wait", [0.0, 0.3], ids=["at-once", "after-the-server"])
def test_h2c_is_decoded_when_the_server_speaks_first(
    wait: float, pool: bytes, tmp_path: Path
) -> None:
    """An h2c server sends its SETTINGS as soon as it accepts; an app whose preface comes after
    them (here 0.3 s after, as gRPC's often did by a hair) is still decoded as HTTP/2."""
    jsonl = tmp_path / "flows.jsonl"
    with tls_servers.running_h2(trustme.CA(), pool, tls=False) as server:
        result = run_tapui(
            "--no-ui", "-q", "--no-save", "--jsonl", str(jsonl), "--",
            PY, client("h2c_client.py"), HOST, str(server.port), "/hello", str(wait),
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200 hello over h2\n\n"
    flows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    http = [f for f in flows if f["kind"] == "http"]
    assert [(f["url"], f["status"], f["http_version"]) for f in http] == [
        (f"http://{HOST}:{server.port}/hello", 200, "HTTP/2")], flows


@pytest.mark.parametrize("app", ["curl", "java"])
def test_an_upgrade_to_h2c_is_decoded_as_http2(app: str, pool: bytes, tmp_path: Path) -> None:
    """curl --http2 and Java's HttpClient ask for h2c on an http:// URL with an HTTP/1.1
    Upgrade (Java's with its own HTTP2-Settings): the request is answered on stream 1, in
    HTTP/2, and decoded as such."""
    need(app)
    jsonl = tmp_path / "flows.jsonl"
    with tls_servers.running_h2(trustme.CA(), pool, tls=False) as server:
        url = f"http://{HOST}:{server.port}"
        command = (["curl", "-sS", "--http2", "-w", "%{http_version}", f"{url}/hello"]
                   if app == "curl" else ["java", client("Fetch.java"), f"{url}/hello"])
        result = run_tapui("--no-ui", "-q", "--no-save", "--jsonl", str(jsonl), "--", *command)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("hello over h2\n2" if app == "curl" else "200 HTTP_2 hello over h2\n")
    http = [f for f in map(json.loads, jsonl.read_text().splitlines()) if f["kind"] == "http"]
    assert [(f["url"], f["status"], f["http_version"], f["error"]) for f in http] == [
        (f"{url}/hello", 200, "HTTP/2", None)], http
