"""Saving a capture: `SessionWriter` hands the flows of a FlowBus to the writer process.

While a capture runs, only the writer process (engine.session_writer, fed by `SessionWriter`)
writes; readers (SessionStore, `tapui sessions`) use their own connections. Flows are sent to
it every `BATCH_INTERVAL` seconds (`BUSY_INTERVAL` while flows stream in) and each batch (at
most `BATCH_ROWS` flows) is one transaction. The writer outlives a crash of tapui (even kill
-9) and commits what it was sent, so every flow that finished more than `BUSY_INTERVAL` before
the crash is in the file, intact.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import operator
import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import fields, replace
from pathlib import Path
from typing import IO, Any

from engine.flow import (
    MEMORY_THRESHOLD,
    Body,
    Certificate,
    Connection,
    EventKind,
    Flow,
    FlowBus,
    FlowEvent,
    Request,
    Response,
    Timings,
    WebSocketMessage,
)
from engine.session_db import (
    BLOB_CHUNK,
    SessionCounters,
    SessionDB,
    SessionError,
    is_session_file,
    read_meta,
)
from engine.sessions import KEEP_SESSIONS, new_session_path, prune_sessions

BATCH_INTERVAL = 0.05
#: While flows stream in (a batch of at least `BUSY_EVENTS` events), batches go every
#: `BUSY_INTERVAL` instead: every commit rewrites the last page of each index, so many small
#: transactions cost the writer (and the machine) far more than a few large ones. At 1,000
#: small flows a second this halves the bytes written, and the latency tapui adds to the
#: captured command's connections drops by about 0.08 ms.
BUSY_INTERVAL = 0.5
BUSY_EVENTS = 32
BATCH_ROWS = 500


# --- the writer process ---------------------------------------------------------------------
#
# SessionWriter (here, in the engine's process) hands flows to `python -m
# engine.session_writer`, which does all the SQLite work: SQLite in a thread of the engine's
# process cost it about 0.3 ms of CPU per flow, mostly fighting its event loop for the GIL.
#
# Frames on the child's stdin: FRAME (kind, payload length), then the payload.

FRAME = struct.Struct("<cQ")
FRAME_BATCH = b"B"  # pickle of (pairs, chunked): one transaction in the child
FRAME_CHUNK = b"C"  # 8-byte token + bytes of a large body; precedes the batch that names it
FRAME_FLUSH = b"F"  # 8-byte token: acknowledged once everything before it is committed
FRAME_END = b"E"  # JSON {"index_for": seconds}: the last frame before end of input
#: Kept body bytes pickled along with their flow; larger bodies go as FRAME_CHUNK frames.
INLINE_BODY = MEMORY_THRESHOLD
#: A batch closes at `rows` flows or at this many inline body bytes (bounds both processes'
#: memory for a burst of big bodies).
FRAME_BYTES = 8 * 1024 * 1024
_ROOT = Path(__file__).resolve().parent.parent  # where `engine` imports from


def _unpickle_body(size: int, cap: int, data: bytes) -> Body:
    """A Body as the writer process gets it: the kept bytes (none when hollow), full size."""
    body = Body(cap=cap)
    if data:
        body.append(data)
    body.size = size
    return body


def _dataclass_reducers() -> dict[type, Callable[[Any], tuple[Any, ...]]]:
    """Pickle reducers for the flow model's dataclasses: (class, field values), read by one
    C attrgetter. About 1.5 times as fast both ways as pickle's generic object protocol."""
    reducers: dict[type, Callable[[Any], tuple[Any, ...]]] = {}
    for cls in (Flow, Connection, Request, Response, Timings, WebSocketMessage, Certificate):
        values = operator.attrgetter(*(f.name for f in fields(cls)))
        reducers[cls] = functools.partial(_reduce_dataclass, cls, values)
    return reducers


def _reduce_dataclass(cls: type, values: Callable[[Any], tuple[Any, ...]], obj: Any
                      ) -> tuple[Any, ...]:
    return cls, values(obj)


_REDUCERS = _dataclass_reducers()


class _FlowPickler(pickle.Pickler):
    """Pickles flows with their Body objects reduced to the kept bytes; a body whose id is in
    `hollow` (unfinished flow, or sent in chunks) travels as its size only."""

    def __init__(self, file: io.BytesIO, hollow: set[int]) -> None:
        super().__init__(file, protocol=5)
        # (a function, not a bound method: a pickler in a reference cycle would keep every
        # flow of its batch, through its memo, until a garbage collection)
        self.dispatch_table = {**_REDUCERS, Body: functools.partial(_reduce_body, hollow)}


