"""Sessions on disk: every flow in one SQLite file (WAL mode), written by one writer process.

Layout (schema version `SCHEMA_VERSION`, kept in PRAGMA user_version):

- `flows`: one narrow row per flow with what the list shows, sorts and filters on (hosts,
  methods and content types are interned in `names`, so a regex runs over the distinct values).
- `details`: the rest of the flow as JSON (headers, trailers, connection, timings).
- `bodies`: raw kept body bytes (request = part 0, response = part 1) and the full size.
- `texts`: what plain-text search reads (URL, header text, decoded UTF-8 bodies); `search` is
  an FTS5 trigram index over it (external content). Finished flows wait in `pending` until the
  writer indexes them, so a burst of flows is durable at once and indexed when there is time;
  searches treat pending flows as candidates, so results never depend on the backlog.
- `ws_messages`, `meta` (command, start time, counters).

While a capture runs, only the writer process (engine.session_writer, fed by `SessionWriter`)
writes; readers (SessionStore, `tapui sessions`) use their own connections. Flows are sent to
it every `BATCH_INTERVAL` seconds (`BUSY_INTERVAL` while flows stream in) and each batch (at
most `BATCH_ROWS` flows) is one transaction. The writer outlives a crash of tapui (even kill
-9) and commits what it was sent, so every flow that finished more than `BUSY_INTERVAL` before
the crash is in the file, intact.
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import operator
import os
import pickle
import shlex
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from engine import sqlfilter, tempdirs
from engine.errors import EXIT_USAGE, TapuiError
from engine.filters import body_bytes
from engine.flow import (
    MEMORY_THRESHOLD,
    Body,
    Certificate,
    Connection,
    EventKind,
    Flow,
    FlowBus,
    FlowEvent,
    Headers,
    Request,
    Response,
    Timings,
    WebSocketMessage,
    header,
)
from engine.store import flow_size

if TYPE_CHECKING:
    from engine.session_store import SessionStore

SCHEMA_VERSION = 1
APPLICATION_ID = 0x74617075  # "tapu"
SQLITE_MAGIC = b"SQLite format 3\x00"
SUFFIX = ".tapui"
#: Sessions kept in the state directory; older ones are pruned when a new one starts.
KEEP_SESSIONS = 10
BATCH_INTERVAL = 0.05
#: While flows stream in (a batch of at least `BUSY_EVENTS` events), batches go every
#: `BUSY_INTERVAL` instead: every commit rewrites the last page of each index, so many small
#: transactions cost the writer (and the machine) far more than a few large ones. At 1,000
#: small flows a second this halves the bytes written, and the latency tapui adds to the
#: captured command's connections drops by about 0.08 ms.
BUSY_INTERVAL = 0.5
BUSY_EVENTS = 32
BATCH_ROWS = 500
#: Finished flows added to the text index per slice (a slice is one short transaction).
INDEX_SLICE = 256
OPEN_STATES = ("open", "request", "response")
_BLOB_CHUNK = 1024 * 1024

#: Upgrades of older files: MIGRATIONS[v] turns schema v into v + 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE names (id INTEGER PRIMARY KEY, value TEXT NOT NULL UNIQUE);
CREATE TABLE flows (
    id INTEGER PRIMARY KEY,
    flow_id INTEGER,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    start REAL NOT NULL,
    duration REAL NOT NULL,      -- +inf while unfinished (sorts last, as in FlowStore)
    hostkey INTEGER,             -- names: request authority, else flow.host
    sni INTEGER,
    hostname INTEGER,
    host_lc TEXT NOT NULL,       -- flow.host lower-cased, the host sort key
    method INTEGER,              -- NULL without a request
    url TEXT,
    status INTEGER,              -- NULL without a response
    req_ctype INTEGER,
    resp_ctype INTEGER,
    size INTEGER NOT NULL,
    error TEXT,
    pid INTEGER,
    ws_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX flows_hostkey ON flows(hostkey);
CREATE INDEX flows_sni ON flows(sni);
CREATE INDEX flows_hostname ON flows(hostname);
CREATE INDEX flows_status ON flows(status);
CREATE INDEX flows_host_lc ON flows(host_lc);
CREATE INDEX flows_size ON flows(size);
CREATE INDEX flows_duration ON flows(duration);
CREATE INDEX flows_open ON flows(id) WHERE state IN ('open', 'request', 'response');
CREATE TABLE details (id INTEGER PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE bodies (
    id INTEGER PRIMARY KEY,      -- flow * 2 + part
    flow INTEGER NOT NULL,
    part INTEGER NOT NULL,       -- 0 request, 1 response
    size INTEGER NOT NULL,       -- every byte seen
    kept INTEGER NOT NULL,       -- bytes kept (the first ones)
    dropped INTEGER NOT NULL DEFAULT 0,
    data BLOB
);
CREATE TABLE ws_messages (
    flow INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    from_client INTEGER NOT NULL,
    opcode INTEGER NOT NULL,
    ts REAL NOT NULL,
    content BLOB,
    PRIMARY KEY (flow, seq)
) WITHOUT ROWID;
CREATE TABLE texts (
    id INTEGER PRIMARY KEY,      -- = flows.id
    head TEXT, hq TEXT, hs TEXT, bq TEXT, bs TEXT, ws TEXT
);
CREATE TABLE pending (flow INTEGER PRIMARY KEY);
CREATE VIRTUAL TABLE search USING fts5(
    head, hq, hs, bq, bs, ws,
    tokenize = 'trigram', detail = none, columnsize = 0,
    content = 'texts', content_rowid = 'id'
);
"""

