"""The contract between the relay and the protocol decoders.

The relay moves bytes between the app and the upstream unchanged; a `StreamObserver` gets a
copy of each chunk (plaintext, after TLS is taken off) and turns it into flows on a FlowBus.
An observer must never raise into the relay: a decoding error marks the flow instead.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol

from engine.flow import Connection, Flow, FlowBus, FlowKind, FlowState, Timings


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
    #: The far end of a proxy's tunnel speaks next: an HTTP proxy granted a CONNECT, or a
    #: SOCKS proxy did. The relay then tells apart what follows as on a new connection.
    tunnel: bool

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

    def answers_pending(self) -> bool:
        """Some exchange still waits for (the rest of) the server's answer."""


class RawObserver:
    """One TCP (or UDP) flow per connection that counts the bytes each way."""

    tunnel = False

    def answers_pending(self) -> bool:
        return False  # (no exchanges: a raw stream ends when either side ends it)

    def __init__(
        self, conn: Connection, bus: FlowBus, timings: Timings | None = None, interval: float = 0.5
    ) -> None:
        kind = FlowKind.UDP if conn.transport == "udp" else FlowKind.TCP
        self.flow = Flow(conn=conn, kind=kind)
        if timings is not None:
            self.flow.timings = dataclasses.replace(timings)
        self.bus = bus
        self._interval = interval
        self._last = time.monotonic()
        bus.new(self.flow)

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self.bus.update(self.flow)

    def client_data(self, data: bytes) -> None:
        self.flow.bytes_sent += len(data)
        self._progress()

    def server_data(self, data: bytes) -> None:
        if self.flow.timings.first_byte is None:
            self.flow.timings.first_byte = time.time()
        self.flow.bytes_received += len(data)
        self._progress()

    def client_eof(self) -> None:
        pass

    def server_eof(self) -> None:
        pass

    def close(self, error: str | None = None) -> None:
        if not self.flow.finished:
            if self.flow.state is FlowState.OPEN:
                self.flow.state = FlowState.RESPONSE
            self.bus.done(self.flow, error=error)
