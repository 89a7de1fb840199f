"""End to end: `tapui -- CMD` in a real terminal (tmux), driven with keys and read off the screen.

Each test starts its own tmux server on a private socket (no user config) and kills it at the
end. tmux is told to accept OSC 52 (`set-clipboard on`), so "copy as curl" lands in a tmux paste
buffer exactly as it would reach a person's terminal clipboard. The shell that runs tapui prints
its exit status when it quits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.conftest import (
    HOST,
    IN_CI,
    ROOT,
    process_alive,
    process_gone,
    run_tapui,
    tapui_command,
)

WIDTH, HEIGHT = 160, 45
FLOWS = re.compile(r"(\d+)/(\d+) flows")
EXITED = re.compile(r"tapui exited with status (\d+)")


class Tmux:
    """One tmux server with one session running `command`."""

    def __init__(self, command: str) -> None:
        # A private server: its socket (and config) in a short-named directory of its own.
        self.dir = Path(tempfile.mkdtemp(prefix="tapui-tmux-"))
        self.socket = str(self.dir / "socket")
        config = self.dir / "tmux.conf"
        config.write_text("set -g set-clipboard on\nset -g status off\n")
        self._tmux("-f", str(config), "new-session", "-d", "-s", "main", "-x", str(WIDTH),
                   "-y", str(HEIGHT), "-c", str(ROOT), "-e", "TERM=xterm-256color",
                   "-e", "COLORTERM=truecolor", command)

    def _tmux(self, *args: str) -> str:
        # os.environ, not the C environment: readline (imported under pytest) puts COLUMNS and
        # LINES there, and the app would believe them rather than the pane's size.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}
        result = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True,
                                text=True, timeout=10, check=True, env=env)
        return result.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "main")

    def keys(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", "main", *(["-l"] if literal else []), *keys)

    def wait(self, predicate: Callable[[str], object], what: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                size = self._tmux("display-message", "-p", "-t", "main",
                                  "#{window_width}x#{window_height}").strip()
                raise AssertionError(f"timed out waiting for {what}; the {size} screen:\n{screen}")
            time.sleep(0.1)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        return self.wait(lambda screen: text in screen, repr(text), timeout)

    def buffer(self) -> str:
        return self._tmux("show-buffer")

    def exit_status(self, timeout: float = 15) -> int:
        """Wait until tapui ended; its exit status (printed by the shell that ran it)."""
        screen = self.wait(lambda s: EXITED.search(s), "tapui to exit", timeout)
        return int(EXITED.search(screen).group(1))

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True,
                       timeout=10, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def tmux(sandbox: None) -> Iterator[Callable[..., Tmux]]:
    """`tmux(argv, options)` runs `tapui options -- argv` in a fresh tmux; every server is
    killed afterwards."""
    if shutil.which("tmux") is None:
        if IN_CI:
            pytest.fail("tmux is not installed")
        pytest.skip("tmux is not installed")
    started: list[Tmux] = []

    def start(argv: list[str], options: tuple[str, ...] = ()) -> Tmux:
        # The shell reports tapui's exit status and stays: tmux's own (remain-on-exit and
        # #{pane_dead_status}) is racy, it can miss the SIGCHLD while it updates utmp for the
        # closed pane and drop the pane's last output.
        command = (shlex.join(tapui_command(*options, "--", *argv))
                   + '; echo "tapui exited with status $?"; exec sleep 600')
        session = Tmux(command)
        started.append(session)
        return session

    yield start
    for session in started:
        session.kill()


def status_line(screen: str) -> str:
    lines = [line for line in screen.splitlines() if FLOWS.search(line)]
    assert lines, f"no status bar on the screen:\n{screen}"
    return lines[-1]


def test_post_copy_as_curl_replays_the_same_request(
    tmux: Callable[[list[str]], Tmux], pool: bytes
) -> None:
    server = servers.http_server(pool)
    body = json.dumps({"name": "tapui", "tags": ["e2e", "tmux"], "n": 42, "quote": "it's"})
    with servers.running(server) as port:
        url = f"http://{HOST}:{port}/api/items?dry_run=1"
        term = tmux(["curl", "-sS", "-X", "POST", "-H", "Content-Type: application/json",
                     "-H", "X-Trace-Id: e2e-7f3a", "--data-binary", body, url])
        # The flow shows up with its answer, and the command's end in the status bar. (The
        # list follows the session file's commits: a frame may show the flow before its
        # answer is in.)
        row = r"POST +host\.tapui\.internal:\d+ +/api/items\?dry_run=1 +200"
        screen = term.wait(lambda s: re.search(row, s) and "[exited 0]" in s,
                           "the POST flow, answered, and the command's exit")
        assert re.search(row, screen)
        assert len(server.requests) == 1
        original = server.requests[0]

        # Find it with the filter, open it, check the request view, copy it as curl.
        term.keys("/")
        term.wait_for("filter")
        term.keys("~m POST", literal=True)
        term.keys("Enter")
        term.wait(lambda s: "filter: ~m POST" in status_line(s)
                  and FLOWS.search(status_line(s)).group(1) == "1", "the filtered list")
        term.keys("Enter")
        screen = term.wait_for("X-Trace-Id: e2e-7f3a")
        assert f"POST {url} HTTP/1.1" in screen
        assert '"name": "tapui"' in screen  # the JSON body, pretty-printed
        term.keys("c")
        term.wait_for("Copied curl command")
        copied = term.buffer()
        assert copied.startswith("curl ")

        # Paste it: run the copied command with bash where the host alias resolves.
        replay = run_tapui("--no-ui", "--", "bash", "-c", copied, timeout=60)
        assert replay.returncode == 0, replay.stderr
        # The test server answers a POST with the body's digest, and records it.
        assert replay.stdout.strip() == hashlib.sha256(body.encode()).hexdigest(), (
            copied, replay.stdout, replay.stderr)
        assert len(server.requests) == 2, (copied, replay.stdout, replay.stderr)
        again = server.requests[1]
        assert again["method"] == original["method"] == "POST"
        assert again["path"] == original["path"] == "/api/items?dry_run=1"
        assert again["body"] == original["body"] == body.encode()
        for name in ("Content-Type", "X-Trace-Id", "User-Agent", "Accept", "Host"):
            assert _header(again, name) == _header(original, name), name
        assert _header(again, "X-Trace-Id") == "e2e-7f3a"

        # Back to the list: the command's output (the server's digest of the body) is there.
        term.keys("q")
        term.wait(lambda s: "Copy curl" in s and "/api/items" in s, "the flow list")
        term.keys("o")
        term.wait_for(hashlib.sha256(body.encode()).hexdigest())
        # Help opens and closes.
        term.keys("?")
        term.wait_for("tapui keys")
        term.keys("Escape")
        term.wait(lambda s: "tapui keys" not in s, "help to close")
        # The UI stayed open after the command ended; q quits with the command's exit code.
        assert "[exited 0]" in status_line(term.screen())
        term.keys("q")
        assert term.exit_status() == 0


def _header(request: dict[str, Any], name: str) -> str | None:
    values = [v for k, v in request["headers"] if k.lower() == name.lower()]
    assert len(values) <= 1, (name, values)
    return values[0] if values else None


def test_exit_code_shown_and_returned(tmux: Callable[[list[str]], Tmux]) -> None:
    term = tmux(["sh", "-c", "echo done here; exit 3"])
    screen = term.wait(lambda s: "[exited 3]" in s, "the exit status")
    assert "0/0 flows" in status_line(screen)
    term.keys("o")
    term.wait_for("done here")
    time.sleep(0.3)
    assert "[exited 3]" in status_line(term.screen())  # still open
    term.keys("q")
    assert term.exit_status() == 3


def test_list_grows_live_while_the_command_runs(
    tmux: Callable[[list[str]], Tmux], pool: bytes
) -> None:
    server = servers.http_server(pool)
    with servers.running(server) as port:
        loop = (f"for i in 1 2 3 4 5; do curl -s -4 http://{HOST}:{port}/hello/$i; "
                "sleep 0.6; done")
        term = tmux(["sh", "-c", loop])
        counts_while_running: set[int] = set()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            screen = term.screen()
            rows = len(re.findall(r"GET +\S+ +/hello/\d", screen))
            status = [line for line in screen.splitlines() if FLOWS.search(line)]
            if status and "[running]" in status[-1]:
                counts_while_running.add(rows)
            if status and "[exited 0]" in status[-1] and rows == 5:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the five flows and the exit did not show:\n{screen}")
        # The list grew while the command ran: several partial counts were on screen.
        assert len(counts_while_running & {1, 2, 3, 4}) >= 3, counts_while_running
        screen = term.screen()
        for i in range(1, 6):
            assert f"/hello/{i}" in screen
        term.keys("q")
        assert term.exit_status() == 0


def _tapui_pid(marker: str) -> int:
    """The pid of the tapui whose arguments include `marker` (not the tmux holding them)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"tapui.cli"] and marker.encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no tapui with {marker} runs")


