"""Protobuf and gRPC bodies shown without their .proto (engine/protobuf_text.py), as the body
pane shows them (format_body)."""

from __future__ import annotations

import base64
import gzip
import struct

from engine.protobuf_text import DECODE_BUDGET, body_text
from tapui.widgets.body_format import format_body

#: field 1 varint 150, field 2 "hello", field 3 a message {1: 7, 2: "inner"},
#: field 4 packed varints [1, 2, 3], field 5 fixed64 holding the double 1.5
MESSAGE = (b"\x08\x96\x01" + b"\x12\x05hello" + b"\x1a\x09\x08\x07\x12\x05inner"
           + b"\x22\x03\x01\x02\x03" + b"\x29" + struct.pack("<d", 1.5))
SHOWN = ["1: 150", '2: "hello"', "3:", "  1: 7", '  2: "inner"', "4: !!binary 01 02 03",
         "5: 4609434218613702656  # fixed64, or the double 1.5"]


def frame(message: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(message)) + message


def shown(data: bytes, content_type: str) -> list[str]:
    return [line.plain for line in format_body(data, content_type).lines]


def test_a_protobuf_body_shows_its_fields() -> None:
    assert shown(MESSAGE, "application/x-protobuf") == SHOWN


def test_a_grpc_body_shows_each_message() -> None:
    data = frame(MESSAGE) + frame(b"\x08\x01")
    assert shown(data, "application/grpc+proto") == [
        "# message 1 of 2, 35 bytes", *SHOWN, "# message 2 of 2, 2 bytes", "1: 1"]


def test_a_compressed_grpc_message_is_inflated() -> None:
    data = frame(gzip.compress(b"\x08\x01"), flags=1)
    lines = shown(data, "application/grpc")
    assert lines[0].endswith("compressed (2 bytes inflated)") and lines[1:] == ["1: 1"]


def test_grpc_web_trailers_are_shown_as_headers() -> None:
    data = frame(b"\x08\x01") + frame(b"grpc-status: 0\r\ngrpc-message: ok\r\n", flags=0x80)
    assert shown(data, "application/grpc-web+proto") == [
        "# message 1 of 1, 2 bytes", "1: 1", "# trailers (34 bytes)", "grpc-status: 0",
        "grpc-message: ok"]


def test_grpc_web_text_is_base64_of_the_same_frames() -> None:
    data = base64.b64encode(frame(b"\x08\x01")) + base64.b64encode(frame(b"\x08\x02"))
    assert shown(data, "application/grpc-web-text") == [
        "# message 1 of 2, 2 bytes", "1: 1", "# message 2 of 2, 2 bytes", "1: 2"]


def test_a_message_cut_by_the_body_cap_is_listed_not_decoded() -> None:
    data = frame(MESSAGE)[:20]
    assert body_text(data, "application/grpc") == (
        "# message 1 of 1, 15 bytes (20 more not kept: not decoded)")


def test_what_does_not_decode_as_its_type_says_is_a_hex_dump() -> None:
    for data, ctype in ((b"\xff\xff\xff\xff", "application/x-protobuf"),
                        (b"\x07\0\0\0\x01", "application/grpc")):
        page = format_body(data, ctype)
        assert page.kind == "hex", (data, [line.plain for line in page.lines])


def test_messages_past_the_decoding_budget_are_listed_not_decoded() -> None:
    big = b"\x10\x01" * (DECODE_BUDGET // 2 + 1)
    lines = shown(frame(big) + frame(b"\x08\x01"), "application/grpc")
    assert lines == [
        f"# message 1 of 2, {len(big):,} bytes (not decoded: past the "
        f"{DECODE_BUDGET // 1024} KiB tapui decodes of a body)",
        "# message 2 of 2, 2 bytes", "1: 1"]
    assert format_body(big, "application/x-protobuf").kind == "hex"
