"""The flow list: a line-API view that renders only the visible rows of the store's view."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.timer import Timer

from engine import grpc
from engine.flow import Flow, FlowKind, FlowState, header
from engine.store import SORT_KEYS, FlowStore, flow_size
from tapui.messages import OpenFlow, ViewChanged


def human_size(n: int) -> str:
    if n < 1024:
        return f"{n}b"
    for unit in ("k", "m", "g"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f}{unit}" if n < 100 else f"{n:.0f}{unit}"
    return f"{n:.0f}t"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "…"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"


def clock(ts: float) -> str:
    """Local time of day with milliseconds."""
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def short_type(flow: Flow) -> str:
    if flow.response is None:
        return ""
    status = grpc.grpc_status(flow.response)
    if status is not None and status[0]:
        return f"grpc {status[1]}"  # an RPC that failed (its HTTP status is still 200)
    value = header(flow.response.headers, "content-type") or ""
    value = value.split(";", 1)[0].strip()
    return value.removeprefix("application/")


def version_label(version: str) -> str:
    return version.upper().removeprefix("HTTP/")


@dataclass(frozen=True)
class Column:
    name: str
    title: str
    width: int
    right: bool = False


def row_class(flow: Flow) -> str:
    """The component class a flow's row is drawn with (its colour)."""
    if flow.error is not None:
        return "error"
    if flow.kind in (FlowKind.TCP, FlowKind.UDP, FlowKind.DNS):
        return "raw"
    if flow.response is not None:
        if grpc.failure(flow.response):
            return "error"
        return f"{min(max(flow.response.status // 100, 1), 5)}xx"
    return "pending"


#: While flows stream in below the window, the scrollable size (and with it the scrollbar)
#: follows at most this often. Repainting the scrollbar at every tick held the interpreter,
#: which the relay shares, for several ms a tick: the app's slowest connections under the UI
#: took twice as long. Moving through the list always sees every flow.
RESIZE_INTERVAL = 0.5

_FIXED = [  # name, title, width, right-aligned, dropped first when narrow (higher = sooner)
    ("mark", "", 1, False, 0),
    ("time", "time", 12, False, 3),
    ("proc", "process", 14, False, 4),
    ("method", "method", 7, False, 0),
    ("host", "host", 0, False, 0),
    ("path", "path", 0, False, 0),
    ("status", "code", 4, True, 0),
    ("type", "type", 14, False, 2),
    ("size", "size", 6, True, 1),
    ("duration", "dur", 7, True, 1),
    ("version", "ver", 3, False, 2),
]


