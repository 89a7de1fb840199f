"""One line at the bottom: the command and its state, flow counts, bytes, filter, view modes."""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, replace

from rich.text import Text
from textual.widgets import Static

from engine.runstatus import CommandState, RunStatus
from tapui.widgets.flow_list import human_size


@dataclass(frozen=True)
class StatusInfo:
    """A snapshot: the RunStatus is mutated by another thread, so its fields are copied."""

    command: tuple[str, ...] | None
    state: CommandState | None
    exit_code: int | None
    message: str | None
    source: str  # what is shown when there is no command (e.g. the HAR file)
    shown: int
    total: int
    total_bytes: int
    filter_expr: str
    sort: str
    follow: bool
    marked: int
    hide_raw: bool
    retention: str = ""  # what --max-body-size / --max-session-size / disk errors cost


#: While flows stream in, the counts follow at most this often: re-rendering the bar at every
#: tick held the interpreter the relay shares for a millisecond or more each time.
COUNTS_INTERVAL = 0.5

_STATE_STYLE = {
    CommandState.STARTING: "yellow",
    CommandState.RUNNING: "green",
    CommandState.EXITED: "bold",
    CommandState.FAILED: "bold red",
}


class StatusBar(Static):
    """Re-renders only when what it shows changed."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self._last: StatusInfo | None = None
        self._shown_at = 0.0

    @classmethod
    def snapshot(cls, status: RunStatus | None, **fields: object) -> StatusInfo:
        """A StatusInfo from a RunStatus and the view's fields."""
        if status is None:
            return StatusInfo(None, None, None, None, **fields)
        return StatusInfo(tuple(status.command), status.state, status.exit_code,
                          status.message, **fields)

    def show(self, info: StatusInfo, *, at_once: bool = False) -> None:
        """Show `info`; while only the counts move (flows streaming in), at most every
        COUNTS_INTERVAL, unless `at_once` (the user did something)."""
        last = self._last
        if info == last:
            return
        now = time.monotonic()
        if (
            not at_once
            and last is not None
            and replace(info, shown=last.shown, total=last.total, total_bytes=last.total_bytes)
            == last
            and now - self._shown_at < COUNTS_INTERVAL
        ):
            return  # (the tick after the interval shows the counts of then)
        self._last = info
        self._shown_at = now
        # One line whose size never changes: no layout pass (it would reflow the whole screen
        # at every tick while flows stream in).
        self.update(self.render_info(info), layout=False)

    @staticmethod
    def render_info(info: StatusInfo) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        if info.command is not None and info.state is not None:
            command = shlex.join(info.command)
            if len(command) > 40:
                command = command[:39] + "…"
            text.append(f" {command} ", style="bold")
            state = info.state
            label = state.value
            if state is CommandState.EXITED:
                label = f"exited {info.exit_code}"
                style = "bold green" if info.exit_code == 0 else "bold red"
            else:
                style = _STATE_STYLE.get(state, "")
            if state is CommandState.FAILED and info.message:
                label += f": {info.message}"
            text.append(f"[{label}]", style=style)
        else:
            text.append(f" {info.source}", style="bold")
        text.append(f"  {info.shown}/{info.total} flows  {human_size(info.total_bytes)}")
        if info.marked:
            text.append(f"  {info.marked} marked", style="magenta")
        text.append(f"  sort:{info.sort}")
        if info.follow:
            text.append("  FOLLOW", style="bold cyan")
        if info.hide_raw:
            text.append("  raw hidden", style="dim")
        if info.filter_expr:
            text.append("  filter: ", style="dim")
            text.append(info.filter_expr, style="yellow")
        if info.retention:
            text.append(f"  {info.retention}", style="bold yellow")
        return text


def retention_note(counters: object | None) -> str:
    """A short note when the session's limits or the disk cost something; "" otherwise."""
    if counters is None:
        return ""
    notes = []
    truncated = getattr(counters, "bodies_truncated", 0)
    if truncated:
        notes.append(f"{truncated} bodies cut to --max-body-size")
    dropped = getattr(counters, "bodies_dropped", 0)
    if dropped:
        notes.append(f"{dropped} old bodies dropped for --max-session-size")
    errors = getattr(counters, "errors", 0)
    if errors:
        notes.append(f"{errors} session write errors")
    return " · ".join(notes)