@contextmanager
def _ui_command(tmux: Callable[..., Tmux], url: str, tmp_path: Path,
                then: str) -> Iterator[tuple[Tmux, Path, int]]:
    """tapui --har FILE under the UI, running `curl URL; THEN`, where THEN writes a pid to
    {pidfile}. Yields (terminal, HAR path, that pid) once the flow is listed; the process is
    killed at the end if it outlived tapui."""
    har, pidfile = tmp_path / "run.har", tmp_path / "command.pid"
    script = f"curl -s -o /dev/null {url}; " + then.format(pidfile=pidfile)
    term = tmux(["sh", "-c", script], ("--har", str(har)))
    term.wait(lambda s: url.rsplit("/", 1)[1] in s and pidfile.exists()
              and pidfile.read_text().strip(), "the flow and the pid")
    pid = int(pidfile.read_text())
    try:
        yield term, har, pid
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _har_urls(har: Path) -> list[str]:
    return [e["request"]["url"] for e in json.loads(har.read_text())["log"]["entries"]]


@pytest.mark.parametrize("how", ["SIGTERM", "terminal closed"])
def test_a_stopped_ui_ends_the_commands_job_and_writes_the_har(
    tmux: Callable[..., Tmux], http_port: int, tmp_path: Path, how: str
) -> None:
    """Under the UI, SIGTERM or SIGHUP used to kill tapui at once: the command ran on, cut off
    from the network, and no HAR was written. Now the command's process group gets the signal
    (a child it left running too) and tapui ends as on `q`."""
    url = f"http://{HOST}:{http_port}/hello"
    with _ui_command(tmux, url, tmp_path, "sleep 300 & echo $! > {pidfile}; wait") as (
        term, har, sleeper
    ):
        tapui = _tapui_pid(str(har))
        if how == "SIGTERM":
            os.kill(tapui, signal.SIGTERM)
            assert term.exit_status() == 128 + signal.SIGTERM  # the command's own end
        else:
            term.kill()  # the terminal goes: tapui gets SIGHUP
            assert process_gone(tapui, 15)
        assert process_gone(sleeper, 5)  # the child the command left running ends too
    assert _har_urls(har) == [url]


