"""Replay: a flow recorded in the sandbox is sent again from tapui, and recorded anew."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import trustme
from rich.console import Console

from engine.flow import Body, EventKind, Flow, FlowBus, FlowEvent, FlowKind
from engine.replay import Replayer, ReplayError, ReplayOptions
from engine.session_store import SessionStore
from tapui.widgets.connection_view import render_connection
from tests import servers, tls_servers
from tests.conftest import HOST, run_tapui
from tests.ui_fixtures import make_flow, raw_flow

pytestmark = pytest.mark.usefixtures("sandbox")


def recorded(tmp_path: Path, *command: str, options: tuple[str, ...] = ()) -> Flow:
    """The one HTTP flow `command` makes in the sandbox, read back from its session file."""
    session = tmp_path / "run.tapui"
    result = run_tapui("--no-ui", "-q", "--save", str(session), *options, "--", *command)
    assert result.returncode == 0, result.stderr
    store = SessionStore(session)
    flows = [f for f in store if f.kind is FlowKind.HTTP]
    assert len(flows) == 1, flows
    return flows[0]


class Events:
    def __init__(self, bus: FlowBus) -> None:
        self.seen: list[FlowEvent] = []
        bus.subscribe(self.seen.append)

    def kinds(self, flow: Flow) -> list[EventKind]:
        return [e.kind for e in self.seen if e.flow is flow]


def test_a_replay_sends_the_same_request_and_records_the_answer(
    http_server: servers._ThreadingServer, tmp_path: Path
) -> None:
    port = http_server.server_address[1]
    flow = recorded(tmp_path, "curl", "-sS", "-H", "X-Trace: 7", "--data-binary", "name=ada",
                    f"http://{HOST}:{port}/submit?x=1")
    bus = FlowBus()
    events = Events(bus)
    replayed = Replayer(bus, ReplayOptions()).replay(flow)
    first, second = http_server.requests
    assert (second["method"], second["path"], second["body"]) == ("POST", "/submit?x=1",
                                                                  b"name=ada")
    assert ("X-Trace", "7") in second["headers"]
    assert dict(first["headers"])["Host"] == dict(second["headers"])["Host"]
    assert replayed.id != flow.id and not replayed.error
    assert replayed.response is not None and replayed.response.status == 200
    assert replayed.response.body.read() == hashlib.sha256(b"name=ada").hexdigest().encode()
    assert replayed.conn.command == f"replay of #{flow.id}"
    assert replayed.conn.upstream == ("127.0.0.1", port)
    assert events.kinds(replayed)[0] is EventKind.NEW
    assert events.kinds(replayed)[-1] is EventKind.DONE


def test_a_replay_over_tls_verifies_the_server_as_the_relay_does(
    https: servers._ThreadingServer, ca_file: str, tmp_path: Path
) -> None:
    port = https.server_address[1]
    flow = recorded(tmp_path, "curl", "-sS", "--http1.1", f"https://{HOST}:{port}/json",
                    options=("--upstream-ca", ca_file))
    trusted = Replayer(FlowBus(), ReplayOptions(upstream_ca=[ca_file])).replay(flow)
    assert trusted.response is not None and trusted.response.status == 200
    assert trusted.response.body.read() == b'{"hello": "world", "n": [1, 2, 3]}'
    assert trusted.conn.tls_version and trusted.conn.certificate is not None
    assert trusted.conn.sni == flow.conn.sni
    untrusted = Replayer(FlowBus(), ReplayOptions()).replay(flow)
    assert untrusted.response is None
    assert untrusted.error is not None
    assert untrusted.error.startswith("replay: the server's certificate failed verification")
    assert len(https.requests) == 2  # the untrusted server never got the request
    insecure = Replayer(FlowBus(), ReplayOptions(insecure=True)).replay(flow)
    assert insecure.response is not None and insecure.response.status == 200


def test_an_http2_flow_is_replayed_in_http2(
    h2server: tls_servers.H2Server, ca_file: str, tmp_path: Path
) -> None:
    flow = recorded(tmp_path, "curl", "-sS", "--http2", "--data-binary", "ping",
                    f"https://{HOST}:{h2server.port}/echo", options=("--upstream-ca", ca_file))
    assert flow.request is not None and flow.request.http_version == "HTTP/2"
    replayed = Replayer(FlowBus(), ReplayOptions(upstream_ca=[ca_file])).replay(flow)
    assert replayed.conn.alpn == "h2" and not replayed.error
    assert replayed.request is not None and replayed.request.http_version == "HTTP/2"
    assert replayed.response is not None and replayed.response.status == 200
    assert replayed.response.body.read() == hashlib.sha256(b"ping").hexdigest().encode()
    again = h2server.requests[-1]
    assert again["headers"][":method"] == "POST" and again["body"] == b"ping"


def test_a_server_gone_since_gives_a_flow_with_the_error(pool: bytes, tmp_path: Path) -> None:
    server = servers.http_server(pool)
    with servers.running(server) as port:
        flow = recorded(tmp_path, "curl", "-sS", f"http://{HOST}:{port}/hello")
    bus = FlowBus()
    events = Events(bus)
    replayed = Replayer(bus, ReplayOptions()).replay(flow)
    assert replayed.error == "replay: Connection refused"
    assert replayed.request is not None and replayed.request.path == "/hello"
    assert events.kinds(replayed) == [EventKind.NEW, EventKind.DONE]


def test_flows_that_cannot_be_replayed_say_why() -> None:
    replayer = Replayer(FlowBus(), ReplayOptions())
    with pytest.raises(ReplayError, match=r"^Flow #11 has no HTTP request to replay\.$"):
        replayer.replay(raw_flow(11))
    cut = make_flow(4, method="POST", path="/upload")
    cut.request.body = Body(cap=10)
    cut.request.body.append(b"x" * 25)
    with pytest.raises(ReplayError, match=r"request body was kept only in part \(10 of 25"):
        replayer.replay(cut)


def test_stop_ends_a_replay_waiting_on_a_silent_server() -> None:
    """Quitting must not wait out a server that never answers."""
    release = threading.Event()
    with servers.running(servers.hold_open_server(release)) as port:
        flow = make_flow(10**9, scheme="http", authority=f"127.0.0.1:{port}", path="/slow")
        replayer = Replayer(FlowBus(), ReplayOptions())
        result: list[Flow] = []
        thread = threading.Thread(target=lambda: result.append(replayer.replay(flow)))
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive()  # waiting for the answer
        started = time.monotonic()
        replayer.stop()
        thread.join(5)
        release.set()
    assert not thread.is_alive() and time.monotonic() - started < 2
    assert result[0].response is None and result[0].error is not None
    later = replayer.replay(flow)  # (the server is gone too: stopped comes first)
    assert later.error == "replay: tapui is quitting"


def test_a_cleartext_http2_flow_is_replayed_with_prior_knowledge(
    ca: trustme.CA, pool: bytes, tmp_path: Path
) -> None:
    with tls_servers.running_h2(ca, pool, tls=False) as server:
        flow = recorded(tmp_path, "curl", "-sS", "--http2-prior-knowledge",
                        f"http://{HOST}:{server.port}/hello")
        replayed = Replayer(FlowBus(), ReplayOptions()).replay(flow)
        assert len(server.requests) == 2
    assert replayed.request is not None and replayed.request.http_version == "HTTP/2"
    assert replayed.response is not None and replayed.response.status == 200
    assert replayed.response.body.read() == b"hello over h2\n"


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_flow_through_a_proxys_tunnel_is_replayed_through_a_new_tunnel(
    https: servers._ThreadingServer, http_server: servers._ThreadingServer, ca_file: str,
    tmp_path: Path, scheme: str,
) -> None:
    port = (https if scheme == "https" else http_server).server_address[1]
    url = f"{scheme}://api.example.test:{port}/hello"
    tunnels = servers.connect_proxy()
    with servers.running(tunnels) as proxy_port:
        proxy = f"http://127.0.0.1:{proxy_port}"  # (the host's: tapui points it there)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env |= {"https_proxy": proxy, "http_proxy": proxy}
        session = tmp_path / "run.tapui"
        result = run_tapui("--no-ui", "-q", "--upstream-ca", ca_file, "--save", str(session),
                           "--", "curl", "-sS", "--proxytunnel", url, env=env)
        assert result.returncode == 0, result.stderr
        [flow] = [f for f in SessionStore(session) if f.request and f.request.method == "GET"]
        assert flow.conn.tunnel == ("connect", f"api.example.test:{port}")
        console = Console(width=120, record=True)
        console.print(render_connection(flow))  # the Connection tab says so
        assert f"to api.example.test:{port}, through the HTTP proxy above" in console.export_text()
        replayed = Replayer(FlowBus(), ReplayOptions(upstream_ca=[ca_file])).replay(flow)
    assert tunnels.targets == [f"api.example.test:{port}"] * 2  # type: ignore[attr-defined]
    assert replayed.error is None, replayed.error
    assert replayed.response is not None and replayed.response.body.read() == (
        b"hello from the host\n")
    assert replayed.conn.tunnel == flow.conn.tunnel


@pytest.mark.parametrize("proxy", ["socks5h://127.0.0.1:{port}", "socks4a://127.0.0.1:{port}",
                                   "socks5h://who:secret@127.0.0.1:{port}"])
def test_a_flow_through_a_socks_proxy_is_replayed_through_a_new_tunnel(
    https: servers._ThreadingServer, ca_file: str, tmp_path: Path, proxy: str
) -> None:
    port = https.server_address[1]
    socks = servers.socks_proxy()
    with servers.running(socks) as proxy_port:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["all_proxy"] = proxy.format(port=proxy_port)  # (the host's: tapui points it there)
        session = tmp_path / "run.tapui"
        result = run_tapui("--no-ui", "-q", "--upstream-ca", ca_file, "--save", str(session),
                           "--", "curl", "-sS", f"https://api.example.test:{port}/hello", env=env)
        assert result.returncode == 0, result.stderr
        [flow] = [f for f in SessionStore(session) if f.request is not None]
        assert flow.conn.tunnel == ("socks", f"api.example.test:{port}")
        replayed = Replayer(FlowBus(), ReplayOptions(upstream_ca=[ca_file])).replay(flow)
    assert replayed.error is None, replayed.error
    assert replayed.response is not None and replayed.response.body.read() == (
        b"hello from the host\n")
    # (replay asks in SOCKS5 without a login: this proxy grants that too)
    assert [target for target, _ in socks.targets] == [f"api.example.test:{port}"] * 2  # type: ignore[attr-defined]


def test_a_socks_proxy_that_wants_a_login_gives_a_flow_that_says_so() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def refuse() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(3)
                conn.sendall(b"\x05\xff")  # no acceptable method: a login is needed

        thread = threading.Thread(target=refuse)
        thread.start()
        flow = make_flow(10**9, scheme="http", authority="api.example.test", path="/")
        flow.conn.upstream = listener.getsockname()
        flow.conn.tunnel = ("socks", "api.example.test:80")
        replayed = Replayer(FlowBus(), ReplayOptions()).replay(flow)
        thread.join(5)
    assert replayed.error == "replay: the SOCKS proxy wants a login (replay has none to give)"


def test_a_replay_while_browsing_a_saved_session_is_added_to_it(
    http_server: servers._ThreadingServer, tmp_path: Path
) -> None:
    """`tapui open FILE`, then r: the new flow is written into the file, after its rows."""
    import asyncio

    from tapui.app import TapuiApp, saved_session_replayer

    port = http_server.server_address[1]
    recorded(tmp_path, "curl", "-sS", f"http://{HOST}:{port}/json")
    session = tmp_path / "run.tapui"
    store = SessionStore(session)
    rows = store.last_row()
    [original] = [f for f in store if f.request is not None]

    async def browse() -> None:
        app = TapuiApp(store=store, replayer=saved_session_replayer(store, ReplayOptions()),
                       initial_filter="~m GET")
        async with app.run_test(size=(140, 30)) as pilot:
            await pilot.press("r")
            await app.workers.wait_for_complete()
            for _ in range(100):
                await pilot.pause(0.05)
                if app.store.view_len == 2:
                    break
            assert app.store.view_len == 2
            await pilot.pause(0.2)
            # (the list took it in: its rows were resized and repainted, not only counted)
            assert app.flow_list.virtual_size.height == 3
            notes = [n.message for n in app._notifications]
            assert f"Replayed #{original.id} as #{rows + 1}: 200 OK" in notes, notes

    asyncio.run(browse())
    store.close()
    again = [f for f in SessionStore(session) if f.request is not None]
    assert [(f.id, f.request.path, f.response.status) for f in again] == [
        (original.id, "/json", 200), (rows + 1, "/json", 200)]
    assert again[1].conn.command == f"replay of #{original.id}"
    assert len(http_server.requests) == 2


def test_flows_read_from_a_har_file_are_replayed(
    http_server: servers._ThreadingServer, tmp_path: Path
) -> None:
    """tapui's own HAR keeps the address it dialled; another tool's gives the URL's host and
    port (the host alias meaning the host's loopback)."""
    from engine.har import load_har, write_har

    port = http_server.server_address[1]
    har = tmp_path / "run.har"
    result = run_tapui("--no-ui", "-q", "--har", str(har), "--", "curl", "-sS",
                       f"http://{HOST}:{port}/json")
    assert result.returncode == 0, result.stderr
    [flow] = [f for f in load_har(har) if f.request is not None]
    assert flow.conn.upstream == ("127.0.0.1", port)
    replayed = Replayer(FlowBus(), ReplayOptions()).replay(flow)
    assert replayed.response is not None and replayed.response.status == 200
    foreign = make_flow(10**9, scheme="http", authority=f"{HOST}:{port}", path="/json")
    foreign.conn.upstream = None  # (as from a browser's HAR)
    write_har(tmp_path / "foreign.har", [foreign])
    [read] = list(load_har(tmp_path / "foreign.har"))
    assert read.conn.upstream is None
    again = Replayer(FlowBus(), ReplayOptions()).replay(read)
    assert again.conn.upstream == ("127.0.0.1", port)
    assert again.response is not None and again.response.body.read() == (
        b'{"hello": "world", "n": [1, 2, 3]}')
    assert [r["path"] for r in http_server.requests] == ["/json"] * 3
