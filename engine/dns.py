"""tapui's DNS answers for the sandbox: local names first, then the host's getaddrinfo."""

from __future__ import annotations

import asyncio
import functools
import socket
import time

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from engine.addresses import AddressPlan
from engine.flow import Flow, FlowBus

TTL = 5
CACHE_MAX = 4096


class DnsResolver:
    """Answers A/AAAA queries; remembers which name each address came from (for flows)."""

    def __init__(self, plan: AddressPlan, loop: asyncio.AbstractEventLoop) -> None:
        self.plan = plan
        self.loop = loop
        #: address -> (name, time asked, time answered): names a connection's host, and gives
        #: the first connection after an answer its DNS phase
        self.answered: dict[str, tuple[str, float, float]] = {}
        #: query bytes after the ID -> (answer bytes after the ID, name, addresses, expiry):
        #: building an answer with dnspython costs ~0.2 ms, a cached one a few µs.
        self._cache: dict[bytes, tuple[bytes, str, list[str], float]] = {}

    async def answer(self, query: bytes) -> bytes | None:
        now = time.monotonic()
        asked = time.time()
        hit = self._cache.get(query[2:])
        if hit is not None and hit[3] > now:
            wire, name, addresses, _expiry = hit
            self._remember(name, addresses, asked)
            return query[:2] + wire
        response = await self._answer(query)
        if response is not None and response[1] is not None:
            self._remember(response[1], response[2], asked)
            wire, name, addresses = response[0], response[1], response[2]
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[query[2:]] = (wire[2:], name, addresses, now + TTL)
        return response[0] if response is not None else None

    def _remember(self, name: str, addresses: list[str], asked: float) -> None:
        now = time.time()
        for address in addresses:
            self.answered[address] = (name, asked, now)

    async def _answer(self, query: bytes) -> tuple[bytes, str | None, list[str]] | None:
        """The answer's bytes, and (for a cacheable A/AAAA answer) the name and addresses."""
        try:
            request = dns.message.from_wire(query)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(request)
        response.flags |= dns.flags.RA
        if not request.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire(), None, []
        question = request.question[0]
        name = question.name.to_text(omit_final_dot=True)
        rdtype = question.rdtype
        if rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            # Nothing to say for other types; NOERROR with no records keeps resolvers happy.
            return response.to_wire(), None, []
        addresses = await self._resolve(name)
        if addresses is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire(), None, []
        wanted = 4 if rdtype == dns.rdatatype.A else 6
        matching = [a for a in addresses if (":" in a) == (wanted == 6)]
        if matching:
            rrset = dns.rrset.from_text_list(
                question.name, TTL, dns.rdataclass.IN, rdtype, matching
            )
            response.answer.append(rrset)
        return response.to_wire(), name, matching

    async def _resolve(self, name: str) -> list[str] | None:
        local = self.plan.lookup(name)
        if local is not None or self.plan.owns(name):
            return local
        try:
            infos = await self.loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            return None
        seen: list[str] = []
        for _family, _type, _proto, _canon, sockaddr in infos:
            address = str(sockaddr[0]).split("%", 1)[0]
            if address not in seen:
                seen.append(address)
        return seen

    def name_for(self, address: str) -> tuple[str, float, float] | None:
        """(name, time asked, time answered) of the last answer that gave `address`."""
        return self.answered.get(address)



def record_answer(bus: FlowBus | None, flow: Flow, query: bytes, answer: bytes | None) -> None:
    """Tell of a query tapui answered: its flow names what was asked and says how it went."""
    if bus is not None:
        flow.conn.hostname, flow.error = describe_dns(query, answer)
        flow.bytes_sent, flow.bytes_received = len(query), len(answer or b"")
        bus.new(flow)
        bus.done(flow)


def describe_dns(query: bytes, answer: bytes | None) -> tuple[str | None, str | None]:
    """(what was asked, e.g. "example.test AAAA"; an error when the answer was not NOERROR)."""
    # The message ID (the first two bytes) changes nothing here; without it, repeated
    # questions hit the cache instead of two dnspython parses (~0.25 ms).
    return _describe(query[2:], None if answer is None else answer[2:])


@functools.lru_cache(maxsize=1024)
def _describe(query_tail: bytes, answer_tail: bytes | None) -> tuple[str | None, str | None]:
    query = b"\0\0" + query_tail
    answer = None if answer_tail is None else b"\0\0" + answer_tail
    try:
        request = dns.message.from_wire(query)
        question = request.question[0]
        asked = f"{question.name.to_text(omit_final_dot=True)} {dns.rdatatype.to_text(question.rdtype)}"
    except (dns.exception.DNSException, IndexError):
        return None, "malformed DNS query"
    if answer is None:
        return asked, "no answer"
    try:
        rcode = dns.message.from_wire(answer).rcode()
    except dns.exception.DNSException:
        return asked, "malformed answer"
    return asked, None if rcode == dns.rcode.NOERROR else dns.rcode.to_text(rcode)
