"""Session files: the writer, crash safety (kill -9), schema versions, HAR round trips,
retention, listing and pruning."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest

from engine import session, session_db, sessions
from engine.flow import (
    Body,
    Connection,
    Flow,
    FlowBus,
    FlowKind,
    FlowState,
    Request,
    Response,
    WebSocketMessage,
)
from engine.har import HarError, har_entry, write_har
from engine.session import SessionWriter
from engine.session_db import SessionDB, SessionError
from engine.session_store import SessionStore
from engine.sessions import import_har, open_any
from tests import servers
from tests.conftest import HOST, ROOT, process_gone, tapui_command

_CONNECTIONS: dict[int, Connection] = {}


def connection(ident: int) -> Connection:
    """Flows on one connection share its Connection, as the engine's do."""
    if ident not in _CONNECTIONS:
        _CONNECTIONS[ident] = Connection(
            id=ident, client=("10.0.0.2", 40000 + ident), server=("10.1.0.1", 443),
            sni=f"api{ident % 4}.example.test", alpn="http/1.1", tls_version="TLSv1.3",
            pid=100 + ident % 2, command="python3 app.py")
    return _CONNECTIONS[ident]


def http_flow(i: int, body: bytes = b"", *, cap: int = 0, ctype: str = "application/json",
              encoding: str | None = None) -> Flow:
    flow = Flow(conn=connection(i // 3 + 1))
    headers = [("Host", f"api{i % 4}.example.test"), ("Cookie", f"a={i}; b=2"),
               ("Content-Type", "application/x-www-form-urlencoded")]
    flow.request = Request("POST" if i % 2 else "GET", "https", f"api{i % 4}.example.test",
                           f"/v1/items/{i}?page={i % 7}&q=x", "HTTP/1.1", headers,
                           Body.of(f"name=n{i}&v=1".encode()) if i % 2 else Body(cap=0))
    rheaders = [("Content-Type", ctype), ("Set-Cookie", f"s={i}; Path=/; HttpOnly")]
    if encoding:
        rheaders.append(("Content-Encoding", encoding))
        body = gzip.compress(body)
    rbody = Body(cap=cap)
    rbody.append(body)
    flow.response = Response(200 if i % 5 else 404, "OK", "HTTP/1.1", rheaders, rbody,
                             trailers=[("x-checksum", "1")] if i % 11 == 0 else [])
    t = flow.timings
    t.dns, t.connect, t.tls = t.start + 0.001, t.start + 0.002, t.start + 0.003
    t.request_sent, t.first_byte, t.done = t.start + 0.004, t.start + 0.01, t.start + 0.02
    return flow


def emit(bus: FlowBus, flow: Flow) -> None:
    bus.new(flow)
    bus.update(flow)
    bus.done(flow)


def comparable(entry: dict) -> dict:
    entry = json.loads(json.dumps(entry))
    entry["_tapui"].pop("flowId")
    return entry


# --- the writer -----------------------------------------------------------------------------


def test_writer_stores_every_flow_and_the_store_reads_them_back(tmp_path: Path) -> None:
    bus = FlowBus()
    writer = SessionWriter(tmp_path / "s.tapui", ["python3", "app.py"])
    writer.attach(bus)
    flows = [http_flow(i, json.dumps({"i": i, "word": "needle" if i % 9 == 0 else "hay"})
                       .encode(), encoding="gzip" if i % 3 == 0 else None) for i in range(300)]
    for flow in flows:
        emit(bus, flow)
    writer.close()
    store = SessionStore(writer.path)
    assert len(store) == 300 and store.view_len == 300
    assert store.command == ["python3", "app.py"]
    for i in (0, 3, 150, 299):
        assert comparable(har_entry(store.view_flow(i))) == comparable(har_entry(flows[i]))
    store.set_filter("needle")
    assert store.view_len == len([i for i in range(300) if i % 9 == 0])
    store.close()


def test_flows_in_progress_are_written_and_then_finished(tmp_path: Path) -> None:
    bus = FlowBus()
    writer = SessionWriter(tmp_path / "s.tapui", ["x"], interval=0.01)
    writer.attach(bus)
    flow = http_flow(1, b"{}")
    response = flow.response
    flow.response = None
    bus.new(flow)
    writer.flush()
    store = SessionStore(writer.path)
    assert store.view_len == 1 and not store.view_flow(0).finished
    flow.response = response
    bus.done(flow)
    writer.flush()
    assert store.drain()
    assert store.view_len == 1 and store.view_flow(0).response.status == 200
    writer.close()
    store.close()


def test_a_stream_of_flows_goes_in_few_large_batches_and_a_lone_flow_goes_at_once(
        tmp_path: Path) -> None:
    bus = FlowBus()
    writer = SessionWriter(tmp_path / "s.tapui", ["x"], interval=0.01, busy_interval=0.4,
                           rows=100_000)  # (a batch is never split for its size here)
    writer.attach(bus)
    store = SessionStore(writer.path)
    # 100 flows every 10 ms: a batch every 10 ms at the quiet interval.
    started = time.monotonic()
    for i in range(10_000):
        emit(bus, http_flow(i, b"{}"))
        if i % 100 == 99:
            time.sleep(0.01)
    streamed = time.monotonic() - started
    writer.flush()
    assert writer.batches_sent <= streamed / 0.4 + 3
    # Once the stream has stopped, a lone flow is written within the quiet interval.
    time.sleep(0.5)  # one busy wait passes; the next batch is empty, so quiet again
    time.sleep(0.1)
    before = writer.batches_sent
    emit(bus, http_flow(10_000, b"{}"))
    deadline = time.monotonic() + 0.3
    while writer.batches_sent == before and time.monotonic() < deadline:
        time.sleep(0.005)
    assert writer.batches_sent == before + 1
    writer.close()
    store.drain()
    assert store.view_len == 10_001
    store.close()


WRITER_SCRIPT = textwrap.dedent("""
    import hashlib, sys, time
    from engine.flow import Body, Connection, Flow, FlowBus, Request, Response
    from engine.session import SessionWriter
    bus = FlowBus()
    writer = SessionWriter(sys.argv[1], ["writer"])
    writer.attach(bus)
    print("writer", writer.child_pid, flush=True)
    i = 0
    while True:
        flow = Flow(conn=Connection(id=i, client=("10.0.0.2", 1), server=("10.0.0.1", 80)))
        bus.new(flow)
        body = hashlib.sha256(str(i).encode()).hexdigest().encode() * (1 + i % 50)
        flow.request = Request("GET", "http", "h.test", f"/{i}", "HTTP/1.1", [("Host", "h")])
        flow.response = Response(200, "OK", "HTTP/1.1", [("X-I", str(i))], Body.of(body))
        bus.update(flow)
        bus.done(flow)
        print(i, time.time(), flush=True)
        i += 1
        time.sleep(0.0005)
""")


def test_kill_9_of_a_writer_process_loses_no_finished_flow(tmp_path: Path) -> None:
    path = tmp_path / "crash.tapui"
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    writer_pid = int(proc.stdout.readline().split()[1])
    finished: list[tuple[int, float]] = []
    for line in proc.stdout:
        i, t = line.split()
        finished.append((int(i), float(t)))
        if len(finished) >= 4000:
            break
    proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    proc.wait()
    # Every flow finished at least one commit interval (plus slack) before the kill is there:
    # flows stream in, so batches go every BUSY_INTERVAL.
    settled = [i for i, t in finished if t < killed_at - session.BUSY_INTERVAL - 0.25]
    assert len(settled) > 1000
    store = SessionStore(path)
    by_i = {}
    for flow in store:
        by_i[int(flow.request.path[1:])] = flow
    for i in settled:
        flow = by_i[i]
        expected = hashlib.sha256(str(i).encode()).hexdigest().encode() * (1 + i % 50)
        assert flow.finished and flow.response.body.read() == expected
        assert flow.response.headers == [("X-I", str(i))]
    # What made it is whole: no finished flow without its body.
    assert all(f.response.body.read() for f in by_i.values() if f.finished)
    store.set_filter("~u /1234$")
    assert store.view_len == 1
    store.close()
    wait_exited(writer_pid)


def test_a_flow_sent_as_unfinished_is_stored_in_progress_even_if_it_finished_meanwhile(
    tmp_path: Path
) -> None:
    """The sender pickles a flow it judged unfinished (bodies hollow) while it finishes: the
    row must not say finished without its bodies; the batch with its DONE completes it."""
    flow = http_flow(1, b'{"ok": true}')
    flow.state = FlowState.DONE
    db = SessionDB(tmp_path / "s.tapui")
    db.begin()
    db.write(flow, finished=False)
    db.commit()
    (state,) = db.conn.execute("SELECT state FROM flows").fetchone()
    assert state == "response"
    db.begin()
    db.write(flow, finished=True)
    db.commit()
    (state,) = db.conn.execute("SELECT state FROM flows").fetchone()
    assert state == "done"
    db.close()


def wait_exited(pid: int, timeout: float = 30) -> None:
    """Wait for a process that is not our child (a zombie counts as gone)."""
    assert process_gone(pid, timeout), f"process {pid} still runs after {timeout} s"


HANDOVER_SCRIPT = textwrap.dedent("""
    import hashlib, sys, time
    from engine.flow import Body, Connection, Flow, FlowBus, Request, Response
    from engine.session import SessionWriter
    bus = FlowBus()
    writer = SessionWriter(sys.argv[1], ["writer"], interval=0.01)
    writer.attach(bus)
    writer.flush()  # the writer process runs
    print("writer", writer.child_pid, flush=True)
    sys.stdin.readline()
    i = 0
    while True:
        group = []
        for _ in range(5):
            flow = Flow(conn=Connection(id=i, client=("10.0.0.2", 1), server=("10.0.0.1", 80)))
            bus.new(flow)
            body = hashlib.sha256(str(i).encode()).hexdigest().encode() * (1 + i % 50)
            flow.request = Request("GET", "http", "h.test", f"/{i}", "HTTP/1.1", [])
            flow.response = Response(200, "OK", "HTTP/1.1", [("X-I", str(i))], Body.of(body))
            bus.update(flow)
            bus.done(flow)
            group.append(i)
            i += 1
        while writer.counters.queued:  # until the group is in the writer process's pipe
            time.sleep(0.001)
        print(*group, flush=True)
""")


def test_writer_process_commits_everything_it_was_sent_after_kill_9_of_tapui(
        tmp_path: Path) -> None:
    """Flows sent to the writer process but not committed when tapui is killed (a lock held
    here keeps it from committing) are all in the file once it has finished."""
    path = tmp_path / "handover.tapui"
    proc = subprocess.Popen([sys.executable, "-c", HANDOVER_SCRIPT, str(path)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    writer_pid = int(proc.stdout.readline().split()[1])
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    sent: list[int] = []
    while len(sent) < 20:  # four batches: one read by the writer, three in its pipe
        sent.extend(int(i) for i in proc.stdout.readline().split())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock.execute("SELECT count(*) FROM flows").fetchone()[0] == 0
    lock.execute("ROLLBACK")
    lock.close()
    wait_exited(writer_pid)
    assert sessions.session_info(path).ended is not None  # finished, not cut off
    store = SessionStore(path)
    by_i = {int(flow.request.path[1:]): flow for flow in store}
    assert sorted(by_i) == sent
    for i in sent:
        expected = hashlib.sha256(str(i).encode()).hexdigest().encode() * (1 + i % 50)
        assert by_i[i].finished and by_i[i].response.body.read() == expected
    store.close()


def test_large_body_round_trips_without_being_held_whole(tmp_path: Path) -> None:
    data = os.urandom(20 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    flow = http_flow(1, data, ctype="application/octet-stream")  # cap 0: all kept
    del data
    writer = SessionWriter(tmp_path / "big.tapui", ["x"])
    tracemalloc.start()
    try:
        writer.add([flow])
        writer.flush(60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    writer.close()
    assert peak < 8 * 1024 * 1024, peak  # sent in chunks, never pickled whole
    store = SessionStore(writer.path)
    body = store.view_flow(0).response.body
    assert body.size == body.kept == 20 * 1024 * 1024
    assert hashlib.sha256(body.read()).hexdigest() == digest
    store.close()


def test_killed_writer_process_leaves_the_engine_side_running(tmp_path: Path) -> None:
    bus = FlowBus()
    writer = SessionWriter(tmp_path / "k.tapui", ["x"], interval=0.01)
    writer.attach(bus)
    emit(bus, http_flow(0, b"{}"))
    writer.flush()
    os.kill(writer.child_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while writer.counters.errors == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    for i in range(1, 200):
        emit(bus, http_flow(i, b"{}"))  # no exception, nothing kept
    started = time.monotonic()
    writer.flush()
    writer.close()
    assert time.monotonic() - started < 2
    counters = writer.counters
    assert counters.errors == 1 and "killed (SIGKILL)" in counters.last_error
    assert counters.queued == 0
    store = SessionStore(writer.path)
    assert len(store) == 1  # what was committed before stays
    store.close()


def test_flows_piped_but_not_committed_when_the_writer_dies_are_handed_on(
        tmp_path: Path) -> None:
    """Nothing lost: flows already in the pipe of a writer that then dies are not in the
    file, so they go to `on_failure` (the UI keeps them in memory) with later ones."""
    bus = FlowBus()
    writer = SessionWriter(tmp_path / "u.tapui", ["x"], interval=0.01)
    handed: list[Flow] = []
    writer.on_failure = handed.extend
    writer.attach(bus)
    saved = http_flow(0, b"{}")
    emit(bus, saved)
    writer.flush()
    os.kill(writer.child_pid, signal.SIGSTOP)  # it reads nothing more, commits nothing more
    piped = [http_flow(i, b"{}") for i in range(1, 4)]
    for flow in piped:
        emit(bus, flow)
    deadline = time.monotonic() + 10
    while writer.counters.queued and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.counters.queued == 0  # all sent down the pipe
    os.kill(writer.child_pid, signal.SIGKILL)
    while writer.failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    later = http_flow(4, b"{}")
    emit(bus, later)
    writer.close()
    assert list(dict.fromkeys(f.id for f in handed)) == [f.id for f in [*piped, later]]
    store = SessionStore(writer.path)
    assert len(store) == 1 and store.view_flow(0).request.url == saved.request.url
    store.close()


def test_writer_process_inherits_no_fd_and_has_its_own_session(tmp_path: Path) -> None:
    """No TUN device or socket of the engine's leaks into it; Ctrl-C does not reach it."""
    r, w = os.pipe()
    os.set_inheritable(w, True)
    ours = os.readlink(f"/proc/self/fd/{w}")
    writer = SessionWriter(tmp_path / "fd.tapui", ["x"])
    try:
        targets = set()
        for fd in os.listdir(f"/proc/{writer.child_pid}/fd"):
            try:
                targets.add(os.readlink(f"/proc/{writer.child_pid}/fd/{fd}"))
            except OSError:
                pass
        assert ours not in targets
        assert os.getsid(writer.child_pid) == writer.child_pid != os.getsid(0)
    finally:
        writer.close()
        os.close(r)
        os.close(w)


CLIENT = textwrap.dedent("""
    import sys, time, urllib.request
    port, n = sys.argv[1], int(sys.argv[2])
    for i in range(n):
        with urllib.request.urlopen(f"http://{host}:{{port}}/json?i={{i}}") as r:
            r.read()
    print("done", flush=True)
    time.sleep(60)
""")


def test_kill_9_of_tapui_keeps_every_finished_exchange(sandbox: None, tmp_path: Path,
                                                      http_port: int) -> None:
    """The real CLI (`--save`), a real client in the sandbox, SIGKILL while it still runs."""
    path = tmp_path / "cli.tapui"
    n = 40
    proc = subprocess.Popen(
        tapui_command("--no-ui", "-q", "--save", str(path), "--", sys.executable, "-c",
                      CLIENT.format(host=HOST), str(http_port), str(n)),
        cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "done"
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    store = SessionStore(path)
    store.set_filter("~u /json")
    assert store.view_len == n
    seen = set()
    for flow in store.iter_view():
        assert flow.finished and flow.response.status == 200
        assert flow.response.body.read() == b'{"hello": "world", "n": [1, 2, 3]}'
        seen.add(flow.request.path)
    assert seen == {f"/json?i={i}" for i in range(n)}
    store.close()


# --- schema versions ------------------------------------------------------------------------


def make_session(path: Path, n: int = 3) -> Path:
    writer = SessionWriter(path, ["x"])
    writer.add(http_flow(i, b'{"a": 1}') for i in range(n))
    writer.close()
    return path


def test_newer_schema_gives_a_clear_message(tmp_path: Path) -> None:
    path = make_session(tmp_path / "new.tapui")
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(SessionError, match="newer tapui"):
        open_any(path)


def test_older_schema_is_migrated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_session(tmp_path / "old.tapui")
    monkeypatch.setattr(session_db, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(session_db.MIGRATIONS, 1,
                        lambda conn: conn.execute("ALTER TABLE flows ADD COLUMN note TEXT"))
    store = open_any(path)
    assert store.view_len == 3 and store.view_flow(0).response.status == 404
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2


def test_older_schema_without_migration_gives_a_clear_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_session(tmp_path / "old.tapui")
    monkeypatch.setattr(session_db, "SCHEMA_VERSION", 3)
    with pytest.raises(SessionError, match="cannot upgrade"):
        open_any(path)


def test_foreign_and_damaged_files_give_clear_messages(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(SessionError, match="not a tapui session"):
        open_any(other)
    damaged = tmp_path / "damaged.tapui"
    damaged.write_bytes(session_db.SQLITE_MAGIC + os.urandom(8192))
    with pytest.raises(SessionError, match="damaged|not a tapui session"):
        open_any(damaged)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(HarError, match="neither"):
        open_any(text)
    truncated = tmp_path / "cut.har"
    truncated.write_text('{"log": {"entries": [{"request": ')
    with pytest.raises(HarError, match="not a valid HAR"):
        open_any(truncated)


def test_open_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    path = make_session(tmp_path / "new.tapui")
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    code = ("import sys\nfrom engine.errors import TapuiError\nfrom engine.sessions import "
            "open_any\ntry:\n    open_any(sys.argv[1])\nexcept TapuiError as e:\n"
            "    print(e, file=sys.stderr); sys.exit(e.exit_code)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "newer tapui" in result.stderr


# --- HAR round trips ------------------------------------------------------------------------


def varied_flows() -> list[Flow]:
    flows = [http_flow(i, json.dumps({"i": i}).encode(), encoding="gzip" if i % 2 else None)
             for i in range(20)]
    flows.append(http_flow(20, os.urandom(3000), ctype="image/png"))
    flows.append(http_flow(21, b"x" * 5000, cap=1000, ctype="text/plain"))  # truncated
    ws = http_flow(22, b"")
    ws.kind = FlowKind.WEBSOCKET
    ws.response.status = 101
    ws.websocket_messages = [WebSocketMessage(True, 1, b"hello", 1.5),
                             WebSocketMessage(False, 2, b"\x00\x01", 1.6)]
    flows.append(ws)
    failed = http_flow(23, b"")
    failed.response = None
    failed.error = "connection refused"
    flows.append(failed)
    return flows


def test_session_to_har_to_session_keeps_every_har_field(tmp_path: Path) -> None:
    flows = varied_flows()
    writer = SessionWriter(tmp_path / "a.tapui", ["x"])
    writer.add(flows)
    writer.close()
    first = SessionStore(writer.path)
    for original, stored in zip(flows, first, strict=True):
        assert comparable(har_entry(stored)) == comparable(har_entry(original))
    first.write_har(tmp_path / "a.har", view_only=False)
    assert import_har(tmp_path / "a.har", tmp_path / "b.tapui") == len(flows)
    second = SessionStore(tmp_path / "b.tapui")
    second.write_har(tmp_path / "b.har", view_only=False)
    a = json.loads((tmp_path / "a.har").read_text())["log"]["entries"]
    b = json.loads((tmp_path / "b.har").read_text())["log"]["entries"]
    assert a == b
    first.close()
    second.close()


def test_har_import_and_export_stream(tmp_path: Path) -> None:
    """A 40 MB HAR is imported, and exported again, holding a few entries at a time."""
    har = tmp_path / "big.har"
    write_har(har, (http_flow(i, b'{"blob": "' + b"z" * 20_000 + b'"}') for i in range(2000)))
    assert har.stat().st_size > 40_000_000
    tracemalloc.start()
    try:
        import_har(har, tmp_path / "big.tapui")
        _, import_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        store = SessionStore(tmp_path / "big.tapui")
        assert store.write_har(tmp_path / "again.har", view_only=False) == 2000
        _, export_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert import_peak < 10_000_000 and export_peak < 10_000_000, (import_peak, export_peak)
    store.set_filter("~u items/1999")
    assert store.view_len == 1
    store.close()


def test_open_any_reads_har_into_a_temporary_session(tmp_path: Path) -> None:
    write_har(tmp_path / "x.har", varied_flows())
    store = open_any(tmp_path / "x.har")
    assert store.view_len == len(varied_flows()) and store.temporary
    store.close()
    assert not store.path.exists()


# --- retention ------------------------------------------------------------------------------


def test_max_session_size_drops_oldest_bodies_and_keeps_metadata(tmp_path: Path) -> None:
    writer = SessionWriter(tmp_path / "r.tapui", ["x"], max_session_size=2 * 1024 * 1024)
    writer.add(http_flow(i, os.urandom(50_000), ctype="image/png") for i in range(200))
    writer.flush()
    counters = writer.counters
    assert counters.bodies_dropped > 100 and counters.bytes_dropped > 5_000_000
    writer.close()
    assert session_db.file_size(writer.path) < 3 * 1024 * 1024
    store = SessionStore(writer.path)
    assert len(store) == 200 and store.counters.bodies_dropped == counters.bodies_dropped
    oldest, newest = store.view_flow(0), store.view_flow(199)
    assert oldest.response.body.size == 50_000 and oldest.response.body.read() == b""
    assert oldest.response.body.truncated
    assert len(newest.response.body.read()) == 50_000
    store.close()


def test_body_cap_is_counted(tmp_path: Path) -> None:
    writer = SessionWriter(tmp_path / "c.tapui", ["x"])
    writer.add([http_flow(1, b"a" * 3000, cap=1000), http_flow(2, b"b" * 10)])
    writer.close()
    store = SessionStore(writer.path)
    assert store.counters.bodies_truncated == 1 and store.counters.bytes_truncated == 2000
    body = store.view_flow(0).response.body
    assert body.size == 3000 and body.kept == 1000 and body.read() == b"a" * 1000
    store.close()


# --- listing and pruning --------------------------------------------------------------------


def test_default_sessions_are_kept_listed_and_pruned(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    directory = tmp_path / "tapui" / "sessions"
    directory.mkdir(parents=True)
    for i in range(12):
        old = directory / f"session-old-{i:02d}{session_db.SUFFIX}"
        make_session(old, n=1)
        os.utime(old, (time.time() - 3600 + i, time.time() - 3600 + i))
    bus = FlowBus()
    writer = session.open_session_writer(None, ["curl", "-s", "http://x.test/"], bus)
    emit(bus, http_flow(1, b"{}"))
    writer.close()
    assert writer.path.parent == directory
    kept = sorted(directory.glob(f"*{session_db.SUFFIX}"))
    assert len(kept) == sessions.KEEP_SESSIONS and writer.path in kept
    assert sessions.cmd_sessions([]) == 0
    out = capsys.readouterr().out
    assert "curl -s http://x.test/" in out and str(writer.path) in out
    assert len(out.strip().splitlines()) == sessions.KEEP_SESSIONS + 1


def test_save_refuses_a_file_that_is_not_a_session(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(SessionError, match="not a tapui session"):
        session.open_session_writer(target, ["x"])
    assert target.read_text() == "keep me"


def test_servers_module_is_only_loopback() -> None:
    server = servers.http_server()
    assert server.server_address[0] == "127.0.0.1"
    server.server_close()
