"""Garbage-collector settings for a long capture: short pauses while flows pile up.

tapui keeps what it has seen: the UI's in-memory store and the HAR recorder hold every finished
flow, a few dozen container objects each. A full collection walks every tracked object, and
with 100,000 flows kept it took about a second here (bench/bench_ui.py), holding the GIL: the
UI froze and, in the same process, no packet was relayed.

So what has lived through a young collection is moved out of the collector's sight
(`gc.freeze`) after start-up and then every FREEZE_EVERY finished flows; full collections walk
only what came since. Reference counting still frees frozen objects as usual; only a reference
cycle that was already old when frozen is never collected (the relay's cycles die young: a
30,000-connection run kept a flat resident size).
"""

from __future__ import annotations

import gc

from engine.flow import EventKind, FlowEvent

FREEZE_EVERY = 2_000  # finished flows
#: A young collection every 10,000 allocations instead of Python's 700: a new connection
#: makes a few hundred short-lived objects (freed by reference counting), and with the
#: default one collection ran about every other connection. In-run A/B on 500-connection
#: runs: -40 us p50 and -175 us p90 per new connection.
YOUNG_THRESHOLD = 10_000


def freeze_survivors() -> None:
    """Collect the young generations, then freeze everything left (so little garbage is)."""
    gc.collect(1)
    gc.freeze()


def settle_after_start() -> None:
    """What starting made (modules, the CA, the config) lives as long as tapui."""
    freeze_survivors()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10)


class HeapFreezer:
    """A FlowBus listener that freezes the survivors every `every` finished flows."""

    def __init__(self, every: int = FREEZE_EVERY) -> None:
        self.every = every
        self._done = 0

    def __call__(self, event: FlowEvent) -> None:
        if event.kind is EventKind.DONE:
            self._done += 1
            if self._done % self.every == 0:
                freeze_survivors()
