"""The session writer process: all SQLite work of a capture, out of the engine's process.

`SessionWriter` (engine.session) runs `python -m engine.session_writer PATH
[--max-session-size N]` and pipes it frames (`engine.session.FRAME`): batches of pickled flows,
the chunks of large bodies, flush tokens. Each batch is one transaction; after each commit one
JSON line on stdout carries the counters and how many batches are done (`{"counters": {...},
"batches": N}`), and a flush token is answered with `{"flushed": token}` once everything before
it is committed. While no input comes, finished flows are added to the text index; a thread
checkpoints the WAL beside the writes.

End of input, whether tapui closed the pipe or died (even by kill -9), means: commit what was
received, index for up to `index_for` seconds (from the end frame; `INDEX_FOR` when tapui
died), mark the session ended, checkpoint, close, exit 0. So the session stays whole.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import select
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from engine.flow import Body, Flow
from engine.session import FRAME, FRAME_BATCH, FRAME_CHUNK, FRAME_END, FRAME_FLUSH
from engine.session_db import SessionDB, SessionError

#: Seconds spent indexing at end of input when tapui did not say (it died).
INDEX_FOR = 2.0
#: Seconds without input after which pending flows are indexed.
IDLE = 0.1


class Frames:
    """Frames from a pipe, read into one buffer so that `select` can tell when input is idle."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.eof = False

    def _complete(self) -> bool:
        if len(self.buf) < FRAME.size:
            return False
        return len(self.buf) >= FRAME.size + FRAME.unpack_from(self.buf)[1]

    def next(self, timeout: float | None) -> tuple[bytes, bytes] | None:
        """The next (kind, payload); None if nothing came for `timeout` seconds. EOFError at
        end of input (a frame cut short by a dying parent is dropped)."""
        while not self._complete():
            if self.eof:
                raise EOFError
            if timeout is not None and not select.select([self.fd], [], [], timeout)[0]:
                return None
            data = os.read(self.fd, 1 << 20)
            if not data:
                self.eof = True
            self.buf += data
        kind, size = FRAME.unpack_from(self.buf)
        end = FRAME.size + size
        payload = bytes(memoryview(self.buf)[FRAME.size:end])
        del self.buf[:end]
        return kind, payload

    def ready(self) -> bool:
        """More input is waiting (so indexing can wait)."""
        return self._complete() or bool(select.select([self.fd], [], [], 0)[0])


class Writer:
    """One session file, written batch by batch as frames arrive."""

    def __init__(self, path: str, max_session_size: int = 0) -> None:
        self.path = path
        self.db = SessionDB(path, max_session_size=max_session_size)  # raises SessionError
        self.index_for = INDEX_FOR
        self._chunked: dict[int, Body] = {}  # token -> a large body arriving in chunks
        self._reporting = True
        self.batches = 0  # batch frames taken (written, or counted as an error)
        # Checkpoints (and their fsyncs) run beside the writes, not in their way.
        self.db.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._stop_checkpoints = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoints, daemon=True,
                                              name="tapui-session-checkpoint")
        self._checkpointer.start()

    def run(self, frames: Frames) -> None:
        """Until end of input, then finish the file."""
        db = self.db
        while True:
            try:
                frame = frames.next(IDLE if db.counters.pending_index else None)
            except EOFError:
                break
            if frame is None:
                self._guarded(db.index_pending)
                continue
            kind, payload = frame
            if kind == FRAME_CHUNK:
                token = int.from_bytes(payload[:8], "little")
                self._chunked.setdefault(token, Body(cap=0)).append(memoryview(payload)[8:])
            elif kind == FRAME_BATCH:
                self.batches += 1  # reported: tapui forgets the flows of batches done
                self._batch(payload)
                if db.counters.pending_index and not frames.ready():
                    self._guarded(db.index_pending)
            elif kind == FRAME_FLUSH:
                self._report(flushed=int.from_bytes(payload, "little"))
            elif kind == FRAME_END:
                self.index_for = float(json.loads(payload)["index_for"])
        self.finish()

    def _batch(self, payload: bytes) -> None:
        try:
            pairs, chunked = pickle.loads(payload)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not end the session
            self.db.counters.errors += 1
            self.db.counters.last_error = f"unreadable batch: {exc}"
            self._report()
            return
        large: list[Body] = []
        for index, part, token, size, cap in chunked:
            body = self._chunked.pop(token, None) or Body(cap=0)
            body.cap, body.size = cap, size  # the kept bytes came in chunks
            flow: Flow = pairs[index][0]
            message = flow.request if part == 0 else flow.response
            if message is not None:
                message.body = body
            large.append(body)
        try:
            self._guarded(lambda: self._write(pairs))
        finally:
            for body in large:
                body.close()

    def _write(self, pairs: list[tuple[Flow, bool]]) -> None:
        db = self.db
        for flow, done in pairs:
            db.write(flow, finished=done)
        db.enforce_size()
        db.save_counters()

    def _guarded(self, work: Callable[[], object]) -> None:
        """One transaction, then a report; a failure (disk full, ...) is counted, never
        raised: the capture goes on without the session."""
        db = self.db
        try:
            db.begin()
            work()
            db.commit()
        except Exception as exc:  # noqa: BLE001
            db.rollback()
            db.counters.errors += 1
            db.counters.last_error = str(exc)
        self._report()

    def _checkpoints(self, every: float = 1.0) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error:
            return
        try:
            while not self._stop_checkpoints.wait(every):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:
                    pass
        finally:
            conn.close()

    def finish(self) -> None:
        """Index what there is time for, mark the session ended, checkpoint, close."""
        self._stop_checkpoints.set()
        self._checkpointer.join()
        for body in self._chunked.values():  # their batch never came
            body.close()
        db = self.db
        try:
            deadline = time.monotonic() + self.index_for
            while time.monotonic() < deadline and db.counters.pending_index > 0:
                db.begin()
                n = db.index_pending()
                db.commit()
                if not n:
                    break
            db.begin()
            db.set_meta(ended=time.time())
            db.save_counters()
            db.commit()
            db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            db.rollback()
            db.counters.errors += 1
            db.counters.last_error = str(exc)
            print(f"tapui: could not finish writing {self.path}: {exc}", file=sys.stderr)
        finally:
            db.close()
        self._report()

    def _report(self, **extra: Any) -> None:
        """One JSON line to tapui; once tapui is gone, nothing (the writing goes on)."""
        if not self._reporting:
            return
        report = {"counters": asdict(self.db.counters), "batches": self.batches, **extra}
        line = json.dumps(report) + "\n"
        try:
            os.write(1, line.encode())
        except OSError:  # broken pipe: tapui died
            self._reporting = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.session_writer",
        description="Write the flows tapui pipes in (engine.session.SessionWriter) into a "
                    "session file.")
    parser.add_argument("path")
    parser.add_argument("--max-session-size", type=int, default=0, metavar="BYTES")
    args = parser.parse_args(argv)
    sys.stdout = sys.stderr  # stdout is the report channel: no stray prints in it
    try:
        writer = Writer(args.path, args.max_session_size)
    except SessionError as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    writer.run(Frames(sys.stdin.fileno()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
