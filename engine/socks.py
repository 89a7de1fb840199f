"""SOCKS proxies (versions 4, 4a and 5): follow the handshake to the start of the tunnel.

An app set to use a SOCKS proxy (`all_proxy=socks5h://...`, curl's `--socks5`) asks it for a
connection to the far end, then speaks its own protocol through it. `SocksObserver` records
the handshake as a raw TCP flow and parses both sides of it; once the proxy grants a CONNECT,
`tunnel` is set and the relay tells the tunnel's protocol apart as on a new connection (as for
an HTTP proxy's CONNECT). Anything it cannot follow (other commands, authentication methods
other than none and username/password, a refusal, bytes that are not SOCKS after all) leaves
the connection a raw TCP flow: the observer never raises.
"""

from __future__ import annotations

import ipaddress

from engine.flow import Connection, FlowBus, Timings
from engine.observer import RawObserver

CONNECT = 1
NO_AUTH, USER_PASSWORD = 0x00, 0x02
V4_GRANTED = 0x5A
_ADDRESS_LENGTHS = {1: 4, 4: 16}  # SOCKS5 address types: IPv4, IPv6 (3: a name, length first)


class NotFollowed(Exception):
    """The bytes are not a SOCKS handshake this observer follows."""


def looks_like_socks(data: bytes) -> str | None:
    """ "socks5" or "socks4" when `data` begins like a client's first SOCKS message, "need-more"
    when it may, else None. (No other protocol tapui tells apart begins with 4 or 5.)"""
    if not data or data[0] not in (4, 5):
        return None
    if data[0] == 5:
        if len(data) < 2:
            return "need-more"
        if data[1] == 0:
            return None
        return "socks5" if len(data) >= 2 + data[1] else "need-more"
    if len(data) < 2:
        return "need-more"
    if data[1] not in (1, 2):
        return None
    if len(data) < 9:
        return "need-more"
    return "socks4" if b"\0" in data[8:] else "need-more"


class SocksObserver(RawObserver):
    def __init__(self, conn: Connection, bus: FlowBus, timings: Timings | None = None) -> None:
        super().__init__(conn, bus, timings)
        self.tunnel = False  # the proxy granted a CONNECT: what follows is the far end's
        self.target: tuple[str, int] | None = None
        self._client = bytearray()
        self._server = bytearray()
        self._step = self._greeting  # the next message to parse
        self._done = False

    def client_data(self, data: bytes) -> None:
        super().client_data(data)
        if not self._done:
            self._client += data
            self._advance()

    def server_data(self, data: bytes) -> None:
        super().server_data(data)
        if not self._done:
            self._server += data
            self._advance()

    def _advance(self) -> None:
        try:
            while not self._done and self._step():
                pass
        except (NotFollowed, IndexError, ValueError):
            self._stop()

    def _stop(self) -> None:
        self._done = True
        self._client.clear()
        self._server.clear()

    # Each step parses one message when it is whole: True if it did (then the next step is
    # set), False while more bytes are needed; NotFollowed when the handshake is not followed.

    def _greeting(self) -> bool:
        c = self._client
        if c[0] == 4:
            self._step = self._request4
            return True
        if len(c) < 2 or len(c) < 2 + c[1]:
            return False
        del c[: 2 + c[1]]
        self._step = self._method_choice
        return True

    def _method_choice(self) -> bool:
        s = self._server
        if len(s) < 2:
            return False
        if s[0] != 5 or s[1] not in (NO_AUTH, USER_PASSWORD):
            raise NotFollowed
        self._step = self._login if s[1] == USER_PASSWORD else self._request5
        del s[:2]
        return True

    def _login(self) -> bool:
        c = self._client
        if len(c) < 2:
            return False
        end = 2 + c[1] + 1
        if len(c) < end or len(c) < end + c[end - 1]:
            return False
        del c[: end + c[end - 1]]
        self._step = self._login_reply
        return True

    def _login_reply(self) -> bool:
        s = self._server
        if len(s) < 2:
            return False
        if s[1] != 0:
            raise NotFollowed  # the proxy turned the login down
        del s[:2]
        self._step = self._request5
        return True

    def _request5(self) -> bool:
        c = self._client
        parsed = _address5(c)
        if parsed is None:
            return False
        host, port, size = parsed
        if c[0] != 5 or c[1] != CONNECT:
            raise NotFollowed  # BIND and UDP ASSOCIATE stay raw
        del c[:size]
        self.target = (host, port)
        self._step = self._reply5
        return True

    def _reply5(self) -> bool:
        s = self._server
        parsed = _address5(s)
        if parsed is None:
            return False
        if s[0] != 5 or s[1] != 0:
            raise NotFollowed  # refused: the app sees the proxy's answer, the flow stays raw
        self._granted()
        return True

    def _request4(self) -> bool:
        c = self._client
        user_end = c.find(0, 8)
        if user_end < 0:
            return False
        port = int.from_bytes(c[2:4], "big")
        ip = ipaddress.IPv4Address(bytes(c[4:8]))
        host = str(ip)
        if c[4:7] == b"\0\0\0" and c[7] != 0:  # SOCKS4a: the name follows the user id
            name_end = c.find(0, user_end + 1)
            if name_end < 0:
                return False
            host = c[user_end + 1 : name_end].decode("idna")
        if c[1] != CONNECT:
            raise NotFollowed
        self.target = (host, port)
        self._step = self._reply4
        return True

    def _reply4(self) -> bool:
        s = self._server
        if len(s) < 8:
            return False
        if s[0] != 0 or s[1] != V4_GRANTED:
            raise NotFollowed
        self._granted()
        return True

    def _granted(self) -> None:
        self.tunnel = True
        self._stop()


def _address5(buf: bytearray) -> tuple[str, int, int] | None:
    """(host, port, message size) of a SOCKS5 request or reply at the start of `buf`; None
    while it is incomplete."""
    if len(buf) < 5:
        return None
    kind = buf[3]
    if kind == 3:
        start, length = 5, buf[4]
    elif kind in _ADDRESS_LENGTHS:
        start, length = 4, _ADDRESS_LENGTHS[kind]
    else:
        raise NotFollowed
    size = start + length + 2
    if len(buf) < size:
        return None
    raw = bytes(buf[start : start + length])
    host = raw.decode("idna") if kind == 3 else str(ipaddress.ip_address(raw))
    return host, int.from_bytes(buf[size - 2 : size], "big"), size
