"""Published ports: a server the command runs in the sandbox, reached from the host.

`--publish 9000:8000` makes tapui listen on the host's loopback (127.0.0.1 and ::1) at port
9000 (`--publish 0.0.0.0:9000:8000`: on the address given); each connection accepted there is
dialled to port 8000 on the sandbox's own loopback by the sandbox's agent
(`engine.sandbox_agent`), which hands tapui the connected socket. The two sockets are then
relayed like any connection the app makes, so the exchanges coming in are decoded and shown
too (TLS is relayed untouched: the host's client does not trust tapui's CA).

`InboundConnection` stands in for the userspace stack's TcpConnection as the relay's app
side; `InboundRelay` dials through the agent instead of the host's network.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import struct
from collections import deque
from collections.abc import Callable

from engine.addresses import Published
from engine.errors import EXIT_USAGE, TapuiError
from engine.flow import Connection
from engine.proxy import READ_SIZE, UPSTREAM_HIGH_WATER, UPSTREAM_LOW_WATER, Proxy, Relay
from engine.upstream import ReadPoller, UpstreamTransport

Answer = Callable[[socket.socket | None, int], None]
SANDBOX_LOOPBACKS = ("127.0.0.1", "::1")


LOOPBACKS = (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6))


def listen(publish: list[Published]) -> list[tuple[socket.socket, int]]:
    """Listening sockets on the host (its loopback unless an address is given), with the
    sandbox port each leads to. Made before the command starts, so that a port in use is said
    at once."""
    made: list[tuple[socket.socket, int]] = []
    try:
        for host_port, sandbox_port, bind in publish:
            addresses = LOOPBACKS if bind is None else (
                (bind, socket.AF_INET6 if ":" in bind else socket.AF_INET),)
            for address, family in addresses:
                sock = None
                try:
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind((address, host_port))
                    sock.listen(128)
                except OSError as exc:
                    if sock is not None:
                        sock.close()
                    if bind is None and family == socket.AF_INET6 and exc.errno in (
                        errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT
                    ):
                        continue  # no IPv6 loopback on this host
                    why = (f"tapui: cannot publish port {sandbox_port}: the host's {address} port "
                           f"{host_port}: {exc.strerror}")
                    if exc.errno == errno.EADDRINUSE:
                        why += (" (choose another host port, e.g. --publish "
                                f"{_spec(bind, _another(host_port), sandbox_port)})")
                    raise TapuiError(why, EXIT_USAGE) from None
                sock.setblocking(False)
                made.append((sock, sandbox_port))
    except BaseException:
        for sock, _port in made:
            sock.close()
        raise
    return made


def _spec(bind: str | None, host_port: int, sandbox_port: int) -> str:
    """The --publish spec for these."""
    if bind is None:
        return f"{host_port}:{sandbox_port}"
    return f"{f'[{bind}]' if ':' in bind else bind}:{host_port}:{sandbox_port}"


def _another(port: int) -> int:
    return port + 1 if port < 65535 else 1024


class AgentLink:
    """Asks the sandbox's agent for sockets connected inside the sandbox. The agent answers
    in order, one request at a time (a connect on a loopback is over at once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self._waiting: deque[Answer] = deque()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._answered)
        self._open = True

    def connect(self, host: str, port: int, answer: Answer) -> None:
        """Call `answer(socket, 0)` with a socket connected to host:port in the sandbox, or
        `answer(None, errno)`."""
        if not self._open:
            answer(None, errno.ECONNABORTED)
            return
        try:
            self.sock.send(json.dumps({"connect": [host, port]}).encode())
        except OSError:  # (EPIPE: the agent is gone)
            self.close()
            answer(None, errno.ECONNABORTED)
            return
        self._waiting.append(answer)

    def _answered(self) -> None:
        try:
            message, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message, fds = b"", []
        if not message:
            self.close()
            return
        answer = self._waiting.popleft()
        if fds:
            conn = socket.socket(fileno=fds[0])
            conn.setblocking(False)
            os.set_inheritable(conn.fileno(), False)
            answer(conn, 0)
        else:
            answer(None, int(json.loads(message).get("errno", errno.EIO)))

    def close(self) -> None:
        """Stop asking (the sandbox closes the socket itself); waiting requests fail."""
        if self._open:
            self._open = False
            self.loop.remove_reader(self.sock.fileno())
        while self._waiting:
            self._waiting.popleft()(None, errno.ECONNABORTED)