def layout_columns(width: int) -> list[Column]:
    """Columns for a given width: fixed ones, dropping the least useful when narrow, then host
    and path share what is left."""
    drop_level = 5
    while True:
        chosen = [c for c in _FIXED if c[4] < drop_level]
        fixed = sum(c[2] for c in chosen) + len(chosen) - 1
        rest = width - fixed
        if rest >= 30 or drop_level == 1:
            break
        drop_level -= 1
    rest = max(rest, 10)
    host_width = min(max(rest // 2, 8), 40)
    path_width = max(rest - host_width, 1)
    columns = []
    for name, title, w, right, _ in chosen:
        if name == "host":
            w = host_width
        elif name == "path":
            w = path_width
        columns.append(Column(name, title, w, right))
    return columns


def fit(text: str, width: int, right: bool = False) -> str:
    if cell_len(text) > width:
        if width <= 1:
            return set_cell_size(text, width)
        if right:
            return "…" + set_cell_size(text[-(width - 1) :], width - 1)
        return set_cell_size(text, width - 1) + "…"
    if right:
        return " " * (width - cell_len(text)) + text
    return set_cell_size(text, width)


def fit_host(text: str, width: int) -> str:
    """Like `fit`, but a host that does not fit loses the end of its name, not its port (or
    a DNS query's type and port): "host.tapui.int…:35829", "host.tap… AAAA:53"."""
    if cell_len(text) <= width:
        return fit(text, width)
    name, space, tail = text.rpartition(" ")
    if space and not name.startswith("←"):
        tail = " " + tail
    else:
        name, colon, port = text.rpartition(":")
        if not colon or not port.isdigit():
            return fit(text, width)
        tail = ":" + port
    room = width - cell_len(tail)
    if room < 5:
        return fit(text, width)
    return fit(name, room) + tail


def cells(flow: Flow) -> dict[str, str]:
    """The text of each column for a flow."""
    request, response = flow.request, flow.response
    conn = flow.conn
    proc = ""
    if conn.pid is not None:
        proc = str(conn.pid)
        if conn.command:
            proc += " " + os.path.basename(conn.command.split(" ", 1)[0])
    raw = flow.kind in (FlowKind.TCP, FlowKind.UDP, FlowKind.DNS)
    if request is not None:
        method, host, path = request.method, request.authority, request.path
        version = version_label(response.http_version if response else request.http_version)
    else:
        method = flow.kind.value.upper()
        host = f"{conn.hostname or conn.sni or conn.server[0]}:{conn.server[1]}"
        path = f"↑{human_size(flow.bytes_sent)} ↓{human_size(flow.bytes_received)}" if raw else ""
        if flow.error and not flow.bytes_received:
            path = f"✗ {flow.error}"  # e.g. a refused connection or QUIC: why is what matters
        version = ""
    if conn.inbound:  # from the host, to the command's server (a published port)
        host = f"← {host}"
    if flow.kind is FlowKind.WEBSOCKET:
        path = f"{path}  ⇄ {len(flow.websocket_messages)} msgs"
    if response is not None:
        status = str(response.status)
    elif flow.state is FlowState.ERROR:
        status = "ERR"
    elif flow.finished:
        status = "-"
    else:
        status = "…"
    return {
        "mark": "",
        "time": clock(flow.timings.start),
        "proc": proc,
        "method": method,
        "host": host,
        "path": path,
        "status": status,
        "type": short_type(flow),
        "size": human_size(flow_size(flow)) if (response or raw) else "",
        "duration": human_duration(flow.duration),
        "version": version,
    }


class FlowList(ScrollView, can_focus=True):
    """Every flow of the store's view, one a line, with a cursor, marks and follow mode."""

    COMPONENT_CLASSES = {
        "flow-list--header",
        "flow-list--cursor",
        "flow-list--mark",
        "flow-list--pending",
        "flow-list--1xx",
        "flow-list--2xx",
        "flow-list--3xx",
        "flow-list--4xx",
        "flow-list--5xx",
        "flow-list--error",
        "flow-list--raw",
        "flow-list--method",
    }

    BINDINGS = [
        Binding("j,down", "cursor(1)", "Down", show=False),
        Binding("k,up", "cursor(-1)", "Up", show=False),
        Binding("pagedown,ctrl+f,space", "page(1)", "Page down", show=False),
        Binding("pageup,ctrl+b", "page(-1)", "Page up", show=False),
        Binding("home,g", "home", "First flow", show=False),
        Binding("end,G", "end", "Last flow", show=False),
        Binding("enter", "open", "Open"),
        Binding("m", "mark", "Mark"),
        Binding("M", "unmark_all", "Unmark all", show=False),
        Binding("F", "follow", "Follow"),
        Binding("s", "sort", "Sort"),
        Binding("S", "reverse_sort", "Reverse sort", show=False),
        Binding("t", "toggle_raw", "Hide raw", show=False),
    ]

    def __init__(self, store: FlowStore, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.store = store
        self.cursor = 0
        self._cursor_id: int | None = None
        self.follow = False
        self.marked: set[int] = set()
        self._columns: list[Column] = []
        self._columns_width = -1
        self._shown: tuple[object, ...] = ()  # what sync() last had painted (_view_signature)
        self._resized_at = 0.0  # when the scrollable size last followed the store
        self._catch_up: Timer | None = None  # a resize put off by _resize

    # --- state --------------------------------------------------------------------------------

    @property
    def selected(self) -> Flow | None:
        if 0 <= self.cursor < self.store.view_len:
            return self.store.view_flow(self.cursor)
        return None

    def marked_flows(self) -> list[Flow]:
        """Marked flows in view order (marked flows hidden by the filter are included last)."""
        shown = [f for f in self.store.view_flows() if f.id in self.marked]
        shown_ids = {f.id for f in shown}
        hidden = [f for i in sorted(self.marked - shown_ids) if (f := self.store.get(i))]
        return shown + hidden

    def sync(self) -> None:
        """Call after the store changed: resize, keep the cursor on its flow, follow, repaint."""
        count = self.store.view_len
        if self.follow:
            self.cursor = max(count - 1, 0)
        elif self._cursor_id is not None:
            index = self.store.view_index(self._cursor_id)
            if index is not None:
                self.cursor = index
        self.cursor = min(max(self.cursor, 0), max(count - 1, 0))
        selected = self.selected
        self._cursor_id = selected.id if selected is not None else None
        self._resize(count)
        self._scroll_to_cursor()
        shown = self._view_signature()
        if shown != self._shown:
            self._shown = shown
            self.refresh()

    def _resize(self, count: int, *, now: bool = False) -> None:
        """Make the scrollable size fit `count` flows: at once when the list shrank, the
        window or the cursor reaches its old end, or `now`; else at most every
        RESIZE_INTERVAL."""
        old = self.virtual_size
        if (
            not now
            and not self.follow
            and old.width == self.size.width
            and old.height <= count + 1
            and round(self.scroll_y) + self._rows_visible() + 1 < old.height
            and self.cursor + 1 < old.height
            and time.monotonic() - self._resized_at < RESIZE_INTERVAL
        ):
            if self._catch_up is None:  # (the stream may stop before the next sync)
                self._catch_up = self.set_timer(RESIZE_INTERVAL, self._caught_up)
            return
        self._resized_at = time.monotonic()
        self._set_virtual_size(Size(self.size.width, count + 1))

    def _caught_up(self) -> None:
        self._catch_up = None
        self._resize(self.store.view_len, now=True)

    def _set_virtual_size(self, size: Size) -> None:
        """Resize the scrollable area, updating only the scrollbars: assigning the reactive
        (layout=True) would repaint every row, and rows that change are repainted by sync()."""
        if size == self.virtual_size:
            return
        scroll_update = getattr(self, "_scroll_update", None)  # (Textual's own, for resizes)
        if scroll_update is None:
            self.virtual_size = size
            return
        self.set_reactive(FlowList.virtual_size, size)
        scroll_update(size)

    def _view_signature(self) -> tuple[object, ...]:
        """What the rows in the window show. While flows stream in below the window, nothing
        in it changes: repainting every row each tick then cost the UI ~50 ms a tick here, and
        since the UI and the relay share one interpreter, it delayed the app's traffic."""
        top = round(self.scroll_y)
        end = min(top + self._rows_visible(), self.store.view_len)
        rows = []
        for row in range(top, end):
            flow = self.store.view_flow(row)
            # (the class, not the style: this runs on ticks, which may come before the
            # widget's styles are applied)
            rows.append((flow.id in self.marked, row_class(flow), *cells(flow).values()))
        return (self.scrollable_content_region.size, top, self.cursor, *rows)

    def _move(self, cursor: int) -> None:
        self.follow = False
        count = self.store.view_len
        self._resize(count, now=True)
        self.cursor = min(max(cursor, 0), max(count - 1, 0))
        selected = self.selected
        self._cursor_id = selected.id if selected is not None else None
        self._scroll_to_cursor()
        self.refresh()
        self.post_message(ViewChanged())

    def _rows_visible(self) -> int:
        return max(self.scrollable_content_region.height - 1, 1)

    def _scroll_to_cursor(self) -> None:
        top = round(self.scroll_y)
        rows = self._rows_visible()
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + rows:
            self.scroll_to(y=self.cursor - rows + 1, animate=False, immediate=True)

    # --- actions ------------------------------------------------------------------------------

    def action_cursor(self, delta: int) -> None:
        self._move(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self._move(self.cursor + direction * self._rows_visible())

    def action_home(self) -> None:
        self._move(0)

    def action_end(self) -> None:
        self._move(self.store.view_len - 1)

    def action_open(self) -> None:
        if self.selected is not None:
            self.post_message(OpenFlow(self.selected.id))

    def action_mark(self) -> None:
        selected = self.selected
        if selected is None:
            return
        self.marked ^= {selected.id}
        self.refresh()
        self.post_message(ViewChanged())

    def action_unmark_all(self) -> None:
        self.marked.clear()
        self.refresh()
        self.post_message(ViewChanged())

    def action_follow(self) -> None:
        self.follow = not self.follow
        self.sync()
        self.post_message(ViewChanged())

    def action_sort(self) -> None:
        index = SORT_KEYS.index(self.store.sort_key)
        self.store.set_sort(SORT_KEYS[(index + 1) % len(SORT_KEYS)], self.store.sort_reverse)
        self.sync()
        self.post_message(ViewChanged())

    def action_reverse_sort(self) -> None:
        self.store.set_sort(self.store.sort_key, not self.store.sort_reverse)
        self.sync()
        self.post_message(ViewChanged())

    def action_toggle_raw(self) -> None:
        self.store.set_hide_raw(not self.store.hide_raw)
        self.sync()
        self.post_message(ViewChanged())

    def on_click(self, event: events.Click) -> None:
        row = round(self.scroll_y) + event.y - 1
        if event.y >= 1 and 0 <= row < self.store.view_len:
            self._move(row)
            if event.chain >= 2:
                self.action_open()

    def on_resize(self) -> None:
        self.sync()

    # --- rendering ----------------------------------------------------------------------------

    def _layout(self, width: int) -> list[Column]:
        if width != self._columns_width:
            self._columns = layout_columns(width)
            self._columns_width = width
        return self._columns

    def _row_style(self, flow: Flow) -> Style:
        return self.get_component_rich_style(f"flow-list--{row_class(flow)}")

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base = self.rich_style
        columns = self._layout(width)
        if y == 0:
            style = base + self.get_component_rich_style("flow-list--header")
            text = " ".join(fit(c.title, c.width, c.right) for c in columns)
            return Strip([Segment(fit(text, width), style)], width)
        row = round(self.scroll_y) + y - 1
        if row >= self.store.view_len:
            return Strip.blank(width, base)
        flow = self.store.view_flow(row)
        style = base + self._row_style(flow)
        if row == self.cursor:
            style += self.get_component_rich_style("flow-list--cursor")
        values = cells(flow)
        segments = []
        for i, column in enumerate(columns):
            if i:
                segments.append(Segment(" ", style))
            if column.name == "mark":
                marked = flow.id in self.marked
                mark_style = style + self.get_component_rich_style("flow-list--mark")
                segments.append(Segment("●" if marked else " ", mark_style))
                continue
            cell_style = style
            if column.name == "method":
                cell_style = style + self.get_component_rich_style("flow-list--method",
                                                                   partial=True)
            value = values[column.name]
            text = (fit_host(value, column.width) if column.name == "host"
                    else fit(value, column.width, column.right))
            segments.append(Segment(text, cell_style))
        strip = Strip(segments)
        return strip.crop_extend(0, width, style)
