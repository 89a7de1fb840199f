"""--publish: a server the command runs in the sandbox, reached from the host's loopback, with
the exchanges coming in shown like the command's own."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.conftest import ROOT, client, run_tapui, tapui_in_background
from tests.servers import free_port

PY = sys.executable
SANDBOX_PORT = 8000  # the sandbox has a network of its own: any port is free there


@dataclass
class Published:
    host_port: int
    server_pid: int
    jsonl: Path
    proc: subprocess.Popen

    def flows(self, expected: int) -> list[dict]:
        """The flows tapui wrote, once `expected` of them are done (or 10 s passed) and tapui
        has ended. (Ended sooner, its SIGTERM would end the server while the last connection
        is still open.)"""
        deadline = time.monotonic() + 10
        while len(self.jsonl.read_text().splitlines()) < expected and time.monotonic() < deadline:
            time.sleep(0.02)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        return [json.loads(line) for line in self.jsonl.read_text().splitlines()]


@contextmanager
def published(tmp_path: Path, *server_args: str, address: str = "127.0.0.1",
              bind: str = "") -> Iterator[Published]:
    """tapui running a test server on `address`:SANDBOX_PORT in the sandbox, published on a
    free port of the host (on `bind`, as `--publish` writes it, if given)."""
    host_port = free_port()
    jsonl = tmp_path / "flows.jsonl"
    server = [PY, client("sandbox_server.py"), *server_args[:1], address, str(SANDBOX_PORT),
              *server_args[1:]]
    with tapui_in_background("--no-ui", "-q", "--no-save", "--jsonl", str(jsonl),
                             "-p", f"{bind}{host_port}:{SANDBOX_PORT}", "--", *server) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["ready"], (line, proc.stderr.read() if proc.poll() is not None else "")
        yield Published(host_port, int(line[1]), jsonl, proc)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "-m", "20", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.usefixtures("sandbox")
def test_a_host_client_reaches_the_commands_server_and_the_exchanges_are_shown(
    tmp_path: Path,
) -> None:
    with published(tmp_path, "http") as pub:
        base = f"http://127.0.0.1:{pub.host_port}"
        result = curl(f"{base}/hello", f"{base}/json")  # (one connection, kept alive)
        assert result.returncode == 0, result.stderr
        assert result.stdout == 'hello from the host\n{"hello": "world", "n": [1, 2, 3]}'
        flows = pub.flows(2)
    exchanges = [f for f in flows if f["method"]]
    assert [(f["method"], f["url"], f["status"]) for f in exchanges] == [
        ("GET", f"{base}/hello", 200), ("GET", f"{base}/json", 200)]
    assert all(f["inbound"] for f in exchanges)
    assert {f["pid"] for f in exchanges} == {pub.server_pid}  # the server's process


@pytest.mark.usefixtures("sandbox")
def test_a_server_on_the_sandboxs_ipv6_loopback_only_is_reached(tmp_path: Path) -> None:
    with published(tmp_path, "http", address="::1") as pub:
        result = curl(f"http://127.0.0.1:{pub.host_port}/hello")
        assert (result.returncode, result.stdout) == (0, "hello from the host\n"), result.stderr
        result = curl(f"http://[::1]:{pub.host_port}/hello")  # and from the host's ::1
        assert (result.returncode, result.stdout) == (0, "hello from the host\n"), result.stderr
        assert [f["status"] for f in pub.flows(2) if f["method"]] == [200, 200]


@pytest.mark.usefixtures("sandbox")
@pytest.mark.parametrize(("bind", "reached", "refused"), [
    ("127.0.0.1:", "127.0.0.1", "[::1]"), ("[::1]:", "[::1]", "127.0.0.1")], ids=["ipv4", "ipv6"])
def test_a_port_published_on_one_address_listens_only_there(
    tmp_path: Path, bind: str, reached: str, refused: str
) -> None:
    with published(tmp_path, "http", bind=bind) as pub:
        result = curl(f"http://{reached}:{pub.host_port}/hello")
        assert (result.returncode, result.stdout) == (0, "hello from the host\n"), result.stderr
        result = curl(f"http://{refused}:{pub.host_port}/hello")
        assert result.returncode == 7, result  # curl: failed to connect
        assert [f["status"] for f in pub.flows(1) if f["method"]] == [200]


@pytest.mark.usefixtures("sandbox")
def test_concurrent_connections_to_a_published_port_arrive_byte_exact(tmp_path: Path) -> None:
    """50 connections at once, each sending and receiving 1 to 5 MiB at the same time."""
    with published(tmp_path, "digest") as pub:
        result = subprocess.run(
            [PY, client("stress.py"), "127.0.0.1", str(pub.host_port), "50", "5"],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )
        assert result.stdout.split() == ["ok", "50"], result.stderr
        flows = pub.flows(50)
    assert len(flows) == 50 and not any(f["error"] for f in flows)


@pytest.mark.usefixtures("sandbox")
def test_nothing_listening_in_the_sandbox_resets_the_client_and_says_why(tmp_path: Path) -> None:
    host_port = free_port()
    jsonl = tmp_path / "flows.jsonl"
    with tapui_in_background("--no-ui", "-q", "--no-save", "--jsonl", str(jsonl),
                             "-p", str(host_port), "--", "sh", "-c", "echo ready; sleep 60") as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with socket.create_connection(("127.0.0.1", host_port)) as sock, \
                pytest.raises(ConnectionResetError):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # (the reset may come first)
            sock.recv(1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    [flow] = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert flow["error"] == (
        f"nothing listens on port {host_port} in the sandbox (127.0.0.1 and ::1 refused)")


def test_a_host_port_in_use_is_refused_before_the_command_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_tapui("--no-ui", "-p", f"{port}:80", "--", "touch", str(marker))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"tapui: cannot publish port 80: the host's 127.0.0.1 port {port}: Address already in "
        f"use (choose another host port, e.g. --publish {port + 1}:80)")
    assert not marker.exists()


@pytest.mark.parametrize("spec", ["0", "70000", "80:", "a:80", "1:2:3", "[::1]:80", "x:1:2"])
def test_a_bad_publish_spec_is_a_usage_error(spec: str) -> None:
    result = run_tapui("--no-ui", "-p", spec, "--", "true")
    assert result.returncode == 2
    assert "argument -p/--publish" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.usefixtures("sandbox")
def test_tls_to_a_published_port_is_relayed_untouched(tmp_path: Path) -> None:
    """The host's client does not trust tapui's CA: it must meet the server's own certificate."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")  # (dialled by address: no name is looked up)
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    pem = str(tmp_path / "server.pem")
    with published(tmp_path, "http", pem, pem) as pub:
        result = curl("--cacert", str(tmp_path / "ca.pem"),
                      f"https://127.0.0.1:{pub.host_port}/hello")
        assert (result.returncode, result.stdout) == (0, "hello from the host\n"), result.stderr
        flows = pub.flows(1)
    assert [(f["kind"], f["inbound"], f["error"]) for f in flows] == [("tcp", True, None)]


@pytest.mark.usefixtures("sandbox")
def test_with_the_agent_killed_a_published_port_resets_and_says_why(tmp_path: Path) -> None:
    host_port = free_port()
    jsonl = tmp_path / "flows.jsonl"
    script = "pkill -KILL -x --ns $$ --nslist net tapui-agent; echo ready; sleep 60"
    with tapui_in_background("--no-ui", "-q", "--no-save", "--jsonl", str(jsonl),
                             "-p", str(host_port), "--", "sh", "-c", script) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with socket.create_connection(("127.0.0.1", host_port)) as sock, \
                pytest.raises(ConnectionResetError):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.recv(1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    [flow] = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert flow["error"] == f"port {host_port} in the sandbox: the sandbox's agent is gone (was it killed?)"
