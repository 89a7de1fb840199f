"""What tapui leaves behind: HAR at exit (also on SIGTERM or a killed command), JSON lines,
the CA command."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.sessions import session_to_open
from tests.conftest import (
    HOST,
    ROOT,
    command_pid,
    run_tapui,
    tapui_command,
    tapui_in_background,
)

PY = sys.executable


def _request_then_wait(port: int) -> str:
    return (
        "import sys, time, urllib.request\n"
        f"urllib.request.urlopen('http://{HOST}:{port}/hello').read()\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )


@pytest.mark.usefixtures("sandbox")
@pytest.mark.parametrize("target", ["tapui", "command"])
def test_har_is_written_when_tapui_is_terminated_or_command_killed(
    http_port: int, tmp_path: Path, target: str
) -> None:
    har = tmp_path / "out.har"
    with tapui_in_background(
        "--no-ui", "--har", str(har), "--", PY, "-c", _request_then_wait(http_port)
    ) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        if target == "tapui":
            proc.send_signal(signal.SIGTERM)
        else:
            os.kill(command_pid(proc.pid), signal.SIGKILL)
        code = proc.wait(30)
    assert code == 128 + (signal.SIGTERM if target == "tapui" else signal.SIGKILL)
    entries = json.loads(har.read_text())["log"]["entries"]
    assert [e["request"]["url"] for e in entries] == [f"http://{HOST}:{http_port}/hello"]


@pytest.mark.usefixtures("sandbox")
def test_jsonl_streams_one_object_per_flow(http_port: int, tmp_path: Path) -> None:
    out = tmp_path / "flows.jsonl"
    url = f"http://{HOST}:{http_port}"
    result = run_tapui(
        "--no-ui", "--jsonl", str(out), "--", "curl", "-4", "-s", "-o", "/dev/null",
        "-o", "/dev/null", f"{url}/hello", f"{url}/json",
    )
    assert result.returncode == 0, result.stderr
    flows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {f["kind"] for f in flows} == {"http", "dns"}  # curl's lookups of the alias too
    flows = [f for f in flows if f["kind"] == "http"]
    assert [(f["method"], f["url"], f["status"]) for f in flows] == [
        ("GET", f"{url}/hello", 200), ("GET", f"{url}/json", 200)
    ]
    assert all(f["pid"] and f["command"].startswith("curl") for f in flows)
    assert ["Accept", "*/*"] in flows[0]["request_headers"]
    assert ["Content-Type", "application/json"] in flows[1]["response_headers"]


def test_ca_command_shows_path_fingerprint_and_pem(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path))
    result = run_tapui("ca", env=env)
    assert result.returncode == 0, result.stderr
    ca_path = tmp_path / "tapui" / "ca.pem"
    assert f"certificate: {ca_path}" in result.stdout
    assert "fingerprint (SHA-256): " in result.stdout
    for key in (tmp_path / "tapui").iterdir():
        if "key" in key.name:
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pem = run_tapui("ca", "--pem", "-", env=env).stdout
    assert pem.startswith("-----BEGIN CERTIFICATE-----")
    assert pem == ca_path.read_text()


@pytest.mark.usefixtures("sandbox")
def test_sessions_lists_runs_and_survives_a_closed_pipe(http_port: int, tmp_path: Path) -> None:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path))
    url = f"http://{HOST}:{http_port}/hello"
    for _ in range(3):
        assert run_tapui("--no-ui", "-q", "--", "curl", "-s", url, env=env).returncode == 0
    listing = run_tapui("sessions", env=env)
    assert listing.returncode == 0, listing.stderr
    rows = [line for line in listing.stdout.splitlines() if "curl -s" in line]
    assert [row.split()[0] for row in rows] == ["1", "2", "3"]  # numbered for `tapui open N`
    assert all(int(row.split()[3]) >= 3 for row in rows)  # the request, DNS lookups, ...
    newest_first = [row.split()[-1] for row in rows]
    directory = tmp_path / "tapui" / "sessions"
    assert session_to_open(None, directory) == newest_first[0]
    assert session_to_open("2", directory) == newest_first[1]
    named = run_tapui("open", "4", env=env)
    assert named.returncode == 2 and "there is no session 4" in named.stderr, named.stderr
    piped = subprocess.run(
        f"{' '.join(tapui_command('sessions'))} | head -1", shell=True, capture_output=True,
        text=True, env=env, cwd=ROOT,
    )
    assert "Traceback" not in piped.stderr


def test_open_without_a_file_says_when_no_session_is_kept(tmp_path: Path) -> None:
    result = run_tapui("open", env=dict(os.environ, XDG_STATE_HOME=str(tmp_path)))
    assert result.returncode == 2
    assert result.stderr.startswith("tapui: no sessions kept in "), result.stderr


def test_headless_run_says_at_once_when_saving_stops_and_goes_on(
    http_port: int, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    script = f"while [ ! -e {go} ]; do sleep 0.05; done; curl -s http://{HOST}:{http_port}/hello"
    with tapui_in_background(
        "--no-ui", "--save", str(tmp_path / "s.tapui"), "--", "sh", "-c", script
    ) as proc:
        writer = _wait_for_child(proc.pid, b"engine.session_writer")
        os.kill(writer, signal.SIGKILL)
        go.touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out == "hello from the host\n"
    assert "saving the session stopped: the session writer was killed (SIGKILL)" in err
    assert f"GET http://{HOST}:{http_port}/hello 200" in err  # the exchange is still shown


def _wait_for_child(pid: int, marker: bytes, timeout: float = 30) -> int:
    """The pid of tapui's child whose command line holds `marker`, once it runs. (A child
    counted as soon as it is forked still shows tapui's own command line until it execs.)"""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            try:
                if marker in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"tapui ({pid}) did not start a {marker.decode()} process")


