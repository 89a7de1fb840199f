"""Protobuf and gRPC bodies as readable text, without their .proto.

A protobuf message carries field numbers and wire types, not names: blackboxprotobuf decodes it
and guesses which length-delimited fields are strings, bytes or nested messages. gRPC (and
gRPC-Web) bodies are a run of length-prefixed messages; each is shown in turn. The text is
YAML-like, so that it highlights as YAML.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import struct
import zlib
from typing import Any

import blackboxprotobuf
from blackboxprotobuf.lib.exceptions import BlackboxProtobufException

from engine import grpc
from engine.grpc import GRPC_TEXT_TYPES, from_base64

PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf",
                  "application/vnd.google.protobuf", "application/x-google-protobuf")
GRPC_TYPES = ("application/grpc", "application/grpc+proto", "application/grpc-web",
              "application/grpc-web+proto")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: Protobuf bytes decoded per body at most: the decoder guesses its way through nested
#: fields at some 160 KB/s at worst here (0.2 s for 32 KiB), and the body pane waits for it.
#: Messages past this are listed, not decoded (a larger protobuf body is a hex dump).
DECODE_BUDGET = 32 * 1024


def handles(media_type: str) -> bool:
    return media_type in (*PROTOBUF_TYPES, *GRPC_TYPES, *GRPC_TEXT_TYPES)


@functools.lru_cache(maxsize=8)  # (paging through a body formats it again)
def body_text(data: bytes, media_type: str) -> str | None:
    """The body as text, or None when it does not decode as what its type says."""
    if media_type in GRPC_TYPES:
        return grpc_text(data)
    if media_type in GRPC_TEXT_TYPES:
        frames = from_base64(data)
        return grpc_text(frames) if frames is not None else None
    return message_text(data)


def grpc_text(data: bytes) -> str | None:
    parsed = grpc.frames(data)
    if parsed is None or not parsed[0]:
        return None
    frames, missing = parsed
    count = sum(1 for flags, _ in frames if not flags & grpc.WEB_TRAILERS)
    out: list[str] = []
    number = 0
    budget = DECODE_BUDGET
    for index, (flags, message) in enumerate(frames, 1):
        cut = missing if index == len(frames) else 0
        if flags & grpc.WEB_TRAILERS:
            more = f", {cut:,} more not kept" if cut else ""
            out.append(f"# trailers ({len(message):,} bytes{more})")
            out.extend(message.decode("utf-8", "replace").strip().splitlines())
            continue
        number += 1
        head = f"# message {number} of {count}, {len(message):,} bytes"
        if cut:
            out.append(f"{head} ({cut:,} more not kept: not decoded)")
            continue
        if flags & grpc.COMPRESSED:
            inflated = _inflate(message)
            if inflated is None:
                out.append(f"{head}, compressed (grpc-encoding) in a way tapui does not read")
                continue
            head += f", compressed ({len(inflated):,} bytes inflated)"
            message = inflated
        if len(message) > budget:
            out.append(f"{head} (not decoded: past the {DECODE_BUDGET // 1024} KiB tapui "
                       "decodes of a body)")
            continue
        budget -= len(message)
        text = message_text(message)
        out.append(head)
        out.append(text if text is not None else "# (not a protobuf message)")
    return "\n".join(out)


def message_text(data: bytes) -> str | None:
    """One protobuf message as text, or None if it does not parse as one."""
    if not data:
        return "# (empty message: every field has its default)"
    if len(data) > DECODE_BUDGET:
        return None
    try:
        message, typedef = blackboxprotobuf.decode_message(data)
    except (BlackboxProtobufException, ValueError, IndexError, KeyError, TypeError):
        return None
    return "\n".join(_lines(message, typedef, 0))


def _inflate(data: bytes) -> bytes | None:
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        return zlib.decompress(data)  # grpc-encoding: deflate
    except (OSError, zlib.error, EOFError):
        return None


def _lines(message: dict[str, Any], typedef: dict[str, Any], depth: int) -> list[str]:
    indent = "  " * depth
    out: list[str] = []
    order = typedef.get("field_order") or list(message)
    for key in dict.fromkeys(order):  # (a repeated field is listed once per occurrence)
        if key not in message:
            continue
        value, spec = message[key], typedef.get(key, {})
        kind = spec.get("type", "")
        values = value if isinstance(value, list) else [value]
        if kind == "message":
            for item in values:
                out.append(f"{indent}{key}:")
                out.extend(_lines(item, spec.get("message_typedef", {}), depth + 1))
        else:
            scalars = [_scalar(item, kind) for item in values]
            text = scalars[0] if len(scalars) == 1 else "[" + ", ".join(scalars) + "]"
            out.append(f"{indent}{key}: {text}")
    return out


def _scalar(value: Any, kind: str) -> str:
    if isinstance(value, bytes):
        return f"!!binary {value.hex(' ')}"
    if isinstance(value, str):
        if _CONTROL.search(value):  # more likely bytes, or packed numbers, than text
            return f"!!binary {value.encode('utf-8').hex(' ')}"
        return json.dumps(value, ensure_ascii=False)
    if kind == "fixed64" and isinstance(value, int):
        as_double = struct.unpack("<d", struct.pack("<Q", value & (2**64 - 1)))[0]
        return f"{value}  # fixed64, or the double {as_double:g}"
    if kind == "fixed32" and isinstance(value, int):
        as_float = struct.unpack("<f", struct.pack("<I", value & (2**32 - 1)))[0]
        return f"{value}  # fixed32, or the float {as_float:g}"
    return str(value)
