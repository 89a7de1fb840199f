"""One TCP connection terminated in userspace: the app's side of a relayed connection.

It behaves toward its handler like an asyncio transport (`write`, `write_eof`, `abort`,
`get_write_buffer_size`) and calls the handler like an asyncio protocol (`data_received`,
`eof_received`, `connection_lost`, `pause_writing`, `resume_writing`). The window it advertises
to the app is the room left in the handler's upstream buffer, so a slow upstream pushes back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
from collections.abc import Callable
from typing import Protocol

from engine import packets
from engine.packets import ACK, FIN, PSH, RST, SYN

log = logging.getLogger(__name__)
#: Initial sequence numbers: unpredictable enough for a private TUN link, without a getrandom
#: system call per connection.
_isn = random.Random(os.urandom(16))
MASK = 0xFFFFFFFF
RCV_BUF = 4 * 1024 * 1024  # most we let the app send ahead of the upstream
SND_BUF_HIGH = 4 * 1024 * 1024  # pause the upstream reader above this many unacked bytes
OUR_WSCALE = 7
RTO_MIN = 0.2
RTO_MAX = 10.0
MAX_RETRIES = 12
PERSIST_MIN = 0.2
#: How long the ACK of the app's FIN may wait for our own FIN (or data) to carry it. Like
#: Linux, which enters delayed-ACK mode on a FIN: the upstream usually closes within a
#: fraction of a millisecond, and one segment then does the work of two.
FIN_ACK_DELAY = 0.04
#: How long the ACK of less than two full-sized segments may wait for the reply (or more data)
#: to carry it. As in Linux, which ACKs at least every second full-sized segment: the ACK of a
#: request or message of up to ~128 KiB then usually rides on the upstream's answer, one packet
#: less through the TUN device. (A bulk upload was ACKed about once per 15-30 of its 64 KiB
#: writes before and after: each batch of packets read gets one ACK.) The delay is far below
#: Linux's own (40 ms), so a client that waits for the ACK before sending more (Nagle) loses at
#: most this.
DATA_ACK_DELAY = 0.001
MAX_OUT_OF_ORDER = 256  # segments held beyond a hole


def seq_lt(a: int, b: int) -> bool:
    return ((a - b) & MASK) > 0x7FFFFFFF


def seq_le(a: int, b: int) -> bool:
    return a == b or seq_lt(a, b)


class SendQueue:
    """Bytes waiting for the app's acknowledgement: a list of the chunks as written.

    Segments are cut as memoryviews over the chunks and written with writev, so no byte is
    copied in Python; acknowledged chunks are dropped from the front.
    """

    COALESCE = 16 * 1024

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.first = 0  # index of the first live chunk
        self.offset = 0  # acknowledged bytes of chunks[first]
        self.size = 0

    def append(self, data: bytes) -> None:
        chunks = self.chunks
        if (
            len(data) < self.COALESCE
            and len(chunks) > self.first + 1  # never the chunk in front (offset applies)
            and len(chunks[-1]) < self.COALESCE
        ):
            chunks[-1] = chunks[-1] + data  # many small writes: keep the list short
        else:
            chunks.append(bytes(data))
        self.size += len(data)

    def consume(self, n: int) -> None:
        self.size -= n
        chunks = self.chunks
        while n:
            left = len(chunks[self.first]) - self.offset
            if n < left:
                self.offset += n
                break
            n -= left
            self.first += 1
            self.offset = 0
        if self.first > 64 or self.first == len(chunks):
            del chunks[: self.first]
            self.first = 0

    def view(self, start: int, n: int) -> list[memoryview]:
        """Pieces covering `n` bytes from `start` (counted from the first unacked byte)."""
        pieces: list[memoryview] = []
        start += self.offset
        chunks = self.chunks
        for i in range(self.first, len(chunks)):
            chunk = chunks[i]
            length = len(chunk)
            if start >= length:
                start -= length
                continue
            take = min(length - start, n)
            pieces.append(memoryview(chunk)[start : start + take])
            n -= take
            if not n:
                break
            start = 0
        return pieces


class Handler(Protocol):
    def data_received(self, parts: list[memoryview]) -> None: ...
    def eof_received(self) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def upstream_buffered(self) -> int: ...


class Writer(Protocol):
    """What a connection needs from the stack: writing packets, forgetting itself, a loop."""

    loop: asyncio.AbstractEventLoop
    fd: int

    def forget(self, conn: TcpConnection) -> None: ...
    def want_ack(self, conn: TcpConnection) -> None: ...
    def want_delivery(self, conn: TcpConnection) -> None: ...
    def icmp_unreachable(self, conn: TcpConnection, code: int) -> None: ...


class TcpConnection:
    """States, simplified: PENDING (SYN seen, upstream connecting) -> OPEN -> CLOSED."""

    def __init__(
        self,
        stack: Writer,
        src: bytes,
        sport: int,
        dst: bytes,
        dport: int,
        irs: int,
        peer_mss: int | None,
        peer_wscale: int | None,
        window: int,
        sack_ok: bool = False,
    ) -> None:
        self.stack = stack
        self.src, self.sport, self.dst, self.dport = src, sport, dst, dport
        self.client = (packets.ip_str(src), sport)
        self.server = (packets.ip_str(dst), dport)
        self.addr_sum = packets.address_sum(dst, src)  # we send from dst to src
        self.template = packets.SegmentTemplate(dst, src, dport, sport)
        self.mss = min(peer_mss or 536, 65535 - (40 if len(src) == 4 else 60) - 20)
        self.wscale_ok = peer_wscale is not None
        self.peer_wscale = peer_wscale or 0
        self.our_wscale = OUR_WSCALE if self.wscale_ok else 0
        self.sack_ok = sack_ok  # the app takes SACK blocks: we tell it which segments we hold
        self.rcv_nxt = (irs + 1) & MASK
        self.iss = _isn.getrandbits(32)
        self.snd_una = self.iss
        self.snd_nxt = (self.iss + 1) & MASK  # SYN takes one sequence number
        self.snd_max = self.snd_nxt  # highest sequence number sent so far
        self.fin_seq: int | None = None  # sequence number of our FIN, once sent
        self.snd_wnd = window  # unscaled in the SYN
        self.sendq = SendQueue()  # bytes from snd_una on: sent but unacked, then unsent
        self.handler: Handler | None = None
        self.state = "PENDING"
        self.fin_pending = False  # handler asked for FIN once the buffer drains
        self.fin_sent = False
        self.fin_acked = False
        self.fin_received = False
        self.writing_paused = False
        self.rto = RTO_MIN
        self.retries = 0
        self.rto_timer: asyncio.TimerHandle | None = None
        # When unacknowledged data times out (None: nothing outstanding). An ACK only moves
        # this; a pending timer that fires early re-arms itself for it (see `_on_rto`).
        self.rto_deadline: float | None = None
        self.persist_timer: asyncio.TimerHandle | None = None
        self.ack_timer: asyncio.TimerHandle | None = None  # a delayed ACK (FIN, little data)
        self.persist_backoff = PERSIST_MIN
        self.dup_acks = 0
        self.last_window_sent = 0
        self.on_established: Callable[[], None] | None = None
        self.syn_packet: bytes | None = None  # quoted in an ICMP unreachable answer
        self.received: list[memoryview] = []  # in-order data not yet handed to the handler
        self.ack_owed = 0  # bytes taken in since the last ACK we sent
        self.rcv_mss = 65520 - (40 if len(src) == 4 else 60)  # the TUN's MTU less IP and TCP
        self.ack_every = 2 * self.rcv_mss  # bytes owed that are ACKed without delay
        # Segments beyond a hole, by sequence number: (payload, FIN flag).
        self.out_of_order: dict[int, tuple[memoryview, bool]] = {}
        self.last_held = 0  # sequence number of the segment held last (its SACK block leads)

    # ---- to the app -------------------------------------------------------------------

    def _window(self) -> int:
        buffered = self.handler.upstream_buffered() if self.handler is not None else 0
        room = max(0, RCV_BUF - buffered)
        limit = 0xFFFF << self.our_wscale
        return min(room, limit) >> self.our_wscale

    def _send(
        self, flags: int, seq: int, payload: list[memoryview] | None = None, options: bytes = b""
    ) -> None:
        if flags & ACK:
            self.ack_owed = 0
            if self.ack_timer is not None:
                self._cancel_delayed_ack()  # this segment carries the ACK
        window = self._window()
        self.last_window_sent = window
        ack = self.rcv_nxt if flags & ACK else 0
        if self.out_of_order and self.sack_ok and not payload and not options:
            options = self._sack_option()
        if options:
            length = sum(map(len, payload)) if payload else 0
            hdr = packets.tcp_segment(
                self.dst, self.src, self.dport, self.sport, seq, ack, flags, window,
                self.addr_sum, length, options,
            )
        elif payload:
            length = len(payload[0]) if len(payload) == 1 else sum(map(len, payload))
            hdr = self.template.header(seq, ack, flags, window, length)
        else:
            hdr = self.template.header(seq, ack, flags, window, 0)
        try:
            if payload:
                os.writev(self.stack.fd, [hdr, *payload])
            else:
                os.write(self.stack.fd, hdr)
        except BlockingIOError:
            pass  # the kernel's queue is full: the retransmission timer resends
        except OSError:
            pass  # the sandbox is gone

    def send_ack(self) -> None:
        if self.state in ("OPEN", "SYNACK"):
            self._send(ACK, self.snd_nxt)

    def ack_batch(self) -> None:
        """The ACK a batch of the app's segments asked for: at once, unless all they brought
        is less than two full-sized segments of new data (then within DATA_ACK_DELAY, on the
        reply or with the next data if they come first)."""
        if (0 < self.ack_owed < self.ack_every and self.state == "OPEN"
                and not self.out_of_order and not self.fin_received):
            if self.ack_timer is None:
                self.ack_timer = self.stack.loop.call_later(DATA_ACK_DELAY, self._delayed_ack)
            return
        self.send_ack()

    def accept(self, handler: Handler) -> None:
        """The upstream is connected: answer the SYN."""
        if self.state != "PENDING":
            return
        self.handler = handler
        self.state = "SYNACK"
        self._send_synack()

    def _send_synack(self) -> None:
        mss = self.rcv_mss
        options = b"\x02\x04" + mss.to_bytes(2, "big")
        if self.wscale_ok:
            options += b"\x01\x03\x03" + bytes([self.our_wscale])
        if self.sack_ok:
            options += b"\x01\x01\x04\x02"
        self.last_window_sent = min(RCV_BUF, 0xFFFF)
        hdr = packets.tcp_segment(
            self.dst,
            self.src,
            self.dport,
            self.sport,
            self.iss,
            self.rcv_nxt,
            SYN | ACK,
            min(RCV_BUF, 0xFFFF),  # the window in a SYN is never scaled
            self.addr_sum,
            0,
            options,
        )
        try:
            os.write(self.stack.fd, hdr)
        except OSError:
            pass
        self._arm_rto()

    def refuse(self) -> None:
        """The upstream refused: answer the SYN with RST, as the real host would."""
        log.debug("RST %s -> %s: upstream refused", self.client, self.server)
        self._send(RST | ACK, 0)
        self._close(None)

    def unreachable(self, code: int) -> None:
        """The upstream is unreachable: answer with ICMP destination unreachable."""
        self.stack.icmp_unreachable(self, code)
        self._close(None)

    # ---- transport API for the handler -----------------------------------------------

    def write(self, data: bytes) -> None:
        if self.state == "CLOSED" or self.fin_pending or not data:
            return
        self.sendq.append(data)
        if self.state == "OPEN":
            self._push()
        if not self.writing_paused and self.get_write_buffer_size() > SND_BUF_HIGH:
            self.writing_paused = True
            if self.handler is not None:
                self.handler.pause_writing()

    def write_eof(self) -> None:
        if self.state == "CLOSED" or self.fin_pending:
            return
        self.fin_pending = True
        if self.state == "OPEN":
            self._push()

    def abort(self) -> None:
        log.debug("RST %s -> %s: aborted in state %s", self.client, self.server, self.state)
        if self.state in ("OPEN", "SYNACK"):
            self._send(RST | ACK, self.snd_nxt)
        self._close(None, notify=False)

    def get_write_buffer_size(self) -> int:
        return self.sendq.size

    def window_update(self) -> None:
        """The handler's upstream buffer drained: tell the app it may send again."""
        if self.state == "OPEN" and self._window() > self.last_window_sent:
            self._send(ACK, self.snd_nxt)

    # ---- segments from the app ---------------------------------------------------------

    def segment(self, pkt: packets.Packet) -> None:
        flags = pkt.flags
        if flags & RST:
            if self.state == "PENDING" or seq_le(self.rcv_nxt, pkt.seq) or pkt.seq == self.rcv_nxt:
                self._close(ConnectionResetError("reset by the app"))
            return
        if flags & SYN:
            if self.state == "SYNACK":
                self._send_synack()  # our SYN-ACK was lost
            elif self.state == "OPEN":
                self.send_ack()
            return  # PENDING: still connecting upstream
        if self.state == "PENDING":
            return
        if not flags & ACK:
            return
        if self.state == "SYNACK":
            if pkt.ack != self.snd_nxt:
                return
            self.state = "OPEN"
            self.snd_una = pkt.ack
            self.rto_deadline = None
            self.rto = RTO_MIN
            self.retries = 0
            if self.on_established is not None:
                self.on_established()
        self._process_ack(pkt)
        if self.state == "CLOSED":
            return
        payload = pkt.payload
        fin = bool(flags & FIN) and self.state == "OPEN"
        if payload:
            if not self._receive(pkt.seq, payload, fin):
                return  # out of order: the FIN, if any, waits with the data
        elif seq_lt(pkt.seq, self.rcv_nxt) and not fin:
            self.stack.want_ack(self)  # a keep-alive or zero-window probe: say where we are
        if fin:
            self._fin_at((pkt.seq + len(payload)) & MASK)

    def _receive(self, seq: int, payload: memoryview, fin: bool) -> bool:
        """Take in a segment's data; False when it lies beyond a hole and waits for it."""
        if seq != self.rcv_nxt:
            if seq_lt(self.rcv_nxt, seq):
                self._hold_out_of_order(seq, payload, fin)
                return False
            behind = (self.rcv_nxt - seq) & MASK
            if behind >= len(payload):
                self.stack.want_ack(self)  # a duplicate: say where we are
                return True
            payload = payload[behind:]  # a retransmission overlapping new data
        if self.fin_received:
            return True
        self._accept(payload)
        if self.out_of_order:
            self._fill_from_out_of_order()
        return True

    def _accept(self, payload: memoryview) -> None:
        self.rcv_nxt = (self.rcv_nxt + len(payload)) & MASK
        self.ack_owed += len(payload)
        self.stack.want_ack(self)
        if self.handler is not None:
            # Handed over once per batch of packets (deliver()): one upstream write and one
            # decoder call for what arrived together.
            if not self.received:
                self.stack.want_delivery(self)
            self.received.append(payload)

    def _hold_out_of_order(self, seq: int, payload: memoryview, fin: bool) -> None:
        """Keep a segment that came after a lost one, as any receiver does.

        The sender (without SACK) assumes we kept it: once the hole is filled, one cumulative
        ACK covers everything. Each such segment gets its own duplicate ACK at once, so the
        sender's fast retransmit fires instead of its backed-off timer.
        """
        ahead = (seq - self.rcv_nxt) & MASK
        window = self.last_window_sent << self.our_wscale
        if (
            not self.fin_received
            and ahead + len(payload) <= window
            and len(self.out_of_order) < MAX_OUT_OF_ORDER
        ):
            self.out_of_order[seq] = (payload, fin)
            self.last_held = seq
        self.send_ack()

    def _sack_option(self) -> bytes:
        """SACK blocks (RFC 2018) for the held segments, the one held last first."""
        base = self.rcv_nxt
        blocks: list[list[int]] = []
        for start, end in sorted(
            ((seq - base) & MASK, ((seq - base) & MASK) + len(payload))
            for seq, (payload, _fin) in self.out_of_order.items()
        ):
            if blocks and start <= blocks[-1][1]:
                blocks[-1][1] = max(blocks[-1][1], end)
            else:
                blocks.append([start, end])
        recent = (self.last_held - base) & MASK
        blocks.sort(key=lambda block: not block[0] <= recent < block[1])
        blocks = blocks[:4]  # all a header without timestamps has room for
        return b"\x01\x01\x05" + bytes([2 + 8 * len(blocks)]) + b"".join(
            struct.pack("!II", (base + start) & MASK, (base + end) & MASK) for start, end in blocks
        )

    def _fill_from_out_of_order(self) -> None:
        """Hand on the held segments that the data just received made contiguous."""
        held = self.out_of_order
        fin_at: int | None = None
        # In sequence order, counted from half the sequence space back, so segments the new
        # data overtook come first; the first one still beyond a hole ends the run.
        origin = (self.rcv_nxt - 0x80000000) & MASK
        for seq in sorted(held, key=lambda seq: (seq - origin) & MASK):
            if seq_lt(self.rcv_nxt, seq):
                break
            payload, fin = held.pop(seq)
            behind = (self.rcv_nxt - seq) & MASK
            if behind < len(payload):
                self._accept(payload[behind:])
            if fin:
                fin_at = (seq + len(payload)) & MASK
        if fin_at is not None and self.state == "OPEN":
            self._fin_at(fin_at)

    def _fin_at(self, fin_seq: int) -> None:
        if fin_seq == self.rcv_nxt and not self.fin_received:
            self.fin_received = True
            self.out_of_order.clear()
            self.rcv_nxt = (self.rcv_nxt + 1) & MASK
            if self.fin_sent:
                self.send_ack()
            else:  # our FIN, or the rest of the reply, will usually carry it
                self._cancel_delayed_ack()
                self.ack_timer = self.stack.loop.call_later(FIN_ACK_DELAY, self._delayed_ack)
            self.deliver()
            if self.handler is not None:
                self.handler.eof_received()
            self._maybe_closed()
        elif self.fin_received:
            self.send_ack()

    def _process_ack(self, pkt: packets.Packet) -> None:
        ack = pkt.ack
        window = pkt.window << self.peer_wscale
        acked = (ack - self.snd_una) & MASK
        if acked > ((self.snd_max - self.snd_una) & MASK):
            return  # acknowledges what we never sent
        if acked:
            self.sendq.consume(min(acked, self.sendq.size))
            if self.fin_seq is not None and ack == ((self.fin_seq + 1) & MASK):
                self.fin_acked = True
            self.snd_una = ack
            if seq_lt(self.snd_nxt, ack):
                self.snd_nxt = ack  # acked beyond a rewind: skip what arrived after all
            self.dup_acks = 0
            self.retries = 0
            self.rto = RTO_MIN
            self.rto_deadline = None
            if self.snd_una != self.snd_max:
                self._arm_rto()
            if self.writing_paused and self.get_write_buffer_size() < SND_BUF_HIGH // 2:
                self.writing_paused = False
                if self.handler is not None:
                    self.handler.resume_writing()
        elif not pkt.payload and self.snd_una != self.snd_max:
            if window == self.snd_wnd and not pkt.flags & (SYN | FIN):
                self.dup_acks += 1
                if self.dup_acks == 3:
                    self._retransmit_one()
        self.snd_wnd = window
        if window:
            self._cancel_persist()
        self._push()
        self._maybe_closed()

    # ---- sending data ------------------------------------------------------------------

    def _push(self) -> None:
        if self.state != "OPEN":
            return
        while True:
            offset = (self.snd_nxt - self.snd_una) & MASK
            if self.fin_sent:
                break
            unsent = self.sendq.size - offset
            room = self.snd_wnd - offset
            if unsent > 0:
                if room <= 0:
                    if offset == 0:
                        self._arm_persist()
                    break
                n = min(unsent, self.mss, room)
                flags = ACK | (PSH if n == unsent else 0)
                self._send(flags, self.snd_nxt, self.sendq.view(offset, n))
                self.snd_nxt = (self.snd_nxt + n) & MASK
                if seq_lt(self.snd_max, self.snd_nxt):
                    self.snd_max = self.snd_nxt
                self._arm_rto()
                continue
            if self.fin_pending and not self.fin_sent and not self.fin_acked:
                self.fin_seq = self.snd_nxt
                self._send(FIN | ACK, self.snd_nxt)
                self.snd_nxt = (self.snd_nxt + 1) & MASK
                if seq_lt(self.snd_max, self.snd_nxt):
                    self.snd_max = self.snd_nxt
                self.fin_sent = True
                self._arm_rto()
            break

    def _retransmit_one(self) -> None:
        outstanding = self.sendq.size
        if outstanding > 0:
            self._send(ACK, self.snd_una, self.sendq.view(0, min(outstanding, self.mss)))
        elif self.fin_sent and not self.fin_acked:
            self._send(FIN | ACK, self.snd_una)

    def _arm_rto(self) -> None:
        """Time out the oldest unacknowledged segment `rto` from now, unless already timed."""
        if self.rto_deadline is None:
            self.rto_deadline = deadline = self.stack.loop.time() + self.rto
            timer = self.rto_timer
            if timer is not None and timer.when() > deadline:  # set before a backoff ended
                timer.cancel()
                timer = None
            if timer is None:
                self.rto_timer = self.stack.loop.call_at(deadline, self._on_rto)

    def _cancel_rto(self) -> None:
        self.rto_deadline = None
        if self.rto_timer is not None:
            self.rto_timer.cancel()
            self.rto_timer = None

    def _on_rto(self) -> None:
        """The timer: one per connection, moved lazily (an ACK per segment would otherwise
        cancel and make a timer each time)."""
        self.rto_timer = None
        if self.state == "CLOSED" or self.rto_deadline is None:
            return
        if self.stack.loop.time() < self.rto_deadline:
            self.rto_timer = self.stack.loop.call_at(self.rto_deadline, self._on_rto)
            return
        self.rto_deadline = None
        self.retries += 1
        if self.retries > MAX_RETRIES:
            self.abort()
            if self.handler is not None:
                self.handler.connection_lost(TimeoutError("the app stopped acknowledging"))
            return
        self.rto = min(self.rto * 2, RTO_MAX)
        if self.state == "SYNACK":
            self._send_synack()
            return
        if self.snd_una == self.snd_max:
            return
        # Go back to the first unacknowledged byte and send again from there.
        self.snd_nxt = self.snd_una
        if self.fin_sent and not self.fin_acked:
            self.fin_sent = False
        self.snd_wnd = max(self.snd_wnd, 1)  # a lost window update must not stall us
        self._push()
        self._arm_rto()

    def _delayed_ack(self) -> None:
        self.ack_timer = None
        self.send_ack()

    def _cancel_delayed_ack(self) -> None:
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None

    def _arm_persist(self) -> None:
        if self.persist_timer is None:
            self.persist_timer = self.stack.loop.call_later(self.persist_backoff, self._on_persist)

    def _cancel_persist(self) -> None:
        if self.persist_timer is not None:
            self.persist_timer.cancel()
            self.persist_timer = None
        self.persist_backoff = PERSIST_MIN

    def _on_persist(self) -> None:
        """Zero-window probe: an already-acknowledged sequence number makes the app answer."""
        self.persist_timer = None
        if self.state != "OPEN" or self.snd_wnd:
            return
        self._send(ACK, (self.snd_una - 1) & MASK)
        self.persist_backoff = min(self.persist_backoff * 2, RTO_MAX)
        self._arm_persist()

    # ---- closing -----------------------------------------------------------------------

    def _maybe_closed(self) -> None:
        if self.fin_received and self.fin_acked:
            self._close(None)

    def deliver(self) -> None:
        """Hand the data received since the last delivery to the handler: the segments'
        payloads as views of their packets (not copied: handlers copy what they keep, and a
        packet's bytes never change)."""
        if not self.received:
            return
        chunks, self.received = self.received, []
        if self.handler is not None:
            self.handler.data_received(chunks)

    def _close(self, exc: Exception | None, notify: bool = True) -> None:
        if self.state == "CLOSED":
            return
        if notify:
            self.deliver()  # data that came before a RST or the end still counts
        self.state = "CLOSED"
        self._cancel_rto()
        self._cancel_persist()
        self._cancel_delayed_ack()
        self.stack.forget(self)
        handler, self.handler = self.handler, None
        if notify and handler is not None:
            handler.connection_lost(exc)