def _reduce_body(hollow: set[int], body: Body) -> tuple[Any, ...]:
    data = b"" if id(body) in hollow else body.read()
    return _unpickle_body, (body.size, body.cap, data)


class SessionWriter:
    """Writes flow events from a FlowBus into a session file, through a writer process.

    The bus listener only appends the event to a list (the engine never blocks, and no thread
    wakes per event); a sender thread, every `interval` seconds (`busy_interval` after a batch
    of `BUSY_EVENTS` events or more), coalesces the events per flow and pipes them, pickled,
    to the writer process, which commits each batch (at most `rows` flows) as one
    transaction. If tapui dies, even by kill -9, the writer process still commits everything
    it was sent.
    """

    def __init__(self, path: str | os.PathLike[str], command: Iterable[str] = (), *,
                 max_session_size: int = 0, interval: float = BATCH_INTERVAL,
                 busy_interval: float = BUSY_INTERVAL, rows: int = BATCH_ROWS) -> None:
        self.path = Path(path)
        self.interval = interval
        self.busy_interval = max(interval, busy_interval)
        self.rows = rows
        db = SessionDB(path, max_session_size=max_session_size)  # raises SessionError
        try:
            meta = read_meta(db.conn)
            db.begin()
            if "started" not in meta:
                db.set_meta(command=list(command), started=time.time())
            db.set_meta(ended=None)
            db.save_counters()
            db.commit()
        finally:
            db.rollback()
            db.close()
        self._child = db.counters  # the writer process's latest report
        self._errors = 0  # failures on this side (the process died, a flow would not pickle)
        self._last_error: str | None = None
        self._fatal: str | None = None  # why events are dropped (the writer process died)
        self._lock = threading.Lock()
        self._pending: list[FlowEvent] = []
        self._inflight = 0  # events taken by the sender and not yet written to the pipe
        self._flushes: list[int] = []
        self._waiters: dict[int, threading.Event] = {}
        self._tokens = itertools.count(1)
        # Flows of the batches piped to the writer and not yet reported done, by batch number:
        # if the writer dies, they were never saved and go to `on_failure` with the rest.
        self._unconfirmed: deque[tuple[int, list[Flow]]] = deque()
        self._batches_sent = 0
        self._wake = threading.Event()
        self._open = True  # events are accepted
        self._closing = False
        self._dead = False  # the writer process is gone
        self._ending = False  # the end was sent: the process exiting is expected
        self._index_for = 2.0
        self._bus: FlowBus | None = None
        self._closed = False
        #: Called (from any thread) with the flows the writer can no longer save once it has
        #: died: those it had not been sent or not yet committed, then each one as events
        #: come. A UI that lists the session file keeps them in memory instead.
        self.on_failure: Callable[[list[Flow]], None] | None = None
        # The writer's stderr goes to a file, not the terminal (the UI owns it); close()
        # passes it on, and a crash's last line becomes last_error.
        self._stderr = tempfile.TemporaryFile(prefix="tapui-writer-")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "engine.session_writer", str(self.path.resolve()),
                 "--max-session-size", str(max_session_size)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                close_fds=True,  # no TUN device or socket of the engine's in there
                start_new_session=True,  # the terminal's Ctrl-C is for the captured command
                cwd=_ROOT)
        except BaseException:
            self._stderr.close()
            raise
        #: The writer process's pid (tests wait for it, or kill it).
        self.child_pid = self._proc.pid
        self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                        name="tapui-session-sender")
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name="tapui-session-reader")
        self._sender.start()
        self._reader.start()

    @property
    def counters(self) -> SessionCounters:
        """The writer process's latest counters; `queued` = events not yet sent to it."""
        with self._lock:
            counters = replace(self._child, queued=len(self._pending) + self._inflight)
            if self._errors:
                counters.errors += self._errors
                counters.last_error = self._last_error
        return counters

    @property
    def batches_sent(self) -> int:
        """Batch frames piped to the writer process so far."""
        return self._batches_sent

    @property
    def failure(self) -> str | None:
        """Why the session stopped being written (the writer process died), else None."""
        return self._fatal

    def listener(self, event: FlowEvent) -> None:
        """A FlowBus listener: safe from any thread, never blocks, wakes no one."""
        with self._lock:
            if self._open:
                self._pending.append(event)
                return
            unsaved = self.on_failure if self._fatal else None
        if unsaved is not None:
            unsaved([event.flow])

    def attach(self, bus: FlowBus) -> None:
        self._bus = bus
        bus.subscribe(self.listener)

    def add(self, flows: Iterable[Flow]) -> None:
        """Queue finished flows (as if their DONE events had been seen)."""
        events = [FlowEvent(EventKind.DONE, flow) for flow in flows]
        with self._lock:
            if self._open:
                self._pending.extend(events)

    def flush(self, timeout: float = 10) -> None:
        """Wait until every event queued so far is committed."""
        done = threading.Event()
        with self._lock:
            if not self._open:
                return
            token = next(self._tokens)
            self._waiters[token] = done
            self._flushes.append(token)
        self._wake.set()
        done.wait(timeout)

    def close(self, index_for: float = 2.0) -> None:
        """Send what is queued, then let the writer process index what there is time for,
        checkpoint and close the file; wait for it."""
        if self._closed:
            return
        self._closed = True
        if self._bus is not None:
            try:
                self._bus.unsubscribe(self.listener)
            except ValueError:
                pass
        with self._lock:
            self._open = False
            self._closing = True
            self._index_for = index_for
        self._wake.set()
        deadline = time.monotonic() + index_for + 30
        self._sender.join(max(0.0, deadline - time.monotonic()))
        try:
            self._proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self._fail(f"the session writer (pid {self._proc.pid}) was still busy at exit; "
                       "it finishes in the background")
            print(f"tapui: {self.path}: {self._fatal}", file=sys.stderr)
            return
        self._reader.join(max(0.0, deadline - time.monotonic()))
        self._release_waiters()
        text = self._stderr_tail()
        if text:  # e.g. "could not finish writing" (the terminal was the UI's until now)
            sys.stderr.write(text if text.endswith("\n") else text + "\n")
        self._stderr.close()
        if self._fatal:
            print(f"tapui: {self.path}: {self._fatal}; the session has the flows written "
                  "before that", file=sys.stderr)

    # -- the sender thread --

    def _send_loop(self) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        closing = False
        wait = self.interval
        while not closing:
            self._wake.wait(wait)
            self._wake.clear()
            with self._lock:
                flushes, self._flushes = self._flushes, []
                events, self._pending = self._pending, []
                self._inflight = len(events)
                closing = self._closing
            wait = self.busy_interval if len(events) >= BUSY_EVENTS else self.interval
            try:
                if not self._dead and (events or flushes):
                    self._send(stdin, events, flushes)
            except (OSError, ValueError):  # the process is gone (broken pipe)
                self._died(unsent=events)
            except Exception as exc:  # noqa: BLE001 - never lose the thread (and the session)
                self._fail(f"could not send flows to the session writer: {exc}", drop=False)
            finally:
                with self._lock:
                    self._inflight = 0
        if self._dead:
            return
        try:
            self._ending = True
            self._frame(stdin, FRAME_END, json.dumps({"index_for": self._index_for}).encode())
            stdin.close()
        except (OSError, ValueError):
            self._died()

    def _send(self, stdin: IO[bytes], events: list[FlowEvent], flushes: list[int]) -> None:
        latest: dict[int, tuple[Flow, bool]] = {}
        for event in events:
            flow = event.flow
            done = event.kind is EventKind.DONE or flow.finished
            previous = latest.get(flow.id)
            latest[flow.id] = (flow, done or (previous is not None and previous[1]))
        batch: list[tuple[Flow, bool]] = []
        size = 0
        for flow, done in latest.values():
            batch.append((flow, done))
            if done:
                size += sum(m.body.kept for m in (flow.request, flow.response)
                            if m is not None and m.body.kept <= INLINE_BODY)
            if len(batch) >= self.rows or size >= FRAME_BYTES:
                self._send_batch(stdin, batch)
                batch, size = [], 0
        if batch:
            self._send_batch(stdin, batch)
        for token in flushes:
            self._frame(stdin, FRAME_FLUSH, token.to_bytes(8, "little"))
        stdin.flush()

    def _send_batch(self, stdin: IO[bytes], batch: list[tuple[Flow, bool]]) -> None:
        """One batch frame, after the chunks of its large bodies. Bodies of unfinished flows
        are not sent: the writer stores bodies once a flow is finished."""
        hollow: set[int] = set()
        chunked: list[tuple[int, int, int, int, int]] = []  # index, part, token, size, cap
        large: list[tuple[int, Body]] = []
        for index, (flow, done) in enumerate(batch):
            for part, message in enumerate((flow.request, flow.response)):
                if message is None:
                    continue
                body = message.body
                if not done or body.kept > INLINE_BODY:
                    hollow.add(id(body))
                if done and body.kept > INLINE_BODY:
                    token = next(self._tokens)
                    chunked.append((index, part, token, body.size, body.cap))
                    large.append((token, body))
        buf = io.BytesIO()
        try:
            _FlowPickler(buf, hollow).dump((batch, chunked))
        except Exception as exc:  # noqa: BLE001 - e.g. a flow changing while pickled
            if len(batch) > 1:  # the others still go
                for pair in batch:
                    self._send_batch(stdin, [pair])
            else:
                self._fail(f"flow {batch[0][0].id} could not be sent to the writer: {exc}",
                           drop=False)
            return
        for token, body in large:
            kept, offset = body.kept, 0
            while offset < kept:
                data = body.read(min(BLOB_CHUNK, kept - offset), offset)
                if not data:
                    break
                self._frame(stdin, FRAME_CHUNK, token.to_bytes(8, "little"), data)
                offset += len(data)
        self._frame(stdin, FRAME_BATCH, buf.getbuffer())
        self._batches_sent += 1
        with self._lock:
            self._unconfirmed.append((self._batches_sent, [flow for flow, _ in batch]))

    @staticmethod
    def _frame(stdin: IO[bytes], kind: bytes, *parts: bytes | memoryview) -> None:
        stdin.write(FRAME.pack(kind, sum(len(p) for p in parts)))
        for part in parts:
            stdin.write(part)

    # -- the reader thread --

    def _read_loop(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        known = {f.name for f in fields(SessionCounters)}
        for line in stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            counters = message.get("counters")
            if counters is not None:
                with self._lock:
                    self._child = SessionCounters(
                        **{k: v for k, v in counters.items() if k in known})
                    done = message.get("batches", 0)
                    while self._unconfirmed and self._unconfirmed[0][0] <= done:
                        self._unconfirmed.popleft()
            flushed = message.get("flushed")
            if flushed is not None:
                with self._lock:
                    waiter = self._waiters.pop(flushed, None)
                if waiter is not None:
                    waiter.set()
        stdout.close()
        self._died()

    # -- the writer process failing --

    def _died(self, unsent: Iterable[FlowEvent] = ()) -> None:
        """The writer process ended or its pipe broke: an error unless it was told to end and
        ended well. Events are dropped from then on (handed to `on_failure`, with `unsent`)."""
        with self._lock:
            if self._dead:
                return
            self._dead = True
        try:
            code = self._proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        if self._ending and code == 0:
            return
        if code is None:
            reason = "the session writer stopped reading"
        elif code < 0:
            reason = f"the session writer was killed ({signal.Signals(-code).name})"
        else:
            reason = f"the session writer exited with status {code}"
        last = self._stderr_tail().strip().splitlines()
        self._fail(f"{reason}: {last[-1]}" if last else reason, unsent=unsent)

    def _fail(self, reason: str, *, drop: bool = True, unsent: Iterable[FlowEvent] = ()) -> None:
        """Count an error; with `drop`, stop taking events (nothing will write them)."""
        dropped: list[Flow] = []
        with self._lock:
            self._errors += 1
            self._last_error = reason
            if drop:
                self._fatal = self._fatal or reason
                self._open = False
                dropped = [flow for _, flows in self._unconfirmed for flow in flows]
                dropped += [event.flow for event in [*unsent, *self._pending]]
                self._unconfirmed.clear()
                self._pending = []
            unsaved = self.on_failure
        if drop:
            self._release_waiters()
            if unsaved is not None and dropped:
                unsaved(list({flow.id: flow for flow in dropped}.values()))

    def _release_waiters(self) -> None:
        with self._lock:
            waiters, self._waiters = list(self._waiters.values()), {}
        for waiter in waiters:
            waiter.set()

    def _stderr_tail(self, limit: int = 64 * 1024) -> str:
        try:
            size = self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, size - limit))
            return self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""


def open_session_writer(path: str | os.PathLike[str] | None, command: Iterable[str],
                        bus: FlowBus | None = None, *, max_session_size: int = 0,
                        keep: int = KEEP_SESSIONS) -> SessionWriter:
    """The CLI's session: `path` (from --save) or a new file in the state directory, where
    all but the newest `keep` sessions are then pruned. Raises SessionError."""
    if path is None:
        target = new_session_path()
    else:
        target = Path(path)
        if target.exists() and target.stat().st_size and not is_session_file(target):
            raise SessionError(f"tapui: --save {path}: the file exists and is not a tapui "
                               "session; choose another name")
    try:
        writer = SessionWriter(target, command, max_session_size=max_session_size)
    except (sqlite3.Error, OSError) as exc:
        raise SessionError(f"tapui: cannot write session {target}: {exc}") from None
    if bus is not None:
        writer.attach(bus)
    if path is None:
        prune_sessions(target.parent, keep, spare=target)
    return writer
