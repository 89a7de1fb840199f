"""HTTPS through tapui with real clients: interception, verification, ALPN, decoding, HAR."""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jsonschema
import pytest
import trustme

from tests import servers, tls_servers
from tests.conftest import HOST, client, need, run_tapui

pytestmark = pytest.mark.usefixtures("sandbox")
PY = sys.executable
SCHEMA = json.loads((Path(__file__).parent / "har_schema.json").read_text())


def tapui_https(ca_file: str, *command: str, har: Path | None = None, extra: tuple = ()):  # type: ignore[no-untyped-def]
    args = ["--no-ui", "--upstream-ca", ca_file, *extra]
    if har is not None:
        args += ["--har", str(har)]
    return run_tapui(*args, "--", *command)


def entries(har: Path) -> list[dict]:
    data = json.loads(har.read_text())
    jsonschema.validate(data, SCHEMA)
    return data["log"]["entries"]


def test_curl_http11_over_tls(ca_file: str, https: servers._ThreadingServer, tmp_path: Path) -> None:
    port = https.server_address[1]
    har = tmp_path / "s.har"
    result = tapui_https(
        ca_file, "curl", "-sS", "--http1.1", f"https://{HOST}:{port}/hello", har=har
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the host\n"
    [entry] = entries(har)
    assert entry["request"]["url"] == f"https://{HOST}:{port}/hello"
    assert entry["response"]["status"] == 200
    assert entry["response"]["content"]["text"] == "hello from the host\n"
    assert f"GET https://{HOST}:{port}/hello 200" in result.stderr


def test_curl_http2_stays_http2(ca_file: str, h2server: tls_servers.H2Server, tmp_path: Path) -> None:
    har = tmp_path / "s.har"
    result = tapui_https(
        ca_file, "curl", "-sS", "--http2", "-w", "%{http_version}",
        f"https://{HOST}:{h2server.port}/hello", har=har,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello over h2\n2"
    [entry] = entries(har)
    assert entry["request"]["httpVersion"] == entry["response"]["httpVersion"] == "HTTP/2"
    assert entry["_tapui"]["alpn"] == "h2"


@pytest.mark.parametrize("path", ["/trailers", "/late-trailers"], ids=["at-once", "late"])
def test_grpc_style_trailers_over_h2(
    ca_file: str, h2server: tls_servers.H2Server, tmp_path: Path, path: str
) -> None:
    """Trailers are recorded, also when they come 0.1 s after the body ("late"): curl stops
    reading at Content-Length and exits, and tapui waits for them (up to its drain time)
    instead of ending the exchange unfinished."""
    har = tmp_path / "s.har"
    result = tapui_https(
        ca_file, "curl", "-sS", "--http2", "-o", "/dev/null",
        f"https://{HOST}:{h2server.port}{path}", har=har,
    )
    assert result.returncode == 0, result.stderr
    [entry] = entries(har)
    assert "_error" not in entry, entry["_error"]
    assert {"name": "grpc-status", "value": "0"} in entry["response"]["_trailers"]


def test_python_urllib_and_http_client(ca_file: str, https: servers._ThreadingServer) -> None:
    port = https.server_address[1]
    code = (
        "import urllib.request, http.client, ssl\n"
        f"print(urllib.request.urlopen('https://{HOST}:{port}/hello').read().decode(), end='')\n"
        f"c = http.client.HTTPSConnection('{HOST}', {port}, context=ssl.create_default_context())\n"
        "c.request('POST', '/submit', body=b'abc')\n"
        "print(c.getresponse().read().decode())\n"
    )
    result = tapui_https(ca_file, PY, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "hello from the host",
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    ]


def test_node_https(ca_file: str, https: servers._ThreadingServer) -> None:
    need("node")
    port = https.server_address[1]
    code = (
        f"require('https').get('https://{HOST}:{port}/hello', r => {{"
        "let b=''; r.on('data', d => b += d); r.on('end', () => process.stdout.write(b)); })"
        ".on('error', e => { console.error(e.message); process.exit(3); })"
    )
    result = tapui_https(ca_file, "node", "-e", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the host\n"


def test_java_trusts_tapui_through_its_trust_store(
    ca_file: str, https: servers._ThreadingServer
) -> None:
    need("java")
    port = https.server_address[1]
    result = tapui_https(ca_file, "java", client("Fetch.java"), f"https://{HOST}:{port}/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200 HTTP_1_1 hello from the host\n"


def test_java_http2_stays_http2(ca_file: str, h2server: tls_servers.H2Server) -> None:
    need("java")
    result = tapui_https(ca_file, "java", client("Fetch.java"), f"https://{HOST}:{h2server.port}/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "200 HTTP_2 hello over h2\n"


def test_wget_https(ca_file: str, https: servers._ThreadingServer) -> None:
    port = https.server_address[1]
    result = tapui_https(ca_file, "wget", "-q", "-O", "-", f"https://{HOST}:{port}/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the host\n"


def test_unknown_upstream_ca_fails_the_apps_handshake(https: servers._ThreadingServer) -> None:
    port = https.server_address[1]
    result = run_tapui("--no-ui", "--", "curl", "-sS", f"https://{HOST}:{port}/hello")
    assert result.returncode != 0  # curl's own TLS failure
    assert result.stdout == ""
    assert "certificate verify failed" in result.stderr  # the flow says why
    assert https.requests == []


def test_insecure_skips_upstream_verification(https: servers._ThreadingServer) -> None:
    port = https.server_address[1]
    result = run_tapui("--no-ui", "--insecure", "--", "curl", "-sS", f"https://{HOST}:{port}/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the host\n"


def test_ignore_hosts_passes_tls_through_untouched(ca_file: str, https: servers._ThreadingServer) -> None:
    """Untouched TLS reaches the upstream's own certificate: curl trusts it only with its CA."""
    port = https.server_address[1]
    url = f"https://{HOST}:{port}/hello"
    result = run_tapui(
        "--no-ui", "--ignore-hosts", r"^host\.tapui\.internal$", "--",
        "curl", "-sS", "--cacert", ca_file, url,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the host\n"
    assert "GET " not in result.stderr  # not decoded: only a connection line


def test_client_rejecting_tapuis_certificate_shows_as_error(
    ca_file: str, https: servers._ThreadingServer
) -> None:
    port = https.server_address[1]
    url = f"https://{HOST}:{port}/hello"
    result = tapui_https(ca_file, "curl", "-sS", "--cacert", ca_file, url)  # pins the real CA
    assert result.returncode != 0
    assert "rejected tapui's TLS" in result.stderr


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "gzip, br"])
def test_encoded_bodies_are_decoded_in_har(
    ca_file: str, https: servers._ThreadingServer, tmp_path: Path, encoding: str
) -> None:
    port = https.server_address[1]
    har = tmp_path / "s.har"
    result = tapui_https(
        ca_file, "curl", "-sS", "-o", "/dev/null",
        f"https://{HOST}:{port}/encoded/{encoding.replace(' ', '')}", har=har,
    )
    assert result.returncode == 0, result.stderr
    [entry] = entries(har)
    assert entry["response"]["content"]["text"] == tls_servers.ENCODED_BODY.decode()


def test_http2_post_and_concurrent_streams(ca_file: str, h2server: tls_servers.H2Server, tmp_path: Path) -> None:
    har = tmp_path / "s.har"
    base = f"https://{HOST}:{h2server.port}"
    result = tapui_https(
        ca_file, "curl", "-sS", "--http2", "-Z", f"{base}/bytes/100000", f"{base}/hello",
        f"{base}/bytes/5000", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null", har=har,
    )
    assert result.returncode == 0, result.stderr
    got = sorted((e["request"]["url"], e["response"]["content"]["size"]) for e in entries(har))
    assert got == sorted([(f"{base}/bytes/100000", 100000), (f"{base}/hello", 14),
                          (f"{base}/bytes/5000", 5000)])


def test_har_has_connection_level_fields(ca_file: str, https: servers._ThreadingServer, tmp_path: Path) -> None:
    port = https.server_address[1]
    har = tmp_path / "s.har"
    result = tapui_https(
        ca_file, "curl", "-sS", "-o", "/dev/null", "-w", "%{remote_ip}", "-H", "Cookie: a=1",
        f"https://{HOST}:{port}/hello?x=1&y=2", har=har,
    )
    assert result.returncode == 0, result.stderr
    [entry] = entries(har)
    assert entry["serverIPAddress"] == result.stdout  # the alias's address curl dialled
    assert entry["timings"]["connect"] >= 0 and entry["timings"]["ssl"] >= 0
    assert entry["timings"]["dns"] >= 0  # curl resolved the alias through tapui's DNS
    assert {"name": "x", "value": "1"} in entry["request"]["queryString"]
    assert {"name": "a", "value": "1"} in entry["request"]["cookies"]
    assert entry["_tapui"]["command"].startswith("curl ")
    assert entry["_tapui"]["pid"] > 0


def test_raw_bytes_relayed_unchanged_through_tls(ca_file: str, https: servers._ThreadingServer) -> None:
    port = https.server_address[1]
    code = (
        "import hashlib, urllib.request\n"
        f"b = urllib.request.urlopen('https://{HOST}:{port}/bytes/3000000').read()\n"
        "print(hashlib.sha256(b).hexdigest())\n"
    )
    result = tapui_https(ca_file, PY, "-c", code)
    assert result.returncode == 0, result.stderr
    import hashlib

    assert result.stdout.strip() == hashlib.sha256(servers.random_pool()[:3000000]).hexdigest()


def test_plain_http_on_any_port_is_decoded(http_port: int) -> None:
    result = run_tapui("--no-ui", "--", PY, client("netcheck.py"), "raw-http", HOST, str(http_port))
    assert result.returncode == 0, result.stderr
    assert "GET http://x/hello 200" in result.stderr or "GET http://x:" in result.stderr


def test_server_speaking_first_over_tls_reaches_a_slow_client(ca: trustme.CA, ca_file: str) -> None:
    """The server's first bytes arrive before the app finished its handshake with tapui."""
    ctx = tls_servers.server_context(ca, [])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        raw, _ = listener.accept()
        with ctx.wrap_socket(raw, server_side=True) as conn:
            conn.sendall(b"banner from the server\n")
            conn.recv(100)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = tapui_https(ca_file, PY, client("slow_tls.py"), HOST, str(port))
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes serve() if it still waits in accept()
        listener.close()
        thread.join(5)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "banner from the server"


@contextmanager
def tls_listener(handle) -> Iterator[int]:  # type: ignore[no-untyped-def]
    """A listener on the loopback running `handle(raw_socket)` for each connection; yields
    its port. Shut down (not only closed) at the end, so no thread keeps it listening."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            with raw:
                handle(raw)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


def _read_head(conn: ssl.SSLSocket) -> bytes:
    """A request's head (and whatever came with it)."""
    request = b""
    while b"\r\n\r\n" not in request:
        request += conn.recv(4096)
    return request


def _answering_close_notify(ca: trustme.CA, reply: bytes):  # type: ignore[no-untyped-def]
    """A tls_listener handler: `reply` to a request, then the app's close_notify answered."""
    ctx = tls_servers.server_context(ca, [])

    def handle(raw: socket.socket) -> None:
        with ctx.wrap_socket(raw, server_side=True) as conn:
            _read_head(conn)
            conn.sendall(reply)
            if conn.recv(4096) == b"":  # the app's close_notify
                _send_close_notify(conn)

    return handle


def _exchange_line(stderr: str) -> str:
    """tapui's line for the connection that carried the exchange."""
    (line,) = [line for line in stderr.splitlines() if " tcp " in line]
    return line


def _send_close_notify(conn: ssl.SSLSocket) -> None:
    """Send close_notify; the client's answer may not come (Python's closes without one)."""
    try:
        conn.unwrap()
    except ssl.SSLError:
        pass


def test_response_delimited_by_the_servers_close_over_tls(ca: trustme.CA, ca_file: str) -> None:
    """The server's close_notify and FIN end an HTTP/1.0 body; the flow ends complete."""
    ctx = tls_servers.server_context(ca, [])
    body = b"until the end " * 1000

    def handle(raw: socket.socket) -> None:
        with ctx.wrap_socket(raw, server_side=True) as conn:
            _read_head(conn)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
            _send_close_notify(conn)

    with tls_listener(handle) as port:
        code = (
            "import urllib.request\n"
            f"print(len(urllib.request.urlopen('https://{HOST}:{port}/close').read()))\n"
        )
        result = tapui_https(ca_file, PY, "-c", code, extra=("--jsonl", "-"))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    (flow,) = [f for f in lines if f["method"]]
    assert flow["error"] is None and flow["status"] == 200
    assert flow["response_size"] == len(body)
    assert str(len(body)) in result.stdout.splitlines()  # what the app read


def test_upstream_tls_sessions_are_resumed(ca: trustme.CA, ca_file: str) -> None:
    """Each app connection gets its own upstream connection; after the first, tapui resumes
    the upstream's TLS session instead of a full handshake."""
    ctx = tls_servers.server_context(ca, ["http/1.1"])
    reused: list[bool] = []

    def handle(raw: socket.socket) -> None:
        with ctx.wrap_socket(raw, server_side=True) as conn:
            reused.append(conn.session_reused)
            _read_head(conn)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    with tls_listener(handle) as port:
        code = (
            "import urllib.request\n"
            "for _ in range(3):\n"
            f"    assert urllib.request.urlopen('https://{HOST}:{port}/').read() == b'ok'\n"
        )
        result = tapui_https(ca_file, PY, "-c", code)
    assert result.returncode == 0, result.stderr
    assert reused == [False, True, True]


def test_upstream_closing_during_the_handshake_fails_the_apps_handshake(ca_file: str) -> None:
    def handle(raw: socket.socket) -> None:
        raw.recv(4096)  # the ClientHello, then nothing

    with tls_listener(handle) as port:
        result = tapui_https(ca_file, "curl", "-sS", f"https://{HOST}:{port}/")
    assert result.returncode != 0
    assert "upstream TLS handshake failed: the server closed the connection" in result.stderr


def test_app_sees_the_alpn_upstream_chose_even_when_it_changes(ca: trustme.CA, ca_file: str) -> None:
    """tapui prepares its answer to the app with the ALPN the upstream chose last time; when
    the upstream chooses otherwise, the app must still be offered what it chose now."""
    choices = iter([["h2"], ["http/1.1"], ["http/1.1"]])

    def handle(raw: socket.socket) -> None:
        ctx = tls_servers.server_context(ca, next(choices))
        with ctx.wrap_socket(raw, server_side=True) as conn:
            conn.sendall(f"{conn.selected_alpn_protocol()}\n".encode())
            conn.recv(10)

    with tls_listener(handle) as port:
        code = (
            "import socket, ssl\n"
            "ctx = ssl.create_default_context()\n"
            "ctx.set_alpn_protocols(['h2', 'http/1.1'])\n"
            "for _ in range(3):\n"
            f"    with ctx.wrap_socket(socket.create_connection(('{HOST}', {port})),\n"
            f"                         server_hostname='{HOST}') as s:\n"
            "        said = s.recv(100).decode().strip()\n"
            "        print(s.selected_alpn_protocol(), said)\n"
        )
        result = tapui_https(ca_file, PY, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["h2 h2", "http/1.1 http/1.1", "http/1.1 http/1.1"]


def test_upstream_gets_the_apps_own_sni_and_alpn_when_they_change(
    ca: trustme.CA, ca_file: str
) -> None:
    """tapui makes the upstream endpoint ahead of the ClientHello, for the SNI and ALPN the
    last connection to the same address used; the upstream must still see what the app
    offers now."""
    ctx = tls_servers.server_context(ca, ["h2", "http/1.1"])
    seen: list[tuple[str | None, str | None]] = []
    names: list[str | None] = []
    ctx.sni_callback = lambda _obj, name, _ctx: names.append(name)  # type: ignore[assignment,misc,func-returns-value]

    def handle(raw: socket.socket) -> None:
        with ctx.wrap_socket(raw, server_side=True) as conn:
            seen.append((names[-1], conn.selected_alpn_protocol()))
            conn.sendall(b"ok\n")
            conn.recv(10)

    with tls_listener(handle) as port:
        code = (
            "import socket, ssl\n"
            f"for name, alpn in [('{HOST}', ['h2', 'http/1.1']), ('{HOST}', ['h2', 'http/1.1']),\n"
            "                   ('api.example.test', ['http/1.1']), ('api.example.test', []),\n"
            f"                   ('{HOST}', ['h2'])]:\n"
            "    ctx = ssl.create_default_context()\n"
            "    if alpn:\n"
            "        ctx.set_alpn_protocols(alpn)\n"
            f"    with ctx.wrap_socket(socket.create_connection((name, {port})),\n"
            "                         server_hostname=name) as s:\n"
            "        print(name, s.selected_alpn_protocol(), s.recv(10).decode().strip())\n"
        )
        result = tapui_https(ca_file, PY, "-c", code, extra=("--add-host", "api.example.test:127.0.0.1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{HOST} h2 ok", f"{HOST} h2 ok", "api.example.test http/1.1 ok",
        "api.example.test None ok", f"{HOST} h2 ok",
    ]
    assert seen == [
        (HOST, "h2"), (HOST, "h2"), ("api.example.test", "http/1.1"),
        ("api.example.test", None), (HOST, "h2"),
    ]



def _servers_view_of_the_apps_close(ca: trustme.CA, ca_file: str, mode: str) -> tuple[str, str]:
    """(how the server's read after its reply ended, tapui's line for the connection) for
    tls_close.py MODE."""
    ctx = tls_servers.server_context(ca, [])
    seen: list[str] = []

    def handle(raw: socket.socket) -> None:
        with ctx.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False) as conn:
            _read_head(conn)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nbody end")
            try:
                seen.append("close_notify" if conn.recv(4096) == b"" else "data")
            except ssl.SSLError as exc:
                seen.append(str(exc.reason))

    with tls_listener(handle) as port:
        result = tapui_https(ca_file, PY, client("tls_close.py"), HOST, str(port), mode)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "got the reply"
    return seen[0], _exchange_line(result.stderr)


def test_an_apps_reset_after_its_close_notify_is_no_error(ca: trustme.CA, ca_file: str) -> None:
    """An app that closes with the server's close_notify unread resets instead of a FIN."""
    handle = _answering_close_notify(ca, b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nbody end")
    with tls_listener(handle) as port:
        result = tapui_https(ca_file, PY, client("tls_close.py"), HOST, str(port),
                             "close_notify_unread")
    assert result.returncode == 0, result.stderr
    line = _exchange_line(result.stderr)
    assert "error" not in line, line


def test_the_apps_close_notify_reaches_the_server(ca: trustme.CA, ca_file: str) -> None:
    seen, line = _servers_view_of_the_apps_close(ca, ca_file, "close_notify")
    assert seen == "close_notify"
    assert "error" not in line, line


def test_an_app_closing_without_close_notify_looks_the_same_to_the_server(
    ca: trustme.CA, ca_file: str
) -> None:
    """No close_notify is made up for the app; the alert the server answers with (OpenSSL's
    decode_error) is no error of the connection: without tapui the app's kernel drops it."""
    seen, line = _servers_view_of_the_apps_close(ca, ca_file, "abrupt")
    assert seen == "UNEXPECTED_EOF_WHILE_READING"
    assert "error" not in line, line


@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "bare_close"])
def test_the_app_sees_the_servers_close_as_the_server_made_it(
    ca: trustme.CA, ca_file: str, close_notify: bool
) -> None:
    """A body that runs to the connection's end is complete only after close_notify: a bare
    close (a server that died mid-body) must not reach the app as a clean end."""
    ctx = tls_servers.server_context(ca, [])

    def handle(raw: socket.socket) -> None:
        conn = ctx.wrap_socket(raw, server_side=True)
        _read_head(conn)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        if close_notify:
            _send_close_notify(conn)
        # (without close_notify, `raw` is closed by tls_listener with the TLS layer unsaid)

    with tls_listener(handle) as port:
        result = tapui_https(ca_file, PY, client("tls_close.py"), HOST, str(port), "until_eof")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("clean end" if close_notify else "UNEXPECTED_EOF_WHILE_READING")


def test_an_app_closing_before_the_servers_close_notify_ends_cleanly(
    ca: trustme.CA, ca_file: str
) -> None:
    """curl sends close_notify and closes its socket; the server answers with its own, which
    the app's kernel refuses with RST, as it would without tapui: no error for the connection."""
    handle = _answering_close_notify(ca, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    with tls_listener(handle) as port:
        result = tapui_https(ca_file, "curl", "-4", "-sS", f"https://{HOST}:{port}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok"
    (line,) = [line for line in result.stderr.splitlines() if " tcp " in line]
    assert "error" not in line, line


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_exchanges_inside_a_proxys_connect_tunnel_are_decoded(
    ca_file: str, https: servers._ThreadingServer, http_port: int, tmp_path: Path, scheme: str
) -> None:
    """An app set to use a proxy (https_proxy, or curl's --proxytunnel for plain HTTP) opens a
    CONNECT tunnel; what it sends through is told apart as on a new connection."""
    port = https.server_address[1] if scheme == "https" else http_port
    url = f"{scheme}://api.example.test:{port}/hello"
    har = tmp_path / "tunnel.har"
    tunnels = servers.connect_proxy()
    with servers.running(tunnels) as proxy_port:
        proxy = f"http://127.0.0.1:{proxy_port}"  # (the host's: tapui points it there)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env |= {"https_proxy": proxy, "http_proxy": proxy}
        result = run_tapui("--no-ui", "--upstream-ca", ca_file, "--har", str(har), "--",
                           "curl", "-sS", "--proxytunnel", url, env=env)
    assert tunnels.targets == [f"api.example.test:{port}"]  # type: ignore[attr-defined]
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the host\n"
    assert [(e["request"]["method"], e["request"]["url"], e["response"]["status"])
            for e in entries(har)] == [
        ("CONNECT", f"http://api.example.test:{port}", 200),
        ("GET", url, 200),
    ]


@pytest.mark.parametrize(
    ("proxy", "login"),
    [("socks5h://127.0.0.1:{port}", None), ("socks5h://who:secret@127.0.0.1:{port}", "who:secret"),
     ("socks4a://127.0.0.1:{port}", None)],
    ids=["socks5", "socks5-login", "socks4a"],
)
def test_exchanges_through_a_socks_proxy_are_decoded(
    ca_file: str, https: servers._ThreadingServer, tmp_path: Path, proxy: str, login: str | None
) -> None:
    """An app set to use a SOCKS proxy (all_proxy) asks it for the far end by name; once the
    proxy grants it, what the app sends through is intercepted and decoded."""
    port = https.server_address[1]
    url = f"https://api.example.test:{port}/hello"
    har = tmp_path / "socks.har"
    socks = servers.socks_proxy()
    with servers.running(socks) as proxy_port:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["all_proxy"] = proxy.format(port=proxy_port)  # (the host's: tapui points it there)
        result = run_tapui("--no-ui", "--upstream-ca", ca_file, "--har", str(har), "--",
                           "curl", "-sS", url, env=env)
    assert socks.targets == [(f"api.example.test:{port}", login)]  # type: ignore[attr-defined]
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the host\n"
    assert [(e["request"]["method"], e["request"]["url"], e["response"]["status"])
            for e in entries(har)] == [("GET", url, 200)]
    assert "error" not in result.stderr


def test_a_server_closing_without_a_response_is_the_exchanges_error(
    ca: trustme.CA, ca_file: str
) -> None:
    """The app's OpenSSL answers the server's bare close with an alert (decode_error): that
    follows the server's close, which is what the exchange and the connection ended with."""
    ctx = tls_servers.server_context(ca, [])

    def handle(raw: socket.socket) -> None:
        with ctx.wrap_socket(raw, server_side=True) as conn:
            _read_head(conn)  # and close, with no response and no close_notify

    with tls_listener(handle) as port:
        result = tapui_https(ca_file, "curl", "-sS", "--http1.1", f"https://{HOST}:{port}/gone")
    assert result.returncode != 0
    (exchange,) = [line for line in result.stderr.splitlines() if " GET https://" in line]
    assert exchange.endswith("error: the server closed the connection before responding")
    assert "error" not in _exchange_line(result.stderr)
