"""UI and store benchmark (a script, not a test): prints timings and memory.

    PYTHONPATH=. python bench/bench_ui.py [--flows 100000] [--rate 2000]

Targets: filters over 100k flows under 150 ms; keypress-to-repaint under 100 ms while
2,000 flows per second arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import tempfile
import threading
import time

from textual import events

from engine.flow import (
    Body,
    Connection,
    Flow,
    FlowBus,
    FlowState,
    Request,
    Response,
    Timings,
)
from engine.heap import HeapFreezer, freeze_survivors
from engine.runstatus import CommandState, RunStatus
from engine.store import FlowStore

T0 = 1714564800.0


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def synthetic_flow(i: int) -> Flow:
    """A finished HTTP flow of a few hundred bytes, on one of 200 hosts."""
    host = f"host-{i % 200}.example.test"
    conn = Connection(id=i, client=("10.0.0.2", 30000 + i % 30000), server=("203.0.113.1", 443),
                      sni=host, pid=1000 + i % 7, command="python3 app.py")
    body = json.dumps({"id": i, "name": f"item {i}", "tags": ["a", "b", "c"],
                       "text": "lorem ipsum dolor sit amet " * 4}).encode()
    request = Request("GET" if i % 5 else "POST", "https", host, f"/api/v1/items/{i}?page={i % 9}",
                      "HTTP/1.1", [("Host", host), ("User-Agent", "bench/1.0"),
                                   ("Accept", "application/json")], Body.of(b""))
    response = Response(200 if i % 13 else 404, "OK", "HTTP/1.1",
                        [("Content-Type", "application/json"),
                         ("Content-Length", str(len(body)))], Body.of(body))
    start = T0 + i * 0.01
    timings = Timings(start=start, connect=start + 0.01, tls=start + 0.02,
                      request_sent=start + 0.03, first_byte=start + 0.05, done=start + 0.06)
    return Flow(conn=conn, id=i, state=FlowState.DONE, request=request, response=response,
                timings=timings)


def timed(label: str, fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    best = min(times) * 1000
    print(f"  {label:<44} {best:8.1f} ms  (best of {repeat}, median "
          f"{statistics.median(times) * 1000:.1f} ms)")
    return best


def session_file(flows: list[Flow], directory: str) -> str:
    """The flows written by the real session writer, as a live run would leave them."""
    from engine.session import SessionWriter

    t = time.perf_counter()
    writer = SessionWriter(os.path.join(directory, "bench.tapui"), ["python3", "app.py"])
    writer.add(flows)
    writer.close(index_for=600)
    print(f"wrote {len(flows):,} flows through the session writer in "
          f"{time.perf_counter() - t:.1f} s")
    return str(writer.path)


def open_store(kind: str, flows: list[Flow], path: str | None):  # type: ignore[no-untyped-def]
    if kind == "session":
        from engine.session_store import SessionStore

        return SessionStore(path)  # type: ignore[arg-type]
    store = FlowStore()
    store.add(flows)
    return store


def bench_store(kind: str, flows: list[Flow], path: str | None) -> None:
    print(f"{kind} store with {len(flows):,} flows")
    t = time.perf_counter()
    store = open_store(kind, flows, path)
    print(f"  {'open / load into store':<44} {(time.perf_counter() - t) * 1000:8.1f} ms")
    timed("first text filter (builds search cache) 'zzz'", lambda: store.set_filter("zzz"),
          repeat=1)
    timed("filter ~d host-42\\.", lambda: store.set_filter(r"~d host-42\."))
    print(f"    -> {store.view_len:,} shown")
    timed("filter ~c 404", lambda: store.set_filter("~c 404"))
    timed("filter ~d host-1 & !~m POST", lambda: store.set_filter("~d host-1 & !~m POST"))
    timed("body text filter 'item 99999'", lambda: store.set_filter("'item 99999'"))
    print(f"    -> {store.view_len:,} shown")
    timed("body filter ~bs 'item 4242\"'", lambda: store.set_filter("~bs 'item 4242\"'"))
    timed("plain text filter (URL hit) items/77", lambda: store.set_filter("items/77"))
    timed("clear filter", lambda: store.set_filter(""))
    timed("sort by size", lambda: store.set_sort("size"))
    timed("sort back to time", lambda: store.set_sort("time"))
    if kind == "session":
        store.close()


async def bench_app(
    kind: str, flows: list[Flow], path: str | None, rate: int, seconds: float
) -> None:
    from tapui.app import TapuiApp

    bus = FlowBus()
    # As a capture does (engine/heap.py). The flows already there stand for flows that came
    # earlier through the bus: the freezer would have frozen them as they finished.
    bus.subscribe(HeapFreezer())
    freeze_survivors()
    status = RunStatus(["python3", "app.py"], CommandState.RUNNING)
    t = time.perf_counter()
    writer = None
    if kind == "session":  # as `tapui -- CMD` runs: the writer records, the UI reads the file
        from engine.session import SessionWriter
        from engine.session_store import SessionStore

        writer = SessionWriter(path, ["python3", "app.py"])  # type: ignore[arg-type]
        writer.attach(bus)
        app = TapuiApp(bus=bus, status=status, store=SessionStore(path))  # type: ignore[arg-type]
    else:
        app = TapuiApp(bus=bus, status=status, flows=flows)
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.pause()
        print(f"{kind} app with {len(flows):,} flows")
        print(f"  {'construct + mount':<44} {(time.perf_counter() - t) * 1000:8.1f} ms")
        flow_list = app.flow_list

        painted = asyncio.Event()
        original = flow_list.render_line

        def render_line(y: int):
            strip = original(y)
            if y - 1 + round(flow_list.scroll_y) == flow_list.cursor:
                painted.set()
            return strip

        flow_list.render_line = render_line  # type: ignore[method-assign]

        stop = threading.Event()
        sent = [0]

        def ingest() -> None:
            next_id = len(flows) + 1
            tick = 0.01
            per_tick = max(1, int(rate * tick))
            deadline = time.perf_counter()
            while not stop.is_set():
                for _ in range(per_tick):
                    flow = synthetic_flow(next_id)
                    flow.state, flow.timings.done = FlowState.REQUEST, None
                    response, flow.response = flow.response, None
                    bus.new(flow)
                    flow.response = response
                    bus.done(flow)
                    next_id += 1
                    sent[0] += 1
                deadline += tick
                time.sleep(max(0.0, deadline - time.perf_counter()))

        thread = threading.Thread(target=ingest, daemon=True)
        start = time.perf_counter()
        thread.start()
        latencies = []
        keys = ["j", "j", "k", "pagedown", "j", "pageup", "end", "home"]
        i = 0
        while time.perf_counter() - start < seconds:
            painted.clear()
            key = keys[i % len(keys)]
            i += 1
            t = time.perf_counter()
            # What a terminal keypress does: the driver posts a Key event. (pilot.press also
            # waits for the app to go idle, up to a second, which is not what a user sees.)
            app._driver.send_message(events.Key(key, key if len(key) == 1 else None))
            try:
                await asyncio.wait_for(painted.wait(), 1.0)
            except TimeoutError:
                pass
            latencies.append((time.perf_counter() - t) * 1000)
            await pilot.pause(0.05)
        stop.set()
        thread.join()
        elapsed = time.perf_counter() - start
        await pilot.pause(0.3)
        latencies.sort()
        p50 = latencies[len(latencies) // 2]
        p95 = latencies[int(len(latencies) * 0.95)]
        print(f"  ingest: {sent[0]:,} flows in {elapsed:.1f} s = {sent[0] / elapsed:,.0f}/s; "
              f"store now {len(app.store):,}")
        print(f"  keypress -> repaint ({len(latencies)} keys)     p50 {p50:6.1f} ms   "
              f"p95 {p95:6.1f} ms   max {latencies[-1]:6.1f} ms")
        t = time.perf_counter()
        await pilot.press("end")
        print(f"  {'one pilot.press (waits for idle)':<44} {(time.perf_counter() - t) * 1000:8.1f} ms")
        await pilot.press("f", *"~d host-42\\.")
        t = time.perf_counter()
        await pilot.press("enter")
        print(f"  {'filter applied by enter in the app':<44} "
              f"{(time.perf_counter() - t) * 1000:8.1f} ms -> {app.store.view_len:,} shown")
        print(f"  resident memory now                          {rss_mib():8.1f} MiB")
    if writer is not None:
        writer.close(index_for=0)
        app.store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=2000, help="flows per second during ingest")
    parser.add_argument("--seconds", type=float, default=5.0, help="ingest duration")
    parser.add_argument(
        "--store", choices=["memory", "session", "both"], default="both",
        help="the in-memory store (--no-save), the session file (the default), or both",
    )
    args = parser.parse_args()
    print(f"resident memory at start                       {rss_mib():8.1f} MiB")
    t = time.perf_counter()
    flows = [synthetic_flow(i) for i in range(1, args.flows + 1)]
    print(f"built {len(flows):,} synthetic flows in {(time.perf_counter() - t) * 1000:.0f} ms; "
          f"resident memory {rss_mib():.1f} MiB")
    kinds = ["memory", "session"] if args.store == "both" else [args.store]
    with tempfile.TemporaryDirectory() as tmp:
        path = session_file(flows, tmp) if "session" in kinds else None
        for kind in kinds:
            bench_store(kind, flows, path)
            gc.collect()
            asyncio.run(bench_app(kind, flows, path, args.rate, args.seconds))
            gc.unfreeze()
            gc.collect()


if __name__ == "__main__":
    main()
