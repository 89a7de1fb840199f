"""The contract between the relay and the protocol decoders.

The relay moves bytes between the app and the upstream unchanged; a `StreamObserver` gets a
copy of each chunk (plaintext, after TLS is taken off) and turns it into flows on a FlowBus.
An observer must never raise into the relay: a decoding error marks the flow instead.
"""

from __future__ import annotations

from typing import Protocol

from engine.flow import Flow


def unfinished_reason(flow: Flow, error: str | None, server_closed: bool) -> str:
    """Why `flow` ended without its whole response. A server that closed first is the
    reason, whatever came after: the app's answer to that close (OpenSSL's alert on a TLS
    connection cut without close_notify, say) or the errors of a socket already gone."""
    if server_closed:
        if flow.response is None:
            return "the server closed the connection before responding"
        return "the server closed the connection before the response was complete"
    return error or "connection closed before the response was complete"


class StreamObserver(Protocol):
    def client_data(self, data: bytes) -> None:
        """Bytes the app sent toward the server."""

    def server_data(self, data: bytes) -> None:
        """Bytes the server sent toward the app."""

    def client_eof(self) -> None:
        """The app half-closed its side (FIN)."""

    def server_eof(self) -> None:
        """The server half-closed its side."""

    def close(self, error: str | None = None) -> None:
        """The connection ended; `error` says why when it did not end cleanly."""
