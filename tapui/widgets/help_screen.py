"""`?`: every key of every screen, built from the bindings so it cannot go stale."""

from __future__ import annotations

from collections.abc import Iterable

from rich.measure import Measurement
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

_KEY_NAMES = {"question_mark": "?", "slash": "/", "escape": "esc", "left_square_bracket": "[",
              "right_square_bracket": "]", "space": "space", "pageup": "pgup",
              "pagedown": "pgdn"}


def key_label(keys: str) -> str:
    return " ".join(_KEY_NAMES.get(k.strip(), k.strip()) for k in keys.split(","))


def keys_table(sections: Iterable[tuple[str, Iterable[BindingType]]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column("key", justify="right", style="bold cyan", no_wrap=True)
    table.add_column("action")
    for title, bindings in sections:
        table.add_row("", Text(title, style="bold underline"))
        for binding in bindings:
            if not isinstance(binding, Binding) or not binding.description:
                continue
            table.add_row(key_label(binding.key), binding.description)
        table.add_row("", "")
    return table


def _rows(section: tuple[str, Iterable[BindingType]]) -> int:
    described = [b for b in section[1] if isinstance(b, Binding) and b.description]
    return len(described) + 2


def keys_columns(sections: list[tuple[str, Iterable[BindingType]]]) -> Table:
    """The sections in two columns of about equal height (so a wide terminal needs no
    scrolling); the first sections go left."""
    heights = [_rows(section) for section in sections]
    split = min(range(1, len(sections)),
                key=lambda i: max(sum(heights[:i]), sum(heights[i:])), default=len(sections))
    grid = Table.grid(padding=(0, 4))
    grid.add_column(vertical="top")
    grid.add_column(vertical="top")
    grid.add_row(keys_table(sections[:split]), keys_table(sections[split:]))
    return grid


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close help")]

    def __init__(self, sections: list[tuple[str, Iterable[BindingType]]]) -> None:
        super().__init__()
        self.sections = [(title, list(bindings)) for title, bindings in sections]
        self.table: Table = keys_table(self.sections)

    def compose(self) -> ComposeResult:
        # Two columns when they fit (a wide terminal then needs no scrolling), else one.
        console = self.app.console
        columns = keys_columns(self.sections)
        width = Measurement.get(console, console.options, columns).maximum + 5  # border etc.
        with VerticalScroll(id="help-box") as box:
            box.border_title = "tapui keys"
            box.border_subtitle = "esc to close"
            if len(self.sections) > 1 and width <= self.app.size.width - 4:
                self.table = columns
                box.styles.width = width
            yield Static(self.table, id="help-table")

    def action_close(self) -> None:
        self.dismiss(None)
