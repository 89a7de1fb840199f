"""HAR 1.2 export (streamed, entry by entry) and import (ours, browsers', mitmproxy's)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from engine.content import (
    ContentDecodeError,
    decode_body,
    encode_body,
    is_text_type,
    looks_like_text,
    media_type,
)
from engine.flow import (
    Body,
    Connection,
    Flow,
    FlowKind,
    FlowState,
    Headers,
    Request,
    Response,
    Timings,
    WebSocketMessage,
    header,
    next_connection_id,
)

HAR_VERSION = "1.2"
_HTTP_KINDS = (FlowKind.HTTP, FlowKind.WEBSOCKET)


class HarError(ValueError):
    """A HAR file that cannot be read (not JSON, truncated, or missing required fields)."""


def _creator_version() -> str:
    try:
        from importlib.metadata import version

        return version("tapui")
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "0.1.0"


# -- writing ----------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def _ms(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b < a:
        return None
    return round((b - a) * 1000, 3)


def har_timings(t: Timings) -> dict[str, float]:
    """HAR phase durations (ms) from the flow's timestamps; -1 where a phase did not happen."""
    prev = t.start
    dns = _ms(prev, t.dns)
    if dns is not None:
        prev = t.dns  # type: ignore[assignment]
    connect = ssl = None
    if t.connect is not None and t.connect >= prev:
        ssl = _ms(t.connect, t.tls)
        end = t.tls if ssl is not None else t.connect
        connect = _ms(prev, end)  # HAR: connect includes ssl
        prev = end  # type: ignore[assignment]
    send = _ms(prev, t.request_sent)
    if send is not None:
        prev = t.request_sent  # type: ignore[assignment]
    wait = _ms(prev, t.first_byte)
    if wait is not None:
        prev = t.first_byte  # type: ignore[assignment]
    receive = _ms(prev, t.done)
    return {
        "blocked": -1,
        "dns": -1 if dns is None else dns,
        "connect": -1 if connect is None else connect,
        "ssl": -1 if ssl is None else ssl,
        "send": send or 0,
        "wait": wait or 0,
        "receive": receive or 0,
    }


def _har_headers(headers: Headers) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in headers]


def _request_cookies(headers: Headers) -> list[dict[str, str]]:
    cookies = []
    for name, value in headers:
        if name.lower() != "cookie":
            continue
        for part in value.split(";"):
            key, sep, val = part.strip().partition("=")
            if sep and key:
                cookies.append({"name": key, "value": val})
    return cookies


def _response_cookies(headers: Headers) -> list[dict[str, Any]]:
    cookies = []
    for name, value in headers:
        if name.lower() != "set-cookie":
            continue
        first, *attrs = value.split(";")
        key, sep, val = first.strip().partition("=")
        if not sep:
            continue
        cookie: dict[str, Any] = {"name": key, "value": val}
        for attr in attrs:
            aname, _, aval = attr.strip().partition("=")
            lname = aname.lower()
            if lname in ("path", "domain"):
                cookie[lname] = aval
            elif lname == "expires":
                try:
                    cookie["expires"] = email.utils.parsedate_to_datetime(aval).isoformat()
                except (TypeError, ValueError):
                    pass
            elif lname == "httponly":
                cookie["httpOnly"] = True
            elif lname == "secure":
                cookie["secure"] = True
            elif lname == "samesite":
                cookie["sameSite"] = aval
        cookies.append(cookie)
    return cookies


def _headers_size(first_line: str, headers: Headers, version: str) -> int:
    if not version.startswith("HTTP/1"):
        return -1
    size = len(first_line.encode("utf-8")) + 2 + 2
    return size + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers)


def _as_text(data: bytes, mime: str) -> tuple[str, bool]:
    """(text, is_base64): text when the bytes are text, base64 otherwise."""
    textual = is_text_type(mime) if mime else True
    if textual and looks_like_text(data):
        try:
            return data.decode("utf-8"), False
        except UnicodeDecodeError:
            pass
    return base64.b64encode(data).decode("ascii"), True


def _post_data(req: Request) -> dict[str, Any] | None:
    if req.body.size == 0:
        return None
    mime = header(req.headers, "content-type") or ""
    raw = req.body.read()
    body, b64 = _as_text(raw, media_type(req.headers))
    post: dict[str, Any] = {"mimeType": mime, "text": body}
    if b64:
        post["_encoding"] = "base64"
    if media_type(req.headers) == "application/x-www-form-urlencoded" and not b64:
        post["params"] = [{"name": k, "value": v} for k, v in parse_qsl(body, True)]
    else:
        post["params"] = []
    return post


