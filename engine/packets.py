"""IPv4/IPv6, TCP, UDP and ICMP headers: parsed with struct, built for the TUN device.

Every packet on the TUN fd carries a 10-byte virtio-net header first (IFF_VNET_HDR). Packets we
write ask the kernel to treat the transport checksum as done (VIRTIO_NET_HDR_F_NEEDS_CSUM with
only the pseudo-header sum in the checksum field): summing 64 KiB segments in Python would cap
throughput near 0.4 GB/s.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

VNET_HDR_LEN = 10
VNET_F_NEEDS_CSUM = 1
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
IPV6_EXTENSION_HEADERS = {0, 43, 60}  # hop-by-hop, routing, destination options
IPV6_FRAGMENT = 44

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_VNET_TCP4 = struct.pack("<BBHHHH", VNET_F_NEEDS_CSUM, 0, 0, 0, 20, 16)
_VNET_TCP6 = struct.pack("<BBHHHH", VNET_F_NEEDS_CSUM, 0, 0, 0, 40, 16)
_VNET_UDP4 = struct.pack("<BBHHHH", VNET_F_NEEDS_CSUM, 0, 0, 0, 20, 6)
_VNET_UDP6 = struct.pack("<BBHHHH", VNET_F_NEEDS_CSUM, 0, 0, 0, 40, 6)
VNET_PLAIN = bytes(VNET_HDR_LEN)


def ones_sum(data: bytes) -> int:
    """The 16-bit ones'-complement sum of `data`, folded (done in C by int.from_bytes)."""
    if len(data) % 2:
        data = data + b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF
    return total or (0xFFFF if any(data) else 0)


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def address_sum(src: bytes, dst: bytes) -> int:
    """Pseudo-header sum of the two addresses (precomputed once per connection)."""
    return ones_sum(src + dst)


@dataclass(slots=True)
class Packet:
    """A parsed IP packet carrying TCP, UDP or ICMP; `payload` is the transport payload."""

    version: int
    src: bytes
    dst: bytes
    proto: int
    sport: int
    dport: int
    payload: memoryview
    # TCP only
    seq: int = 0
    ack: int = 0
    flags: int = 0
    window: int = 0
    options: bytes = b""
    # ICMP only
    icmp_type: int = 0
    icmp_code: int = 0
    raw: memoryview | None = None  # the whole IP packet (for ICMP replies)


def parse(buf: memoryview) -> Packet | None:
    """Parse one IP packet (without the virtio header); None for anything we don't serve."""
    n = len(buf)
    if n < 20:
        return None
    version = buf[0] >> 4
    if version == 4:
        vihl, _tos, total, _id, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(buf)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or n < ihl or total < ihl or total > n:
            return None
        if frag & 0x3FFF:  # more-fragments flag or a fragment offset
            return None
        body = buf[ihl:total]
    elif version == 6:
        if n < 40:
            return None
        plen = (buf[4] << 8) | buf[5]
        if 40 + plen > n:
            return None
        proto = buf[6]
        src = bytes(buf[8:24])
        dst = bytes(buf[24:40])
        off = 40
        end = 40 + plen
        while proto in IPV6_EXTENSION_HEADERS:
            if off + 8 > end:
                return None
            proto, hlen = buf[off], (buf[off + 1] + 1) * 8
            off += hlen
        if proto == IPV6_FRAGMENT or off > end:
            return None
        body = buf[off:end]
    else:
        return None
    if proto == PROTO_TCP:
        if len(body) < 20:
            return None
        sport, dport, seq, ack, doff, flags, window, _csum, _urg = _TCP.unpack_from(body)
        hlen = (doff >> 4) * 4
        if hlen < 20 or hlen > len(body):
            return None
        options = bytes(body[20:hlen]) if hlen > 20 else b""
        return Packet(
            version, src, dst, proto, sport, dport, body[hlen:], seq, ack, flags, window, options
        )
    if proto == PROTO_UDP:
        if len(body) < 8:
            return None
        sport, dport, length, _csum = _UDP.unpack_from(body)
        if length < 8 or length > len(body):
            return None
        return Packet(version, src, dst, proto, sport, dport, body[8:length])
    if proto in (PROTO_ICMP, PROTO_ICMPV6):
        if len(body) < 8:
            return None
        pkt = Packet(version, src, dst, proto, 0, 0, body[4:])
        pkt.icmp_type, pkt.icmp_code = body[0], body[1]
        pkt.raw = buf
        return pkt
    return None


def parse_tcp_options(options: bytes) -> tuple[int | None, int | None, bool]:
    """(MSS, window scale, SACK permitted) from a SYN's options; None where absent or malformed."""
    mss = wscale = None
    sack_ok = False
    i, n = 0, len(options)
    while i < n:
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= n:
            break
        length = options[i + 1]
        if length < 2 or i + length > n:
            break
        if kind == 2 and length == 4:
            mss = (options[i + 2] << 8) | options[i + 3]
        elif kind == 3 and length == 3:
            wscale = min(options[i + 2], 14)
        elif kind == 4 and length == 2:
            sack_ok = True
        i += length
    return mss, wscale, sack_ok