class InboundConnection:
    """A connection accepted on the host, as the relay's app side: what a TcpConnection of
    the userspace stack offers the relay, over a host socket."""

    def __init__(self, readers: ReadPoller, sock: socket.socket, client: tuple[str, int],
                 server: tuple[str, int]) -> None:
        self.readers = readers
        self.sock = sock
        self.client = client
        self.server = server
        self.state = "OPEN"
        self.fin_received = False
        self.handler = None
        self.transport: UpstreamTransport | None = None
        self._eof_sent = False
        self._paused = False

    # -- what the relay calls --

    def accept(self, handler) -> None:  # type: ignore[no-untyped-def]
        self.handler = handler
        self.transport = UpstreamTransport(
            self.readers, self.sock, _ClientSide(self), READ_SIZE, UPSTREAM_HIGH_WATER,
            UPSTREAM_LOW_WATER,
        )

    def refuse(self) -> None:
        """Nothing took the connection in the sandbox: reset it, as a refused dial would."""
        self.state = "CLOSED"
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def unreachable(self, _code: int) -> None:
        self.refuse()

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and not self._eof_sent:
            self._eof_sent = True
            self.transport.write_eof()
            self._maybe_done()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        elif self.state != "CLOSED":
            self.refuse()

    def window_update(self) -> None:
        """The sandbox's side took what was buffered for it: read the client again."""
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    # -- what the host socket brings --

    def _data(self, data: bytes) -> None:
        handler = self.handler
        handler.data_received([data])  # type: ignore[union-attr]
        if handler.upstream_buffered() > UPSTREAM_HIGH_WATER and self.transport is not None:  # type: ignore[union-attr]
            self._paused = True  # (the sandbox's side reads slower than the client sends)
            self.transport.pause_reading()

    def _eof(self) -> None:
        self.fin_received = True
        self.handler.eof_received()  # type: ignore[union-attr]
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.fin_received and self._eof_sent and self.transport is not None:
            self.transport.close()  # (once what is buffered has gone)

    def _lost(self, exc: Exception | None) -> None:
        self.state = "CLOSED"
        self.handler.connection_lost(exc)  # type: ignore[union-attr]


class _ClientSide(asyncio.Protocol):
    def __init__(self, conn: InboundConnection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        self.conn._data(data)

    def eof_received(self) -> bool:
        self.conn._eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn._lost(exc)

    def pause_writing(self) -> None:
        self.conn.handler.pause_writing()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.conn.handler.resume_writing()  # type: ignore[union-attr]


class InboundRelay(Relay):
    """A relay whose server is in the sandbox: dialled through the agent, TLS untouched."""

    def __init__(self, proxy: Proxy, conn: InboundConnection, agent: AgentLink) -> None:
        super().__init__(proxy, conn)  # type: ignore[arg-type]
        self.agent = agent
        self.intercept_tls = False
        self.info.inbound = True
        self.sandbox_end: tuple[str, int] | None = None  # the agent's end of the dialled socket

    def connect(self) -> None:
        host, port = self.info.upstream  # type: ignore[misc]
        self.agent.connect(host, port, self._dialled)

    def _dialled(self, sock: socket.socket | None, err: int) -> None:
        if sock is not None:
            self.sandbox_end = sock.getsockname()[:2]
            self._connected(sock)
            return
        host, port = self.info.upstream  # type: ignore[misc]
        if err == errno.ECONNREFUSED and host == SANDBOX_LOOPBACKS[0]:
            self.info.upstream = (SANDBOX_LOOPBACKS[1], port)  # a server on ::1 only
            self.connect()
            return
        if err == errno.ECONNREFUSED:
            why = f"nothing listens on port {port} in the sandbox (127.0.0.1 and ::1 refused)"
        elif err == errno.ECONNABORTED:
            why = f"port {port} in the sandbox: the sandbox's agent is gone (was it killed?)"
        else:
            why = f"port {port} in the sandbox: {os.strerror(err)}"
        self._record_failure(why)
        if self.app.state != "CLOSED":
            self.app.refuse()

    def _prepare_upstream_tls(self) -> None:
        pass  # (nothing is intercepted)

    def stop(self) -> None:
        super().stop()
        self.app.abort()

    def _find_process(self) -> None:
        """The server's process: the one holding the socket the agent's connection reached."""
        if self.proxy.processes is None or self.sandbox_end is None or self.info.pid is not None:
            return
        accepted = Connection(id=0, client=self.info.upstream, server=self.sandbox_end)  # type: ignore[arg-type]
        self.proxy.processes.lookup(accepted)
        self.info.pid, self.info.command = accepted.pid, accepted.command


class Publisher:
    """Accepts on the published ports and relays each connection into the sandbox."""

    def __init__(self, proxy: Proxy, agent: AgentLink,
                 listeners: list[tuple[socket.socket, int]]) -> None:
        self.proxy = proxy
        self.agent = agent
        self.listeners = listeners
        for sock, sandbox_port in listeners:
            proxy.loop.add_reader(sock.fileno(), self._accept, sock, sandbox_port)

    def _accept(self, listener: socket.socket, sandbox_port: int) -> None:
        for _ in range(64):  # (a burst of clients, served in one turn)
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # (EMFILE and the like: the client is refused by the backlog)
            sock.setblocking(False)
            conn = InboundConnection(
                self.proxy.upstream_readers, sock, peer[:2], (SANDBOX_LOOPBACKS[0], sandbox_port)
            )
            relay = InboundRelay(self.proxy, conn, self.agent)
            self.proxy.relays.add(relay)
            relay.connect()

    def close(self) -> None:
        for sock, _port in self.listeners:
            self.proxy.loop.remove_reader(sock.fileno())
            sock.close()
        self.listeners = []
        self.agent.close()