def _content(resp: Response) -> dict[str, Any]:
    mime = header(resp.headers, "content-type") or ""
    raw = resp.body.read()
    coding = header(resp.headers, "content-encoding")
    content: dict[str, Any] = {"size": resp.body.size, "mimeType": mime}
    if resp.body.size == 0:
        return content
    try:
        data = decode_body(raw, coding, partial=resp.body.truncated)
    except ContentDecodeError as exc:
        data = raw
        content["_raw"] = True  # text holds the undecoded bytes
        content["comment"] = f"could not undo Content-Encoding: {exc}"
    else:
        if coding and not resp.body.truncated:
            content["size"] = len(data)
            content["compression"] = len(data) - resp.body.size
    body, b64 = _as_text(data, media_type(resp.headers))
    content["text"] = body
    if b64:
        content["encoding"] = "base64"
    if resp.body.truncated:
        content["_truncated"] = True
    return content


def _ws_messages(flow: Flow) -> list[dict[str, Any]]:
    out = []
    for m in flow.websocket_messages:
        if m.opcode == 1:
            data = m.content.decode("utf-8", errors="replace")
        else:
            data = base64.b64encode(m.content).decode("ascii")
        out.append(
            {
                "type": "send" if m.from_client else "receive",
                "time": m.timestamp,
                "opcode": m.opcode,
                "data": data,
            }
        )
    return out


def har_entry(flow: Flow) -> dict[str, Any]:
    """One HAR 1.2 entry for an HTTP or WebSocket flow."""
    req = flow.request
    if req is None:
        raise ValueError(f"flow {flow.id} has no request")
    timings = har_timings(flow.timings)
    total = sum(
        max(0.0, timings[k]) for k in ("blocked", "dns", "connect", "send", "wait", "receive")
    )
    url = req.url
    if flow.kind is FlowKind.WEBSOCKET:  # as browsers export them: ws:// and wss://
        scheme, rest = url.split(":", 1)
        url = {"http": "ws", "https": "wss"}.get(scheme, scheme) + ":" + rest
    request: dict[str, Any] = {
        "method": req.method,
        "url": url,
        "httpVersion": req.http_version,
        "cookies": _request_cookies(req.headers),
        "headers": _har_headers(req.headers),
        "queryString": [{"name": k, "value": v} for k, v in parse_qsl(urlsplit(url).query, True)],
        "headersSize": _headers_size(
            f"{req.method} {req.path} {req.http_version}", req.headers, req.http_version
        ),
        "bodySize": req.body.size,
    }
    post = _post_data(req)
    if post is not None:
        request["postData"] = post
    resp = flow.response
    if resp is None:
        response: dict[str, Any] = {
            "status": 0,
            "statusText": "",
            "httpVersion": req.http_version,
            "cookies": [],
            "headers": [],
            "content": {"size": 0, "mimeType": "x-unknown"},
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": -1,
        }
    else:
        response = {
            "status": resp.status,
            "statusText": resp.reason,
            "httpVersion": resp.http_version,
            "cookies": _response_cookies(resp.headers),
            "headers": _har_headers(resp.headers),
            "content": _content(resp),
            "redirectURL": header(resp.headers, "location") or "",
            "headersSize": _headers_size(
                f"{resp.http_version} {resp.status} {resp.reason}", resp.headers, resp.http_version
            ),
            "bodySize": resp.body.size,
        }
    conn = flow.conn
    entry: dict[str, Any] = {
        "startedDateTime": _iso(flow.timings.start),
        "time": round(total, 3),
        "request": request,
        "response": response,
        "cache": {},
        "timings": timings,
        "serverIPAddress": conn.server[0],
        "connection": str(conn.id),
    }
    if flow.kind is FlowKind.WEBSOCKET or flow.websocket_messages:
        entry["_resourceType"] = "websocket"
        entry["_webSocketMessages"] = _ws_messages(flow)
    if flow.error:
        entry["_error"] = flow.error
    if req.trailers:
        request["_trailers"] = _har_headers(req.trailers)
    if resp is not None and resp.trailers:
        response["_trailers"] = _har_headers(resp.trailers)
    entry["_tapui"] = {
        "flowId": flow.id,
        "client": list(conn.client),
        "serverPort": conn.server[1],
        "hostname": conn.hostname,
        "sni": conn.sni,
        "alpn": conn.alpn,
        "tlsVersion": conn.tls_version,
        "pid": conn.pid,
        "command": conn.command,
        "inbound": conn.inbound,
        "upstream": list(conn.upstream) if conn.upstream else None,  # (where a replay goes)
        "tunnel": list(conn.tunnel) if conn.tunnel else None,
    }
    return entry


