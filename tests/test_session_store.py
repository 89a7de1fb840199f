"""SessionStore behaves like FlowStore (the UI's interface) while reading from a session file."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.filters import FilterError
from engine.flow import Body, FlowBus
from engine.session import SessionWriter
from engine.session_store import CACHE_FLOWS, LazyBody, SessionStore
from engine.store import SORT_KEYS, FlowStore
from tests.test_sqlfilter import make_flow


@pytest.fixture
def pair(tmp_path: Path) -> tuple[FlowStore, SessionStore, dict[int, int]]:
    rnd = random.Random(11)
    flows = [make_flow(rnd) for _ in range(300)]
    writer = SessionWriter(tmp_path / "s.tapui", ["x"])
    writer.add(flows)
    writer.close()
    memory = FlowStore()
    memory.add(flows)
    disk = SessionStore(writer.path)
    # Row ids follow arrival order: row n is the n-th flow.
    rows = {row: flow.id for row, flow in enumerate(flows, start=disk.view_flow(0).id)}
    yield memory, disk, rows
    disk.close()


def view_ids(store: FlowStore | SessionStore) -> list[int]:
    return [store.view_flow(i).id for i in range(store.view_len)]


@pytest.mark.parametrize("key", SORT_KEYS)
@pytest.mark.parametrize("reverse", [False, True])
def test_sorted_views_match_flowstore(pair, key: str, reverse: bool) -> None:  # type: ignore[no-untyped-def]
    memory, disk, rows = pair
    memory.set_sort(key, reverse)
    disk.set_sort(key, reverse)
    assert [rows[i] for i in view_ids(disk)] == view_ids(memory)


@pytest.mark.parametrize("expr", ["", "~d api", "needle | ~c 404", "!~http", "~q", "hello"])
def test_filtered_views_and_counts_match_flowstore(pair, expr: str) -> None:  # type: ignore[no-untyped-def]
    memory, disk, rows = pair
    for store in (memory, disk):
        store.set_filter(expr)
        store.set_sort("status", True)
    assert [rows[i] for i in view_ids(disk)] == view_ids(memory)
    assert len(disk) == len(memory) and disk.total_bytes == memory.total_bytes
    disk.set_hide_raw(True)
    memory.set_hide_raw(True)
    assert [rows[i] for i in view_ids(disk)] == view_ids(memory)


def test_view_index_get_and_bad_filter(pair) -> None:  # type: ignore[no-untyped-def]
    _, disk, _ = pair
    disk.set_filter("~s")
    for sort in ("time", "size"):
        disk.set_sort(sort, reverse=True)
        flow = disk.view_flow(7)
        assert disk.view_index(flow.id) == 7
        assert disk.get(flow.id).id == flow.id
    with pytest.raises(FilterError):
        disk.set_filter("~c notanumber")
    assert disk.filter_expr == "~s"
    missing = next(f.id for f in disk if f.response is None)
    assert disk.view_index(missing) is None


def test_clear_hides_what_was_there(pair) -> None:  # type: ignore[no-untyped-def]
    _, disk, _ = pair
    disk.clear()
    assert disk.view_len == 0 and len(disk) == 0 and disk.total_bytes == 0


def test_bodies_are_read_lazily_and_in_parts(tmp_path: Path) -> None:
    from tests.test_session import http_flow

    data = bytes(range(256)) * 8000  # 2 MB: written in chunks
    writer = SessionWriter(tmp_path / "b.tapui", ["x"])
    writer.add([http_flow(1, data, ctype="application/octet-stream")])
    writer.close()
    store = SessionStore(writer.path)
    body = store.view_flow(0).response.body
    assert isinstance(body, LazyBody) and body.size == len(data)
    assert body.read(10, 1000) == data[1000:1010] and body.read() == data
    store.close()


def test_memory_stays_bounded_while_scrolling(tmp_path: Path) -> None:
    rnd = random.Random(3)
    writer = SessionWriter(tmp_path / "m.tapui", ["x"])
    writer.add(make_flow(rnd) for _ in range(5000))
    writer.close()
    store = SessionStore(writer.path)
    assert isinstance(store._view, range)  # no gaps, no filter: nothing loaded
    for i in range(0, store.view_len, 3):
        store.view_flow(i)
    assert len(store._cache) <= CACHE_FLOWS
    store.close()


def test_live_session_follows_the_writer(tmp_path: Path) -> None:
    rnd = random.Random(4)
    bus = FlowBus()
    writer = SessionWriter(tmp_path / "live.tapui", ["x"], interval=0.01)
    writer.attach(bus)
    store = SessionStore(writer.path)
    store.set_filter("~http")
    store.attach(bus)
    expected = 0
    for round_ in range(5):
        for _ in range(50):
            flow = make_flow(rnd)
            bus.new(flow)
            if flow.request is not None and flow.request.body.size == 0:
                flow.request.body = Body(cap=0)
            bus.done(flow)
            expected += flow.kind.value in ("http", "websocket")
        writer.flush()
        assert store.drain()
        assert store.view_len == expected, round_
        assert all(store.view_flow(i).finished for i in range(store.view_len))
    writer.close()
    store.detach(bus)
    store.close()


@contextmanager
def a_commit_while_the_view_is_read(
    tmp_path: Path, seed: int, *, before: bool
) -> Iterator[tuple[SessionStore, list[bool]]]:
    """A session of one flow and a store on it; the writer commits two more flows once, while
    the store reads the view's rows: just `before` that read, or just after it. The list says
    whether it has happened."""
    rnd = random.Random(seed)
    writer = SessionWriter(tmp_path / "race.tapui", ["x"])
    store = SessionStore(writer.path)
    writer.add([make_flow(rnd)])
    writer.flush()
    committed = [False]
    query = store._query

    def commit(now: bool) -> None:
        if now and not committed[0]:
            committed[0] = True
            writer.add([make_flow(rnd), make_flow(rnd)])
            writer.flush()  # committed

    def query_and_commit(sql: str, params=()):  # type: ignore[no-untyped-def]
        reading_the_view = sql.startswith("SELECT f.id FROM flows f WHERE f.id >= ?")
        commit(reading_the_view and before)
        rows = query(sql, params)
        commit(reading_the_view and not before)
        return rows

    store._query = query_and_commit  # type: ignore[method-assign]
    try:
        yield store, committed
    finally:
        writer.close()
        store.close()


def test_rows_committed_while_the_view_is_read_are_listed_next_time(tmp_path: Path) -> None:
    """The writer may commit between the store's reading of new rows and of where the rows
    still to watch begin: those rows must still come into the view on the next drain (they
    never did, and the UI's list stayed empty under "0/3 flows")."""
    with a_commit_while_the_view_is_read(tmp_path, 7, before=False) as (store, committed):
        assert store.drain()
        assert committed[0]
        store.drain()
        assert len(store) == 3 and store.view_len == 3


def test_the_count_takes_in_every_listed_row(tmp_path: Path) -> None:
    """A commit while the store reads the view must not leave more rows listed than counted
    (the status bar showed "3/0 flows")."""
    with a_commit_while_the_view_is_read(tmp_path, 8, before=True) as (store, committed):
        assert store.drain()
        assert committed[0]
        assert store.view_len == 3 and len(store) == 3
