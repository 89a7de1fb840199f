"""DNS over TCP, answered by tapui as it answers DNS over UDP.

Resolvers fall back to TCP when an answer came truncated, and some always use it (glibc's
`options use-vc`, `dig +tcp`). Each message is prefixed with its length (RFC 1035 4.2.2), and
one connection may carry many, answered in order. Like a DNS query over UDP, a connection to
port 53 of any address is answered here and dials nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from engine.dns import DnsResolver, record_answer
from engine.flow import Flow, FlowBus
from engine.tcp import TcpConnection


class DnsOverTcp:
    """The handler of one app connection to port 53: each query it sends is answered with
    the sandbox's DNS and recorded as a DNS flow (made by `new_flow`)."""

    def __init__(
        self,
        conn: TcpConnection,
        resolver: DnsResolver,
        bus: FlowBus | None,
        new_flow: Callable[[], Flow],
    ) -> None:
        self.conn = conn
        self.resolver = resolver
        self.bus = bus
        self.new_flow = new_flow
        self.buffer = bytearray()
        self.queries: deque[bytes] = deque()
        self.answering: asyncio.Task[None] | None = None
        self.app_eof = False
        self.closed = False
        conn.accept(self)

    def data_received(self, parts: list[memoryview]) -> None:
        for part in parts:
            self.buffer += part
        while len(self.buffer) >= 2:
            size = int.from_bytes(self.buffer[:2], "big")
            if len(self.buffer) < 2 + size:
                break
            self.queries.append(bytes(self.buffer[2 : 2 + size]))
            del self.buffer[: 2 + size]
        if self.queries and self.answering is None:
            self.answering = self.conn.stack.loop.create_task(self._answer_all())

    async def _answer_all(self) -> None:
        while self.queries and not self.closed:
            query = self.queries.popleft()
            flow = self.new_flow()
            answer = await self.resolver.answer(query)
            if answer is not None and not self.closed:
                self.conn.write(len(answer).to_bytes(2, "big") + answer)
            record_answer(self.bus, flow, query, answer)
        self.answering = None
        if self.app_eof:
            self.conn.write_eof()

    def eof_received(self) -> None:
        self.app_eof = True
        if self.answering is None:
            self.conn.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def pause_writing(self) -> None:
        pass  # answers are small; a resolver reads them

    def resume_writing(self) -> None:
        pass

    def upstream_buffered(self) -> int:
        return 0
