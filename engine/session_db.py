"""A session file: every flow of a capture in one SQLite file (WAL mode).

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

Only the writer process (engine.session_writer) writes while a capture runs; readers
(SessionStore, `tapui sessions`) use their own connections.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import sqlfilter
from engine.errors import EXIT_USAGE, TapuiError
from engine.filters import body_bytes
from engine.flow import (
    Body,
    Flow,
    FlowState,
    Headers,
    Timings,
    header,
)
from engine.store import flow_size

if TYPE_CHECKING:
    pass

SCHEMA_VERSION = 1
APPLICATION_ID = 0x74617075  # "tapu"
SQLITE_MAGIC = b"SQLite format 3\x00"
SUFFIX = ".tapui"
#: Finished flows added to the text index per slice (a slice is one short transaction).
INDEX_SLICE = 256
OPEN_STATES = ("open", "request", "response")
BLOB_CHUNK = 1024 * 1024  #: body bytes read or written at a time

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




def file_family(path: Path) -> list[Path]:
    """A session file and its WAL and shared-memory files."""
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm")]


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a session, its WAL included."""
    total = 0
    for p in file_family(Path(path)):
        try:
            total += p.stat().st_size
        except OSError:
            pass
    return total



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
            "in": conn.inbound, "tun": list(conn.tunnel) if conn.tunnel else None,
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
        state = flow.state
        if not finished and flow.finished:
            # The sender judged the flow unfinished (its bodies came hollow) and it finished
            # while being pickled: the row stays in progress, until the batch with its DONE,
            # so no finished row ever lacks its bodies (a kill -9 between the two left one).
            state = (FlowState.RESPONSE if resp is not None
                     else FlowState.REQUEST if req is not None else FlowState.OPEN)
        values = (
            flow.id, flow.kind.value, state.value, flow.timings.start,
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
        if kept <= BLOB_CHUNK:
            self.conn.execute(sql + "?)", (ident, rowid, part, body.size, kept, body.read()))
            return
        # Large bodies go in chunks, never whole in memory.
        self.conn.execute(sql + "zeroblob(?))", (ident, rowid, part, body.size, kept, kept))
        with self.conn.blobopen("bodies", "data", ident) as blob:
            offset = 0
            while offset < kept:
                chunk = body.read(min(BLOB_CHUNK, kept - offset), offset)
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
