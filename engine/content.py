"""Content-Encoding: undo (and redo) gzip, deflate, br and zstd, and pick text for search."""

from __future__ import annotations

import zlib

import brotli
import zstandard

from engine.flow import Body, Headers, header


class ContentDecodeError(ValueError):
    """The body is not valid data for its Content-Encoding (or the encoding is unknown)."""


#: Bytes of decoded text `text_for_search` returns at most.
SEARCH_LIMIT = 4 * 1024 * 1024

_TEXT_TYPES = (
    "json",
    "xml",
    "javascript",
    "ecmascript",
    "x-www-form-urlencoded",
    "graphql",
    "yaml",
    "csv",
    "html",
    "css",
    "svg",
    "x-ndjson",
    "sql",
    "toml",
)


def encodings(content_encoding: str | None) -> list[str]:
    """The codings of a Content-Encoding value, in the order they were applied."""
    if not content_encoding:
        return []
    return [c.strip().lower() for c in content_encoding.split(",") if c.strip()]


def _inflate(data: bytes, wbits: int, limit: int | None, partial: bool) -> bytes:
    """zlib-family decompression; gzip may hold several members back to back."""
    out = bytearray()
    while data:
        d = zlib.decompressobj(wbits)
        try:
            out += d.decompress(data, 0 if limit is None else max(1, limit - len(out) + 1))
        except zlib.error as exc:
            raise ContentDecodeError(str(exc)) from exc
        if limit is not None and len(out) > limit:
            raise ContentDecodeError(f"decoded body larger than {limit} bytes")
        if not d.eof:
            if d.unconsumed_tail and limit is not None:
                raise ContentDecodeError(f"decoded body larger than {limit} bytes")
            if partial:
                break
            raise ContentDecodeError("compressed data ends early")
        data = d.unused_data
        if wbits != 31:
            break  # only gzip has members
    return bytes(out)


def _deflate(data: bytes, limit: int | None, partial: bool) -> bytes:
    # "deflate" means zlib-wrapped, but many servers send raw deflate.
    try:
        return _inflate(data, 15, limit, partial)
    except ContentDecodeError:
        return _inflate(data, -15, limit, partial)


def _brotli(data: bytes, limit: int | None, partial: bool) -> bytes:
    d = brotli.Decompressor()
    try:
        out = d.process(data)
    except brotli.error as exc:
        raise ContentDecodeError(f"brotli: {exc}") from exc
    if not partial and not d.is_finished():
        raise ContentDecodeError("brotli data ends early")
    if limit is not None and len(out) > limit:
        raise ContentDecodeError(f"decoded body larger than {limit} bytes")
    return out


def _zstd(data: bytes, limit: int | None, partial: bool) -> bytes:
    out = bytearray()
    dctx = zstandard.ZstdDecompressor()
    while data:
        d = dctx.decompressobj()
        try:
            out += d.decompress(data)
        except zstandard.ZstdError as exc:
            raise ContentDecodeError(f"zstd: {exc}") from exc
        if limit is not None and len(out) > limit:
            raise ContentDecodeError(f"decoded body larger than {limit} bytes")
        if not d.eof:
            if partial:
                break
            raise ContentDecodeError("zstd data ends early")
        data = d.unused_data
    return bytes(out)


_DECODERS = {
    "gzip": lambda d, lim, p: _inflate(d, 31, lim, p),
    "x-gzip": lambda d, lim, p: _inflate(d, 31, lim, p),
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}


def decode_body(
    raw: bytes,
    content_encoding: str | None,
    *,
    max_size: int | None = None,
    partial: bool = False,
) -> bytes:
    """Undo `content_encoding` (stacked codings in reverse order).

    `max_size` bounds each decoding step (a guard against decompression bombs); `partial`
    accepts data that stops early (a body truncated by the capture cap) and returns what
    decodes. Raises ContentDecodeError.
    """
    data = bytes(raw)
    for coding in reversed(encodings(content_encoding)):
        if coding == "identity":
            continue
        decoder = _DECODERS.get(coding)
        if decoder is None:
            raise ContentDecodeError(f"unknown content encoding {coding!r}")
        data = decoder(data, max_size, partial)
    return data


def encode_body(data: bytes, content_encoding: str | None) -> bytes:
    """Apply `content_encoding` to decoded bytes (used to rebuild raw bodies from HAR text)."""
    for coding in encodings(content_encoding):
        if coding in ("gzip", "x-gzip"):
            c = zlib.compressobj(6, zlib.DEFLATED, 31)
            data = c.compress(data) + c.flush()
        elif coding == "deflate":
            data = zlib.compress(data)
        elif coding == "br":
            data = brotli.compress(data)
        elif coding == "zstd":
            data = zstandard.ZstdCompressor().compress(data)
        elif coding != "identity":
            raise ContentDecodeError(f"unknown content encoding {coding!r}")
    return data


def media_type(headers: Headers) -> str:
    """The lower-case media type of Content-Type without parameters, or ""."""
    value = header(headers, "content-type") or ""
    return value.split(";", 1)[0].strip().lower()


def charset(headers: Headers) -> str | None:
    value = header(headers, "content-type") or ""
    for param in value.split(";")[1:]:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset":
            return val.strip().strip('"') or None
    return None


def is_text_type(mime: str) -> bool:
    if mime.startswith("text/"):
        return True
    return any(t in mime for t in _TEXT_TYPES)


def looks_like_text(data: bytes) -> bool:
    """Heuristic for bodies without a useful Content-Type: UTF-8 and no NUL bytes."""
    sample = data[:4096]
    if b"\x00" in sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the sample is fine.
        return exc.start >= len(sample) - 3
    return True


def decode_text(data: bytes, headers: Headers) -> str:
    enc = charset(headers) or "utf-8"
    try:
        return data.decode(enc, errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


def text_for_search(body: Body, headers: Headers, limit: int = SEARCH_LIMIT) -> str | None:
    """Decoded text of a text-like body (at most `limit` bytes), or None for binary/undecodable."""
    if body.kept == 0:
        return None
    mime = media_type(headers)
    coding = header(headers, "content-encoding")
    raw = body.read(limit)  # compressed prefixes decode fine with partial=True
    try:
        data = decode_body(raw, coding, max_size=limit * 8, partial=True)
    except ContentDecodeError:
        return None
    data = data[:limit]
    if mime and not is_text_type(mime):
        return None
    if not mime and not looks_like_text(data):
        return None
    return decode_text(data, headers)
