"""A FlowStore that reads a session file: same interface, bounded memory, a million flows.

The view (filtered, sorted) is a list of row ids computed by SQL (engine.sqlfilter); the
unfiltered time-ordered view of a session with no gaps is just a `range`. Flows are built from
their rows only when asked for (the list asks for the visible ones), kept in a small LRU cache,
and their bodies are read from the file when read (`LazyBody`).

Live use: while a SessionWriter writes the file, `drain()` (called on each UI tick) notices new
commits through PRAGMA data_version and updates the view: only the tail for the time order,
the whole view at most once a second for the other orders.
"""

from __future__ import annotations

import bisect
import json
import os
import queue
import sqlite3
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from engine import session_db
from engine.flow import (
    Body,
    Certificate,
    Connection,
    EventKind,
    Flow,
    FlowBus,
    FlowEvent,
    FlowKind,
    FlowState,
    Request,
    Response,
    Timings,
    WebSocketMessage,
)
from engine.sqlfilter import SqlFilter, compile_expr
from engine.store import RAW_KINDS, SORT_KEYS

_ORDER = {
    "time": "f.id", "host": "f.host_lc, f.id", "status": "f.status, f.id",
    "size": "f.size, f.id", "duration": "f.duration, f.id",
}
#: Flows kept built in memory (the visible screen and some around it).
CACHE_FLOWS = 2048
#: Rows built per query around the one asked for.
PAGE = 128
#: Slowest rebuild rate of a non-time-ordered view while the session grows.
RESORT_INTERVAL = 1.0


class LazyBody(Body):
    """A body whose kept bytes stay in the session file until read."""

    __slots__ = ("_store", "_row", "_kept_bytes")

    def __init__(self, store: SessionStore, row: int, size: int, kept: int) -> None:
        super().__init__(cap=0)
        self.size = size
        self._store = store
        self._row = row
        self._kept_bytes = kept

    @property
    def kept(self) -> int:
        return self._kept_bytes

    @property
    def truncated(self) -> bool:
        return self._kept_bytes < self.size

    def append(self, data: bytes) -> None:
        raise TypeError("a body read from a session file is read-only")

    def read(self, limit: int | None = None, offset: int = 0) -> bytes:
        if offset >= self._kept_bytes:
            return b""
        n = self._kept_bytes - offset if limit is None else min(limit, self._kept_bytes - offset)
        return self._store.read_body(self._row, offset, n)

    def close(self) -> None:
        pass


