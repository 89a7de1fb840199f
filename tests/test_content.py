"""Content-Encoding decoding and search text."""

from __future__ import annotations

import gzip
import zlib

import brotli
import pytest
import zstandard

from engine.content import ContentDecodeError, decode_body, encode_body, text_for_search
from engine.flow import Body

TEXT = ("tapui decodes bodies. " * 500).encode()


def deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("coding", "raw"),
    [
        ("gzip", gzip.compress(TEXT)),
        ("x-gzip", gzip.compress(TEXT)),
        ("GZIP", gzip.compress(TEXT)),
        ("deflate", zlib.compress(TEXT)),
        ("deflate", deflate_raw(TEXT)),
        ("br", brotli.compress(TEXT)),
        ("zstd", zstandard.ZstdCompressor().compress(TEXT)),
        ("identity", TEXT),
        (None, TEXT),
        ("", TEXT),
        ("gzip, br", brotli.compress(gzip.compress(TEXT))),
        ("br,zstd", zstandard.ZstdCompressor().compress(brotli.compress(TEXT))),
        ("deflate, identity, gzip", gzip.compress(zlib.compress(TEXT))),
    ],
)
def test_decode(coding: str | None, raw: bytes) -> None:
    assert decode_body(raw, coding) == TEXT


def test_multi_member_gzip_and_streamed_zstd() -> None:
    assert decode_body(gzip.compress(b"one ") + gzip.compress(b"two"), "gzip") == b"one two"
    cctx = zstandard.ZstdCompressor()
    stream = cctx.compressobj()  # frame without a content size in its header
    raw = stream.compress(TEXT) + stream.flush()
    assert decode_body(raw, "zstd") == TEXT


@pytest.mark.parametrize(
    ("coding", "raw"),
    [
        ("gzip", b"not gzip at all"),
        ("gzip", gzip.compress(TEXT)[:-20]),
        ("br", b"\xff\xfe garbage"),
        ("zstd", b"nope"),
        ("deflate", b"\x00\x01\x02garbage"),
        ("compress", b"anything"),
        ("gzip, br", gzip.compress(TEXT)),  # the outer coding is wrong
    ],
)
def test_decode_errors(coding: str, raw: bytes) -> None:
    with pytest.raises(ContentDecodeError):
        decode_body(raw, coding)


def test_partial_and_size_limit() -> None:
    raw = gzip.compress(TEXT)
    part = decode_body(raw[: len(raw) // 2], "gzip", partial=True)
    assert TEXT.startswith(part) and part
    with pytest.raises(ContentDecodeError):
        decode_body(gzip.compress(b"\x00" * 1_000_000), "gzip", max_size=1000)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd", "gzip, br", None])
def test_encode_round_trip(coding: str | None) -> None:
    assert decode_body(encode_body(TEXT, coding), coding) == TEXT


def test_text_for_search() -> None:
    json_headers = [("Content-Type", "application/json; charset=utf-8"), ("Content-Encoding", "br")]
    assert (
        text_for_search(Body.of(brotli.compress(b'{"k": "v\xc3\xa9"}')), json_headers)
        == '{"k": "vé"}'
    )
    latin = [("Content-Type", "text/plain; charset=iso-8859-1")]
    assert text_for_search(Body.of(b"caf\xe9"), latin) == "café"
    png = [("Content-Type", "image/png")]
    assert text_for_search(Body.of(b"\x89PNG\r\n\x1a\n"), png) is None
    assert text_for_search(Body.of(b"plain words"), []) == "plain words"
    assert text_for_search(Body.of(b"\x00\x01\x02"), []) is None
    assert text_for_search(Body.of(b"bad"), [("Content-Encoding", "gzip")]) is None
    assert text_for_search(Body(), []) is None
    big = Body.of(b"a" * 100)
    assert text_for_search(big, [("Content-Type", "text/plain")], limit=10) == "a" * 10
    # A body cut by the capture cap still gives the text that decodes.
    capped = Body(cap=200)
    capped.append(gzip.compress(TEXT))
    found = text_for_search(capped, [("Content-Type", "text/html"), ("Content-Encoding", "gzip")])
    assert found and TEXT.decode().startswith(found)
