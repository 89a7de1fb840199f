"""Render a flow's request as a curl command line that reproduces it when pasted into bash."""

from __future__ import annotations

import shlex

from engine.flow import Flow, Request

#: Headers curl computes itself; sending them again would duplicate or contradict them.
COMPUTED_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
         "http2-settings", "te", "proxy-connection"}


def sendable_headers(request: Request) -> list[tuple[str, str]]:
    """The request's headers that a sender passes on as they are: not HTTP/2's pseudo-headers,
    nor those it computes itself (framing, hop-by-hop: COMPUTED_HEADERS). Shared by the curl
    command, replay and edit-and-replay."""
    return [(name, value) for name, value in request.headers
            if not name.startswith(":") and name.lower() not in COMPUTED_HEADERS]


class CurlError(ValueError):
    """The flow has no request to reproduce."""


def _is_text(data: bytes) -> bool:
    """Bodies that can be passed literally as one shell word."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if text.startswith("@"):  # --data-binary @... would read a file
        return False
    return all(ch.isprintable() or ch in "\t\n\r" for ch in text)


def printf_quote(data: bytes) -> str:
    """A single-quoted printf format that outputs exactly `data` (NUL and high bytes too)."""
    out = []
    for byte in data:
        ch = chr(byte)
        if 0x20 <= byte < 0x7F and ch not in "\\%'":
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return "'" + "".join(out) + "'"


def _version_flag(request: Request) -> str | None:
    version = request.http_version.upper()
    if version.startswith("HTTP/2"):
        return "--http2" if request.scheme == "https" else "--http2-prior-knowledge"
    if version == "HTTP/1.0":
        return "--http1.0"
    if version == "HTTP/1.1":
        return "--http1.1"
    if version.startswith("HTTP/3"):
        return "--http3"
    return None


def to_curl(flow: Flow) -> str:
    """A bash command line (possibly `printf ... | curl ...`) that resends the flow's request."""
    request = flow.request
    if request is None:
        raise CurlError("this flow has no HTTP request")
    args: list[str] = ["curl"]
    body = request.body.read() if request.body.size else b""
    method = request.method.upper()
    if method == "HEAD" and not body:
        args.append("--head")
    elif method != ("POST" if body else "GET"):
        args += ["-X", request.method]
    flag = _version_flag(request)
    if flag:
        args.append(flag)

    names = {name.lower() for name, _ in request.headers}
    if "accept-encoding" in names:
        args.append("--compressed")
    for name, value in sendable_headers(request):
        lname = name.lower()
        if lname == "accept-encoding":
            continue
        if lname == "host" and value.lower() == request.authority.lower():
            continue
        # "Name;" is curl's way to send a header with an empty value.
        args += ["-H", f"{name}: {value}" if value else f"{name};"]
    if request.http_version.upper().startswith("HTTP/1"):
        # curl adds these by default; an empty value stops it when the client did not send them.
        for default in ("User-Agent", "Accept"):
            if default.lower() not in names:
                args += ["-H", f"{default}:"]
    if body and "content-type" not in names:
        # --data-binary implies this type; a client that sent none should not get one.
        args += ["-H", "Content-Type:"]

    url = request.url
    if any(ch in url for ch in "[]{}"):
        args.append("--globoff")
    if "/./" in url or "/../" in url or url.endswith(("/.", "/..")):
        args.append("--path-as-is")

    prefix = ""
    if request.body.truncated:
        prefix = (f"# tapui: the request body was cut at {request.body.kept} of "
                  f"{request.body.size} bytes\n")
    if body and _is_text(body):
        args += ["--data-binary", body.decode("utf-8")]
    elif body:
        args += ["--data-binary", "@-"]
        prefix += f"printf {printf_quote(body)} | "
    args.append(url)
    return prefix + " ".join(shlex.quote(arg) for arg in args)
