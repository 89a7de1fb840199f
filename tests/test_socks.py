"""Following a SOCKS proxy's handshake to the start of its tunnel (the relay's side is in
test_tls_e2e: curl through a SOCKS proxy on the loopback)."""

from __future__ import annotations

import pytest

from engine.flow import Connection, FlowBus, FlowState
from engine.sniff import classify
from engine.socks import SocksObserver

GREETING = b"\x05\x01\x00"
NO_LOGIN = b"\x05\x00"
BY_NAME = b"\x05\x01\x00\x03\x10api.example.test\x01\xbb"
GRANTED = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"
SOCKS4A = b"\x04\x01\x00\x50\x00\x00\x00\x01me\x00api.example.test\x00"
SOCKS4_GRANTED = b"\x00\x5a\x00\x50\x00\x00\x00\x01"


def follow(*messages: tuple[str, bytes], split: int | None = None) -> SocksObserver:
    """Feed ("c" | "s", bytes) messages to an observer, `split` bytes at a time if given."""
    observer = SocksObserver(Connection(1, ("169.254.77.2", 40000), ("169.254.77.1", 1080)),
                             FlowBus())
    for side, data in messages:
        feed = observer.client_data if side == "c" else observer.server_data
        step = split or len(data)
        for i in range(0, len(data), step):
            feed(data[i : i + step])
    return observer


@pytest.mark.parametrize(
    ("first", "kind"),
    [(GREETING, "socks5"), (b"\x05", "need-more"), (b"\x05\x02\x00", "need-more"),
     (SOCKS4A, "socks4"), (b"\x04\x01\x00\x50", "need-more"), (b"\x05\x00", "unknown"),
     (b"\x04\x09whatever", "unknown")],
)
def test_a_socks_clients_first_message_is_told_apart(first: bytes, kind: str) -> None:
    assert classify(first) == kind


@pytest.mark.parametrize("split", [None, 1])
def test_a_granted_connect_by_name_opens_the_tunnel(split: int | None) -> None:
    observer = follow(("c", GREETING), ("s", NO_LOGIN), ("c", BY_NAME), ("s", GRANTED), split=split)
    assert observer.tunnel and observer.target == ("api.example.test", 443)


def test_a_login_is_followed() -> None:
    login = b"\x01\x03who\x06secret"
    observer = follow(("c", b"\x05\x02\x00\x02"), ("s", b"\x05\x02"), ("c", login),
                      ("s", b"\x01\x00"), ("c", BY_NAME), ("s", GRANTED))
    assert observer.tunnel


def test_an_ipv6_target_is_read() -> None:
    request = b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x00\x50"
    observer = follow(("c", GREETING), ("s", NO_LOGIN), ("c", request), ("s", GRANTED))
    assert observer.tunnel and observer.target == ("::1", 80)


@pytest.mark.parametrize(
    "messages",
    [
        [("c", GREETING), ("s", NO_LOGIN), ("c", BY_NAME), ("s", b"\x05\x05\x00\x01" + bytes(6))],
        [("c", GREETING), ("s", b"\x05\xff")],  # no method acceptable
        [("c", GREETING), ("s", NO_LOGIN), ("c", b"\x05\x02" + BY_NAME[2:]), ("s", GRANTED)],
        [("c", GREETING), ("s", b"HTTP/1.1 400 Bad Request\r\n\r\n")],
    ],
    ids=["refused", "no-method", "bind", "not-socks"],
)
def test_what_is_not_a_granted_connect_stays_a_raw_flow(messages: list[tuple[str, bytes]]) -> None:
    observer = follow(*messages)
    assert not observer.tunnel
    observer.close()
    assert observer.flow.state is FlowState.DONE
    assert observer.flow.bytes_sent == sum(len(d) for side, d in messages if side == "c")


def test_socks4a_names_the_target_and_socks4_an_address() -> None:
    observer = follow(("c", SOCKS4A), ("s", SOCKS4_GRANTED))
    assert observer.tunnel and observer.target == ("api.example.test", 80)
    by_address = b"\x04\x01\x1f\x90\x7f\x00\x00\x01\x00"
    observer = follow(("c", by_address), ("s", SOCKS4_GRANTED))
    assert observer.tunnel and observer.target == ("127.0.0.1", 8080)
