"""The filters the user kept (enter in the filter bar), remembered across runs as a shell's
history is: one a line, oldest first, in tapui's state directory."""

from __future__ import annotations

from pathlib import Path

#: Filters remembered at most; the oldest are dropped.
KEEP = 200


def filter_history_file() -> Path:
    """Where the UI keeps the filters: $XDG_STATE_HOME/tapui/filter-history."""
    from engine.sessions import state_dir

    return state_dir() / "filter-history"


class FilterHistory:
    """The remembered filters; `path` None keeps them for this run only."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: list[str] = []
        if path is not None:
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""  # none yet, or unreadable: start afresh
            self.entries = [line for line in text.splitlines() if line.strip()][-KEEP:]

    def add(self, expr: str) -> None:
        """Remember `expr` as the newest (once: an older copy moves up)."""
        if not expr or "\n" in expr:
            return
        if expr in self.entries:
            self.entries.remove(expr)
        self.entries.append(expr)
        del self.entries[:-KEEP]
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self.path.write_text("".join(e + "\n" for e in self.entries), encoding="utf-8")
            except OSError:
                pass  # (a read-only home: the history lasts for this run)