def write_har(dest: str | os.PathLike[str] | IO[str], flows: Iterable[Flow]) -> int:
    """Write `flows` (HTTP and WebSocket ones; raw TCP/UDP are skipped) as HAR 1.2.

    Entries are written one at a time, never held together in memory. A path is written
    to a temporary file renamed into place at the end. Returns the number of entries.
    """
    if isinstance(dest, str | os.PathLike):
        path = Path(dest)
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                count = _write_har(f, flows)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return count
    return _write_har(dest, flows)


def _write_har(f: IO[str], flows: Iterable[Flow]) -> int:
    creator = json.dumps({"name": "tapui", "version": _creator_version()})
    f.write(
        f'{{"log": {{"version": "{HAR_VERSION}", "creator": {creator}, "pages": [], "entries": ['
    )
    count = 0
    for flow in flows:
        if flow.kind not in _HTTP_KINDS or flow.request is None:
            continue
        f.write(",\n" if count else "\n")
        f.write(json.dumps(har_entry(flow), ensure_ascii=False))
        count += 1
    f.write("\n]}}\n")
    f.flush()
    return count


# -- reading ----------------------------------------------------------------------------------


def load_har(path: str | os.PathLike[str]) -> Iterator[Flow]:
    """Flows from a HAR file. Raises HarError (at once for an unreadable file, while
    iterating for a malformed entry)."""
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except OSError as exc:
        raise HarError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise HarError(
            f"{path} is not a valid HAR file (truncated or not JSON): {exc.msg} "
            f"at line {exc.lineno}, column {exc.colno}"
        ) from None
    except UnicodeDecodeError:
        raise HarError(f"{path} is not a valid HAR file: not UTF-8 text") from None
    log = doc.get("log") if isinstance(doc, dict) else None
    entries = log.get("entries") if isinstance(log, dict) else None
    if not isinstance(entries, list):
        raise HarError(f"{path} is not a HAR file: no log.entries list")
    return _flows(str(path), entries)


def _flows(path: str, entries: list[Any]) -> Iterator[Flow]:
    conns: dict[str, Connection] = {}
    for i, entry in enumerate(entries):
        try:
            yield _flow_from_entry(entry, conns)
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise HarError(f"{path}: entry {i} is malformed: {what}") from None


def _headers_from(items: Any) -> Headers:
    return [(str(h["name"]), str(h["value"])) for h in items or []]


def _version(value: str | None) -> str:
    v = (value or "").strip().upper()
    if v in ("H2", "HTTP/2", "HTTP/2.0"):
        return "HTTP/2"
    if v in ("H3", "HTTP/3", "HTTP/3.0"):
        return "HTTP/3"
    if v.startswith("HTTP/1"):
        return v
    return v or "HTTP/1.1"


def _connection(entry: dict[str, Any], conns: dict[str, Connection], url_port: int) -> Connection:
    key = str(entry.get("connection") or "")
    if key and key in conns:
        return conns[key]
    extra = entry.get("_tapui") or {}
    server_ip = str(entry.get("serverIPAddress") or "").strip("[]")
    conn = Connection(
        id=int(key) if key.isdigit() else next_connection_id(),
        client=tuple(extra.get("client") or ("", 0)),  # type: ignore[arg-type]
        server=(server_ip, int(extra.get("serverPort") or url_port)),
        hostname=extra.get("hostname"),
        sni=extra.get("sni"),
        alpn=extra.get("alpn"),
        tls_version=extra.get("tlsVersion"),
        pid=extra.get("pid"),
        command=extra.get("command"),
        inbound=bool(extra.get("inbound")),
        upstream=tuple(extra["upstream"]) if extra.get("upstream") else None,  # type: ignore[arg-type]
        tunnel=tuple(extra["tunnel"]) if extra.get("tunnel") else None,  # type: ignore[arg-type]
    )
    if key:
        conns[key] = conn
    return conn


