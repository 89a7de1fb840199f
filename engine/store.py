"""An ordered in-memory store of flows with a filtered, sorted view.

The engine announces flows on a `FlowBus` from its own thread; `FlowStore.listener` only puts the
event on a thread-safe queue and the UI thread calls `drain()` (or `apply()`) in batches. The
interface is kept small so that a SQLite-backed store can replace this one later.

The view is a sorted list of `(key, index)` pairs, `index` being the flow's arrival position, so
adding, removing or re-sorting one flow is a binary search plus a list insert or delete.
"""

from __future__ import annotations

import bisect
import queue
from collections.abc import Callable, Iterable
from typing import Any

from engine.filters import Filter, parse, prime
from engine.flow import EventKind, Flow, FlowBus, FlowEvent, FlowKind

SORT_KEYS = ("time", "host", "status", "size", "duration")
RAW_KINDS = (FlowKind.TCP, FlowKind.UDP, FlowKind.DNS)


def flow_size(flow: Flow) -> int:
    """Bytes the flow moved: the response body for HTTP, bytes each way for raw flows."""
    if flow.response is not None:
        return flow.response.body.size
    if flow.request is None:
        return flow.bytes_sent + flow.bytes_received
    return 0


def _key_time(flow: Flow, index: int) -> Any:
    return index


def _key_host(flow: Flow, index: int) -> Any:
    return flow.host.lower()


def _key_status(flow: Flow, index: int) -> Any:
    return flow.response.status if flow.response is not None else -1


def _key_size(flow: Flow, index: int) -> Any:
    return flow_size(flow)


def _key_duration(flow: Flow, index: int) -> Any:
    duration = flow.duration
    return float("inf") if duration is None else duration


_KEYS: dict[str, Callable[[Flow, int], Any]] = {
    "time": _key_time,
    "host": _key_host,
    "status": _key_status,
    "size": _key_size,
    "duration": _key_duration,
}


