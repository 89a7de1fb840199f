"""Pilot tests of the Textual app: one or more per user action."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rich.console import Console
from textual.pilot import Pilot

from engine.curl import to_curl
from engine.flow import EventKind, FlowBus, FlowEvent
from engine.har import load_har, write_har
from engine.replay import Replayer, ReplayOptions
from engine.runstatus import CommandState, RunStatus
from engine.store import FlowStore
from tapui.app import TapuiApp, run_har_viewer
from tapui.widgets import flow_list as flow_list_module
from tapui.widgets import status_bar as status_bar_module
from tapui.widgets.body_view import BodyView
from tapui.widgets.export_dialog import ExportDialog
from tapui.widgets.filter_bar import FilterBar
from tapui.widgets.flow_detail import FlowDetail
from tapui.widgets.flow_list import FlowList, cells
from tapui.widgets.help_screen import HelpScreen, key_label
from tapui.widgets.output_panel import OutputPanel, clean_line
from tests.ui_fixtures import JSON_BODY, make_flow, raw_flow, sample_flows

SIZE = (140, 30)


def asynctest(fn):
    """Run an async test with asyncio.run (the project does not use pytest-asyncio)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def shown_ids(app: TapuiApp) -> list[int]:
    return [f.id for f in app.store.view_flows()]


