"""The host-side socket of a relayed connection, as a lean asyncio-style transport.

asyncio's socket transport costs about 40 µs more per new connection here: a weak registry
entry, a getsockname call, and two trips round the event loop (connection_made, then the
reader) before the first byte can be read. Upstream sockets are made and closed once per
connection the app opens, so the relay uses this instead. It offers what the relay needs of a
transport (`write`, `write_eof`, `close`, `abort`, `is_closing`, `pause_reading`,
`resume_reading`, `get_write_buffer_size`) and calls its protocol like asyncio does
(`data_received`, `eof_received`, `connection_lost` on a later loop turn, `pause_writing` and
`resume_writing` at the water marks).

Their reads are watched by one `ReadPoller`, an epoll set of its own that the event loop
watches as a single reader.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_EVENTS = 256  # per loop turn; the rest (level-triggered) come on the next
_GONE = asyncio.Protocol()  # the protocol of a transport whose connection is lost: no-ops


class ReadPoller:
    """The reads of many sockets as one reader of the event loop.

    Watching a new socket with the loop's add_reader, and forgetting it with remove_reader,
    took ~45 µs per relayed connection here (a Handle, a selector key, a KeyError raised for
    every new fd, cache-cold); epoll's own register and unregister take a few µs. Ready
    sockets are served in one loop turn, for the cost of one more epoll_wait.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:  # (close() forgets every fd)
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def _ready(self) -> None:
        callbacks = self._callbacks
        for fd, _ in self._epoll.poll(0, MAX_EVENTS):
            callback = callbacks.get(fd)  # (None: removed by an earlier callback)
            if callback is not None:
                try:
                    callback()
                except Exception:  # noqa: BLE001 - one socket must not starve the others
                    log.exception("reading an upstream socket failed")

    def close(self) -> None:
        if self._epoll.closed:
            return
        self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._callbacks.clear()


class UpstreamTransport:
    def __init__(
        self,
        readers: ReadPoller,
        sock: socket.socket,
        protocol: asyncio.Protocol,
        read_size: int,
        high_water: int,
        low_water: int,
    ) -> None:
        self._readers = readers
        self._loop = readers.loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._read_size = read_size
        self._high = high_water
        self._low = low_water
        self._buffer = bytearray()  # bytes the socket has not taken yet
        self._writing_paused = False  # the protocol was told to pause writing
        self._reading = True
        self._at_eof = False  # the peer has sent its FIN
        self._eof_wanted = False  # shut the write side once the buffer drains
        self._eof_sent = False
        self._reset_is_end = False  # see _shutdown_write
        self._closing = False
        self._lost = False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        readers.add(self._fd, self._read_ready)

    # ---- reading ------------------------------------------------------------------------

    def _read_ready(self) -> None:
        try:
            data = self._sock.recv(self._read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if not self._reset_is_end:
                self._force_close(exc)
                return
            data = b""
        try:
            if data:
                self._protocol.data_received(data)
                return
            self._reading = False  # the peer's FIN: nothing more to read
            self._at_eof = True
            self._readers.remove(self._fd)
            self._protocol.eof_received()  # the write side stays open (half-close)
        except Exception as exc:  # as asyncio does: a failing protocol ends the connection
            log.exception("the relay failed on the upstream's bytes")
            self._force_close(exc)

    def pause_reading(self) -> None:
        if self._reading and not self._closing:
            self._reading = False
            self._readers.remove(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing and not self._at_eof:
            self._reading = True
            self._readers.add(self._fd, self._read_ready)

    # ---- writing ------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self.writelines([data])

    def writelines(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """Write `parts` in order, with one system call (sendmsg) when nothing is buffered."""
        if self._eof_wanted or self._closing:
            return
        if self._buffer:
            for part in parts:
                self._buffer += part
        else:
            sent = self._send(parts)
            if sent is None:
                return
            for part in parts:
                if sent >= len(part):
                    sent -= len(part)
                    continue
                self._buffer += memoryview(part)[sent:]
                sent = 0
            if not self._buffer:
                return
            self._loop.add_writer(self._fd, self._write_ready)
        if not self._writing_paused and len(self._buffer) > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _send(self, parts: list[bytes | bytearray | memoryview]) -> int | None:
        """Bytes the socket took (0 when full); None when it failed (and is closing)."""
        try:
            return self._sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._force_close(exc)
            return None

    def _write_ready(self) -> None:
        sent = self._send([self._buffer])
        if sent is None:
            return
        del self._buffer[:sent]
        if self._writing_paused and len(self._buffer) <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()
        if self._buffer:
            return
        self._loop.remove_writer(self._fd)
        if self._closing:
            self._schedule_lost(None)
        elif self._eof_wanted:
            self._shutdown_write()

    def write_eof(self) -> None:
        if self._eof_wanted or self._closing:
            return
        self._eof_wanted = True
        if not self._buffer:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                self._force_close(exc)
                return
            # Reset before our FIN: the peer had closed, and our last bytes (an app's
            # close_notify, say) met its closed socket, whose kernel answered with RST. What
            # it sent before is still to be read; then the reset reads as its end.
            self._reset_is_end = True

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    # ---- closing ------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; the socket closes once what is buffered has been sent."""
        if self._closing:
            return
        self._closing = True
        if self._reading:
            self._reading = False
            self._readers.remove(self._fd)
        if not self._buffer:
            self._schedule_lost(None)

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: Exception | None) -> None:
        if self._lost:
            return
        if self._buffer:
            self._buffer.clear()
            self._loop.remove_writer(self._fd)
        if self._reading:
            self._reading = False
            self._readers.remove(self._fd)
        self._closing = True
        self._schedule_lost(exc)

    def _schedule_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._loop.call_soon(self._connection_lost, exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()
            # The relay holds this transport and its protocol holds the relay: let go, so
            # reference counting frees the connection's objects now, not a later collection.
            self._protocol = _GONE
