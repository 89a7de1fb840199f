"""Make the README's screenshots from a real tapui session.

    python screenshots/make_screenshots.py [--out DIR]

Starts a small HTTP server on 127.0.0.1 (JSON, HTML, an image, a gzip response, a POST and a
404) and a gRPC server (grpcio, from the test extra), runs a real client under
`tapui --no-ui --har` (a Python script and curl, talking to the servers through
host.tapui.internal), then loads the recorded HAR into the Textual app, drives it
with keys through `App.run_test()` and saves an SVG of each main screen. No terminal needed.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import http.server
import json
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent import futures
from pathlib import Path

import blackboxprotobuf
import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.flow import Flow  # noqa: E402
from engine.har import load_har  # noqa: E402
from engine.runstatus import CommandState, RunStatus  # noqa: E402
from tapui.app import TapuiApp  # noqa: E402

SIZE = (140, 34)
HOST = "host.tapui.internal"

USERS = [
    {"id": 1, "name": "Ada Lovelace", "email": "ada@example.test", "roles": ["admin"],
     "active": True},
    {"id": 2, "name": "Alan Turing", "email": "alan@example.test", "roles": ["dev", "ops"],
     "active": True},
    {"id": 3, "name": "Grace Hopper", "email": "grace@example.test", "roles": ["dev"],
     "active": False, "last_login": None},
]

PAGE = b"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Shop</title><link rel="stylesheet" href="/static/app.css">
</head>
<body><h1>Welcome</h1><p>Three users, one order.</p><img src="/static/logo.png" alt="logo">
</body>
</html>
"""


def png(width: int = 48, height: int = 48) -> bytes:
    """A small gradient PNG, made by hand so the script needs no imaging library."""
    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 5, y * 5, 160)) for x in range(width)) for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack("!I", len(data)) + kind + data
                + struct.pack("!I", zlib.crc32(kind + data)))

    header = struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "demo-shop/1.0"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None
              ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def reply_json(self, status: int, value: object, extra: dict[str, str] | None = None) -> None:
        self.reply(status, json.dumps(value).encode(), "application/json", extra)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            self.reply(200, PAGE, "text/html; charset=utf-8")
        elif path == "/api/users":
            self.reply_json(200, {"users": USERS, "total": len(USERS), "next": None},
                            {"Cache-Control": "no-store", "X-Request-Id": "req-7f3a9c"})
        elif path == "/api/search":
            time.sleep(0.35)  # a slow endpoint, for the timing view
            self.reply_json(200, {"query": "tapui", "hits": [{"id": 2, "score": 0.93}]})
        elif path == "/api/report":
            report = {"day": "2024-05-01", "orders": [{"sku": f"SKU-{i:03d}", "qty": i % 4 + 1}
                                                      for i in range(40)]}
            body = gzip.compress(json.dumps(report).encode(), mtime=0)
            self.reply(200, body, "application/json", {"Content-Encoding": "gzip"})
        elif path == "/static/logo.png":
            self.reply(200, png(), "image/png", {"Cache-Control": "max-age=3600"})
        else:
            self.reply_json(404, {"error": "not found", "path": path})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        order = json.loads(body or b"{}")
        self.reply_json(201, {"id": 1042, "status": "created", **order},
                        {"Location": "/api/orders/1042"})


#: The gRPC answer: an order, as a protobuf message (its .proto would name the fields).
ORDER = blackboxprotobuf.encode_message(
    {"1": 1042, "2": "created", "3": {"1": "SKU-007", "2": 2}, "4": {"1": "Ada Lovelace",
     "2": "ada@example.test"}, "5": 1714557600},
    {"1": {"type": "int"}, "2": {"type": "string"},
     "3": {"type": "message", "message_typedef": {"1": {"type": "string"}, "2": {"type": "int"}}},
     "4": {"type": "message", "message_typedef": {"1": {"type": "string"},
                                                 "2": {"type": "string"}}},
     "5": {"type": "int"}},
)


class Orders(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != "/shop.Orders/Get":
            return None
        return grpc.unary_unary_rpc_method_handler(lambda request, context: ORDER)


CLIENT = """\
import json, sys, urllib.request, urllib.error
import grpc

base, grpc_target = sys.argv[1], sys.argv[2]
auth = {"Authorization": "Bearer demo-token", "Accept": "application/json"}

def get(path, headers=auth):
    request = urllib.request.Request(base + path, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        exc.read()

get("/api/users")
get("/static/logo.png", {})
get("/api/report", {**auth, "Accept-Encoding": "gzip"})
order = {"items": [{"sku": "SKU-007", "qty": 2}], "coupon": "SPRING24", "note": "leave at door"}
request = urllib.request.Request(base + "/api/orders", data=json.dumps(order).encode(),
                                 headers={**auth, "Content-Type": "application/json"})
urllib.request.urlopen(request).read()
get("/api/users/99")
get("/api/search?q=tapui&limit=5")
with grpc.insecure_channel(grpc_target) as channel:
    channel.unary_unary("/shop.Orders/Get")(b"\\x08\\x92\\x08", timeout=10)  # {1: 1042}
print("client done")
"""


def record_session(workdir: Path) -> list[Flow]:
    """Run the client under tapui (headless) against a local server; the flows it recorded."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://{HOST}:{server.server_address[1]}"
    rpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[Orders()])
    grpc_target = f"{HOST}:{rpc.add_insecure_port('127.0.0.1:0')}"
    rpc.start()
    client = workdir / "client.py"
    client.write_text(CLIENT)
    script = workdir / "client.sh"
    script.write_text(f'curl -s -o /dev/null "{base}/"\n'
                      f'"{sys.executable}" "{client}" "{base}" "{grpc_target}"\n')
    har = workdir / "session.har"
    try:
        subprocess.run([sys.executable, "-m", "tapui.cli", "--no-ui", "-q", "--har", str(har),
                        "--", "sh", str(script)], cwd=ROOT, check=True, timeout=120)
    finally:
        rpc.stop(None)
        server.shutdown()
        server.server_close()
    return sorted(load_har(har), key=lambda flow: flow.timings.start)


async def shoot(flows: list[Flow], out: Path) -> list[Path]:
    """Drive the app with keys and save an SVG of each screen."""
    saved: list[Path] = []
    status = RunStatus(command=["sh", "client.sh"], state=CommandState.EXITED, exit_code=0)

    def row(app: TapuiApp, path: str) -> int:
        return next(i for i, flow in enumerate(app.store.view_flows())
                    if flow.request is not None and flow.request.path.startswith(path))

    async def screen(name: str, *keys: str, select: str | None = None) -> None:
        app = TapuiApp(flows=flows, status=status, title="tapui")
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            if select is not None:
                await pilot.press("home", *["j"] * row(app, select))
            await pilot.press(*keys)
            await pilot.pause(0.3)
            path = out / f"{name}.svg"
            app.save_screenshot(filename=path.name, path=str(out))
            saved.append(path)

    await screen("flow-list", select="/api/orders")
    await screen("json-response", "enter", "2", select="/api/report")
    await screen("request", "enter", select="/api/orders")
    await screen("timing", "enter", "3", select="/api/search")
    await screen("grpc-response", "enter", "2", select="/shop.Orders/Get")
    await screen("filtered-list", "slash", *"~m POST | ~c 404", "enter")
    await screen("search-marks", "slash", *"~bs SKU-01[0-9]", "enter", "enter", "2", "n")
    await screen("help", "question_mark")
    return saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tapui-shots-") as tmp:
        flows = record_session(Path(tmp))
    print(f"recorded {len(flows)} flows")
    for path in asyncio.run(shoot(flows, args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
