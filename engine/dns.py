"""tapui's DNS answers for the sandbox: local names first, then the host's getaddrinfo."""

from __future__ import annotations

import asyncio
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

TTL = 5


class DnsResolver:
    """Answers A/AAAA queries; remembers which name each address came from (for flows)."""

    def __init__(self, plan: AddressPlan, loop: asyncio.AbstractEventLoop) -> None:
        self.plan = plan
        self.loop = loop
        #: address -> (name, time answered): lets a connection's flow name its host
        self.answered: dict[str, tuple[str, float]] = {}

    async def answer(self, query: bytes) -> bytes | None:
        try:
            request = dns.message.from_wire(query)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(request)
        response.flags |= dns.flags.RA
        if not request.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = request.question[0]
        name = question.name.to_text(omit_final_dot=True)
        rdtype = question.rdtype
        if rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            # Nothing to say for other types; NOERROR with no records keeps resolvers happy.
            return response.to_wire()
        addresses = await self._resolve(name)
        if addresses is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        wanted = 4 if rdtype == dns.rdatatype.A else 6
        matching = [a for a in addresses if (":" in a) == (wanted == 6)]
        if matching:
            rrset = dns.rrset.from_text_list(
                question.name, TTL, dns.rdataclass.IN, rdtype, matching
            )
            response.answer.append(rrset)
            now = time.time()
            for address in matching:
                self.answered[address] = (name, now)
        return response.to_wire()

    async def _resolve(self, name: str) -> list[str] | None:
        local = self.plan.lookup(name)
        if local is not None:
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

    def name_for(self, address: str) -> tuple[str, float] | None:
        return self.answered.get(address)