@pytest.mark.usefixtures("sandbox")
def test_filter_keeps_only_matching_flows_in_lines_har_and_jsonl(
    http_port: int, tmp_path: Path
) -> None:
    har, jsonl, session = tmp_path / "out.har", tmp_path / "out.jsonl", tmp_path / "s.tapui"
    url = f"http://{HOST}:{http_port}"
    script = (f"curl -4 -s -o /dev/null {url}/hello && "
              f"curl -4 -s -o /dev/null --data-binary x=1 {url}/submit")
    result = run_tapui("--no-ui", "--filter", "~m POST", "--har", str(har), "--jsonl",
                       str(jsonl), "--save", str(session), "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tapui: ")]
    assert len(lines) == 1 and f" POST {url}/submit 200 " in lines[0], result.stderr
    assert [e["request"]["method"] for e in json.loads(har.read_text())["log"]["entries"]] == [
        "POST"]
    assert [json.loads(line)["method"] for line in jsonl.read_text().splitlines()] == ["POST"]
    kept = session_to_open(str(session))  # the session keeps every flow
    from engine.session_store import SessionStore

    with_requests = [f.request.method for f in SessionStore(kept) if f.request is not None]
    assert sorted(with_requests) == ["GET", "POST"]


@pytest.mark.usefixtures("sandbox")
def test_a_filter_on_raw_flows_keeps_the_connection_lines(http_port: int) -> None:
    result = run_tapui("--no-ui", "--filter", "~tcp", "--", "curl", "-4", "-s", "-o",
                       "/dev/null", f"http://{HOST}:{http_port}/hello")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tapui: ")]
    assert len(lines) == 1, result.stderr
    assert f" tcp {HOST}:{http_port} sent " in lines[0]


def test_a_bad_filter_is_a_usage_error_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = run_tapui("--no-ui", "--filter", "~d api & (", "--", "touch", str(marker))
    assert result.returncode == 2 and not marker.exists()
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "tapui: error: --filter '~d api & (': ")
    assert "at character" in result.stderr


@pytest.mark.usefixtures("sandbox")
@pytest.mark.parametrize("level", [1, 2])
def test_verbose_prints_headers_and_with_vv_bodies(
    http_port: int, level: int
) -> None:
    url = f"http://{HOST}:{http_port}/submit"
    result = run_tapui("--no-ui", "-" + "v" * level, "--filter", "~m POST", "--", "curl", "-4",
                       "-s", "-H", "X-Trace: 7", "--data-binary", "name=ada", url)
    assert result.returncode == 0, result.stderr
    digest = result.stdout.strip()
    lines = [line for line in result.stderr.splitlines() if line.startswith("tapui: ")]
    assert f" POST {url} 200 " in lines[0]
    assert "tapui:   > X-Trace: 7" in lines and "tapui:   < Content-Type: text/plain" in lines
    bodies = ["tapui:   > name=ada", f"tapui:   < {digest}"]
    if level == 1:
        assert not set(bodies) & set(lines)
    else:
        assert lines.index("tapui:   > name=ada") < lines.index(f"tapui:   < {digest}")


def test_detail_lines_say_what_a_binary_or_long_body_is_and_escape_controls() -> None:
    from engine.printer import BODY_PREVIEW, detail_lines
    from tests.ui_fixtures import make_flow

    image = make_flow(1, response_headers=[("Content-Type", "image/png")],
                      response_body=b"\x89PNG\r\n" + bytes(100))
    assert detail_lines(image, 2)[-1] == "< [106 bytes, image/png, not text]"
    long = make_flow(2, response_body=b"a\x1b[31mb\n" + b"x" * (2 * BODY_PREVIEW))
    shown = detail_lines(long, 2)
    assert "< a\ufffd[31mb" in shown
    assert shown[-1] == f"< [… {8 + 2 * BODY_PREVIEW:,} bytes in all]"
    assert all(len(line) < BODY_PREVIEW + 10 for line in shown)
