"""A proxy set in the user's environment keeps working inside the sandbox."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from engine.proxy_env import host_proxy_url, sandbox_proxy_env
from tests import servers
from tests.conftest import HOST, run_tapui


@pytest.fixture
def proxy() -> Iterator[servers._ThreadingServer]:
    """A stand-in forward proxy on the host's loopback: it answers every request itself and
    records its target (absolute-form, as clients send to a proxy)."""
    server = servers.http_server()
    with servers.running(server):
        yield server


def _with_proxy(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "no_proxy")}
    return env | {"http_proxy": url}


@pytest.mark.usefixtures("sandbox")
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_proxy_on_the_hosts_loopback_is_reached_from_the_sandbox(
    proxy: servers._ThreadingServer, host: str
) -> None:
    port = proxy.server_address[1]
    result = run_tapui("--no-ui", "--", "curl", "-4", "-sS", "http://api.example.test/hello",
                       env=_with_proxy(f"http://{host}:{port}"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the host\n"
    assert [r["path"] for r in proxy.requests] == ["http://api.example.test/hello"]
    assert "GET http://api.example.test/hello 200" in result.stderr


@pytest.mark.usefixtures("sandbox")
def test_the_sandboxes_own_names_bypass_the_proxy(
    proxy: servers._ThreadingServer, http_server: servers._ThreadingServer
) -> None:
    """The host alias and --add-host names mean nothing to a proxy on the host."""
    port = http_server.server_address[1]
    command = (f"curl -sS http://{HOST}:{port}/alias && "
               f"curl -sS http://api.example.test:{port}/added")
    result = run_tapui("--no-ui", "--add-host", "api.example.test:127.0.0.1", "--",
                       "sh", "-c", command,
                       env=_with_proxy(f"http://127.0.0.1:{proxy.server_address[1]}"))
    assert result.returncode == 0, result.stderr
    assert [r["path"] for r in http_server.requests] == ["/alias", "/added"]
    assert proxy.requests == []


@pytest.mark.parametrize(("setting", "inside"), [
    ("http://127.0.0.1:3128", "http://169.254.77.1:3128"),
    ("127.0.0.1:3128", "169.254.77.1:3128"),
    ("http://user:secret@localhost:8080/", "http://user:secret@host.tapui.internal:8080/"),
    ("socks5h://[::1]:1080", "socks5h://[fd7a:7a70:7a70::1]:1080"),
    ("http://proxy.corp.example:3128", "http://proxy.corp.example:3128"),
    ("http://127.0.0.2:3128", "http://127.0.0.2:3128"),  # the gateway reaches 127.0.0.1 only
    ("not a url", "not a url"),
])
def test_proxy_urls_naming_the_loopback_are_pointed_at_the_gateway(
    setting: str, inside: str
) -> None:
    assert host_proxy_url(setting) == inside


def test_no_proxy_keeps_its_entries_and_gains_the_sandboxes_names() -> None:
    env = {"HTTPS_PROXY": "http://proxy.corp.example:3128", "NO_PROXY": "localhost,.corp"}
    assert sandbox_proxy_env(env, ["api.example.test"]) == []
    assert env["NO_PROXY"].split(",") == [
        "localhost", ".corp", "host.tapui.internal", "169.254.77.1", "fd7a:7a70:7a70::1",
        "api.example.test",
    ]
    assert "no_proxy" not in env


def test_without_a_proxy_the_environment_is_left_alone() -> None:
    env = {"PATH": "/usr/bin", "no_proxy": "localhost"}
    assert sandbox_proxy_env(env) == []
    assert env == {"PATH": "/usr/bin", "no_proxy": "localhost"}
