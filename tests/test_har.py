"""HAR 1.2 export/import and JSON lines."""

from __future__ import annotations

import base64
import gzip
import io
import json
from pathlib import Path

import brotli
import jsonschema
import pytest

from engine.content import decode_body
from engine.flow import (
    Body,
    Connection,
    Flow,
    FlowBus,
    FlowKind,
    FlowState,
    Request,
    Response,
    Timings,
    WebSocketMessage,
)
from engine.har import HarError, har_entry, load_har, write_har
from engine.jsonl import JsonLinesWriter, flow_to_json

SCHEMA = json.loads((Path(__file__).parent / "har_schema.json").read_text())
T0 = 1_700_000_000.0
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))


def conn(cid: int = 7, ip: str = "192.0.2.10", port: int = 443) -> Connection:
    return Connection(
        id=cid, client=("10.0.0.2", 50000), server=(ip, port), sni="shop.example.test",
        alpn="h2", tls_version="TLSv1.3", pid=4242, command="python3 app.py",
    )  # fmt: skip


def timings(**kw: float) -> Timings:
    t = Timings(start=T0)
    for k, v in kw.items():
        setattr(t, k, T0 + v)
    return t


def make_flows() -> list[Flow]:
    c = conn()
    get = Flow(
        conn=c,
        timings=timings(dns=0.010, connect=0.030, tls=0.060, request_sent=0.061,
                        first_byte=0.100, done=0.120),
        request=Request(
            "GET", "https", "shop.example.test", "/search?q=caf%C3%A9&page=2&empty=",
            "HTTP/1.1",
            headers=[("Host", "shop.example.test"), ("Cookie", "sid=abc; theme=dark"),
                     ("Accept-Encoding", "gzip")],
        ),
        response=Response(
            200, "OK", "HTTP/1.1",
            headers=[("Content-Type", "text/html; charset=utf-8"), ("Content-Encoding", "gzip"),
                     ("Set-Cookie", "sid=xyz; Path=/; HttpOnly; Secure; SameSite=Lax; "
                                    "Expires=Wed, 09 Jun 2027 10:18:14 GMT")],
            body=Body.of(gzip.compress("<p>café</p>".encode() * 50)),
        ),
    )  # fmt: skip
    post = Flow(
        conn=c,
        timings=timings(request_sent=0.2, first_byte=0.3, done=0.35),
        request=Request(
            "POST", "https", "shop.example.test", "/api/items", "HTTP/2",
            headers=[("content-type", "application/json")], body=Body.of(b'{"id": 1}'),
            trailers=[("x-req-trailer", "1")],
        ),
        response=Response(
            200, "", "HTTP/2", headers=[("content-type", "image/png")], body=Body.of(PNG),
            trailers=[("grpc-status", "0")],
        ),
    )  # fmt: skip
    form = Flow(
        conn=conn(8, "2001:db8::1", 80),
        timings=timings(done=0.05),
        request=Request(
            "POST", "http", "[2001:db8::1]", "/login", "HTTP/1.1",
            headers=[("Content-Type", "application/x-www-form-urlencoded")],
            body=Body.of(b"user=ann&pw=s%26cret"),
        ),
        response=Response(302, "Found", "HTTP/1.1", headers=[("Location", "/home")]),
    )  # fmt: skip
    binary_upload = Flow(
        conn=c,
        timings=timings(done=0.01),
        request=Request("PUT", "https", "shop.example.test", "/blob", "HTTP/2",
                        headers=[("content-type", "application/octet-stream")],
                        body=Body.of(b"\x00\xff\x10binary")),
        response=Response(204, "", "HTTP/2"),
    )  # fmt: skip
    ws = Flow(
        conn=conn(9, "192.0.2.11", 80),
        kind=FlowKind.WEBSOCKET,
        timings=timings(first_byte=0.01, done=5.0),
        request=Request("GET", "http", "chat.example.test", "/ws", "HTTP/1.1",
                        headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")]),
        response=Response(101, "Switching Protocols", "HTTP/1.1",
                          headers=[("Upgrade", "websocket")]),
        websocket_messages=[
            WebSocketMessage(True, 1, "héllo".encode(), T0 + 1),
            WebSocketMessage(False, 2, b"\x00\x01\x02", T0 + 2),
            WebSocketMessage(True, 8, b"\x03\xe8bye", T0 + 3),
        ],
    )  # fmt: skip
    failed = Flow(
        conn=c,
        timings=timings(done=0.5),
        request=Request("GET", "https", "shop.example.test", "/slow", "HTTP/2"),
        error="stream reset: CANCEL",
    )
    raw = Flow(conn=conn(10), kind=FlowKind.TCP, bytes_sent=10, bytes_received=20)
    flows = [get, post, form, binary_upload, ws, failed, raw]
    for f in flows:
        f.state = FlowState.ERROR if f.error else FlowState.DONE
    return flows


def test_har_validates_against_schema(tmp_path: Path) -> None:
    path = tmp_path / "out.har"
    assert write_har(path, make_flows()) == 6  # the raw TCP flow is skipped
    doc = json.loads(path.read_text())
    jsonschema.Draft7Validator(SCHEMA).validate(doc)
    entries = doc["log"]["entries"]
    get, post, form, upload, ws, failed = entries
    assert get["startedDateTime"].startswith("2023-11-14T22:13:20.000")
    assert get["timings"] == {"blocked": -1, "dns": 10.0, "connect": 50.0, "ssl": 30.0,
                              "send": 1.0, "wait": 39.0, "receive": 20.0}  # fmt: skip
    assert get["time"] == pytest.approx(120.0)
    assert get["serverIPAddress"] == "192.0.2.10" and get["connection"] == "7"
    req = get["request"]
    assert req["url"] == "https://shop.example.test/search?q=caf%C3%A9&page=2&empty="
    assert req["queryString"] == [{"name": "q", "value": "café"}, {"name": "page", "value": "2"},
                                  {"name": "empty", "value": ""}]  # fmt: skip
    assert req["cookies"] == [{"name": "sid", "value": "abc"}, {"name": "theme", "value": "dark"}]
    assert req["headersSize"] > 0 and req["bodySize"] == 0 and "postData" not in req
    resp = get["response"]
    assert resp["content"]["text"] == "<p>café</p>" * 50
    assert resp["content"]["size"] == len("<p>café</p>".encode() * 50)
    assert resp["content"]["compression"] == resp["content"]["size"] - resp["bodySize"]
    cookie = resp["cookies"][0]
    assert cookie["name"] == "sid" and cookie["httpOnly"] and cookie["secure"]
    assert cookie["path"] == "/" and cookie["expires"].startswith("2027-06-09T10:18:14")
    assert post["request"]["httpVersion"] == "HTTP/2" and post["response"]["headersSize"] == -1
    assert post["request"]["postData"]["text"] == '{"id": 1}'
    assert post["response"]["content"]["encoding"] == "base64"
    assert base64.b64decode(post["response"]["content"]["text"]) == PNG
    assert form["request"]["postData"]["params"] == [{"name": "user", "value": "ann"},
                                                     {"name": "pw", "value": "s&cret"}]  # fmt: skip
    assert form["response"]["redirectURL"] == "/home"
    assert form["serverIPAddress"] == "2001:db8::1"
    assert ws["_webSocketMessages"][0] == {
        "type": "send",
        "time": T0 + 1,
        "opcode": 1,
        "data": "héllo",
    }
    assert ws["_webSocketMessages"][1]["type"] == "receive"
    assert ws["request"]["url"] == "ws://chat.example.test/ws"  # as browsers export WebSockets
    assert failed["_error"] == "stream reset: CANCEL" and failed["response"]["status"] == 0
    assert "_error" not in get


def test_round_trip(tmp_path: Path) -> None:
    flows = make_flows()[:-1]
    flows[0].conn.inbound = True  # (to a published port)
    path = tmp_path / "rt.har"
    write_har(path, flows)
    loaded = list(load_har(path))
    assert len(loaded) == len(flows)
    for orig, back in zip(flows, loaded, strict=True):
        assert back.request.method == orig.request.method
        assert back.request.url == orig.request.url
        assert back.request.http_version == orig.request.http_version
        assert back.request.headers == orig.request.headers
        assert back.request.trailers == orig.request.trailers
        assert back.request.body.read() == orig.request.body.read()
        assert back.kind is orig.kind
        assert back.error == orig.error and back.state is orig.state
        assert back.conn.server == orig.conn.server
        assert back.conn.pid == orig.conn.pid and back.conn.sni == orig.conn.sni
        assert back.conn.inbound == orig.conn.inbound
        assert back.timings.start == pytest.approx(orig.timings.start, abs=0.001)
        if orig.timings.done:
            assert back.timings.done == pytest.approx(orig.timings.done, abs=0.001)
        if orig.response is None:
            assert back.response is None
            continue
        assert back.response.status == orig.response.status
        assert back.response.headers == orig.response.headers
        assert back.response.trailers == orig.response.trailers
        coding = dict((k.lower(), v) for k, v in orig.response.headers).get("content-encoding")
        assert decode_body(back.response.body.read(), coding) == decode_body(
            orig.response.body.read(), coding
        )
        assert [(m.from_client, m.opcode, m.content) for m in back.websocket_messages] == [
            (m.from_client, m.opcode, m.content) for m in orig.websocket_messages
        ]
    get, post = loaded[0], loaded[1]
    assert get.timings.dns == pytest.approx(T0 + 0.010, abs=1e-3)
    assert get.timings.tls == pytest.approx(T0 + 0.060, abs=1e-3)
    assert get.conn is post.conn  # same HAR connection, same Connection object


def test_write_is_streamed() -> None:
    out = io.StringIO()
    flows = make_flows()[:3]

    def lazily():
        for i, flow in enumerate(flows):
            if i:  # the previous entry is already written when the next flow is asked for
                assert flows[i - 1].request.path in out.getvalue()
            yield flow

    assert write_har(out, lazily()) == 3
    json.loads(out.getvalue())


def test_empty_har(tmp_path: Path) -> None:
    path = tmp_path / "empty.har"
    assert write_har(path, []) == 0
    jsonschema.validate(json.loads(path.read_text()), SCHEMA)
    assert list(load_har(path)) == []


def test_truncated_har_raises(tmp_path: Path) -> None:
    path = tmp_path / "cut.har"
    write_har(path, make_flows())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(HarError, match="truncated"):
        list(load_har(path))
    with pytest.raises(HarError, match="cannot read"):
        load_har(tmp_path / "missing.har")
    path.write_text('{"log": {"entries": "nope"}}')
    with pytest.raises(HarError, match="log.entries"):
        load_har(path)
    path.write_text('{"log": {"version": "1.2", "entries": [{"request": {"method": "GET"}}]}}')
    with pytest.raises(HarError, match="entry 0"):
        list(load_har(path))


def test_load_browser_style_har(tmp_path: Path) -> None:
    """A Chrome-style entry: lower-case versions, decoded brotli text, WebSocket messages."""
    entry = {
        "startedDateTime": "2024-03-01T12:00:00.123Z",
        "time": 42.5,
        "request": {
            "method": "GET", "url": "https://cdn.example.test/app.js", "httpVersion": "h2",
            "headers": [{"name": ":authority", "value": "cdn.example.test"}],
            "queryString": [], "cookies": [], "headersSize": -1, "bodySize": 0,
        },
        "response": {
            "status": 200, "statusText": "", "httpVersion": "h2",
            "headers": [{"name": "content-encoding", "value": "br"},
                        {"name": "content-type", "value": "text/javascript"}],
            "cookies": [], "content": {"size": 11, "mimeType": "text/javascript",
                                       "text": "console.log"},
            "redirectURL": "", "headersSize": -1, "bodySize": 9,
        },
        "cache": {},
        "timings": {"blocked": 1.5, "dns": -1, "ssl": -1, "connect": -1, "send": 0.2,
                    "wait": 30, "receive": 10.8},
        "serverIPAddress": "[2001:db8::5]",
        "_webSocketMessages": [{"type": "receive", "time": 1709294400.5, "opcode": 1,
                                "data": "hi"}],
    }  # fmt: skip
    path = tmp_path / "chrome.har"
    path.write_text(json.dumps({"log": {"version": "1.2", "creator": {"name": "WebInspector",
                                "version": "537.36"}, "entries": [entry]}}))  # fmt: skip
    (flow,) = load_har(path)
    assert flow.request.http_version == "HTTP/2" and flow.response.http_version == "HTTP/2"
    assert flow.request.url == "https://cdn.example.test/app.js"
    assert brotli.decompress(flow.response.body.read()) == b"console.log"
    assert flow.conn.server == ("2001:db8::5", 443)
    assert flow.kind is FlowKind.WEBSOCKET and flow.websocket_messages[0].content == b"hi"
    assert flow.duration == pytest.approx(0.0425)


def test_har_entry_requires_request() -> None:
    with pytest.raises(ValueError):
        har_entry(Flow(conn=conn()))


def test_json_lines_writer() -> None:
    out = io.StringIO()
    bus = FlowBus()
    bus.subscribe(JsonLinesWriter(out))
    flows = make_flows()
    bus.new(flows[0])
    bus.update(flows[0])
    assert out.getvalue() == ""
    bus.done(flows[0])
    bus.done(flows[5])
    bus.done(flows[6])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 3
    assert (
        lines[0]["url"].startswith("https://shop.example.test/search") and lines[0]["status"] == 200
    )
    assert lines[0]["duration_ms"] == pytest.approx(120.0)
    assert lines[0]["server"] == "192.0.2.10:443" and lines[0]["sni"] == "shop.example.test"
    assert lines[0]["pid"] == 4242 and lines[0]["command"] == "python3 app.py"
    assert lines[1]["error"] == "stream reset: CANCEL" and lines[1]["status"] is None
    assert lines[2]["kind"] == "tcp" and lines[2]["request_size"] == 10
    assert flow_to_json(flows[2])["server"] == "[2001:db8::1]:80"