def _ipv4_header(src: bytes, dst: bytes, proto: int, total: int) -> bytes:
    hdr = _IPV4.pack(0x45, 0, total, 0, 0x4000, 64, proto, 0, src, dst)
    csum = checksum(hdr)
    return hdr[:10] + csum.to_bytes(2, "big") + hdr[12:]


def tcp_segment(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    addr_sum: int,
    payload_len: int,
    options: bytes = b"",
) -> bytes:
    """The virtio header, IP header and TCP header of a segment; the payload follows."""
    tcp_len = 20 + len(options) + payload_len
    pseudo = fold(addr_sum + PROTO_TCP + tcp_len)
    tcp = _TCP.pack(
        sport, dport, seq, ack, (5 + len(options) // 4) << 4, flags, window, pseudo, 0
    )
    if len(src) == 4:
        return _VNET_TCP4 + _ipv4_header(src, dst, PROTO_TCP, 20 + tcp_len) + tcp + options
    return _VNET_TCP6 + _IPV6.pack(0x60000000, tcp_len, PROTO_TCP, 64, src, dst) + tcp + options


class SegmentTemplate:
    """Headers of one connection's segments toward the app, with the constant parts summed
    once: per segment only the lengths, sequence numbers, flags and window change."""

    __slots__ = ("prefix", "ip_words", "addrs", "ports", "pseudo_base", "v4")

    _V4 = struct.Struct("!HHHHHH")
    _V6 = struct.Struct("!IHBB")
    _TCP = struct.Struct("!4sIIBBHHH")

    def __init__(self, src: bytes, dst: bytes, sport: int, dport: int) -> None:
        self.v4 = len(src) == 4
        self.addrs = src + dst
        self.ports = struct.pack("!HH", sport, dport)
        self.pseudo_base = address_sum(src, dst) + PROTO_TCP
        self.prefix = _VNET_TCP4 if self.v4 else _VNET_TCP6
        # IPv4 words that never change: version/IHL, DF, TTL/protocol, the addresses.
        self.ip_words = 0x4500 + 0x4000 + (64 << 8 | PROTO_TCP) + ones_sum(self.addrs)

    def header(self, seq: int, ack: int, flags: int, window: int, payload_len: int) -> bytes:
        tcp_len = 20 + payload_len
        pseudo = self.pseudo_base + tcp_len
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
        tcp = self._TCP.pack(self.ports, seq, ack, 0x50, flags, window, pseudo & 0xFFFF, 0)
        if self.v4:
            total = 20 + tcp_len
            csum = self.ip_words + total
            csum = (csum & 0xFFFF) + (csum >> 16)
            csum = (csum & 0xFFFF) + (csum >> 16)
            ip = self._V4.pack(0x4500, total, 0, 0x4000, 64 << 8 | PROTO_TCP, ~csum & 0xFFFF)
            return self.prefix + ip + self.addrs + tcp
        return self.prefix + self._V6.pack(0x60000000, tcp_len, PROTO_TCP, 64) + self.addrs + tcp


def udp_datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    udp_len = 8 + len(payload)
    pseudo = fold(address_sum(src, dst) + PROTO_UDP + udp_len)
    udp = _UDP.pack(sport, dport, udp_len, pseudo)
    if len(src) == 4:
        return _VNET_UDP4 + _ipv4_header(src, dst, PROTO_UDP, 20 + udp_len) + udp + payload
    return _VNET_UDP6 + _IPV6.pack(0x60000000, udp_len, PROTO_UDP, 64, src, dst) + udp + payload


def icmp_packet(src: bytes, dst: bytes, icmp_type: int, code: int, rest: bytes) -> bytes:
    """An ICMP (v4) or ICMPv6 message with its checksum computed (they are small)."""
    if len(src) == 4:
        body = bytes([icmp_type, code, 0, 0]) + rest
        csum = checksum(body)
        body = body[:2] + csum.to_bytes(2, "big") + body[4:]
        return VNET_PLAIN + _ipv4_header(src, dst, PROTO_ICMP, 20 + len(body)) + body
    body = bytes([icmp_type, code, 0, 0]) + rest
    pseudo = src + dst + len(body).to_bytes(4, "big") + b"\0\0\0" + bytes([PROTO_ICMPV6])
    csum = checksum(pseudo + body)
    body = body[:2] + csum.to_bytes(2, "big") + body[4:]
    return VNET_PLAIN + _IPV6.pack(0x60000000, len(body), PROTO_ICMPV6, 64, src, dst) + body


def ip_str(addr: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(addr) == 4 else socket.AF_INET6, addr)


def ip_bytes(addr: str) -> bytes:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return socket.inet_pton(family, addr)
