"""A waterfall of a flow's phases: DNS, connect, TLS, request, waiting, receiving."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from engine.flow import Flow
from tapui.widgets.flow_list import clock, human_duration

BAR_WIDTH = 48

_PHASES = [  # label, start field(s) (first present wins), end field, colour
    ("DNS", ("start",), "dns", "magenta"),
    ("connect", ("dns", "start"), "connect", "yellow"),
    ("TLS", ("connect",), "tls", "cyan"),
    ("request", ("tls", "connect", "dns", "start"), "request_sent", "blue"),
    ("waiting", ("request_sent",), "first_byte", "green"),
    ("receiving", ("first_byte",), "done", "bright_green"),
]


def phases(flow: Flow) -> list[tuple[str, float | None, float | None, str]]:
    """(label, start, end, colour) per phase; start/end None when the phase did not happen.

    Timestamps from before the flow started (a reused connection's connect and TLS) do not
    count for this flow."""
    t = flow.timings
    out = []
    for label, start_fields, end_field, colour in _PHASES:
        end = getattr(t, end_field)
        start = next((v for f in start_fields if (v := getattr(t, f)) is not None), None)
        if start is not None and start < t.start:
            start = t.start
        if end is None or start is None or end < t.start or end < start:
            out.append((label, None, None, colour))
        else:
            out.append((label, start, end, colour))
    return out


def render_timing(flow: Flow, bar_width: int = BAR_WIDTH) -> Table:
    t = flow.timings
    end = t.done
    known = [e for _, _, e, _ in phases(flow) if e is not None]
    if end is None:
        end = max(known, default=t.start)
    total = max(end - t.start, 1e-9)
    table = Table.grid(padding=(0, 2))
    table.add_column("phase", justify="right", style="bold")
    table.add_column("bar", width=bar_width, no_wrap=True)
    table.add_column("duration", justify="right")
    table.add_column("at", justify="right", style="dim")
    for label, start, stop, colour in phases(flow):
        if start is None or stop is None:
            table.add_row(label, Text("·" * bar_width, style="dim"), "–", "")
            continue
        offset = int((start - t.start) / total * bar_width)
        length = max(1, round((stop - start) / total * bar_width))
        offset = min(offset, bar_width - length)
        bar = Text(" " * offset)
        bar.append("█" * length, style=colour)
        bar.append(" " * (bar_width - offset - length))
        table.add_row(label, bar, human_duration(stop - start), f"+{(start - t.start) * 1000:.1f}ms")
    state = "" if t.done is not None else " (in progress)"
    table.add_row("total", Text("─" * bar_width, style="dim"),
                  human_duration(end - t.start) + state, "")
    table.add_row("started", "", clock(t.start), "")
    return table


class TimingView(Static):
    def show_flow(self, flow: Flow) -> None:
        self.update(render_timing(flow))
