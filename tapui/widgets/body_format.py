"""Turn message bodies into highlighted lines: pretty-printed by type (protobuf and gRPC decoded
without their .proto), hex dumps for other binary.

Only one page (PAGE_SIZE characters or bytes) is highlighted at a time, so a large body costs
the same to show as a small one.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl
from xml.dom import minidom

from rich.style import Style
from rich.syntax import Syntax
from rich.text import Span, Text

from engine import protobuf_text
from engine.content import ContentDecodeError, decode_body
from engine.flow import Body, Headers, header

PAGE_SIZE = 64 * 1024
#: Bodies up to this size are re-indented (JSON, XML); larger ones are shown as sent.
PRETTY_LIMIT = 2 * 1024 * 1024
#: Raw bytes read from a body for display.
READ_LIMIT = 32 * 1024 * 1024
THEME = "ansi_dark"

_BINARY_TYPES = ("image/", "audio/", "video/", "font/", "application/octet-stream",
                 "application/zip", "application/gzip", "application/pdf", "application/wasm",
                 "application/x-protobuf", "application/grpc", "application/protobuf")


#: C0 controls (but tab and newline), DEL and C1 controls shown as visible symbols, never sent raw
#: to the terminal.
_CONTROLS = {c: 0x2400 + c for c in range(32) if c not in (9, 10)}
_CONTROLS.update({0x7F: 0x2421, **{c: 0xFFFD for c in range(0x80, 0xA0)}})


def printable(text: str) -> str:
    return text.translate(_CONTROLS)


@dataclass
class Decoded:
    data: bytes
    note: str | None = None  # e.g. "decoded from gzip" or why decoding failed


def decode(body: Body, headers: Headers) -> Decoded:
    """The body's bytes with Content-Encoding undone (raw bytes and a note when that fails)."""
    raw = body.read(READ_LIMIT)
    notes = []
    if body.truncated or body.size > len(raw):
        notes.append(f"showing {len(raw):,} of {body.size:,} bytes")
    encoding = header(headers, "content-encoding")
    if encoding and encoding.strip().lower() != "identity" and raw:
        try:
            decoded = decode_body(raw, encoding, max_size=READ_LIMIT * 4,
                                  partial=body.truncated or body.size > len(raw))
            notes.append(f"decoded from {encoding} ({len(raw):,} bytes)")
            raw = decoded
        except ContentDecodeError as exc:
            notes.append(f"could not decode {encoding}: {exc}")
    return Decoded(raw, "; ".join(notes) or None)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_binary(data: bytes, content_type: str | None) -> bool:
    mtype = media_type(content_type)
    if mtype.startswith(_BINARY_TYPES) and not mtype.startswith("image/svg"):
        return True
    sample = data[:8192]
    if b"\x00" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the sample's end is still text.
        return exc.start < len(sample) - 3
    return False


def _kind(mtype: str, text: str) -> str:
    if "json" in mtype:
        return "json"
    if mtype == "application/x-www-form-urlencoded":
        return "form"
    if mtype.startswith("multipart/"):
        return "multipart"
    if "html" in mtype:
        return "html"
    if "xml" in mtype or mtype.endswith("+xml"):
        return "xml"
    if "javascript" in mtype or "ecmascript" in mtype:
        return "javascript"
    if mtype == "text/css":
        return "css"
    if mtype == "text/event-stream":
        return "sse"
    stripped = text.lstrip()[:1]
    if not mtype or mtype == "text/plain":
        if stripped in ("{", "["):
            return "json"
        if stripped == "<":
            return "html" if "<html" in text[:1024].lower() else "xml"
    return "text"


def _pretty(kind: str, text: str, content_type: str | None) -> str:
    if len(text) > PRETTY_LIMIT:
        return text
    try:
        if kind == "json":
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        if kind == "xml":
            pretty = minidom.parseString(text.encode("utf-8")).toprettyxml(indent="  ")
            return "\n".join(line for line in pretty.splitlines() if line.strip())
        if kind == "form":
            pairs = parse_qsl(text, keep_blank_values=True)
            return "\n".join(f"{k}: {v}" for k, v in pairs) if pairs else text
    except Exception:  # malformed bodies are shown as sent
        return text
    return text


#: Server-sent events ("event: x", "data: {...}" lines) read as YAML: field names stand out and
#: JSON data highlights as a flow mapping.
_LEXERS = {"json": "json", "xml": "xml", "html": "html", "javascript": "javascript",
           "css": "css", "form": "yaml", "protobuf": "yaml", "sse": "yaml"}


def _no_background(style: str | Style) -> str | Style:
    if isinstance(style, Style) and style.bgcolor is not None:
        return Style(color=style.color, bold=style.bold, italic=style.italic,
                     underline=style.underline)
    return style