class FlowStore:
    """Flows in arrival order, by id, and a filtered and sorted view of them."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[FlowEvent] = queue.SimpleQueue()
        self._flows: list[Flow] = []
        self._index: dict[int, int] = {}  # flow id -> arrival position
        self._view: list[tuple[Any, int]] = []
        self._keys: dict[int, Any] = {}  # arrival position -> key, for flows in the view
        self._sizes: dict[int, int] = {}  # arrival position -> size last counted
        self.total_bytes = 0
        self.filter_expr = ""
        self._filter: Filter | None = None
        self.hide_raw = False
        self.sort_key = "time"
        self.sort_reverse = False
        self._key = _KEYS["time"]

    # --- feeding ------------------------------------------------------------------------------

    def listener(self, event: FlowEvent) -> None:
        """A FlowBus listener: safe to call from any thread, never blocks."""
        self.queue.put(event)

    def attach(self, bus: FlowBus) -> None:
        bus.subscribe(self.listener)

    def detach(self, bus: FlowBus) -> None:
        try:
            bus.unsubscribe(self.listener)
        except ValueError:
            pass

    def drain(self, limit: int = 100_000) -> bool:
        """Apply up to `limit` queued events; True when the view or a shown flow changed."""
        events: list[FlowEvent] = []
        try:
            while len(events) < limit:
                events.append(self.queue.get_nowait())
        except queue.Empty:
            pass
        return self.apply(events) if events else False

    def add(self, flows: Iterable[Flow]) -> None:
        """Add finished flows (e.g. loaded from a HAR file)."""
        for flow in flows:
            self._upsert(flow)

    def apply(self, events: Iterable[FlowEvent]) -> bool:
        """Apply flow events in order; True when the view or a flow in it changed."""
        changed = False
        for event in events:
            changed = self._upsert(event.flow) or changed
            if event.kind is EventKind.DONE:
                prime(event.flow)
        return changed

    def _upsert(self, flow: Flow) -> bool:
        index = self._index.get(flow.id)
        if index is None:
            index = len(self._flows)
            self._flows.append(flow)
            self._index[flow.id] = index
        elif self._flows[index] is not flow:
            self._flows[index] = flow
        size = flow_size(flow)
        self.total_bytes += size - self._sizes.get(index, 0)
        self._sizes[index] = size
        return self._place(index, flow)

    def _matches(self, flow: Flow) -> bool:
        if self.hide_raw and flow.kind in RAW_KINDS:
            return False
        try:
            return self._filter is None or self._filter(flow)
        except Exception:  # a filter must never break ingest
            return False

    def _place(self, index: int, flow: Flow) -> bool:
        """Put the flow where it belongs in the view (or out of it)."""
        old = self._keys.get(index)
        shown = old is not None
        if not self._matches(flow):
            if shown:
                self._remove(index, old)
            return shown
        key = self._key(flow, index)
        if shown:
            if key == old:
                return True
            self._remove(index, old)
        self._keys[index] = key
        entry = (key, index)
        if not self._view or self._view[-1] < entry:
            self._view.append(entry)
        else:
            bisect.insort(self._view, entry)
        return True

    def _remove(self, index: int, key: Any) -> None:
        pos = bisect.bisect_left(self._view, (key, index))
        del self._view[pos]
        del self._keys[index]

    # --- reading ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self):
        return iter(self._flows)

    def get(self, flow_id: int) -> Flow | None:
        index = self._index.get(flow_id)
        return None if index is None else self._flows[index]

    @property
    def view_len(self) -> int:
        return len(self._view)

    def view_flow(self, i: int) -> Flow:
        """The i-th flow of the filtered, sorted view."""
        if self.sort_reverse:
            i = len(self._view) - 1 - i
        return self._flows[self._view[i][1]]

    def view_flows(self) -> list[Flow]:
        return [self.view_flow(i) for i in range(len(self._view))]

    def view_index(self, flow_id: int) -> int | None:
        """Position of a flow in the view, or None when it is filtered out."""
        index = self._index.get(flow_id)
        if index is None or index not in self._keys:
            return None
        pos = bisect.bisect_left(self._view, (self._keys[index], index))
        return len(self._view) - 1 - pos if self.sort_reverse else pos

    # --- view settings ------------------------------------------------------------------------

    def set_filter(self, expr: str) -> None:
        """Filter the view; raises FilterError (keeping the current filter) on a bad expression."""
        expr = expr.strip()
        compiled = parse(expr) if expr else None
        self.filter_expr = expr
        self._filter = compiled
        self._rebuild()

    def set_hide_raw(self, hide: bool) -> None:
        """Hide raw TCP, UDP and DNS flows from the view."""
        self.hide_raw = hide
        self._rebuild()

    def set_sort(self, key: str, reverse: bool = False) -> None:
        if key not in _KEYS:
            raise ValueError(f"unknown sort key {key!r}; one of {', '.join(SORT_KEYS)}")
        self.sort_key = key
        self.sort_reverse = reverse
        self._key = _KEYS[key]
        self._rebuild()

    def clear(self) -> None:
        """Forget every flow; later updates of forgotten flows bring them back as new."""
        self._flows.clear()
        self._index.clear()
        self._view.clear()
        self._keys.clear()
        self._sizes.clear()
        self.total_bytes = 0

    def _rebuild(self) -> None:
        key = self._key
        flows = self._flows
        flt = self._filter
        hidden = RAW_KINDS if self.hide_raw else ()
        try:
            if flt is None and not hidden:
                view = [(key(f, i), i) for i, f in enumerate(flows)]
            elif flt is None:
                view = [(key(f, i), i) for i, f in enumerate(flows) if f.kind not in hidden]
            else:
                view = [(key(f, i), i) for i, f in enumerate(flows)
                        if f.kind not in hidden and flt(f)]
        except Exception:  # a filter that fails on some flow: count those as not matching
            view = [(key(f, i), i) for i, f in enumerate(flows) if self._matches(f)]
        if self.sort_key != "time":
            view.sort()
        self._view = view
        self._keys = {i: k for k, i in view}
