"""gRPC's own status: an RPC that failed still has HTTP status 200; what it ended with is in the
`grpc-status` trailer (or header, for a trailers-only answer) of an `application/grpc*`
response. engine.sqlfilter asks the same of a session file (keep the two in step).

gRPC-Web sends its trailers as the last frame of the body (browsers cannot read HTTP
trailers): `web_trailers` reads them from there, and the flow keeps them as its trailers.
"""

from __future__ import annotations

import base64
import re
import struct
from urllib.parse import unquote

from engine.flow import Headers, Response, header

WEB_TRAILERS = 0x80  # gRPC-Web: the frame holds the trailers, as HTTP/1 header lines
COMPRESSED = 0x01
#: gRPC-Web for browsers that cannot send binary: the same frames, in base64.
GRPC_TEXT_TYPES = ("application/grpc-web-text", "application/grpc-web-text+proto")
#: gRPC-Web bodies longer than this are not read for their trailers when the flow ends (on
#: the relay's thread); their RPC's status stays unknown.
WEB_TRAILERS_READ = 1024 * 1024

CODES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}


def grpc_status(response: Response | None) -> tuple[int, str, str] | None:
    """(code, its name, the message) of a gRPC response, or None if it carries no status."""
    if response is None or not is_grpc(response):
        return None
    value, headers = header(response.trailers, "grpc-status"), response.trailers
    if value is None:
        value, headers = header(response.headers, "grpc-status"), response.headers
    if value is None or not value.strip().isdigit():
        return None
    code = int(value)
    message = unquote(header(headers, "grpc-message") or "")  # percent-encoded on the wire
    return code, CODES.get(code, f"code {code}"), message


def is_grpc(response: Response) -> bool:
    return (header(response.headers, "content-type") or "").lower().startswith("application/grpc")


def failure(response: Response | None) -> str | None:
    """"NOT_FOUND: no such user" for an RPC that failed; None if it succeeded or is not one."""
    status = grpc_status(response)
    if status is None or status[0] == 0:
        return None
    _, name, message = status
    return f"{name}: {message}" if message else name


def frames(data: bytes) -> tuple[list[tuple[int, bytes]], int] | None:
    """(flags, message) for each length-prefixed frame, and how many bytes a cut-off last
    frame lacks (0 when whole); None if the bytes are not gRPC framing."""
    found: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 5:
            return None
        flags, length = struct.unpack_from(">BI", data, offset)
        if flags & ~(WEB_TRAILERS | COMPRESSED):
            return None
        message = data[offset + 5 : offset + 5 + length]
        found.append((flags, message))
        offset += 5 + length
        if len(message) < length:
            return found, length - len(message)
    return found, 0


def from_base64(data: bytes) -> bytes | None:
    """The frames of a grpc-web-text body (each message may be base64 on its own, padding
    and all); None if it is not base64."""
    try:
        return b"".join(base64.b64decode(part + b"=" * (-len(part) % 4), validate=True)
                        for part in re.findall(rb"[A-Za-z0-9+/]+=*", data))
    except ValueError:
        return None


def web_trailers(response: Response) -> Headers:
    """The trailers at the end of a whole gRPC-Web response's body; [] if it has none."""
    media = (header(response.headers, "content-type") or "").split(";")[0].strip().lower()
    body = response.body
    if (not media.startswith("application/grpc-web") or not body.size or body.truncated
            or body.size > WEB_TRAILERS_READ):
        return []
    data: bytes | None = body.read()
    if media in GRPC_TEXT_TYPES:
        data = from_base64(data)  # type: ignore[arg-type]
    parsed = frames(data) if data else None
    if parsed is None or parsed[1]:
        return []
    blocks = [message for flags, message in parsed[0] if flags & WEB_TRAILERS]
    if not blocks:
        return []
    trailers = []
    for line in blocks[-1].decode("latin-1").splitlines():
        name, colon, value = line.partition(":")
        if colon and name.strip():
            trailers.append((name.strip().lower(), value.strip()))
    return trailers
