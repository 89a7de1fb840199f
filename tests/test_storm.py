"""Malformed packets written into the stack while a real transfer runs do not disturb it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HOST, ROOT, client, command_pid, requires_root, tapui_in_background

pytestmark = pytest.mark.usefixtures("sandbox")
ROUNDS = 40  # of storm.py's packets


def test_malformed_packet_storm_during_transfer(tmp_path: Path, http_port: int) -> None:
    requires_root()  # entering the sandbox's network namespace to inject packets needs it
    stop = tmp_path / "stop"
    with tapui_in_background(
        "--no-ui", "--", sys.executable, client("transfer.py"), HOST, str(http_port), str(stop)
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        child = command_pid(proc.pid)
        storm = subprocess.run(
            ["nsenter", f"--net=/proc/{child}/ns/net", sys.executable, client("storm.py"), str(ROUNDS)],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )
        assert storm.returncode == 0, storm.stderr
        assert int(storm.stdout.split()[1]) > 1000
        assert proc.poll() is None  # tapui still runs
        stop.touch()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.split()[0] == "ok" and int(out.split()[1]) >= 4
    assert "Traceback" not in err
    # Each round's SYN+FIN segments (IPv4 and IPv6) reached the stack, were dialled (on both
    # of the host's loopbacks) and refused.
    assert err.count("connection refused") >= 2 * ROUNDS, err[-2000:]
