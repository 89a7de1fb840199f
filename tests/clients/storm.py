"""Run in the sandbox's network namespace (as host root, through nsenter): write malformed and
odd packets onto tapui0 so tapui's stack reads them. Usage: storm.py ROUNDS. Every destination
is the sandbox's gateway (the host alias), so nothing can leave the machine."""

import os
import random
import socket
import sys

from scapy.all import ICMP, IP, TCP, UDP, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, raw
from scapy.layers.inet6 import IPv6ExtHdrHopByHop, IPv6ExtHdrRouting

SRC4, GW4 = "169.254.77.2", "169.254.77.1"
SRC6, GW6 = "fd7a:7a70:7a70::2", "fd7a:7a70:7a70::1"
rng = random.Random(4242)


def port() -> int:
    return rng.randint(40000, 60000)


def patched(pkt: bytes, offset: int, value: bytes) -> bytes:
    return pkt[:offset] + value + pkt[offset + len(value):]


def packets() -> list[bytes]:
    tcp4 = raw(IP(src=SRC4, dst=GW4) / TCP(sport=port(), dport=port(), flags="A") / (b"x" * 40))
    tcp6 = raw(IPv6(src=SRC6, dst=GW6) / TCP(sport=port(), dport=port(), flags="A") / (b"y" * 40))
    out = [
        tcp4[:10],  # truncated IPv4 header
        tcp6[:30],  # truncated IPv6 header
        patched(tcp4, 0, b"\x43"),  # IHL 3 (< 5)
        patched(tcp4, 0, b"\x4f"),  # IHL 15, longer than the header present
        patched(tcp4, 2, (len(tcp4) + 500).to_bytes(2, "big")),  # total length too large
        patched(tcp4, 2, (8).to_bytes(2, "big")),  # total length smaller than the header
        patched(tcp4, 10, b"\xde\xad"),  # bad IP checksum
        patched(tcp4, 20 + 12, b"\x20"),  # TCP data offset 2 (< 5)
        patched(tcp4, 20 + 12, b"\xf0"),  # TCP data offset 15, past the segment
        patched(tcp4, 20 + 16, b"\xbe\xef"),  # bad TCP checksum
        patched(tcp6, 4, (2000).to_bytes(2, "big")),  # IPv6 payload length too large
        patched(tcp4, 0, b"\x55"),  # IP version 5
        patched(tcp4, 0, b"\x05"),  # IP version 0
        bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))),  # garbage
        raw(IP(src=SRC4, dst=GW4, proto=200) / b"unknown protocol"),
        raw(IP(src=SRC4, dst=GW4, proto=47) / (b"\0" * 24)),  # GRE
        raw(IP(src=SRC4, dst=GW4, proto=132) / (b"\0" * 24)),  # SCTP
        raw(IP(src=SRC4, dst=GW4, flags="MF", frag=0) / TCP(sport=port(), dport=port(), flags="S")),
        raw(IP(src=SRC4, dst=GW4, frag=100) / (b"\0" * 64)),  # a later fragment
        raw(IPv6(src=SRC6, dst=GW6) / IPv6ExtHdrHopByHop() / TCP(sport=port(), dport=port(), flags="A")),
        raw(IPv6(src=SRC6, dst=GW6) / IPv6ExtHdrRouting() / UDP(sport=port(), dport=port()) / b"r"),
        raw(IPv6(src=SRC6, dst=GW6) / IPv6ExtHdrDestOpt() / TCP(sport=port(), dport=port(), flags="R")),
        raw(IPv6(src=SRC6, dst=GW6) / IPv6ExtHdrFragment(m=1) / TCP(sport=port(), dport=port(), flags="S")),
        raw(IPv6(src=SRC6, dst=GW6, nh=0) / (b"\x06\xff" + b"\0" * 6)),  # ext header claiming 2 KiB
        raw(IP(src=SRC4, dst=GW4) / UDP(sport=port(), dport=port(), len=4) / b"bad length"),
        raw(IP(src=SRC4, dst=GW4) / UDP(sport=port(), dport=53) / os.urandom(30)),  # garbage DNS
        raw(IP(src=SRC4, dst=GW4) / UDP(sport=port(), dport=53)),  # empty DNS
        raw(IP(src=SRC4, dst=GW4) / ICMP(type=8) / b"ping"),
        raw(IP(src=SRC4, dst=GW4) / ICMP(type=3, code=3) / (b"\0" * 28)),
        raw(IP(src=SRC4, dst=GW4) / TCP(sport=port(), dport=port(), flags="A") / (b"z" * 65000)),
    ]
    for flags in ("SF", "SR", "F", "", "FSRPAUEC", "U", "PU", "SA", "R", "RA", "FA", "P"):
        out.append(raw(IP(src=SRC4, dst=GW4) / TCP(sport=port(), dport=port(), flags=flags) / b"q"))
        out.append(raw(IPv6(src=SRC6, dst=GW6) / TCP(sport=port(), dport=port(), flags=flags)))
    for _ in range(10):  # TCP options of every odd shape
        opts = bytes(rng.getrandbits(8) for _ in range(rng.choice([4, 8, 12, 40])))
        syn = raw(IP(src=SRC4, dst=GW4) / TCP(sport=port(), dport=port(), flags="S"))
        out.append(syn[:20] + patched(syn[20:], 12, bytes([(5 + len(opts) // 4) << 4])) + opts)
    return out


def main() -> None:
    rounds = int(sys.argv[1])
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sent = 0
    for _ in range(rounds):
        for pkt in packets():
            try:
                sock.sendto(pkt, ("tapui0", 0))
                sent += 1
            except OSError:
                pass  # the kernel refuses a few shapes outright; the rest reach tapui
    print("sent", sent)


main()
