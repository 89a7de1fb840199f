"""The userspace network stack on the TUN fd: TCP to handlers, DNS answered, other UDP relayed.

Packets are read in batches when the fd is readable; each connection gets at most one pure ACK
per batch (data we send carries the ACK anyway).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

from engine import packets
from engine.addresses import GATEWAY_V4, GATEWAY_V6, AddressPlan
from engine.dns import DnsResolver, record_answer
from engine.dns_tcp import DnsOverTcp
from engine.flow import Connection, Flow, FlowBus, FlowKind, next_connection_id
from engine.packets import ACK, RST, SYN
from engine.procinfo import ProcessFinder
from engine.tcp import TcpConnection

log = logging.getLogger(__name__)

READ_SIZE = 65536 + 1024
BATCH = 128
UDP_IDLE = 60.0
DNS_PORT = 53
QUIC_PORT = 443
QUIC_REFUSED = ("QUIC (HTTP/3) refused, so that the client falls back to HTTPS over TCP "
                "(--allow-quic relays it)")

ConnKey = tuple[bytes, int, bytes, int]
NewConnection = Callable[[TcpConnection], None]


class UdpFlow(asyncio.DatagramProtocol):
    """One app-side UDP flow relayed through a host socket (source NAT), until idle."""

    def __init__(self, stack: Netstack, key: ConnKey) -> None:
        self.stack = stack
        self.key = key
        self.transport: asyncio.DatagramTransport | None = None
        self.last = time.monotonic()
        self.pending: list[bytes] = []
        src, sport, dst, dport = key
        self.flow = udp_flow(stack, src, sport, dst, dport, FlowKind.UDP)
        if stack.processes is not None:
            stack.processes.lookup(self.flow.conn)
        if stack.bus is not None:
            stack.bus.new(self.flow)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        for data in self.pending:
            self.transport.sendto(data)
        self.pending.clear()

    def send(self, data: bytes) -> None:
        self.last = time.monotonic()
        self.flow.bytes_sent += len(data)
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.last = time.monotonic()
        self.flow.bytes_received += len(data)
        src, sport, dst, dport = self.key
        self.stack.write(packets.udp_datagram(dst, src, dport, sport, data))

    def error_received(self, exc: Exception) -> None:
        pass

    def close(self, error: str | None = None) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.stack.bus is not None and not self.flow.finished:
            self.stack.bus.done(self.flow, error=error)


def udp_flow(stack: Netstack, src: bytes, sport: int, dst: bytes, dport: int,
             kind: FlowKind, transport: str = "udp") -> Flow:
    """A flow for a UDP exchange (relayed datagrams, or a DNS query tapui answered; over TCP,
    with transport "tcp")."""
    server = packets.ip_str(dst)
    named = stack.dns.name_for(server)
    conn = Connection(
        id=next_connection_id(), client=(packets.ip_str(src), sport), server=(server, dport),
        upstream=(stack.plan.upstream_address(server), dport),
        hostname=named[0] if named else stack.plan.name_of(server), transport=transport,
    )
    return Flow(conn=conn, kind=kind)


class Netstack:
    def __init__(
        self,
        fd: int,
        loop: asyncio.AbstractEventLoop,
        plan: AddressPlan,
        on_connection: NewConnection,
        bus: FlowBus | None = None,
        processes: ProcessFinder | None = None,
        refused_udp_ports: frozenset[int] = frozenset(),
    ) -> None:
        self.fd = fd
        self.bus = bus
        self.processes = processes  # who sent a datagram (looked up while its socket is open)
        self.loop = loop
        self.plan = plan
        self.on_connection = on_connection
        self.dns = DnsResolver(plan, loop)
        self.connections: dict[ConnKey, TcpConnection] = {}
        self.udp: dict[ConnKey, UdpFlow] = {}
        #: UDP ports answered with "port unreachable" (QUIC: its clients fall back to TCP),
        #: and when each refused flow was last seen (it is shown once while it lasts).
        self.refused_udp_ports = refused_udp_ports
        self.refused_udp: dict[ConnKey, float] = {}
        self._acks: set[TcpConnection] = set()
        self._deliveries: list[TcpConnection] = []
        self._reaper: asyncio.TimerHandle | None = None
        self.closed = False
        self.stats = {"packets": 0, "dropped": 0}

    def start(self) -> None:
        self.loop.add_reader(self.fd, self._readable)
        self._reaper = self.loop.call_later(UDP_IDLE / 4, self._reap_udp)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.fd)
        except (ValueError, OSError):
            pass
        if self._reaper is not None:
            self._reaper.cancel()
        for flow in list(self.udp.values()):
            flow.close()
        self.udp.clear()
        for conn in list(self.connections.values()):
            conn.abort()

    # ---- the TcpConnection's view of us ------------------------------------------------

    def forget(self, conn: TcpConnection) -> None:
        self.connections.pop((conn.src, conn.sport, conn.dst, conn.dport), None)
        self._acks.discard(conn)

    def want_ack(self, conn: TcpConnection) -> None:
        self._acks.add(conn)

    def want_delivery(self, conn: TcpConnection) -> None:
        self._deliveries.append(conn)

    def write(self, packet: bytes) -> None:
        try:
            os.write(self.fd, packet)
        except OSError:
            pass

    def icmp_unreachable(self, conn: TcpConnection, code: int) -> None:
        """Tell the app its SYN could not be delivered (host/network unreachable)."""
        self._unreachable(conn.src, conn.dst, conn.syn_packet or b"", code)

    def _unreachable(self, src: bytes, dst: bytes, original: bytes | memoryview, code: int) -> None:
        """An ICMP "destination unreachable" (ICMPv4 `code`, or its ICMPv6 peer) to `src`, about
        its packet `original` to `dst`."""
        if len(src) == 4:
            self.write(packets.icmp_packet(dst, src, 3, code, b"\0\0\0\0" + bytes(original[:28])))
        else:
            code6 = {0: 0, 1: 3, 3: 4, 13: 1}.get(code, 3)
            self.write(packets.icmp_packet(dst, src, 1, code6, b"\0\0\0\0" + bytes(original[:1232])))

    # ---- reading -----------------------------------------------------------------------

    def _readable(self) -> None:
        fd = self.fd
        for _ in range(BATCH):
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            if not data:
                self.close()
                return
            self.stats["packets"] += 1
            try:
                self._packet(memoryview(data)[packets.VNET_HDR_LEN :])
            except Exception:  # one bad packet must never stop the stack
                self.stats["dropped"] += 1
                log.exception("dropping a packet that broke the stack")
        if self._deliveries:  # before the ACKs, so their windows count what was handed on
            deliveries, self._deliveries = self._deliveries, []
            for conn in deliveries:
                conn.deliver()
        if self._acks:
            acks, self._acks = self._acks, set()
            for conn in acks:
                conn.ack_batch()

    def _packet(self, buf: memoryview) -> None:
        pkt = packets.parse(buf)
        if pkt is None:
            self.stats["dropped"] += 1
            return
        if pkt.proto == packets.PROTO_TCP:
            self._tcp(pkt, buf)
        elif pkt.proto == packets.PROTO_UDP:
            self._udp(pkt, buf)
        elif pkt.proto in (packets.PROTO_ICMP, packets.PROTO_ICMPV6):
            self._icmp(pkt)

    def _tcp(self, pkt: packets.Packet, buf: memoryview) -> None:
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        conn = self.connections.get(key)
        if conn is not None:
            conn.segment(pkt)
            return
        flags = pkt.flags
        if flags & RST:
            return
        if flags & SYN and not flags & ACK:
            if pkt.dport == 0 or pkt.sport == 0:
                return
            mss, wscale, sack_ok = packets.parse_tcp_options(pkt.options)
            conn = TcpConnection(
                self, pkt.src, pkt.sport, pkt.dst, pkt.dport, pkt.seq, mss, wscale, pkt.window,
                sack_ok,
            )
            conn.syn_packet = bytes(buf[: 40 + len(pkt.options) + 20])
            self.connections[key] = conn
            if pkt.dport == DNS_PORT:  # answered here, as DNS over UDP is
                DnsOverTcp(conn, self.dns, self.bus, lambda: self._dns_flow(key, "tcp"))
            else:
                self.on_connection(conn)
            return
        self._reset_unknown(pkt)

    def _reset_unknown(self, pkt: packets.Packet) -> None:
        """RFC 793's answer to a segment of no connection."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "RST to unknown segment %s:%d -> %s:%d flags %#x",
                packets.ip_str(pkt.src), pkt.sport, packets.ip_str(pkt.dst), pkt.dport, pkt.flags,
            )
        addr_sum = packets.address_sum(pkt.dst, pkt.src)
        if pkt.flags & ACK:
            seq, ack, flags = pkt.ack, 0, RST
        else:
            seq = 0
            ack = (pkt.seq + len(pkt.payload) + (1 if pkt.flags & (SYN | packets.FIN) else 0))
            ack &= 0xFFFFFFFF
            flags = RST | ACK
        self.write(
            packets.tcp_segment(pkt.dst, pkt.src, pkt.dport, pkt.sport, seq, ack, flags, 0, addr_sum, 0)
        )

    def _udp(self, pkt: packets.Packet, buf: memoryview) -> None:
        if pkt.dport == DNS_PORT:
            self.loop.create_task(self._dns(pkt.src, pkt.sport, pkt.dst, bytes(pkt.payload)))
            return
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        if pkt.dport in self.refused_udp_ports:
            self._refuse_udp(key, pkt, buf)
            return
        flow = self.udp.get(key)
        if flow is None:
            flow = UdpFlow(self, key)
            self.udp[key] = flow
            target = self.plan.upstream_address(packets.ip_str(pkt.dst))
            family = socket.AF_INET6 if ":" in target else socket.AF_INET
            self.loop.create_task(self._open_udp(flow, target, pkt.dport, family))
        flow.send(bytes(pkt.payload))

    def _refuse_udp(self, key: ConnKey, pkt: packets.Packet, buf: memoryview) -> None:
        """Port unreachable, as a host with nothing on that port answers: a connected socket
        gets ECONNREFUSED at once, and QUIC clients fall back to TCP. One flow per client
        socket says so."""
        if key not in self.refused_udp:
            flow = udp_flow(self, *key, FlowKind.UDP)
            flow.bytes_sent = len(pkt.payload)
            if self.processes is not None:  # (before the refusal: the app may close at once)
                self.processes.lookup(flow.conn)
            if self.bus is not None:
                self.bus.new(flow)
                self.bus.done(flow, error=QUIC_REFUSED)
        self.refused_udp[key] = time.monotonic()
        self._unreachable(pkt.src, pkt.dst, buf, 3)

    async def _open_udp(self, flow: UdpFlow, host: str, port: int, family: int) -> None:
        try:
            await self.loop.create_datagram_endpoint(
                lambda: flow, remote_addr=(host, port), family=family
            )
        except OSError as exc:
            self.udp.pop(flow.key, None)
            flow.close(exc.strerror or str(exc))

    def _dns_flow(self, key: ConnKey, transport: str) -> Flow:
        """The flow of a DNS query tapui answers, with the process that asked."""
        flow = udp_flow(self, *key, FlowKind.DNS, transport)
        if self.processes is not None:
            self.processes.lookup(flow.conn)
        return flow

    async def _dns(self, src: bytes, sport: int, dst: bytes, query: bytes) -> None:
        flow = self._dns_flow((src, sport, dst, DNS_PORT), "udp")
        answer = await self.dns.answer(query)
        if answer is not None and not self.closed:
            self.write(packets.udp_datagram(dst, src, DNS_PORT, sport, answer))
        record_answer(self.bus, flow, query, answer)

    def _reap_udp(self) -> None:
        now = time.monotonic()
        for key, last in list(self.refused_udp.items()):
            if now - last > UDP_IDLE:
                del self.refused_udp[key]
        for key, flow in list(self.udp.items()):
            if now - flow.last > UDP_IDLE:
                flow.close()
                del self.udp[key]
        self._reaper = self.loop.call_later(UDP_IDLE / 4, self._reap_udp)

    def _icmp(self, pkt: packets.Packet) -> None:
        """Echo requests to the gateway (the host alias) are answered; other ICMP is dropped."""
        dst = packets.ip_str(pkt.dst)
        if pkt.version == 4 and pkt.icmp_type == 8 and dst == GATEWAY_V4:
            self.write(packets.icmp_packet(pkt.dst, pkt.src, 0, 0, bytes(pkt.payload)))
        elif pkt.version == 6 and pkt.icmp_type == 128 and dst == GATEWAY_V6:
            self.write(packets.icmp_packet(pkt.dst, pkt.src, 129, 0, bytes(pkt.payload)))