def _timings(entry: dict[str, Any]) -> Timings:
    start = dt.datetime.fromisoformat(entry["startedDateTime"]).timestamp()
    t = Timings(start=start)
    phases = entry.get("timings") or {}

    def phase(name: str) -> float:
        value = phases.get(name, -1)
        return float(value) / 1000 if isinstance(value, int | float) and value >= 0 else -1.0

    cur = start + max(0.0, phase("blocked"))
    if phase("dns") >= 0:
        cur += phase("dns")
        t.dns = cur
    if phase("connect") >= 0:
        ssl = phase("ssl")
        t.connect = cur + phase("connect") - max(0.0, ssl)
        cur += phase("connect")
        if ssl >= 0:
            t.tls = cur
    cur += max(0.0, phase("send"))
    t.request_sent = cur
    cur += max(0.0, phase("wait"))
    t.first_byte = cur
    cur += max(0.0, phase("receive"))
    total = entry.get("time")
    t.done = start + float(total) / 1000 if isinstance(total, int | float) and total >= 0 else cur
    return t


def flow_from_entry(entry: dict[str, Any], conns: dict[str, Connection] | None = None) -> Flow:
    """One flow from a HAR entry (for streaming readers); entries sharing a `connection` id
    share a Connection through `conns`. Raises KeyError, TypeError or ValueError."""
    return _flow_from_entry(entry, {} if conns is None else conns)


def _flow_from_entry(entry: dict[str, Any], conns: dict[str, Connection]) -> Flow:
    req = entry["request"]
    url = urlsplit(req["url"])
    if not url.scheme or not url.netloc:
        raise ValueError(f"request.url is not absolute: {req['url']!r}")
    port = url.port or (443 if url.scheme in ("https", "wss") else 80)
    scheme = {"wss": "https", "ws": "http"}.get(url.scheme, url.scheme)
    flow = Flow(conn=_connection(entry, conns, port), timings=_timings(entry))
    headers = _headers_from(req.get("headers"))
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    request = Request(
        method=str(req["method"]),
        scheme=scheme,
        authority=url.netloc,
        path=path,
        http_version=_version(req.get("httpVersion")),
        headers=headers,
        trailers=_headers_from(req.get("_trailers")),
    )
    post = req.get("postData")
    if post:
        if post.get("text") is not None:
            b64 = "base64" in (post.get("_encoding"), post.get("encoding"))
            data = base64.b64decode(post["text"]) if b64 else str(post["text"]).encode("utf-8")
        else:
            data = urlencode(
                [(p["name"], p.get("value", "")) for p in post.get("params", [])]
            ).encode()
        request.body = Body.of(data)
    flow.request = request
    resp = entry.get("response") or {}
    status = int(resp.get("status") or 0)
    if status:
        rheaders = _headers_from(resp.get("headers"))
        content = resp.get("content") or {}
        data = b""
        if content.get("text") is not None:
            if content.get("encoding") == "base64":
                data = base64.b64decode(content["text"])
            else:
                data = str(content["text"]).encode("utf-8")
            coding = header(rheaders, "content-encoding")
            if coding and not content.get("_raw"):
                try:  # HAR text is decoded; re-encode so the flow's raw body matches its headers
                    data = encode_body(data, coding)
                except ContentDecodeError:
                    pass
        body = Body.of(data)
        full = resp.get("bodySize")
        if content.get("_truncated") and data and isinstance(full, int) and full > len(data):
            body.cap, body.size = len(data), full  # ours: the first bytes of a longer body
        flow.response = Response(
            status=status,
            reason=str(resp.get("statusText") or ""),
            http_version=_version(resp.get("httpVersion") or req.get("httpVersion")),
            headers=rheaders,
            body=body,
            trailers=_headers_from(resp.get("_trailers")),
        )
    messages = entry.get("_webSocketMessages")
    if messages is not None or entry.get("_resourceType") == "websocket":
        flow.kind = FlowKind.WEBSOCKET
        for m in messages or []:
            opcode = int(m.get("opcode", 1))
            raw = str(m.get("data", ""))
            content_bytes = raw.encode("utf-8") if opcode == 1 else base64.b64decode(raw)
            flow.websocket_messages.append(
                WebSocketMessage(
                    m.get("type") == "send", opcode, content_bytes, float(m.get("time", 0))
                )
            )
    error = entry.get("_error")
    flow.error = str(error) if error else None
    flow.state = FlowState.ERROR if flow.error else FlowState.DONE
    return flow
