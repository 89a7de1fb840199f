"""gRPC's own status: an RPC that failed still has HTTP status 200; what it ended with is in the
`grpc-status` trailer (or header, for a trailers-only answer) of an `application/grpc*`
response. engine.sqlfilter asks the same of a session file (keep the two in step)."""

from __future__ import annotations

from urllib.parse import unquote

from engine.flow import Response, header

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