def highlight(text: str, kind: str) -> list[Text]:
    lexer = _LEXERS.get(kind)
    if lexer is None:
        lines = [Text(line) for line in text.split("\n")]
    else:
        syntax = Syntax("", lexer, theme=THEME, tab_size=4)
        highlighted = syntax.highlight(text)
        # Keep the widget's background: drop the theme's background colours.
        highlighted.style = ""
        highlighted.spans = [Span(s.start, s.end, _no_background(s.style))
                             for s in highlighted.spans]
        lines = highlighted.split("\n", allow_blank=True)
    if lines and not lines[-1].plain and len(lines) > 1:
        lines.pop()
    return lines


def hexdump(data: bytes, offset: int = 0) -> list[Text]:
    """Classic 16-bytes-a-line hex dump; `offset` is where `data` starts in the body."""
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        hexpart = " ".join(f"{b:02x}" for b in chunk[:8])
        if len(chunk) > 8:
            hexpart += "  " + " ".join(f"{b:02x}" for b in chunk[8:])
        ascii_part = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        line = Text()
        line.append(f"{offset + i:08x}  ", style="dim")
        line.append(f"{hexpart:<49}", style="cyan")
        line.append(f" │{ascii_part}│", style="default")
        lines.append(line)
    return lines


def _split_pages(text: str, size: int) -> list[str]:
    """Cut text into pages of about `size` characters, at line ends when possible."""
    pages = []
    start = 0
    while start < len(text):
        end = start + size
        if end >= len(text):
            pages.append(text[start:])
            break
        newline = text.rfind("\n", start, end)
        if newline > start:
            end = newline + 1
        pages.append(text[start:end])
        start = end
    return pages or [""]


def _multipart(data: bytes, content_type: str | None) -> str | None:
    match = re.search(r'boundary="?([^";]+)"?', content_type or "", re.IGNORECASE)
    if match is None:
        return None
    boundary = b"--" + match.group(1).encode("latin-1", "replace")
    out = []
    for part in data.split(boundary)[1:]:
        if part.startswith(b"--"):
            break
        part = part.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, _, content = part.partition(b"\r\n\r\n")
        out.append("── part " + "─" * 30)
        out.extend(head.decode("utf-8", "replace").splitlines())
        out.append("")
        try:
            text = content.decode("utf-8")
            binary = "\x00" in text
        except UnicodeDecodeError:
            binary = True
        if binary:
            out.append(f"<{len(content):,} bytes of binary data>")
        else:
            out.extend(text.splitlines())
    return "\n".join(out) if out else None


@dataclass
class Page:
    lines: list[Text]
    page: int
    pages: int
    kind: str  # "json", "hex", "text", ...


#: How a body can be shown: as its type suggests, as the text it is (no pretty-printing, no
#: protobuf decoding), or as a hex dump.
VIEWS = ("auto", "text", "hex")


def format_body(data: bytes, content_type: str | None, page: int = 0,
                page_size: int = PAGE_SIZE, view: str = "auto") -> Page:
    """Lines for page `page` of a decoded body, shown in `view` (one of VIEWS)."""
    if not data:
        return Page([Text("(no body)", style="dim")], 0, 1, "empty")
    readable = body_text(data, content_type, view)
    if readable is None:
        pages = max(1, math.ceil(len(data) / page_size))
        page = min(max(page, 0), pages - 1)
        start = page * page_size
        return Page(hexdump(data[start : start + page_size], start), page, pages, "hex")
    return _text_page(*readable, page, page_size)


@functools.lru_cache(maxsize=2)  # (the open flow's request and response: paged, searched)
def body_text(data: bytes, content_type: str | None,
              view: str = "auto") -> tuple[str, str] | None:
    """A body as the text its pages show, and the kind of text it is; None for a body shown
    as a hex dump (binary, or `view` "hex")."""
    if view == "hex":
        return None
    if view == "text":
        return printable(data.decode("utf-8", "replace").replace("\r\n", "\n")), "text"
    mtype = media_type(content_type)
    if protobuf_text.handles(mtype):
        decoded = protobuf_text.body_text(data, mtype)
        if decoded is not None:
            return printable(decoded), "protobuf"
    if is_binary(data, content_type):
        return None
    text = data.decode("utf-8", "replace").replace("\r\n", "\n")
    kind = _kind(mtype, text)
    if kind == "multipart":
        text = _multipart(data, content_type) or text
    else:
        text = _pretty(kind, text, content_type)
    return printable(text), kind


def first_page_with(data: bytes, content_type: str | None, patterns: Sequence[re.Pattern[str]],
                    page_size: int = PAGE_SIZE, view: str = "auto") -> int:
    """The first page of a body where one of `patterns` finds something (0 if none does)."""
    readable = body_text(data, content_type, view) if data else None
    if readable is None:
        return 0
    for number, chunk in enumerate(_split_pages(readable[0], page_size)):
        if any(pattern.search(chunk) for pattern in patterns):
            return number
    return 0


def _text_page(text: str, kind: str, page: int, page_size: int) -> Page:
    chunks = _split_pages(text, page_size)
    page = min(max(page, 0), len(chunks) - 1)
    # Re-indented documents highlight cleanly; a page cut from a large one still mostly does.
    return Page(highlight(chunks[page], kind), page, len(chunks), kind)
