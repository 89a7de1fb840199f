"""Garbage-collector settings: kept flows are frozen out of full collections, and still freed;
a finished connection needs no collection at all."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.flow import Connection, Flow, FlowBus
from engine.heap import HeapFreezer
from tests.conftest import HOST, ROOT


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


RUN_WITHOUT_COLLECTIONS = """
import collections, gc, json, os, sys
from engine import heap
settle = heap.settle_after_start

def settle_then_keep_garbage() -> None:
    settle()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)

heap.settle_after_start = settle_then_keep_garbage
from tapui.cli import main
code = main(sys.argv[1:])
gc.collect()
kinds = collections.Counter(type(o).__name__ for o in gc.garbage)
with open(os.environ["GARBAGE_OUT"], "w") as out:
    json.dump(kinds, out)
sys.exit(code)
"""


@pytest.mark.usefixtures("sandbox")
def test_finished_connections_are_freed_without_a_garbage_collection(
    http_port: int, tmp_path: Path
) -> None:
    """A connection's objects (its relay, TCP state, sockets, flows) sat in reference cycles
    until a collection found them: ~41 objects a connection, and a young collection every
    ~60 connections that cost ~30 us a connection in all. Now reference counting frees them."""
    out = tmp_path / "garbage.json"
    urls = " ".join(f"http://{HOST}:{http_port}/hello" for _ in range(20))
    result = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT_COLLECTIONS, "--no-ui", "-q", "--", "sh", "-c",
         f"for url in {urls}; do curl -4 -s -o /dev/null $url || exit 1; done"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL,
        env=dict(os.environ, GARBAGE_OUT=str(out)),
    )
    assert result.returncode == 0, result.stderr
    garbage = json.loads(out.read_text())
    per_connection = ("Relay", "TcpConnection", "UpstreamTransport", "socket", "Flow")
    assert {kind: garbage[kind] for kind in per_connection if kind in garbage} == {}
