"""Shared fixtures: running tapui around real clients, and real servers on the host's loopback."""

from __future__ import annotations

import os
import shutil
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

from tests import servers, tls_servers

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = Path(__file__).resolve().parent / "clients"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HOST = "host.tapui.internal"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def tapui_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tapui.cli", *args]


def run_tapui(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None, **kwargs: object
) -> Run:
    """`tapui ARGS...` to completion; stdout/stderr captured as text."""
    proc = subprocess.run(
        tapui_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        **kwargs,  # type: ignore[arg-type]
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@contextmanager
def tapui_in_background(
    *args: str, env: dict[str, str] | None = None, stdin: int = subprocess.DEVNULL
) -> Iterator[subprocess.Popen]:
    """`tapui ARGS` started in the background (stdout and stderr piped, as text), killed if
    it still runs when the block ends, so no test leaves one behind."""
    proc = subprocess.Popen(
        tapui_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=stdin, text=True, cwd=ROOT, env=env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def command_pid(tapui_pid: int) -> int:
    """The pid of the command tapui runs (the sandbox helper exec'd into it): tapui's child
    that is not its session writer process."""
    for child in Path(f"/proc/{tapui_pid}/task/{tapui_pid}/children").read_text().split():
        if b"engine.session_writer" not in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise AssertionError(f"tapui ({tapui_pid}) runs no command")


def process_alive(pid: int) -> bool:
    """`pid` runs: it exists and has not ended (a zombie, not yet reaped, has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def process_gone(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `pid` to end (it need not be our child)."""
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not process_alive(pid)


def need(program: str) -> None:
    """Skip a test whose client program is not installed; in CI (which installs them all)
    fail instead."""
    if shutil.which(program) is None:
        message = f"{program} is not installed"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def client(name: str) -> str:
    """Path of a client script from tests/clients (run inside the sandbox)."""
    return str(CLIENTS / name)


@pytest.fixture(scope="session")
def data_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private XDG data home so the tests' CA never touches the user's."""
    return tmp_path_factory.mktemp("xdg-data")


@pytest.fixture(scope="session", autouse=True)
def _private_xdg(data_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests' CA and session files stay out of the user's own directories."""
    private = {"XDG_DATA_HOME": str(data_home),
               "XDG_STATE_HOME": str(tmp_path_factory.mktemp("xdg-state"))}
    old = {name: os.environ.get(name) for name in private}
    os.environ.update(private)
    yield
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def sandbox() -> None:
    """Check once that the sandbox starts here; in CI a broken sandbox fails, never skips."""
    result = run_tapui("--no-ui", "-q", "--", "true", timeout=60)
    if result.returncode != 0:
        message = f"tapui's sandbox cannot start here: {result.stderr.strip()}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def pool() -> bytes:
    return servers.random_pool()


@pytest.fixture
def http_port(pool: bytes) -> Iterator[int]:
    with servers.running(servers.http_server(pool)) as port:
        yield port


@pytest.fixture
def http_server(pool: bytes) -> Iterator[servers._ThreadingServer]:
    server = servers.http_server(pool)
    with servers.running(server):
        yield server


@pytest.fixture
def http6_port(pool: bytes) -> Iterator[int]:
    with servers.running(servers.http_server(pool, socket.AF_INET6)) as port:
        yield port


@pytest.fixture
def digest_port(pool: bytes) -> Iterator[int]:
    with servers.running(servers.digest_server(pool)) as port:
        yield port


@pytest.fixture
def digest6_port(pool: bytes) -> Iterator[int]:
    with servers.running(servers.digest_server(pool, socket.AF_INET6)) as port:
        yield port


@pytest.fixture
def udp_echo() -> Iterator[servers.UdpEcho]:
    echo = servers.UdpEcho()
    echo.start()
    yield echo
    echo.stop()


def requires_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root on the host (CI runs as root)")


def peak_rss_kib(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_measuring_peak_rss(command: list[str], **kwargs: object) -> tuple[subprocess.Popen, str, str, int]:
    """Run `command` to its end, sampling its peak resident memory; (proc, out, err, KiB)."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, **kwargs,  # type: ignore[call-overload]
    )
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, peak_rss_kib(proc.pid))
        except OSError:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    return proc, out, err, peak


# --- TLS servers, with certificates from a trustme CA that tapui is told to trust ------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CA's certificate as a PEM file, for --upstream-ca."""
    path = tmp_path_factory.mktemp("ca") / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def https(ca: trustme.CA, pool: bytes) -> Iterator[servers._ThreadingServer]:
    server = tls_servers.https_server(ca, pool)
    with servers.running(server):
        yield server


@pytest.fixture
def h2server(ca: trustme.CA, pool: bytes) -> Iterator[tls_servers.H2Server]:
    with tls_servers.running_h2(ca, pool) as server:
        yield server
