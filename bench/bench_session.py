"""Session files at scale: open, first paint, ~d filter, body grep, scroll to end, memory, ingest.

    python bench/bench_session.py                 # 1,000,000 flows, ~2 GiB of bodies
    python bench/bench_session.py --flows 50000   # a quick run

The big session is generated with plain SQL inserts (fast, not through the writer) and reused
when it already exists with the same size; reads are measured in a fresh process so its memory
is the reader's alone. Ingest goes through the real SessionWriter while a reader keeps querying.
Targets: open < 1 s, ~d < 200 ms, body grep < 500 ms, RSS < 300 MB, ingest >= 5,000 flows/s.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import session, session_db  # noqa: E402
from engine.flow import Body, Connection, Flow, FlowBus, Request, Response  # noqa: E402

HOSTS = [f"{kind}{n}.example.test" for kind in ("api", "cdn", "img", "auth", "shop")
         for n in range(100)]
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
         "zulu price amount currency title author created updated status active pending").split()
GREP_WORD = "zebrafish"  # in 1% of the text bodies
TEXT_SHARE = 0.7
TEXT_AVG = 1000
BINARY_AVG = 4820  # 0.7 * 1000 + 0.3 * 4820 = ~2,150 bytes per flow: 2 GiB per million


def rss_mb() -> tuple[float, float]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


# --- synthetic traffic ----------------------------------------------------------------------


class Traffic:
    """Deterministic flows: 70% JSON bodies (~1 KB), 30% binary (~4.8 KB)."""

    def __init__(self, seed: int = 1) -> None:
        self.rnd = random.Random(seed)
        self.pool = random.Random(seed).randbytes(32 * 1024 * 1024)
        self.texts = [self._json(i) for i in range(4000)]

    def _json(self, i: int) -> str:
        rnd = self.rnd
        items = []
        size = 0
        target = rnd.randint(TEXT_AVG // 2, TEXT_AVG * 3 // 2)
        while size < target:
            item = {"id": rnd.randrange(10**6), "name": " ".join(rnd.choices(WORDS, k=3)),
                    "price": round(rnd.random() * 100, 2), "tags": rnd.choices(WORDS, k=2)}
            if i % 100 == 0 and not items:
                item["note"] = GREP_WORD
            items.append(item)
            size += len(json.dumps(item))
        return json.dumps({"items": items, "page": i % 50})

    def flow(self, i: int) -> dict:
        rnd = self.rnd
        host = HOSTS[(i * 7919) % len(HOSTS)]
        text = rnd.random() < TEXT_SHARE
        if text:
            body = self.texts[i % len(self.texts)].encode()
            ctype = "application/json"
        else:
            n = rnd.randint(BINARY_AVG // 2, BINARY_AVG * 3 // 2)
            start = rnd.randrange(len(self.pool) - n)
            body = self.pool[start:start + n]
            ctype = "image/png"
        method = "POST" if i % 10 == 0 else "GET"
        path = f"/v1/{rnd.choice(WORDS)}/{i}?page={i % 50}"
        req_headers = [("Host", host), ("User-Agent", "bench/1.0"), ("Accept", "*/*"),
                       ("Accept-Encoding", "gzip, br"), ("X-Request-Id", f"req-{i:08d}")]
        resp_headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                        ("Cache-Control", "max-age=60"), ("Server", "bench"),
                        ("Date", "Mon, 01 Jan 2024 00:00:00 GMT")]
        return {"i": i, "host": host, "method": method, "path": path, "status":
                200 if i % 20 else 404, "req_headers": req_headers, "resp_headers": resp_headers,
                "body": body, "text": body.decode() if text else None, "ctype": ctype,
                "start": 1_700_000_000 + i * 0.01, "duration": rnd.random() / 5}

    def real_flow(self, i: int) -> Flow:
        d = self.flow(i)
        conn = Connection(id=i, client=("10.0.0.2", 40000 + i % 20000),
                          server=("10.1.0.1", 443), sni=d["host"], pid=100, command="bench")
        flow = Flow(conn=conn)
        flow.request = Request(d["method"], "https", d["host"], d["path"], "HTTP/1.1",
                               d["req_headers"])
        flow.response = Response(d["status"], "OK", "HTTP/1.1", d["resp_headers"],
                                 Body.of(d["body"]))
        flow.timings.done = flow.timings.start + d["duration"]
        return flow


def generate(path: Path, flows: int) -> None:
    """Fill a session with plain SQL inserts in big transactions (not through the writer)."""
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    conn = session_db.connect(path, create=True)
    conn.execute("PRAGMA cache_size = -262144")
    traffic = Traffic()
    names: dict[str, int] = {}

    def name(value: str) -> int:
        if value not in names:
            names[value] = conn.execute("INSERT INTO names(value) VALUES (?)",
                                        (value,)).lastrowid
        return names[value]

    t0 = time.monotonic()
    body_bytes = 0
    batch = 20_000
    conn.execute("BEGIN")
    conn.execute("INSERT INTO meta VALUES ('command', ?), ('started', ?), ('ended', ?)",
                 (json.dumps(["bench", "generated"]), json.dumps(time.time()),
                  json.dumps(time.time())))
    for lo in range(0, flows, batch):
        rows, details, bodies, texts = [], [], [], []
        for i in range(lo, min(lo + batch, flows)):
            d = traffic.flow(i)
            rid = i + 1
            url = f"https://{d['host']}{d['path']}"
            size = len(d["body"])
            body_bytes += size
            rows.append((rid, rid, "http", "done", d["start"], d["duration"], name(d["host"]),
                         name(d["host"]), None, d["host"], name(d["method"]), url, d["status"],
                         None, name(d["ctype"]), size, None, 100, 0))
            t = [d["start"], None, None, None, None, None, d["start"] + d["duration"]]
            details.append((rid, json.dumps({
                "t": t, "b": [0, 0], "fid": rid,
                "c": {"id": rid, "client": ["10.0.0.2", 40000], "server": ["10.1.0.1", 443],
                      "upstream": None, "hostname": None, "sni": d["host"], "alpn": None,
                      "tls": None, "pid": 100, "command": "bench", "transport": "tcp",
                      "t": t, "cert": None},
                "rq": [d["method"], "https", d["host"], d["path"], "HTTP/1.1",
                       d["req_headers"], []],
                "rs": [d["status"], "OK", "HTTP/1.1", d["resp_headers"], []],
            }, separators=(",", ":"))))
            bodies.append((rid * 2 + 1, rid, 1, size, size, d["body"]))
            texts.append((rid, f"{url}\n{d['method']}", session_db.header_text(d["req_headers"]),
                          session_db.header_text(d["resp_headers"]), None, d["text"], None))
        conn.executemany(f"INSERT INTO flows(id, {', '.join(session_db.FLOW_COLUMNS)}) VALUES "
                         f"({', '.join('?' * (len(session_db.FLOW_COLUMNS) + 1))})", rows)
        conn.executemany("INSERT INTO details VALUES (?, ?)", details)
        conn.executemany("INSERT INTO bodies VALUES (?, ?, ?, ?, ?, 0, ?)",
                         bodies)
        conn.executemany("INSERT INTO texts VALUES (?, ?, ?, ?, ?, ?, ?)", texts)
        conn.execute("COMMIT")
        conn.execute("BEGIN")
        done = min(lo + batch, flows)
        print(f"\r  rows {done:,}/{flows:,}  bodies {body_bytes / 2**30:.2f} GiB  "
              f"{time.monotonic() - t0:.0f}s", end="", flush=True)
    conn.execute("COMMIT")
    print("\n  indexing text (FTS5 trigram) ...", flush=True)
    t1 = time.monotonic()
    step = 50_000
    for lo in range(0, flows, step):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO search(rowid, head, hq, hs, bq, bs, ws) SELECT id, head, hq, "
                     "hs, bq, bs, ws FROM texts WHERE id > ? AND id <= ?", (lo, lo + step))
        conn.execute("COMMIT")
        print(f"\r  indexed {min(lo + step, flows):,}  {time.monotonic() - t1:.0f}s", end="",
              flush=True)
    conn.execute("INSERT INTO search(search) VALUES ('optimize')")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    print(f"\n  generated in {time.monotonic() - t0:.0f}s: {session_db.file_size(path) / 2**30:.2f}"
          f" GiB on disk, {body_bytes / 2**30:.2f} GiB of bodies")


# --- reading --------------------------------------------------------------------------------


def measure(path: Path, screen: int = 50) -> dict[str, float]:
    from engine.session_store import SessionStore

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    store = SessionStore(path)
    out["open_s"] = time.perf_counter() - t0
    for i in range(min(screen, store.view_len)):
        store.view_flow(i)
    out["first_paint_s"] = time.perf_counter() - t0
    out["flows"] = len(store)

    def timed(label: str, expr: str) -> None:
        t = time.perf_counter()
        store.set_filter(expr)
        for i in range(min(screen, store.view_len)):
            store.view_flow(i)
        out[label + "_s"] = time.perf_counter() - t
        out[label + "_matches"] = store.view_len

    timed("filter_d", "~d ^cdn7")
    timed("grep_body", GREP_WORD)
    timed("grep_body_b", f"~b {GREP_WORD}")
    timed("filter_c", "~c 404 & ~d ^api")
    store.set_filter("")
    t = time.perf_counter()
    n = store.view_len
    flows = [store.view_flow(i) for i in range(max(0, n - screen), n)]
    flows[-1].response.body.read()
    out["scroll_end_s"] = time.perf_counter() - t
    t = time.perf_counter()
    store.set_sort("size", reverse=True)
    for i in range(screen):
        store.view_flow(i)
    out["sort_size_s"] = time.perf_counter() - t
    out["rss_mb"], out["rss_peak_mb"] = rss_mb()
    store.close()
    return out


# --- ingest ---------------------------------------------------------------------------------


def ingest(path: Path, flows: int) -> dict[str, float]:
    from engine.session_store import SessionStore

    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    traffic = Traffic(seed=2)
    prepared = [traffic.real_flow(i) for i in range(flows)]
    bus = FlowBus()
    writer = session.SessionWriter(path, ["bench", "ingest"])
    writer.attach(bus)
    stop = threading.Event()
    queries = [0]

    def reader() -> None:
        """Like the UI: follow the session every tick, paint the first screen, and change the
        filter every half second (host, body grep, status, none)."""
        store = SessionStore(path)
        exprs = ["~d ^api1", GREP_WORD, "~c 404", ""]
        changed = 0.0
        while not stop.is_set():
            store.drain()
            if time.monotonic() - changed > 0.5:
                store.set_filter(exprs[queries[0] % len(exprs)])
                changed = time.monotonic()
                queries[0] += 1
            for i in range(min(50, store.view_len)):
                store.view_flow(i)
            time.sleep(0.075)
        store.close()

    thread = threading.Thread(target=reader)
    thread.start()
    t0 = time.perf_counter()
    for flow in prepared:
        bus.new(flow)
        bus.update(flow)
        bus.done(flow)
    emitted = time.perf_counter() - t0
    writer.flush(timeout=600)
    written = time.perf_counter() - t0
    backlog = writer.counters.pending_index
    stop.set()
    thread.join()
    t1 = time.perf_counter()
    writer.close(index_for=600)
    return {"ingest_flows": flows, "ingest_emit_s": emitted, "ingest_written_s": written,
            "ingest_flows_per_s": flows / written, "index_backlog": backlog,
            "index_catch_up_s": time.perf_counter() - t1, "reader_queries": queries[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, default=1_000_000)
    parser.add_argument("--ingest-flows", type=int, default=50_000)
    parser.add_argument("--path", type=Path, default=Path("/tmp/tapui-bench.tapui"))
    parser.add_argument("--regen", action="store_true", help="generate even if the file exists")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.path)))
        return 0
    free = shutil.disk_usage(args.path.parent).free
    need = args.flows * 5200
    if free < need * 1.2:
        print(f"not enough disk: {free / 2**30:.1f} GiB free, ~{need / 2**30:.1f} GiB needed")
        return 1
    stamp = args.path.with_suffix(".flows")
    if args.regen or not args.path.exists() or not stamp.exists() or \
            stamp.read_text() != str(args.flows):
        print(f"generating {args.flows:,} flows in {args.path}")
        generate(args.path, args.flows)
        stamp.write_text(str(args.flows))
    result = subprocess.run([sys.executable, __file__, "--measure", "--path", str(args.path)],
                            capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout)
    figures.update(ingest(args.path.with_name("tapui-bench-ingest.tapui"), args.ingest_flows))
    targets = {"open_s": 1.0, "filter_d_s": 0.2, "grep_body_s": 0.5, "rss_mb": 300}
    print(f"\nsession: {figures['flows']:,.0f} flows, "
          f"{session_db.file_size(args.path) / 2**30:.2f} GiB on disk")
    for key, value in figures.items():
        if key == "flows":
            continue
        target = targets.get(key)
        mark = "" if target is None else ("  ok" if value < target else f"  MISSED (< {target})")
        if key == "ingest_flows_per_s":
            mark = "  ok" if value >= 5000 else "  MISSED (>= 5000)"
        shown = f"{value * 1000:8.1f} ms" if key.endswith("_s") and value < 10 else \
            f"{value:10,.1f}"
        print(f"  {key:22} {shown}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
