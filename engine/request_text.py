"""A request as text to edit (HTTP/1 style, whatever its version) and back, for "edit and
replay":

    POST /submit?x=1 HTTP/1.1
    Host: api.test:8080
    Content-Type: application/x-www-form-urlencoded

    name=ada

The Host line carries the authority (HTTP/2's :authority too). Headers the sender computes
(Content-Length, Transfer-Encoding, Connection, ...) are left out and computed again. A body
with a Content-Encoding is shown decoded and encoded again when read back.
"""

from __future__ import annotations

from engine.content import ContentDecodeError, decode_body, encode_body
from engine.curl import sendable_headers
from engine.flow import Body, Request, header


class RequestTextError(ValueError):
    """The request cannot be edited as text, or the edited text is not a request."""


def _body_text(request: Request) -> str:
    if request.body.truncated:
        raise RequestTextError("its body was kept only in part")
    raw = request.body.read() if request.body.kept else b""
    coding = header(request.headers, "content-encoding")
    try:
        data = decode_body(raw, coding) if coding else raw
        return data.decode("utf-8")
    except (ContentDecodeError, UnicodeDecodeError):
        raise RequestTextError("its body is not text") from None


def request_to_text(request: Request) -> str:
    """The request as editable text. Raises RequestTextError for bodies that are not text."""
    body = _body_text(request)
    version = "HTTP/2" if request.http_version.upper().startswith("HTTP/2") else "HTTP/1.1"
    lines = [f"{request.method} {request.path} {version}", f"Host: {request.authority}"]
    lines += [f"{name}: {value}" for name, value in sendable_headers(request)
              if name.lower() != "host"]  # (the line above carries the authority)
    return "\n".join(lines) + "\n\n" + body


def text_to_request(text: str, original: Request) -> Request:
    """The request the edited `text` describes (scheme from `original`). A final newline the
    editor added to a body that had none is dropped."""
    head, separator, body = text.replace("\r\n", "\n").partition("\n\n")
    if not separator:
        head, body = head.rstrip("\n"), ""
    lines = head.split("\n")
    parts = lines[0].split()
    if len(parts) not in (2, 3):
        raise RequestTextError(f"the first line is not METHOD TARGET [VERSION]: {lines[0]!r}")
    method, path = parts[0], parts[1]
    version = parts[2].upper() if len(parts) == 3 else original.http_version
    if version not in ("HTTP/1.0", "HTTP/1.1", "HTTP/2"):
        raise RequestTextError(f"unknown HTTP version {parts[2]!r} (HTTP/1.1 or HTTP/2)")
    headers: list[tuple[str, str]] = []
    authority = original.authority
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or name != name.strip():
            raise RequestTextError(f"not a header line (Name: value): {line!r}")
        value = value.strip()
        if name.lower() == "host":
            authority = value
            if version == "HTTP/2":
                continue  # (sent as :authority)
        headers.append((name, value))
    original_body = _body_text(original)
    if body.endswith("\n") and not original_body.endswith("\n"):
        body = body[:-1]
    data = body.encode("utf-8")
    coding = header(headers, "content-encoding")
    if coding:
        try:
            data = encode_body(data, coding)
        except ContentDecodeError as exc:
            raise RequestTextError(str(exc)) from None
    return Request(method, original.scheme, authority, path, version, headers, Body.of(data))
