"""The packet codec: headers built from a template equal the general builder's, and parsing
rejects malformed packets instead of raising."""

from __future__ import annotations

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from engine import packets


def test_segment_template_matches_general_builder() -> None:
    rng = random.Random(7)
    for size in (4, 16):
        for _ in range(500):
            src, dst = os.urandom(size), os.urandom(size)
            sport, dport = rng.randrange(65536), rng.randrange(65536)
            seq, ack = rng.getrandbits(32), rng.getrandbits(32)
            flags, window, length = rng.randrange(256), rng.randrange(65536), rng.randrange(65480)
            general = packets.tcp_segment(
                src, dst, sport, dport, seq, ack, flags, window,
                packets.address_sum(src, dst), length,
            )
            fast = packets.SegmentTemplate(src, dst, sport, dport).header(
                seq, ack, flags, window, length
            )
            assert fast == general


def test_built_ipv4_header_checksum_verifies() -> None:
    src, dst = bytes([169, 254, 77, 1]), bytes([169, 254, 77, 2])
    segment = packets.SegmentTemplate(src, dst, 80, 40000).header(1, 2, packets.ACK, 100, 1000)
    ip_header = segment[packets.VNET_HDR_LEN : packets.VNET_HDR_LEN + 20]
    assert packets.ones_sum(ip_header) == 0xFFFF


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_parse_never_raises_on_garbage(data: bytes) -> None:
    packets.parse(memoryview(data))