async def wait_for(pilot, condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


# --- store -------------------------------------------------------------------------------------


def test_store_incremental_view_matches_rebuild() -> None:
    store = FlowStore()
    store.set_sort("status")
    store.set_filter("~d api | ~d cdn")
    flows = sample_flows()
    for flow in flows:
        store.apply([FlowEvent(EventKind.NEW, flow)])
    flows[7].response = make_flow(99, status=503).response  # slow.example.test answers
    flows[4].response.status = 200  # not realistic, but moves a flow within the sort
    assert store.apply([FlowEvent(EventKind.UPDATE, flows[4])])
    incremental = [f.id for f in store.view_flows()]
    store.set_sort("status")  # full rebuild
    assert [f.id for f in store.view_flows()] == incremental
    assert store.view_index(flows[4].id) == incremental.index(flows[4].id)
    store.set_sort("status", reverse=True)
    assert [f.id for f in store.view_flows()] == incremental[::-1]
    assert store.get(5) is flows[4] and len(store) == 11


# --- list, filter, sort, marks, follow --------------------------------------------------------


@asynctest
async def test_list_shows_flows_and_navigates() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        flows = app.flow_list
        assert app.store.view_len == 11 and flows.cursor == 0
        await pilot.press("j", "down", "j")
        assert flows.cursor == 3
        await pilot.press("k", "up")
        assert flows.cursor == 1
        await pilot.press("end")
        assert flows.cursor == 10
        await pilot.press("home")
        assert flows.cursor == 0
        await pilot.press("pagedown")
        assert flows.cursor > 5 or flows.cursor == 10
        await pilot.press("pageup")
        assert flows.cursor == 0


@asynctest
async def test_a_narrow_list_keeps_the_port_of_a_long_host() -> None:
    flow = make_flow(1, authority="service.internal.example.test:35829", path="/hello")
    app = TapuiApp(flows=[flow])
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        row = app.flow_list.render_line(1).text
        assert "…:35829 " in row and "/hello" in row


@asynctest
async def test_filter_narrows_and_bad_syntax_keeps_last_good() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("slash")
        bar = app.query_one(FilterBar)
        assert bar.display and bar.input.has_focus
        await pilot.press(*"~d cdn")
        await wait_for(pilot, lambda: app.store.filter_expr == "~d cdn")
        assert shown_ids(app) == [6, 9]
        await pilot.press(*" & (")  # "~d cdn & (" is incomplete
        await pilot.pause(0.3)
        assert app.store.filter_expr == "~d cdn" and shown_ids(app) == [6, 9]
        assert bar.error is not None and "expression expected" in str(bar.error)
        error_text = str(app.query_one("#filter-error").render())
        assert "expression expected" in error_text
        await pilot.press(*"~c 500)")
        await wait_for(pilot, lambda: app.store.filter_expr == "~d cdn & (~c 500)")
        assert shown_ids(app) == [6] and bar.error is None
        await pilot.press("enter")
        assert not bar.display and app.flow_list.has_focus
        assert bar.history == ["~d cdn & (~c 500)"]
        # Plain text, reopened with f; history with up.
        await pilot.press("f")
        for _ in range(len(bar.input.value)):
            await pilot.press("backspace")
        await pilot.press(*"lovelace", "enter")
        assert shown_ids(app) == [1]
        await pilot.press("f", "up")
        assert bar.input.value == "lovelace"
        await pilot.press("up")
        assert bar.input.value == "~d cdn & (~c 500)"
        await pilot.press("escape")
        assert not bar.display and app.store.filter_expr == "lovelace"


@asynctest
async def test_kept_filters_are_remembered_across_runs(tmp_path: Path) -> None:
    history = tmp_path / "state" / "filter-history"
    for expr in ("~d cdn", "lovelace", "~d cdn"):  # kept again: it moves up, once
        app = TapuiApp(flows=sample_flows(), filter_history=history)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f", *expr, "enter")
    assert history.read_text() == "lovelace\n~d cdn\n"
    app = TapuiApp(flows=sample_flows(), filter_history=history)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f", "up")
        assert app.filter_bar.input.value == "~d cdn"
        await pilot.press("up")
        assert app.filter_bar.input.value == "lovelace"


@asynctest
async def test_sort_cycles_and_reverses() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        assert app.store.sort_key == "host"
        hosts = [f.host for f in app.store.view_flows()]
        assert hosts == sorted(hosts)
        await pilot.press("s")
        assert app.store.sort_key == "status"
        statuses = [f.response.status if f.response else -1 for f in app.store.view_flows()]
        assert statuses == sorted(statuses)
        await pilot.press("S")
        statuses = [f.response.status if f.response else -1 for f in app.store.view_flows()]
        assert statuses == sorted(statuses, reverse=True)
        await pilot.press("s", "s")
        assert app.store.sort_key == "duration"
        await pilot.press("s")
        assert app.store.sort_key == "time"
        assert "sort:time" in str(app.query_one("#status").render())


@asynctest
async def test_marks_and_cursor_follows_its_flow_across_sorts() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("j", "m", "j", "j", "m")
        assert app.flow_list.marked == {2, 4}
        assert "2 marked" in str(app.query_one("#status").render())
        await pilot.press("m")
        assert app.flow_list.marked == {2}
        await pilot.press("m", "s")  # sort by host: the cursor stays on flow 4
        assert app.flow_list.selected.id == 4
        await pilot.press("M")
        assert app.flow_list.marked == set()


def test_refused_connection_row_says_why() -> None:
    flow = raw_flow(50)
    flow.bytes_sent = flow.bytes_received = 0
    assert cells(flow)["path"] == "↑0b ↓0b"
    flow.error = "upstream ::1:8080: connection refused"
    assert cells(flow)["path"] == "✗ upstream ::1:8080: connection refused"
    flow.bytes_sent = 1200  # sent, nothing came back (a refused QUIC datagram): still why
    assert cells(flow)["path"] == "✗ upstream ::1:8080: connection refused"
    flow.bytes_received = 10  # an exchange before it failed: the byte counts matter more
    assert cells(flow)["path"].startswith("↑1.2k ↓10b")


def test_an_inbound_exchange_is_marked_in_its_row() -> None:
    """From the host to a published port: the arrow says it came in to the command."""
    flow = raw_flow(51)
    assert not cells(flow)["host"].startswith("← ")
    flow.conn.inbound = True
    assert cells(flow)["host"].startswith("← ")


@asynctest
async def test_toggle_raw_flows() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        assert 11 in shown_ids(app)
        await pilot.press("t")
        assert 11 not in shown_ids(app) and app.store.view_len == 10
        await pilot.press("t")
        assert app.store.view_len == 11


def _emit_from_thread(bus: FlowBus, first_id: int, count: int) -> threading.Thread:
    def run() -> None:
        for i in range(first_id, first_id + count):
            flow = make_flow(i, duration=None, status=None)
            bus.new(flow)
            flow.response = make_flow(i).response
            bus.update(flow)
            bus.done(flow)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@asynctest
async def test_live_events_and_follow_mode() -> None:
    bus = FlowBus()
    app = TapuiApp(bus=bus, status=RunStatus(["python3", "app.py"], CommandState.RUNNING))
    async with app.run_test(size=SIZE) as pilot:
        _emit_from_thread(bus, 1, 50).join()
        await wait_for(pilot, lambda: app.store.view_len == 50)
        assert app.flow_list.cursor == 0  # not following yet
        await pilot.press("F")
        assert app.flow_list.follow and app.flow_list.cursor == 49
        assert "FOLLOW" in str(app.query_one("#status").render())
        _emit_from_thread(bus, 51, 30).join()
        await wait_for(pilot, lambda: app.store.view_len == 80)
        await pilot.pause(0.1)
        assert app.flow_list.cursor == 79
        assert app.flow_list.scroll_y > 0  # the cursor row is on screen
        await pilot.press("k")  # moving stops following
        assert not app.flow_list.follow and app.flow_list.cursor == 78
        _emit_from_thread(bus, 81, 10).join()
        await wait_for(pilot, lambda: app.store.view_len == 90)
        assert app.flow_list.cursor == 78 and app.flow_list.selected.id == 79
    assert not bus._listeners  # unsubscribed on exit


@asynctest
async def test_in_progress_flow_updates_in_place() -> None:
    bus = FlowBus()
    app = TapuiApp(bus=bus)
    async with app.run_test(size=SIZE) as pilot:
        flow = make_flow(1, status=None, duration=None)
        bus.new(flow)
        await wait_for(pilot, lambda: app.store.view_len == 1)
        assert "…" in app.flow_list.render_line(1).text
        flow.response = make_flow(2, status=201, reason="Created").response
        bus.done(flow)
        await wait_for(pilot, lambda: "201" in app.flow_list.render_line(1).text)


@asynctest
async def test_a_tick_that_comes_while_the_app_closes_does_nothing() -> None:
    """Failed once in CI: a last tick ran after the app's screens were gone."""
    app = TapuiApp(bus=FlowBus())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
    app.store.listener(FlowEvent(EventKind.NEW, make_flow(1)))  # came just before the close
    app.tick()


@asynctest
async def test_flows_arriving_below_the_window_do_not_repaint_its_rows() -> None:
    """The UI shares the interpreter with the relay: repainting rows that did not change
    held the GIL for ~50 ms a tick while flows streamed in, and delayed the app's traffic."""
    bus = FlowBus()
    app = TapuiApp(bus=bus)
    async with app.run_test(size=SIZE) as pilot:
        _emit_from_thread(bus, 1, 60).join()  # more than the window holds
        await wait_for(pilot, lambda: app.store.view_len == 60)
        await pilot.pause(0.2)
        painted: list[int] = []
        render_line = app.flow_list.render_line

        def counting_render_line(y: int):
            painted.append(y)
            return render_line(y)

        app.flow_list.render_line = counting_render_line  # type: ignore[method-assign]
        _emit_from_thread(bus, 61, 40).join()
        await wait_for(pilot, lambda: app.store.view_len == 100)
        await pilot.pause(0.2)
        assert painted == []  # the scrollbar and the status bar changed, no row did
        await wait_for(pilot, lambda: "100/100 flows" in str(app.query_one("#status").render()))
        first = app.store.view_flow(0)
        first.response.status = 503  # type: ignore[union-attr]
        bus.update(first)
        await wait_for(pilot, lambda: painted)  # a row in the window changed: repainted
        assert "503" in render_line(1).text


def test_the_lists_repaint_check_needs_no_styles() -> None:
    """A tick may come before the list's styles are applied: at start-up, with flows already
    waiting, the check once failed the app ("No 'flow-list--2xx' key in COMPONENT_CLASSES")."""
    store = FlowStore()
    store.add(sample_flows())
    flow_list = FlowList(store)
    signature = flow_list._view_signature()
    assert signature[3][1] == "2xx"  # the first row's class: its colour


PACE = 2.0  # seconds: the tests' own pace, long enough that "not yet" holds on a slow machine


@asynctest
async def test_a_stream_below_the_window_moves_the_scrollbar_at_a_steady_pace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Repainting the scrollbar at every tick held the interpreter the relay shares: while
    flows stream in below the window it follows at a steady pace (twice a second), and
    catches up when the stream stops."""
    monkeypatch.setattr(flow_list_module, "RESIZE_INTERVAL", PACE)
    bus = FlowBus()
    app = TapuiApp(bus=bus)
    async with app.run_test(size=SIZE) as pilot:
        _emit_from_thread(bus, 1, 60).join()
        await wait_for(pilot, lambda: app.flow_list.virtual_size.height == 61)
        _emit_from_thread(bus, 61, 40).join()
        await wait_for(pilot, lambda: app.store.view_len == 100)
        assert app.flow_list.virtual_size.height == 61  # not yet: the last resize was just now
        await wait_for(pilot, lambda: app.flow_list.virtual_size.height == 101,
                       timeout=PACE + 2)


@asynctest
async def test_the_status_bar_counts_a_stream_at_a_steady_pace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(status_bar_module, "COUNTS_INTERVAL", PACE)
    bus = FlowBus()
    app = TapuiApp(bus=bus)
    async with app.run_test(size=SIZE) as pilot:
        status = app.query_one("#status")
        _emit_from_thread(bus, 1, 60).join()
        await wait_for(pilot, lambda: "60/60 flows" in str(status.render()), timeout=PACE + 2)
        _emit_from_thread(bus, 61, 40).join()
        await wait_for(pilot, lambda: app.store.view_len == 100)
        assert "60/60 flows" in str(status.render())  # not yet: the last count was just now
        await wait_for(pilot, lambda: "100/100 flows" in str(status.render()), timeout=PACE + 2)


@asynctest
async def test_moving_through_the_list_sees_every_flow_at_once() -> None:
    bus = FlowBus()
    app = TapuiApp(bus=bus)
    async with app.run_test(size=SIZE) as pilot:
        _emit_from_thread(bus, 1, 60).join()
        await wait_for(pilot, lambda: app.flow_list.virtual_size.height == 61)
        await pilot.pause(0.1)
        _emit_from_thread(bus, 61, 40).join()
        await wait_for(pilot, lambda: app.store.view_len == 100)
        await pilot.press("G")
        assert app.flow_list.virtual_size.height == 101
        assert app.flow_list.selected is not None and app.flow_list.selected.id == 100
        assert "100/100 flows" in str(app.query_one("#status").render())  # a key: at once
        rows = app.flow_list.scrollable_content_region.height - 1  # (a header line)
        assert round(app.flow_list.scroll_y) == 100 - rows  # the newest flow is in the window


# --- detail -------------------------------------------------------------------------------------


@asynctest
async def test_detail_tabs_and_back() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter")
        assert isinstance(app.screen, FlowDetail) and app.screen.flow.id == 1
        response = app.screen.query_one("#response-view")
        text = "\n".join(line.plain for line in response.lines)
        assert '"name": "Ada Lovelace"' in text  # pretty-printed JSON
        await pilot.press("3")
        assert app.screen.query_one("TabbedContent").active == "tab-timing"
        await pilot.press("4")
        assert app.screen.query_one("TabbedContent").active == "tab-connection"
        await pilot.press("q")
        assert not isinstance(app.screen, FlowDetail)
        await pilot.press("end", "k", "enter")  # the WebSocket flow
        ws = app.screen.query_one("#websocket-view")
        assert any('{"welcome":true}' in line.plain for line in ws.lines)
        await pilot.press("escape")
        assert not isinstance(app.screen, FlowDetail)


@asynctest
async def test_detail_binary_and_large_bodies_page() -> None:
    big = json.dumps([{"i": i, "text": "x" * 50} for i in range(4000)]).encode()
    flows = [
        make_flow(1, response_headers=[("Content-Type", "application/json")],
                  response_body=big),
        make_flow(2, response_headers=[("Content-Type", "application/octet-stream")],
                  response_body=bytes(range(256)) * 1000),
    ]
    app = TapuiApp(flows=flows)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter", "2")
        view = app.screen.query_one("#response-view")
        assert view.pages > 1 and view.page == 0
        first = [line.plain for line in view.lines]
        assert any("page 1/" in line for line in first)
        await pilot.press("right_square_bracket")
        assert view.page == 1
        await pilot.press("left_square_bracket")
        assert view.page == 0
        await pilot.press("q", "j", "enter", "2")
        view = app.screen.query_one("#response-view")
        assert any(line.plain.startswith("00000000  00 01 02") for line in view.lines)
        assert view.pages == 4


@asynctest
async def test_detail_says_when_a_body_was_cut_short() -> None:
    flows = [
        make_flow(1, response_headers=[("Content-Length", "1000")], response_body=b"x" * 300,
                  error="app reset the connection"),
        make_flow(2, method="HEAD", response_headers=[("Content-Length", "1000")]),
    ]
    app = TapuiApp(flows=flows)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter", "2")
        view = app.screen.query_one("#response-view")
        assert any("cut short: 300 of 1,000 bytes came" in line.plain for line in view.lines)
        assert "300b of 1000b" in str(app.screen.query_one("#detail-summary").render())
        await pilot.press("q", "j", "enter", "2")  # a HEAD answer has no body to fall short
        view = app.screen.query_one("#response-view")
        assert not any("cut short" in line.plain for line in view.lines)


def marked(view: BodyView) -> list[str]:
    """The text of each marked span in a body view, in order."""
    style = view.get_component_rich_style("body-view--match", partial=True)
    return [line.plain[span.start:span.end] for line in view.lines for span in line.spans
            if span.style == style]


@asynctest
async def test_the_filters_text_is_marked_in_the_flow_it_found() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f", *"lovelace", "enter", "enter", "2")
        view = app.screen.query_one("#response-view", BodyView)
        assert marked(view) == ["Lovelace"]  # case ignored, as the filter does
        assert any("the filter's text in 1 line · n next" in line.plain for line in view.lines)
        assert marked(app.screen.query_one("#request-view", BodyView)) == []
        await pilot.press("n")  # the line comes up, as far as the view scrolls
        assert view.scroll_offset.y == min(view.match_lines[0], view.max_scroll_y) > 0


@contextlib.asynccontextmanager
async def text_response_found(text: str, expr: str) -> AsyncIterator[tuple[Pilot, BodyView]]:
    """A flow whose response is `text`, opened at its response from the list filtered by
    `expr`."""
    flows = [make_flow(1, response_headers=[("Content-Type", "text/plain")],
                       response_body=text.encode())]
    app = TapuiApp(flows=flows)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f", *expr, "enter", "enter", "2")
        yield pilot, app.screen.query_one("#response-view", BodyView)


@asynctest
async def test_a_body_opens_at_the_first_page_with_the_filters_text() -> None:
    text = "\n".join(f"line {i}" for i in range(30000)) + "\nthe needle\n"
    async with text_response_found(text, "needle") as (_, view):
        assert view.pages > 1 and view.page == view.pages - 1
        assert marked(view) == ["needle"]


@asynctest
async def test_v_shows_a_body_as_text_then_as_hex_then_as_its_type_suggests() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter", "2")  # flow 1: a JSON answer
        view = app.screen.query_one("#response-view", BodyView)
        body_start = len(view.head)

        def shown() -> list[str]:
            return [line.plain for line in view.lines[body_start:]]

        assert shown()[:2] == ["{", '  "user": {']  # pretty-printed
        await pilot.press("v")
        assert shown()[0] == "── shown as text · v: next view ──"
        assert shown()[1] == JSON_BODY.decode()  # as sent: one line
        await pilot.press("v")
        assert shown()[0] == "── shown as hex · v: next view ──"
        assert shown()[1].startswith("00000000  7b 22 75 73 65 72 22 3a  7b 22 69 64")
        await pilot.press("v")
        assert shown()[:2] == ["{", '  "user": {']


@asynctest
async def test_n_and_shift_n_move_between_the_marked_lines() -> None:
    text = "\n".join("a needle" if i in (50, 150) else f"line {i}" for i in range(200))
    async with text_response_found(text, "needle") as (pilot, view):
        first, second = view.match_lines
        await pilot.press("n")
        assert view.scroll_offset.y == first
        await pilot.press("n")
        assert view.scroll_offset.y == second
        await pilot.press("N")
        assert view.scroll_offset.y == first


@asynctest
async def test_only_the_parts_an_operator_searches_are_marked() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f", *"~hs cache-control & !~bs nothing-like-this", "enter", "enter")
        request = app.screen.query_one("#request-view", BodyView)
        response = app.screen.query_one("#response-view", BodyView)
        assert marked(request) == []  # ~hs: response headers only; a negated term marks nothing
        assert marked(response) == ["Cache-Control"]
        await pilot.press("1", "n")  # nothing to move to: the view stays
        assert request.scroll_offset.y == 0


# --- copy, export, open -----------------------------------------------------------------------


@asynctest
async def test_copy_as_curl() -> None:
    flows = sample_flows()
    app = TapuiApp(flows=flows)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("j", "j", "j", "c")
        assert app.last_copied == to_curl(flows[3])
        assert app.last_copied.startswith("curl ")
        assert "--data-binary 'user=ada&password=s3cret'" in app.last_copied
        assert app.clipboard == app.last_copied  # OSC 52 path
        await pilot.press("home", "enter", "c")  # from the detail screen too
        assert app.last_copied == to_curl(flows[0])
        await pilot.press("q", "end", "c")  # raw TCP: nothing to copy
        assert app.last_copied == to_curl(flows[0])
        await pilot.press("home", "u")  # the URL alone
        assert app.last_copied == app.clipboard == "https://api.example.test/v1/users/7?expand=items"


async def _export(pilot, app: TapuiApp, key: str, path: Path) -> None:
    await pilot.press(key)
    assert isinstance(app.screen, ExportDialog)
    field = app.screen.query_one("Input")
    assert field.value.startswith("./tapui-") and field.value.endswith(".har")
    field.value = str(path)
    await pilot.press("enter")
    await app.workers.wait_for_complete()
    await pilot.pause()


@asynctest
async def test_export_marked_shown_and_session(tmp_path: Path) -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("j", "m", "j", "j", "m")
        await _export(pilot, app, "e", tmp_path / "marked.har")
        got = list(load_har(tmp_path / "marked.har"))
        assert [f.request.url for f in got] == ["https://www.example.test/index.html",
                                                "https://api.example.test/login"]
        await pilot.press("M", "f", *"~c 404", "enter")
        await _export(pilot, app, "e", tmp_path / "shown.har")
        got = list(load_har(tmp_path / "shown.har"))
        assert [(f.request.path, f.response.status) for f in got] == [("/missing", 404)]
        await _export(pilot, app, "w", tmp_path / "all.har")
        doc = json.loads((tmp_path / "all.har").read_text())
        assert len(doc["log"]["entries"]) == 10  # every HTTP flow; the raw TCP one has no HAR
        # esc cancels
        await pilot.press("e")
        await pilot.press("escape")
        assert not isinstance(app.screen, ExportDialog)


@asynctest
async def test_save_body_writes_the_shown_body_decoded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    flows = sample_flows()
    app = TapuiApp(flows=flows)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("j", "j", "b")  # flow 3: gzip'd JSON, from the list
        assert isinstance(app.screen, ExportDialog)
        field = app.screen.query_one("Input")
        assert field.value == "./stats.json"
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert (tmp_path / "stats.json").read_bytes() == b'{"ok":true,"count":3}'
        await pilot.press("b", "enter")  # the name is taken now: the next one is offered
        await app.workers.wait_for_complete()
        assert (tmp_path / "stats-1.json").exists()
        await pilot.press("j", "enter", "1", "b")  # flow 4's request, from its Request tab
        field = app.screen.query_one("Input")
        assert field.value == "./login.txt"
        field.value = str(tmp_path / "stats.json")  # taken: refused, nothing overwritten
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert (tmp_path / "stats.json").read_bytes() == b'{"ok":true,"count":3}'
        await pilot.press("b")
        app.screen.query_one("Input").value = str(tmp_path / "form.txt")
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert (tmp_path / "form.txt").read_bytes() == b"user=ada&password=s3cret"
        notes = [n.message for n in app._notifications]
        assert any("already exists" in n for n in notes)
        assert any(n.startswith("Wrote 24 bytes to ") and n.endswith("form.txt") for n in notes)
        await pilot.press("q", "j", "b")  # flow 5: a 404 with no body
        assert not isinstance(app.screen, ExportDialog)
        assert any(n.message == "Flow #5 has no response body." for n in app._notifications)


@asynctest
async def test_replay_adds_the_new_exchange_to_the_list(http_server) -> None:
    port = http_server.server_address[1]
    # (an id the engine's counter does not reach in a test run)
    flow = make_flow(10**9, scheme="http", authority=f"127.0.0.1:{port}", path="/json",
                     start=time.time() - 10)
    bus = FlowBus()
    app = TapuiApp(bus=bus, flows=[flow], replayer=Replayer(bus, ReplayOptions()))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("r")
        await app.workers.wait_for_complete()
        await wait_for(pilot, lambda: app.store.view_len == 2)
        original, replayed = app.store.view_flows()
        assert original is flow
        assert replayed.response is not None and replayed.response.status == 200
        assert replayed.response.body.read() == b'{"hello": "world", "n": [1, 2, 3]}'
        assert [r["path"] for r in http_server.requests] == ["/json"]
        notes = [n.message for n in app._notifications]
        assert f"Replayed #{flow.id} as #{replayed.id}: 200 OK" in notes
        await pilot.press("enter")  # the new flow opens like any other
        assert isinstance(app.screen, FlowDetail)
        await pilot.press("r")  # from a flow's screen: the new flow's takes its place
        await app.workers.wait_for_complete()
        await wait_for(pilot, lambda: isinstance(app.screen, FlowDetail)
                       and app.screen.flow.id not in (flow.id, replayed.id))
        assert app.screen.flow.response.status == 200 and len(http_server.requests) == 2
        await pilot.press("q")  # and q goes back to the list
        assert not isinstance(app.screen, FlowDetail)


@asynctest
async def test_replay_without_a_replayer_says_so() -> None:
    app = TapuiApp(flows=sample_flows())  # (tapui's runs and `tapui open` always have one)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("r")
        assert any(n.message == "Nothing here can send a request again."
                   for n in app._notifications)


@asynctest
async def test_an_initial_filter_is_applied_and_shown() -> None:
    app = TapuiApp(flows=sample_flows(), initial_filter="~m POST")
    async with app.run_test(size=SIZE) as pilot:
        assert shown_ids(app) == [4]
        assert "filter: ~m POST" in str(app.query_one("#status").render())
        await pilot.press("f")  # the bar opens with it, to change it
        assert app.filter_bar.input.value == "~m POST"


@asynctest
async def test_open_har_file(tmp_path: Path) -> None:
    path = tmp_path / "session.har"
    write_har(path, sample_flows())
    app = TapuiApp(flows=load_har(path), title="tapui · session.har")
    async with app.run_test(size=SIZE) as pilot:
        assert app.store.view_len == 10
        assert "session.har" in str(app.query_one("#status").render())
        await pilot.press("f", *"~d www", "enter")
        assert [f.request.path for f in app.store.view_flows()] == ["/index.html"]


def test_run_har_viewer_rejects_bad_files(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.har"
    bad.write_text('{"log": {"entries": [')
    assert run_har_viewer(str(bad)) == 2
    err = capsys.readouterr().err
    assert err.startswith("tapui: ") and err.count("\n") == 1 and "Traceback" not in err
    assert run_har_viewer(str(tmp_path / "missing.har")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.har" in err


# --- clear, output, status, help, palette -----------------------------------------------------


@asynctest
async def test_clear() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("m", "z")
        assert len(app.store) == 0 and app.store.view_len == 0 and not app.flow_list.marked
        assert "0/0 flows" in str(app.query_one("#status").render())
        await pilot.press("enter", "c", "j")  # nothing selected: no crash
        assert app.last_copied is None


@asynctest
async def test_output_panel_reads_the_pty() -> None:
    read_fd, write_fd = os.pipe()
    status = RunStatus(["sh", "-c", "echo"], CommandState.RUNNING, output_fd=read_fd)
    app = TapuiApp(status=status)
    try:
        async with app.run_test(size=SIZE) as pilot:
            panel = app.query_one(OutputPanel)
            assert not panel.display
            await pilot.press("o")
            assert panel.display
            os.write(write_fd, b"\x1b[32mgreen\x1b[0m line\r\nprogress 10%\rprogress 100%\r\n")
            os.write(write_fd, "caf\u00e9 ".encode()[:4])  # a character split across reads
            os.write(write_fd, "caf\u00e9 ".encode()[4:] + b"done\n")
            await wait_for(pilot, lambda: len(panel.lines) >= 3)
            texts = [strip.text.rstrip() for strip in panel.lines]
            assert texts[:3] == ["green line", "progress 100%", "café done"]
            await pilot.press("o")
            assert not panel.display
    finally:
        os.close(write_fd)
        os.close(read_fd)


def test_clean_line() -> None:
    assert clean_line("a\x07b\x1b[2Kc\x08").plain == "abc"
    assert clean_line("\x1b[1;31mERR\x1b[0m").spans


@asynctest
async def test_status_bar_shows_command_and_exit_and_ui_stays() -> None:
    status = RunStatus(["curl", "-s", "https://api.example.test/"], CommandState.RUNNING)
    app = TapuiApp(status=status, flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        text = str(app.query_one("#status").render())
        assert "curl -s https://api.example.test/" in text and "[running]" in text
        assert "11/11 flows" in text
        status.state, status.exit_code = CommandState.EXITED, 3
        await pilot.pause(0.2)
        text = str(app.query_one("#status").render())
        assert "exited 3" in text
        assert app.is_running
        await pilot.press("f", *"~c 404", "enter")
        assert "1/11 flows" in str(app.query_one("#status").render())
        assert "~c 404" in str(app.query_one("#status").render())
        await pilot.press("q")
    assert not app.is_running


@asynctest
async def test_ctrl_c_quits() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f")  # even with the filter input focused
        await pilot.press("ctrl+c")
    assert not app.is_running


@asynctest
async def test_help_lists_every_key() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        console = Console(width=100, record=True, file=io.StringIO())
        console.print(app.screen.table)
        table_text = console.export_text()
        for _, bindings in app.help_sections():
            for binding in bindings:
                assert key_label(binding.key) in table_text
        for key in ("j", "k", "enter", "m", "F", "s", "t", "/", "c", "e", "w", "z", "o", "?"):
            assert key in table_text
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


@asynctest
async def test_every_action_is_in_the_command_palette() -> None:
    app = TapuiApp(flows=sample_flows())
    async with app.run_test(size=SIZE):
        titles = {cmd.title for cmd in app.get_system_commands(app.screen)}
        for title in ("Filter flows", "Copy as curl", "Export HAR", "Save session",
                      "Clear flows", "Toggle output", "Help", "Open flow", "Toggle follow",
                      "Toggle mark", "Cycle sort", "Toggle raw flows", "Quit"):
            assert title in titles
        command = next(c for c in app.get_system_commands(app.screen) if c.title == "Cycle sort")
        command.callback()
        assert app.store.sort_key == "host"


def test_engine_does_not_import_the_ui() -> None:
    code = ("import sys, engine.filters, engine.store, engine.curl; "
            "assert not any(m.startswith(('textual', 'tapui')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})


@asynctest
async def test_status_bar_says_when_max_body_size_cut_bodies(tmp_path: Path) -> None:
    """A session whose bodies were cut by --max-body-size says so in the status bar."""
    from engine.flow import Body
    from engine.session import SessionWriter
    from engine.session_store import SessionStore

    flows = sample_flows()
    for flow in flows[:3]:
        assert flow.response is not None
        body = Body(cap=10)
        body.append(b"x" * 100)
        flow.response.body = body
    writer = SessionWriter(tmp_path / "cut.tapui", ["curl"])
    writer.add(flows)
    writer.close()
    store = SessionStore(writer.path)
    try:
        app = TapuiApp(store=store, title="cut.tapui")
        async with app.run_test(size=SIZE):
            assert "3 bodies cut to --max-body-size" in str(app.query_one("#status").render())
    finally:
        store.close()


@asynctest
async def test_session_writer_death_keeps_the_list_growing_in_memory(tmp_path: Path) -> None:
    """The list reads the live session file; when its writer process dies, the app says so
    and lists every flow, saved or not, from memory."""
    import signal

    from engine.session import SessionWriter
    from engine.session_store import SessionStore

    bus = FlowBus()
    writer = SessionWriter(tmp_path / "live.tapui", ["python3", "app.py"])
    writer.attach(bus)
    store = SessionStore(writer.path)
    try:
        app = TapuiApp(bus=bus, status=RunStatus(["python3", "app.py"], CommandState.RUNNING),
                       store=store, session=writer)
        async with app.run_test(size=SIZE) as pilot:
            _emit_from_thread(bus, 1, 20).join()
            await wait_for(pilot, lambda: app.store.view_len == 20)  # saved, then listed
            os.kill(writer.child_pid, signal.SIGKILL)
            await wait_for(pilot, lambda: writer.failure is not None)
            _emit_from_thread(bus, 21, 15).join()
            await wait_for(pilot, lambda: app.store.view_len == 35)
            assert isinstance(app.store, FlowStore)
            assert shown_ids(app) == list(range(1, 36))
            assert "session not saved" in str(app.query_one("#status").render())
            assert any("SIGKILL" in n.message for n in app._notifications)
    finally:
        writer.close()
        store.close()
