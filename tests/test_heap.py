"""Garbage-collector settings: kept flows are frozen out of full collections, and still freed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from engine.flow import Connection, Flow, FlowBus
from engine.heap import HeapFreezer


@pytest.fixture
def bus() -> Iterator[FlowBus]:
    bus = FlowBus()
    bus.subscribe(HeapFreezer(every=50))
    yield bus
    gc.unfreeze()  # (the freeze is process-wide)


def finish_flows(bus: FlowBus, n: int) -> list[Flow]:
    flows = []
    for i in range(n):
        flow = Flow(conn=Connection(id=i, client=("10.0.0.2", 40000 + i), server=("10.0.0.1", 80)))
        bus.new(flow)
        bus.done(flow)
        flows.append(flow)
    return flows


def test_flows_kept_past_a_freeze_are_left_out_of_collections(bus: FlowBus) -> None:
    kept = finish_flows(bus, 100)
    tracked = {id(o) for o in gc.get_objects()}  # every generation but the frozen one
    assert gc.get_freeze_count() > 0
    assert not any(id(flow) in tracked or id(flow.conn) in tracked for flow in kept)


def test_flows_finished_since_the_last_freeze_are_still_collected_as_usual(bus: FlowBus) -> None:
    kept = finish_flows(bus, 60)
    tracked = {id(o) for o in gc.get_objects()}
    assert all(id(flow) in tracked for flow in kept[50:])


def test_a_frozen_flow_is_still_freed_once_nothing_refers_to_it(bus: FlowBus) -> None:
    kept = finish_flows(bus, 50)
    ref = weakref.ref(kept[0])
    assert id(kept[0]) not in {id(o) for o in gc.get_objects()}
    del kept
    assert ref() is None