FLOW_COLUMNS = (
    "flow_id", "kind", "state", "start", "duration", "hostkey", "sni", "hostname", "host_lc",
    "method", "url", "status", "req_ctype", "resp_ctype", "size", "error", "pid", "ws_count",
)


class SessionError(TapuiError):
    """A session file that cannot be opened or written; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


# --- locations ------------------------------------------------------------------------------


def sessions_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "state")
    return Path(base) / "tapui" / "sessions"


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


def _family(path: Path) -> list[Path]:
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm")]


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a session, its WAL included."""
    total = 0
    for p in _family(Path(path)):
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total


def prune_sessions(directory: Path | None = None, keep: int = KEEP_SESSIONS,
                   spare: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` sessions of the state directory (never `spare`, nor a
    file written in the last minute: another tapui may be running on it)."""
    directory = directory or sessions_dir()
    files = sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: _mtime(p), reverse=True)
    removed = []
    for path in files[keep:]:
        if path == spare or time.time() - _mtime(path) < 60:
            continue
        for p in _family(path):
            p.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _mtime(path: Path) -> float:
    return max((p.stat().st_mtime for p in _family(path) if p.exists()), default=0.0)


# --- opening --------------------------------------------------------------------------------


def is_session_file(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def connect(path: str | os.PathLike[str], *, create: bool = False) -> sqlite3.Connection:
    """A connection to a session file, schema checked (and migrated); `create` makes a new file.

    Raises SessionError with a one-line reason for anything that is not a usable session.
    """
    path = os.fspath(path)
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if not exists and not create:
        raise SessionError(f"tapui: {path}: no such session file")
    if exists and not is_session_file(path):
        raise SessionError(f"tapui: {path} is not a tapui session file (not SQLite)")
    try:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise SessionError(f"tapui: cannot open {path}: {exc}") from None
    try:
        if not exists:
            _create(conn)
        _check_schema(conn, path)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 8192")  # 32 MB: fewer checkpoint fsyncs
        conn.execute("PRAGMA cache_size = -32768")
        sqlfilter.register(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise SessionError(f"tapui: {path} is damaged or not a tapui session: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _create(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before any table: lets retention shrink
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN IMMEDIATE")
    for statement in SCHEMA.split(";\n"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.execute("COMMIT")


def _check_schema(conn: sqlite3.Connection, path: str) -> None:
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id != APPLICATION_ID:
        raise SessionError(f"tapui: {path} is an SQLite database but not a tapui session")
    current = SCHEMA_VERSION
    if version > current:
        raise SessionError(
            f"tapui: {path} was written by a newer tapui (session format {version}; this "
            f"tapui reads formats up to {current}). Upgrade tapui to open it.")
    while version < current:
        migrate = MIGRATIONS.get(version)
        if migrate is None:
            raise SessionError(
                f"tapui: {path} uses session format {version}, which this tapui cannot "
                f"upgrade (it reads format {current}). Open it with the tapui that wrote it "
                "and export a HAR file.")
        try:
            conn.execute("BEGIN IMMEDIATE")
            migrate(conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise SessionError(f"tapui: cannot upgrade {path} to format {version + 1}: "
                               f"{exc}") from None
        version += 1


def read_meta(conn: sqlite3.Connection) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}


# --- flows to rows --------------------------------------------------------------------------


def header_text(headers: Headers) -> str:
    """Headers as plain text search sees them (engine.filters does the same)."""
    return "\n".join(f"{k}: {v}" for k, v in headers)


def clean(text: str | None) -> str | None:
    """Text SQLite accepts (strings with lone surrogates are not UTF-8)."""
    if text is None or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text


def search_text(data: bytes) -> str | None:
    """Decoded body bytes as indexable text; None for binary bodies (not UTF-8, or NUL)."""
    if not data or b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _timings(t: Timings) -> list[float | None]:
    return [t.start, t.dns, t.connect, t.tls, t.request_sent, t.first_byte, t.done]


def details_json(flow: Flow) -> str:
    conn = flow.conn
    cert = conn.certificate
    doc: dict[str, Any] = {
        "t": _timings(flow.timings),
        "c": {
            "id": conn.id, "client": list(conn.client), "server": list(conn.server),
            "upstream": list(conn.upstream) if conn.upstream else None,
            "hostname": conn.hostname, "sni": conn.sni, "alpn": conn.alpn,
            "tls": conn.tls_version, "pid": conn.pid, "command": conn.command,
            "transport": conn.transport, "t": _timings(conn.timings),
            "cert": None if cert is None else [cert.subject, cert.issuer, cert.not_before,
                                               cert.not_after, list(cert.sans)],
        },
        "b": [flow.bytes_sent, flow.bytes_received],
        "fid": flow.id,
    }
    req, resp = flow.request, flow.response
    if req is not None:
        doc["rq"] = [req.method, req.scheme, req.authority, req.path, req.http_version,
                     list(req.headers), list(req.trailers)]
    if resp is not None:
        doc["rs"] = [resp.status, resp.reason, resp.http_version, list(resp.headers),
                     list(resp.trailers)]
    return json.dumps(doc, separators=(",", ":"))


@dataclass
class SessionCounters:
    """What the status bar shows when retention bites (also kept in the file's meta)."""

    flows: int = 0  # finished flows written
    bodies_truncated: int = 0  # bodies longer than --max-body-size: the first bytes are kept
    bytes_truncated: int = 0
    bodies_dropped: int = 0  # bodies removed (oldest first) to stay under --max-session-size
    bytes_dropped: int = 0
    pending_index: int = 0  # finished flows not in the text index yet (searched anyway)
    queued: int = 0  # flow events waiting for the writer
    errors: int = 0  # failed writes (e.g. disk full); last_error says why
    last_error: str | None = None


class SessionDB:
    """The write side of a session: turns flows into rows. One instance per writing thread
    (the writer process's, an import's)."""

    def __init__(self, path: str | os.PathLike[str], *, max_session_size: int = 0) -> None:
        self.path = Path(path)
        self.conn = connect(path, create=True)
        self.max_session_size = max_session_size
        meta = read_meta(self.conn)
        self.counters = SessionCounters(**meta.get("counters", {}))
        self._names: dict[str, int] = {}
        self._rowids: dict[int, int] = {}  # engine flow id -> row id, while unfinished
        #: Recently finished flows (engine id -> row id): a late event updates the same row.
        self._finished: OrderedDict[int, int] = OrderedDict()
        self._drop_floor = 0  # every body up to this body id is dropped
        self._unchecked = 0  # body bytes written since the last size check
        self.counters.pending_index = self.conn.execute(
            "SELECT count(*) FROM pending").fetchone()[0]

    def close(self) -> None:
        self.conn.close()

    def set_meta(self, **values: Any) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                              [(k, json.dumps(v)) for k, v in values.items()])

    def save_counters(self) -> None:
        self.set_meta(counters=asdict(self.counters))

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def name(self, value: str | None) -> int | None:
        if value is None:
            return None
        key = clean(value)
        found = self._names.get(key)  # type: ignore[arg-type]
        if found is not None:
            return found
        row = self.conn.execute("SELECT id FROM names WHERE value = ?", (key,)).fetchone()
        ident = row[0] if row else self.conn.execute(
            "INSERT INTO names(value) VALUES (?)", (key,)).lastrowid
        if len(self._names) > 50_000:
            self._names.clear()
        self._names[key] = ident  # type: ignore[index]
        return ident

    # -- one flow --

    def write(self, flow: Flow, finished: bool | None = None) -> int:
        """Insert or update a flow; with `finished` (default: flow.finished) also its bodies,
        messages and search text. Returns its row id. Call inside begin()/commit()."""
        if finished is None:
            finished = flow.finished
        req, resp, conn = flow.request, flow.response, flow.conn
        host = flow.host
        values = (
            flow.id, flow.kind.value, flow.state.value, flow.timings.start,
            flow.duration if flow.duration is not None else float("inf"),
            self.name(req.authority if req is not None else host), self.name(conn.sni),
            self.name(conn.hostname), clean(host.lower()),
            self.name(req.method) if req is not None else None,
            clean(req.url) if req is not None else None,
            resp.status if resp is not None else None,
            self.name(header(req.headers, "content-type")) if req is not None else None,
            self.name(header(resp.headers, "content-type")) if resp is not None else None,
            flow_size(flow), clean(flow.error), conn.pid, len(flow.websocket_messages),
        )
        rowid = self._rowids.get(flow.id)
        was_finished = rowid is None and flow.id in self._finished
        if was_finished:
            rowid = self._finished[flow.id]
        if rowid is None:
            rowid = self.conn.execute(
                f"INSERT INTO flows({', '.join(FLOW_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(FLOW_COLUMNS))})", values).lastrowid
            assert rowid is not None
        else:
            self.conn.execute(
                f"UPDATE flows SET {', '.join(c + ' = ?' for c in FLOW_COLUMNS)} WHERE id = ?",
                (*values, rowid))
        self.conn.execute("INSERT OR REPLACE INTO details VALUES (?, ?)",
                          (rowid, details_json(flow)))
        head = "\n".join([req.url, req.method]) if req is not None else host
        texts = [clean(head), clean(header_text(req.headers)) if req is not None else "",
                 clean(header_text(resp.headers)) if resp is not None else "", None, None, None]
        if finished:
            self._rowids.pop(flow.id, None)
            self._finished[flow.id] = rowid
            if len(self._finished) > 10_000:
                self._finished.popitem(last=False)
            if req is not None:
                self._body(rowid, 0, req.body)
                texts[3] = search_text(body_bytes(req.body, req.headers))
            if resp is not None:
                self._body(rowid, 1, resp.body)
                texts[4] = search_text(body_bytes(resp.body, resp.headers))
            if flow.websocket_messages:
                self._messages(rowid, flow)
                texts[5] = search_text(b"\n".join(m.content for m in flow.websocket_messages))
            self.counters.flows += not was_finished
            self._unchecked += flow_size(flow) + (req.body.kept if req is not None else 0)
            if self.max_session_size and self._unchecked > self.max_session_size // 16:
                self.enforce_size()
        else:
            self._rowids[flow.id] = rowid
        self._texts(rowid, texts, finished, was_finished)
        return rowid

    def _body(self, rowid: int, part: int, body: Body) -> None:
        if not body.size:
            return
        kept = body.kept
        if body.truncated:
            self.counters.bodies_truncated += 1
            self.counters.bytes_truncated += body.size - kept
        ident = rowid * 2 + part
        sql = "INSERT OR REPLACE INTO bodies(id, flow, part, size, kept, data) VALUES (?, ?, ?, ?, ?, "
        if kept <= _BLOB_CHUNK:
            self.conn.execute(sql + "?)", (ident, rowid, part, body.size, kept, body.read()))
            return
        # Large bodies go in chunks, never whole in memory.
        self.conn.execute(sql + "zeroblob(?))", (ident, rowid, part, body.size, kept, kept))
        with self.conn.blobopen("bodies", "data", ident) as blob:
            offset = 0
            while offset < kept:
                chunk = body.read(min(_BLOB_CHUNK, kept - offset), offset)
                if not chunk:
                    break
                blob.write(chunk)
                offset += len(chunk)

    def _messages(self, rowid: int, flow: Flow) -> None:
        self.conn.execute("DELETE FROM ws_messages WHERE flow = ?", (rowid,))
        self.conn.executemany(
            "INSERT INTO ws_messages VALUES (?, ?, ?, ?, ?, ?)",
            [(rowid, i, int(m.from_client), m.opcode, m.timestamp, m.content)
             for i, m in enumerate(list(flow.websocket_messages))])

    def _texts(self, rowid: int, texts: list[str | None], finished: bool,
               was_finished: bool) -> None:
        """Store the search text; a finished flow's text goes to the index queue. Text that
        was indexed already is taken out of the index first (external content must match)."""
        if was_finished and not self.conn.execute(
                "SELECT 1 FROM pending WHERE flow = ?", (rowid,)).fetchone():
            old = self.conn.execute("SELECT head, hq, hs, bq, bs, ws FROM texts WHERE id = ?",
                                    (rowid,)).fetchone()
            if old is not None:
                self.conn.execute("INSERT INTO search(search, rowid, head, hq, hs, bq, bs, ws) "
                                  "VALUES ('delete', ?, ?, ?, ?, ?, ?, ?)", (rowid, *old))
        self.conn.execute("INSERT OR REPLACE INTO texts VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (rowid, *texts))
        if finished:
            added = self.conn.execute("INSERT OR IGNORE INTO pending(flow) VALUES (?)",
                                      (rowid,)).rowcount
            self.counters.pending_index += added

    # -- background work --

    def index_pending(self, limit: int = INDEX_SLICE) -> int:
        """Index up to `limit` finished flows; returns how many. Call inside a transaction."""
        rows = self.conn.execute("SELECT flow FROM pending ORDER BY flow LIMIT ?",
                                 (limit,)).fetchall()
        if not rows:
            return 0
        last = rows[-1][0]
        self.conn.execute(
            "INSERT INTO search(rowid, head, hq, hs, bq, bs, ws) SELECT t.id, t.head, t.hq, "
            "t.hs, t.bq, t.bs, t.ws FROM pending p JOIN texts t ON t.id = p.flow "
            "WHERE p.flow <= ?", (last,))
        self.conn.execute("DELETE FROM pending WHERE flow <= ?", (last,))
        self.counters.pending_index = max(0, self.counters.pending_index - len(rows))
        return len(rows)

    def used_bytes(self) -> int:
        page_size, pages, free = (self.conn.execute(f"PRAGMA {p}").fetchone()[0]
                                  for p in ("page_size", "page_count", "freelist_count"))
        return (pages - free) * page_size

    def enforce_size(self) -> None:
        """Drop the oldest bodies (and their search text) while the file is over the limit;
        metadata stays. Call inside a transaction."""
        limit = self.max_session_size
        self._unchecked = 0
        if not limit or self.used_bytes() <= limit:
            return
        target = int(limit * 0.9)
        while self.used_bytes() > target:
            rows = self.conn.execute(
                "SELECT id, flow, length(data) FROM bodies WHERE id > ? AND data IS NOT NULL "
                "ORDER BY id LIMIT 128", (self._drop_floor,)).fetchall()
            if not rows:
                break
            flows = sorted({r[1] for r in rows})
            self.conn.executemany("UPDATE bodies SET data = NULL, dropped = 1 WHERE id = ?",
                                  [(r[0],) for r in rows])
            self.counters.bodies_dropped += len(rows)
            self.counters.bytes_dropped += sum(r[2] or 0 for r in rows)
            for rowid in flows:
                old = self.conn.execute("SELECT head, hq, hs FROM texts WHERE id = ?",
                                        (rowid,)).fetchone()
                if old is not None:
                    self._texts(rowid, [*old, None, None, None], True, was_finished=True)
            self._drop_floor = rows[-1][0]
        self.conn.execute("PRAGMA incremental_vacuum").fetchall()  # one page per row stepped


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
        self.hollow = hollow
        self.dispatch_table = {**_REDUCERS, Body: self._reduce_body}

    def _reduce_body(self, body: Body) -> tuple[Any, ...]:
        data = b"" if id(body) in self.hollow else body.read()
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
                data = body.read(min(_BLOB_CHUNK, kept - offset), offset)
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


def list_sessions(directory: Path | None = None) -> list[SessionInfo]:
    directory = directory or sessions_dir()
    files = sorted(directory.glob(f"*{SUFFIX}"), key=_mtime, reverse=True)
    return [session_info(p) for p in files]


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
                    f"{KEEP_SESSIONS}). Open one with: tapui open FILE")
    parser.add_argument("--dir", metavar="DIR", type=Path, help="list this directory instead")
    args = parser.parse_args(argv)
    sessions = list_sessions(args.dir)
    if not sessions:
        print(f"no sessions in {args.dir or sessions_dir()}")
        return 0
    print(f"{'STARTED':19}  {'FLOWS':>9}  {'SIZE':>7}  {'COMMAND':40}  FILE")
    for s in sessions:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started)) \
            if s.started else "?"
        command = f"(unreadable: {s.error})" if s.error else shlex.join(s.command)
        if s.ended is None and not s.error:
            command += "  [running or interrupted]"
        if len(command) > 40:
            command = command[:39] + "…"
        print(f"{started:19}  {s.flows:>9,}  {human_size(s.size):>7}  {command:40}  {s.path}")
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
            for p in _family(Path(tmp)):
                p.unlink(missing_ok=True)
            raise
    raise HarError(f"{path} is neither a tapui session nor a HAR file")