def test_a_ui_that_cannot_close_still_ends_and_writes_the_har(
    tmux: Callable[..., Tmux], http_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen after SIGHUP: Textual's shutdown blocked for good on its output thread, and tapui
    never ended. Here that stop is made to block (a sitecustomize on PYTHONPATH): tapui must
    still end, with the command's job, and write the HAR."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\nfrom textual.drivers import _writer_thread\n"
        "_writer_thread.WriterThread.stop = lambda self: time.sleep(3600)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    url = f"http://{HOST}:{http_port}/hello"
    with _ui_command(tmux, url, tmp_path, "sleep 300 & echo $! > {pidfile}; wait") as (
        _term, har, sleeper
    ):
        tapui = _tapui_pid(str(har))
        os.kill(tapui, signal.SIGTERM)
        try:
            assert process_gone(tapui, 20)
        finally:
            if process_alive(tapui):  # (stuck: end it, as no test may leave one behind)
                os.kill(tapui, signal.SIGKILL)
        assert process_gone(sleeper, 5)
    assert _har_urls(har) == [url]


def test_sigquit_under_the_ui_reaches_the_command_and_ends_tapui(
    tmux: Callable[..., Tmux], http_port: int, tmp_path: Path
) -> None:
    url = f"http://{HOST}:{http_port}/hello"
    with _ui_command(tmux, url, tmp_path, "echo $$ > {pidfile}; exec sleep 300") as (
        term, har, _command
    ):
        os.kill(_tapui_pid(str(har)), signal.SIGQUIT)
        assert term.exit_status() == 128 + signal.SIGQUIT  # the command's own end
    assert _har_urls(har) == [url]


def test_edit_and_replay_sends_the_edited_request(
    tmux: Callable[[list[str]], Tmux], pool: bytes, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """R opens the request in $EDITOR (here a script that edits the file), and what it saves
    is sent to the same server; the answer is a new flow."""
    editor = tmp_path / "editor.sh"
    editor.write_text("#!/bin/sh\nsed -i 's/name=ada/name=bob/; s/^X-Trace: 7$/X-Trace: 8/' \"$1\"\n")
    editor.chmod(0o755)
    monkeypatch.setenv("EDITOR", str(editor))
    monkeypatch.delenv("VISUAL", raising=False)
    server = servers.http_server(pool)
    with servers.running(server) as port:
        term = tmux(["curl", "-sS", "-H", "X-Trace: 7", "--data-binary", "name=ada",
                     f"http://{HOST}:{port}/submit"])
        term.wait(lambda s: re.search(r"POST +host\.tapui\.internal:\d+ +/submit +200", s)
                  and "[exited 0]" in s, "the POST flow, answered, and the command's exit")
        term.keys("/")
        term.wait_for("filter")
        term.keys("~m POST", literal=True)
        term.keys("Enter")
        term.wait(lambda s: FLOWS.search(status_line(s)).group(1) == "1", "the filtered list")
        term.keys("R")
        term.wait(lambda s: re.search(r"Replayed #\d+ as #\d+: 200 OK", s),
                  "the edited request's answer")
        assert len(server.requests) == 2
        first, again = server.requests
        assert (first["body"], _header(first, "X-Trace")) == (b"name=ada", "7")
        assert (again["method"], again["path"]) == ("POST", "/submit")
        assert (again["body"], _header(again, "X-Trace")) == (b"name=bob", "8")
        assert _header(again, "Host") == _header(first, "Host")
        term.wait(lambda s: re.search(r"\d+ replay +POST +host\.tapui\.internal:\d+ +/submit +200",
                                      s), "the new flow in the list")
        term.keys("q")
        assert term.exit_status() == 0