class SessionStore:
    """Flows of a session file, and a filtered and sorted view of them (see FlowStore)."""

    def __init__(self, path: str | os.PathLike[str], *, temporary: bool = False) -> None:
        self.path = Path(path)
        self.temporary = temporary
        self._conn = session_db.connect(path)
        self._lock = threading.RLock()
        self.queue: queue.SimpleQueue[FlowEvent] = queue.SimpleQueue()
        self.filter_expr = ""
        self._filter: SqlFilter | None = None
        self.hide_raw = False
        self.sort_key = "time"
        self.sort_reverse = False
        self._floor = 0  # rows up to this id were cleared from the view
        self._view: Sequence[int] = range(0)
        self._cache: OrderedDict[int, Flow] = OrderedDict()
        self._data_version = self._pragma("data_version")
        self._tail_from = 0  # first id that may still change (time order, live)
        self._count = 0
        self.total_bytes = 0
        self._totals_at = 0.0
        self._summing: threading.Thread | None = None
        self._resort_due = False
        self._built_at = 0.0
        self.counters = session_db.SessionCounters()
        meta = session_db.read_meta(self._conn)
        self.command: list[str] = list(meta.get("command") or [])
        self.started: float | None = meta.get("started")
        self._update_totals(force=True)
        self._rebuild()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        if self.temporary:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _pragma(self, name: str) -> int:
        with self._lock:
            return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    # --- feeding (the SessionWriter writes; this store reads what it committed) ---------------

    def listener(self, event: FlowEvent) -> None:
        """Compatibility with FlowStore: events only hint that the file changes."""

    def attach(self, bus: FlowBus) -> None:
        bus.subscribe(self.listener)

    def detach(self, bus: FlowBus) -> None:
        try:
            bus.unsubscribe(self.listener)
        except ValueError:
            pass

    def drain(self, limit: int = 0) -> bool:
        """Catch up with the writer's commits; True when something may have changed."""
        version = self._pragma("data_version")
        due = self._resort_due and time.monotonic() - self._built_at >= RESORT_INTERVAL
        if version == self._data_version and not due:
            return False
        self._data_version = version
        self._refresh()
        return True

    def apply(self, events: Iterable[FlowEvent]) -> bool:
        return self.drain()

    def add(self, flows: Iterable[Flow], refresh: bool = True) -> None:
        """Write finished flows into the session file (e.g. an imported HAR); without
        `refresh`, the view takes them in at the next drain() (the UI's next tick)."""
        db = session_db.SessionDB(self.path)
        try:
            db.begin()
            for flow in flows:
                db.write(flow, finished=True)
            while db.index_pending(10_000):
                pass
            db.save_counters()
            db.commit()
        finally:
            db.rollback()
            db.close()
        if refresh:
            self.drain()

    def _refresh(self) -> None:
        with self._lock:
            for ident in [i for i, f in self._cache.items() if not f.finished]:
                del self._cache[ident]
        if self.sort_key != "time":
            if time.monotonic() - self._built_at >= RESORT_INTERVAL:
                self._rebuild()
            else:
                self._resort_due = True
        else:
            self._refresh_tail()
        # Counted after the view is read, so the count takes in every row listed (counted
        # before, a commit in between showed "3/0 flows" until the next commit).
        self._update_totals()

    def _refresh_tail(self) -> None:
        # Time order: rows before _tail_from are final; fetch the rest again. The next tail is
        # read before the rows: read after, it could pass rows the writer committed in
        # between, and those would never be fetched (the list stayed empty under "0/3 flows").
        tail = self._next_tail()
        view = self._view
        if not isinstance(view, array):
            view = array("q", view)
        del view[bisect.bisect_left(view, self._tail_from):]
        where, params = self._where()
        view.extend(r[0] for r in self._query(
            f"SELECT f.id FROM flows f WHERE f.id >= ? AND {where} ORDER BY f.id",
            (self._tail_from, *params)))
        self._view = view
        self._tail_from = tail

    def _next_tail(self) -> int:
        """The first row that may still change: the first unfinished one, else the next."""
        first_open = self._query(
            "SELECT min(id) FROM flows WHERE state IN ('open', 'request', 'response') "
            "AND id > ?", (self._floor,))[0][0]
        last = self._query("SELECT max(id) FROM flows")[0][0] or 0
        return first_open if first_open is not None else last + 1

    def _update_totals(self, force: bool = False) -> None:
        """Flow count now; the byte total (a scan of every row) in the background."""
        if not force and self._count > 100_000 and time.monotonic() - self._totals_at < 2:
            return
        self._totals_at = time.monotonic()
        self._count = self._query("SELECT count(*) FROM flows WHERE id > ?", (self._floor,))[0][0]
        meta = session_db.read_meta(self._conn)
        known = session_db.SessionCounters.__dataclass_fields__
        self.counters = session_db.SessionCounters(
            **{k: v for k, v in meta.get("counters", {}).items() if k in known})
        if self._summing is None or not self._summing.is_alive():
            self._summing = threading.Thread(target=self._sum_sizes, args=(self._floor,),
                                             name="tapui-session-total", daemon=True)
            self._summing.start()
            if self._count < 100_000:
                self._summing.join()

    def _sum_sizes(self, floor: int) -> None:
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
            try:
                total = conn.execute("SELECT total(size) FROM flows WHERE id > ?",
                                     (floor,)).fetchone()[0]
            finally:
                conn.close()
        except sqlite3.Error:
            return
        if floor == self._floor:
            self.total_bytes = int(total)

    # --- the view -------------------------------------------------------------------------

    def _where(self) -> tuple[str, tuple[Any, ...]]:
        terms = ["f.id > ?"]
        params: list[Any] = [self._floor]
        if self.hide_raw:
            terms.append("f.kind NOT IN (" + ", ".join(f"'{k.value}'" for k in RAW_KINDS) + ")")
        if self._filter is not None:
            terms.append(self._filter.where)
            params.extend(self._filter.params)
        return " AND ".join(terms), tuple(params)

    def _rebuild(self) -> None:
        self._built_at = time.monotonic()
        self._resort_due = False
        self._tail_from = self._next_tail()
        if self._filter is None and not self.hide_raw and self.sort_key == "time":
            # Two queries: SQLite answers min() and max() from the key only when alone.
            low = self._query("SELECT min(id) FROM flows WHERE id > ?", (self._floor,))[0][0]
            high = self._query("SELECT max(id) FROM flows")[0][0]
            if low is None:
                self._view = range(0)
                return
            if self._count == high - low + 1:  # no gaps: the view is a range
                self._view = range(low, high + 1)
                return
        where, params = self._where()
        ids = array("q")
        with self._lock:
            cursor = self._conn.execute(
                f"SELECT f.id FROM flows f WHERE {where} ORDER BY {_ORDER[self.sort_key]}",
                params)
            while rows := cursor.fetchmany(4096):
                ids.extend(r[0] for r in rows)
        self._view = ids

    def __len__(self) -> int:
        return self._count

    def last_row(self) -> int:
        """The highest flow row id in the file (0 when it has none)."""
        return self._query("SELECT coalesce(max(id), 0) FROM flows")[0][0]

    def __iter__(self) -> Iterator[Flow]:
        """Every flow in arrival order, built one page at a time (never all in memory)."""
        last = self._floor
        while True:
            ids = [r[0] for r in self._query(
                "SELECT id FROM flows WHERE id > ? ORDER BY id LIMIT ?", (last, PAGE))]
            if not ids:
                return
            flows = self._build(ids)
            for ident in ids:
                if ident in flows:
                    yield flows[ident]
            last = ids[-1]

    def get(self, flow_id: int) -> Flow | None:
        flow = self._cached(flow_id)
        if flow is None and flow_id > self._floor:
            flow = self._build([flow_id]).get(flow_id)
            if flow is not None:
                self._remember(flow)
        return flow

    @property
    def view_len(self) -> int:
        return len(self._view)

    def _view_id(self, i: int) -> int:
        return self._view[len(self._view) - 1 - i if self.sort_reverse else i]

    def view_flow(self, i: int) -> Flow:
        """The i-th flow of the filtered, sorted view (its neighbours are built with it)."""
        ident = self._view_id(i)
        flow = self._cached(ident)
        if flow is not None:
            return flow
        lo, hi = max(0, i - PAGE // 4), min(len(self._view), i + PAGE * 3 // 4)
        ids = [x for x in (self._view_id(j) for j in range(lo, hi)) if x not in self._cache]
        flows = self._build(ids)
        for built in flows.values():
            self._remember(built)
        if ident not in flows:  # gone (should not happen: rows are never deleted)
            raise IndexError(i)
        return flows[ident]

    def iter_view(self) -> Iterator[Flow]:
        """The view's flows in order, built page by page and not cached (for exports)."""
        for start in range(0, len(self._view), PAGE):
            ids = [self._view_id(i) for i in range(start, min(start + PAGE, len(self._view)))]
            flows = self._build(ids)
            yield from (flows[i] for i in ids if i in flows)

    def view_flows(self) -> list[Flow]:
        """Every flow of the view, built: avoid on big sessions (use iter_view)."""
        return list(self.iter_view())

    def view_index(self, flow_id: int) -> int | None:
        view = self._view
        if isinstance(view, range) or (self.sort_key == "time"):
            pos = bisect.bisect_left(view, flow_id)
            if pos >= len(view) or view[pos] != flow_id:
                return None
        else:
            try:
                pos = view.index(flow_id)
            except ValueError:
                return None
        return len(view) - 1 - pos if self.sort_reverse else pos

    # --- view settings --------------------------------------------------------------------

    def set_filter(self, expr: str) -> None:
        """Filter the view; raises FilterError (keeping the current filter) on a bad one."""
        expr = expr.strip()
        compiled = compile_expr(expr) if expr else None
        self.filter_expr = expr
        self._filter = compiled
        self._rebuild()

    def set_hide_raw(self, hide: bool) -> None:
        self.hide_raw = hide
        self._rebuild()

    def set_sort(self, key: str, reverse: bool = False) -> None:
        if key not in _ORDER:
            raise ValueError(f"unknown sort key {key!r}; one of {', '.join(SORT_KEYS)}")
        changed = key != self.sort_key
        self.sort_key = key
        self.sort_reverse = reverse
        if changed:
            self._rebuild()

    def clear(self) -> None:
        """Hide every flow so far (the file keeps them); later ones show."""
        self._floor = self._query("SELECT max(id) FROM flows")[0][0] or 0
        with self._lock:
            self._cache.clear()
        self._update_totals(force=True)
        self._rebuild()

    # --- exports --------------------------------------------------------------------------

    def write_har(self, dest: str | os.PathLike[str] | IO[str], view_only: bool = True) -> int:
        """Stream the view (or the whole session) as HAR, one flow built at a time."""
        from engine.har import write_har

        return write_har(dest, self.iter_view() if view_only else iter(self))

    # --- rows to flows --------------------------------------------------------------------

    def _cached(self, ident: int) -> Flow | None:
        with self._lock:
            flow = self._cache.get(ident)
            if flow is not None:
                self._cache.move_to_end(ident)
            return flow

    def _remember(self, flow: Flow) -> None:
        with self._lock:
            self._cache[flow.id] = flow
            while len(self._cache) > CACHE_FLOWS:
                self._cache.popitem(last=False)

    def read_body(self, row: int, offset: int, n: int) -> bytes:
        with self._lock:
            try:
                with self._conn.blobopen("bodies", "data", row, readonly=True) as blob:
                    blob.seek(offset)
                    return blob.read(n)
            except sqlite3.OperationalError:  # dropped by retention meanwhile
                return b""

    def _build(self, ids: list[int]) -> dict[int, Flow]:
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        rows = self._query(
            "SELECT f.id, f.kind, f.state, f.error, f.ws_count, d.data FROM flows f "
            f"JOIN details d ON d.id = f.id WHERE f.id IN ({marks})", ids)
        bodies: dict[tuple[int, int], Body] = {}
        body_ids = [i * 2 + part for i in ids for part in (0, 1)]
        for row, flow_id, part, size, kept, data_null in self._query(
                "SELECT id, flow, part, size, kept, data IS NULL FROM bodies "
                f"WHERE id IN ({', '.join('?' * len(body_ids))})", body_ids):
            bodies[(flow_id, part)] = LazyBody(self, row, size, 0 if data_null else kept)
        flows = {}
        for ident, kind, state, error, ws_count, data in rows:
            flow = _flow(ident, kind, state, error, json.loads(data), bodies)
            if ws_count:
                flow.websocket_messages = [
                    WebSocketMessage(bool(c), op, content or b"", ts)
                    for c, op, ts, content in self._query(
                        "SELECT from_client, opcode, ts, content FROM ws_messages "
                        "WHERE flow = ? ORDER BY seq", (ident,))]
            flows[ident] = flow
        return flows


def _headers(items: list[list[str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in items]


def _flow(ident: int, kind: str, state: str, error: str | None, d: dict[str, Any],
          bodies: dict[tuple[int, int], Body]) -> Flow:
    c = d["c"]
    cert = c.get("cert")
    conn = Connection(
        id=c["id"], client=tuple(c["client"]), server=tuple(c["server"]),  # type: ignore[arg-type]
        upstream=tuple(c["upstream"]) if c.get("upstream") else None,  # type: ignore[arg-type]
        hostname=c.get("hostname"), sni=c.get("sni"), alpn=c.get("alpn"),
        tls_version=c.get("tls"), pid=c.get("pid"), command=c.get("command"),
        transport=c.get("transport", "tcp"), inbound=c.get("in", False),
        tunnel=tuple(c["tun"]) if c.get("tun") else None,  # type: ignore[arg-type]
        timings=Timings(*c["t"]),
        certificate=Certificate(*cert[:4], sans=list(cert[4])) if cert else None,
    )
    flow = Flow(conn=conn, kind=FlowKind(kind), id=ident, state=FlowState(state),
                timings=Timings(*d["t"]), error=error, bytes_sent=d["b"][0],
                bytes_received=d["b"][1])
    if "rq" in d:
        method, scheme, authority, path, version, headers, trailers = d["rq"]
        flow.request = Request(method, scheme, authority, path, version, _headers(headers),
                               bodies.get((ident, 0)) or Body(cap=0), _headers(trailers))
    if "rs" in d:
        status, reason, version, headers, trailers = d["rs"]
        flow.response = Response(status, reason, version, _headers(headers),
                                 bodies.get((ident, 1)) or Body(cap=0), _headers(trailers))
    return flow


class AddToSession:
    """A FlowBus listener that writes each finished flow into a saved session file (replays
    made while browsing it with `tapui open`); the store reading the file then lists them."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self.error: str | None = None  # why the last flow could not be written, if it could not

    def __call__(self, event: FlowEvent) -> None:
        if event.kind is not EventKind.DONE:
            return
        try:
            self.store.add([event.flow], refresh=False)  # (from the replay's thread: the UI's
            self.error = None  # own drain then sees the change, and repaints the list)
        except (sqlite3.Error, OSError) as exc:  # a read-only file, a full disk
            self.error = f"could not add it to {self.store.path}: {exc}"
