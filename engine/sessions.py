"""The kept session files: where they live, pruning, listing (`tapui sessions`), and opening
a session or a HAR file (`tapui open`)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import tempdirs
from engine.session_db import (
    APPLICATION_ID,
    SQLITE_MAGIC,
    SUFFIX,
    SessionDB,
    SessionError,
    file_family,
    file_size,
)

if TYPE_CHECKING:
    from engine.session_store import SessionStore

#: Sessions kept in the state directory; older ones are pruned when a new one starts.
KEEP_SESSIONS = 10


# --- locations ------------------------------------------------------------------------------


def state_dir() -> Path:
    """tapui's state directory: $XDG_STATE_HOME/tapui (~/.local/state/tapui)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "state")
    return Path(base) / "tapui"


def sessions_dir() -> Path:
    return state_dir() / "sessions"


def new_session_path(directory: Path | None = None) -> Path:
    directory = directory or sessions_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise SessionError(
            f"tapui: cannot keep sessions in {directory}: {exc.strerror or exc}. "
            "Name a file with --save FILE, set XDG_STATE_HOME, or use --no-save."
        ) from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return directory / f"session-{stamp}-{os.getpid()}{SUFFIX}"




def prune_sessions(directory: Path | None = None, keep: int = KEEP_SESSIONS,
                   spare: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` sessions of the state directory (never `spare`, nor a
    file written in the last minute: another tapui may be running on it)."""
    removed = []
    for path in kept_sessions(directory)[keep:]:
        if path == spare or time.time() - _mtime(path) < 60:
            continue
        for p in file_family(path):
            p.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _mtime(path: Path) -> float:
    return max((p.stat().st_mtime for p in file_family(path) if p.exists()), default=0.0)




# --- HAR import -----------------------------------------------------------------------------


def import_har(har_path: str | os.PathLike[str], session_path: str | os.PathLike[str],
               batch: int = 500) -> int:
    """Stream a HAR file's entries into a session (never the whole file in memory)."""
    import binascii

    import ijson

    from engine.har import HarError, flow_from_entry

    db = SessionDB(session_path)
    count = 0
    conns: dict[str, Any] = {}
    try:
        with open(har_path, "rb") as f:
            db.begin()
            db.set_meta(command=[], started=time.time(), source=os.path.basename(har_path))
            try:
                for entry in ijson.items(f, "log.entries.item", use_float=True):
                    try:
                        flow = flow_from_entry(entry, conns)
                    except (KeyError, TypeError, ValueError, AttributeError,
                            binascii.Error) as exc:
                        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                        raise HarError(f"{har_path}: entry {count} is malformed: {what}"
                                       ) from None
                    db.write(flow, finished=True)
                    count += 1
                    if count % batch == 0:
                        db.index_pending(batch)
                        db.commit()
                        db.begin()
            except ijson.JSONError as exc:
                raise HarError(f"{har_path} is not a valid HAR file (truncated or not JSON): "
                               f"{exc}") from None
            while db.index_pending(10_000):
                pass
            db.set_meta(ended=time.time())
            db.save_counters()
            db.commit()
    except OSError as exc:
        raise HarError(f"cannot read {har_path}: {exc.strerror or exc}") from None
    finally:
        db.rollback()
        db.close()
    return count


# --- the CLI's commands ---------------------------------------------------------------------


@dataclass
class SessionInfo:
    path: Path
    command: list[str] = field(default_factory=list)
    started: float | None = None
    ended: float | None = None
    flows: int = 0
    size: int = 0
    error: str | None = None


def session_info(path: Path) -> SessionInfo:
    info = SessionInfo(path, size=file_size(path))
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                raise sqlite3.DatabaseError("not a tapui session")
            meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
            info.flows = conn.execute("SELECT count(*) FROM flows").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        info.error = str(exc)
        return info
    info.command = list(meta.get("command") or [])
    info.started = meta.get("started")
    info.ended = meta.get("ended")
    return info


def kept_sessions(directory: Path | None = None) -> list[Path]:
    """The session files in `directory` (the kept ones by default), the most recently written
    first. (By the file itself: reading a session touches its -shm file, and listing them
    must not reorder them.)"""
    directory = directory or sessions_dir()
    return sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)


def list_sessions(directory: Path | None = None) -> list[SessionInfo]:
    return [session_info(p) for p in kept_sessions(directory)]


def session_to_open(which: str | None, directory: Path | None = None) -> str:
    """What `tapui open` opens: a file; or with a number N (that is not a file's name), the
    Nth newest kept session, as `tapui sessions` numbers them; with nothing, the newest."""
    if which is not None and (not which.isdigit() or os.path.exists(which)):
        return which
    kept = kept_sessions(directory)
    number = int(which) if which is not None else 1
    if not kept:
        raise SessionError(f"tapui: no sessions kept in {directory or sessions_dir()}: "
                           "run a command under tapui first, or name a file to open")
    if not 1 <= number <= len(kept):
        raise SessionError(f"tapui: {len(kept)} session{'s are' if len(kept) > 1 else ' is'} "
                           f"kept, numbered 1 (the newest) to {len(kept)} by `tapui sessions`; "
                           f"there is no session {number}")
    return str(kept[number - 1])


def human_size(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}G"


def cmd_sessions(argv: list[str]) -> int:
    """`tapui sessions`: the kept sessions, newest first."""
    parser = argparse.ArgumentParser(
        prog="tapui sessions",
        description=f"List the sessions tapui kept in {sessions_dir()} (the newest "
                    f"{KEEP_SESSIONS}), newest first. Open one with: tapui open N (its number "
                    "here), tapui open FILE, or tapui open (the newest)")
    parser.add_argument("--dir", metavar="DIR", type=Path, help="list this directory instead")
    args = parser.parse_args(argv)
    sessions = list_sessions(args.dir)
    if not sessions:
        print(f"no sessions in {args.dir or sessions_dir()}")
        return 0
    print(f"{'#':>2}  {'STARTED':19}  {'FLOWS':>9}  {'SIZE':>7}  {'COMMAND':40}  FILE")
    for number, s in enumerate(sessions, 1):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started)) \
            if s.started else "?"
        command = f"(unreadable: {s.error})" if s.error else shlex.join(s.command)
        if s.ended is None and not s.error:
            command += "  [running or interrupted]"
        if len(command) > 40:
            command = command[:39] + "…"
        print(f"{number:>2}  {started:19}  {s.flows:>9,}  {human_size(s.size):>7}  {command:40}  "
              f"{s.path}")
    return 0


def open_any(path: str | os.PathLike[str]) -> SessionStore:
    """`tapui open FILE`: a session file, or a HAR file (streamed into a temporary session),
    told apart by content. Raises SessionError or engine.har.HarError with a clear message."""
    from engine.har import HarError
    from engine.session_store import SessionStore

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise SessionError(f"tapui: cannot read {path}: {exc.strerror or exc}") from None
    if head == SQLITE_MAGIC:
        return SessionStore(path)
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith((b"{", b"[")) or not head.strip():
        fd, tmp = tempfile.mkstemp(prefix=tempdirs.prefix("har"), suffix=SUFFIX)
        os.close(fd)
        os.unlink(tmp)
        try:
            import_har(path, tmp)
            return SessionStore(tmp, temporary=True)
        except BaseException:
            for p in file_family(Path(tmp)):
                p.unlink(missing_ok=True)
            raise
    raise HarError(f"{path} is neither a tapui session nor a HAR file")
