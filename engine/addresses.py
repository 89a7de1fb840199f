"""The sandbox's address plan: its own addresses, the host alias and `--add-host` names.

Inside the sandbox 127.0.0.1 is the sandbox's own loopback; the host's loopback is reached only
through synthetic gateway-side addresses that tapui maps to a real address when it dials.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import NamedTuple

HOST_ALIAS = "host.tapui.internal"
#: The names tapui answers for, and no other resolver: one it does not know (a typo of the
#: alias, say) does not exist, and is not asked of the host's DNS.
OWN_ZONE = "tapui.internal"
SANDBOX_V4 = "169.254.77.2"
GATEWAY_V4 = "169.254.77.1"
SANDBOX_V6 = "fd7a:7a70:7a70::2"
GATEWAY_V6 = "fd7a:7a70:7a70::1"
_FIRST_EXTRA = 10  # synthetic addresses for --add-host start at .10 / ::a


@dataclass
class AddressPlan:
    #: synthetic address inside the sandbox -> the address tapui dials on the host
    mapped: dict[str, str] = field(default_factory=dict)
    #: lower-case name -> synthetic addresses answered by tapui's DNS
    names: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, add_hosts: list[tuple[str, str]]) -> AddressPlan:
        plan = cls()
        plan.mapped[GATEWAY_V4] = "127.0.0.1"
        plan.mapped[GATEWAY_V6] = "::1"
        plan.names[HOST_ALIAS] = [GATEWAY_V4, GATEWAY_V6]
        v4 = ipaddress.IPv4Address(GATEWAY_V4)
        v6 = ipaddress.IPv6Address(GATEWAY_V6)
        for i, (name, target) in enumerate(add_hosts):
            family = ipaddress.ip_address(target).version
            synthetic = str((v4 if family == 4 else v6) + _FIRST_EXTRA - 1 + i)
            plan.mapped[synthetic] = target
            plan.names.setdefault(name.lower().rstrip("."), []).append(synthetic)
        return plan

    def upstream_address(self, dialled: str) -> str:
        """What tapui dials on the host for an address the app dialled."""
        return self.mapped.get(dialled, dialled)

    def other_loopback(self, dialled: str, refused: str) -> str | None:
        """For the host alias's addresses: the host loopback to try when the one dialled
        (`refused`) refuses. A server on the host listens on 127.0.0.1 or on ::1, often not
        on both; apps try the alias's IPv6 address first, and would otherwise meet a refusal
        (and a failed connection in the list) each time before falling back."""
        if dialled in (GATEWAY_V4, GATEWAY_V6) and refused == self.mapped[dialled]:
            return "::1" if refused == "127.0.0.1" else "127.0.0.1"
        return None

    def lookup(self, name: str) -> list[str] | None:
        return self.names.get(name.lower().rstrip("."))

    def owns(self, name: str) -> bool:
        """Whether `name` is in tapui's own zone (answered here whether it exists or not)."""
        name = name.lower().rstrip(".")
        return name == OWN_ZONE or name.endswith("." + OWN_ZONE)

    def name_of(self, address: str) -> str | None:
        for name, addresses in self.names.items():
            if address in addresses:
                return name
        return None


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_add_host(spec: str) -> tuple[str, str]:
    """`NAME:IP` (IPv6 in brackets or bare) -> (name, ip); ValueError with a clear message."""
    name, sep, ip = spec.partition(":")
    if not sep or not name or not ip:
        raise ValueError(f"--add-host wants NAME:IP, got {spec!r}")
    ip = ip.strip("[]")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"--add-host {spec!r}: {ip!r} is not an IP address") from None
    return name, ip


class Published(NamedTuple):
    """A --publish: the host port (on `address`, or on 127.0.0.1 and ::1 when None) that
    leads to `sandbox_port` in the sandbox."""

    host_port: int
    sandbox_port: int
    address: str | None = None


def parse_publish(spec: str) -> Published:
    """`PORT`, `HOST_PORT:PORT` or `IP:HOST_PORT:PORT` (an IPv6 address in brackets, as
    `[::1]:8080:80`); ValueError if bad."""
    address = None
    rest = spec
    if spec.startswith("["):
        inside, bracket, rest = spec[1:].partition("]:")
        if not bracket:
            raise ValueError(f"expected [IPv6]:HOST_PORT:PORT, got {spec!r}")
        address = inside
    elif spec.count(":") == 2:
        address, rest = spec.split(":", 1)
    if address is not None:
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            raise ValueError(f"not an IP address to listen on: {address!r}") from None
    parts = rest.split(":")
    if len(parts) > 2 or (address is not None and len(parts) != 2) or not all(
            p.isdigit() for p in parts):
        raise ValueError(f"expected PORT, HOST_PORT:PORT or IP:HOST_PORT:PORT, got {spec!r}")
    ports = [int(p) for p in parts]
    if not all(1 <= p <= 65535 for p in ports):
        raise ValueError(f"ports are 1 to 65535, got {spec!r}")
    return Published(ports[0], ports[-1], address)
