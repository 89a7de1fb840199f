"""The filter bar: applies the expression as you type, shows syntax errors inline, keeps history."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.timer import Timer
from textual.widgets import Input, Label

from engine.filters import FilterError, parse
from tapui.filter_history import FilterHistory
from tapui.messages import FilterChanged, FilterClosed

DEBOUNCE = 0.15


class FilterBar(Horizontal):
    """`~d example & !~c 200`: a valid expression is applied; an invalid one is flagged and the
    last valid one stays in force."""

    BINDINGS = [
        Binding("up", "history(-1)", "Older filter", show=False),
        Binding("down", "history(1)", "Newer filter", show=False),
        Binding("escape", "close", "Close filter", show=False),
    ]

    def __init__(self, history: FilterHistory | None = None, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.kept = history or FilterHistory()
        self._history_pos = 0
        self.applied = ""
        self.error: FilterError | None = None
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Label("filter", id="filter-label")
        yield Input(placeholder="~d host & ~c 200 | text …  (enter: keep, esc: close)",
                    id="filter-input")
        yield Label("", id="filter-error")

    @property
    def history(self) -> list[str]:
        """The kept filters, oldest first (`up` walks back through them)."""
        return self.kept.entries

    @property
    def input(self) -> Input:
        return self.query_one("#filter-input", Input)

    def open(self) -> None:
        self.display = True
        self.input.value = self.applied
        self.input.cursor_position = len(self.applied)
        self._history_pos = len(self.history)
        self.input.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(DEBOUNCE, self.apply_now)

    def apply_now(self) -> None:
        """Validate and apply the current text (also called at once on enter)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        expr = self.input.value.strip()
        error_label = self.query_one("#filter-error", Label)
        try:
            parse(expr)
        except FilterError as exc:
            self.error = exc
            error_label.update(f"✗ {exc.message} at {exc.pos + 1}")
            self.input.add_class("-invalid")
            return
        self.error = None
        error_label.update("")
        self.input.remove_class("-invalid")
        if expr != self.applied:
            self.applied = expr
            self.post_message(FilterChanged(expr))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.apply_now()
        if self.error is None:
            self.kept.add(self.applied)
            self.action_close()

    def action_history(self, delta: int) -> None:
        if not self.history:
            return
        self._history_pos = min(max(self._history_pos + delta, 0), len(self.history))
        value = self.history[self._history_pos] if self._history_pos < len(self.history) else ""
        self.input.value = value
        self.input.cursor_position = len(value)

    def action_close(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.query_one("#filter-error", Label).update("")
        self.input.remove_class("-invalid")
        self.error = None
        self.display = False
        self.post_message(FilterClosed())
