"""Messages the widgets post to the app."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


@dataclass
class OpenFlow(Message):
    """The user asked to see a flow's detail."""

    flow_id: int


@dataclass
class ViewChanged(Message):
    """Sort, follow, marks or raw-flow hiding changed: the status bar should refresh."""


@dataclass
class FilterChanged(Message):
    """The filter bar holds a new valid expression ("" clears the filter)."""

    expr: str


@dataclass
class FilterClosed(Message):
    """The filter bar was closed (enter or escape)."""
