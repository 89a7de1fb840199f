"""Proxy settings of the user's environment, made to work from inside the sandbox.

A proxy on the host's loopback (`https_proxy=http://127.0.0.1:3128`, a local corporate proxy)
would be the sandbox's own loopback there, where nothing listens: every request of the command
would fail. Such settings are pointed at the host's loopback through tapui's gateway, and the
sandbox's own names (the host alias, `--add-host` names), which a proxy on the host could not
resolve, are added to `no_proxy`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from engine.addresses import GATEWAY_V4, GATEWAY_V6, HOST_ALIAS

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy")
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")


def sandbox_proxy_env(env: dict[str, str], local_names: Iterable[str] = ()) -> list[str]:
    """Rewrite `env` in place; returns the names of the proxy variables that were pointed at
    the host through the gateway."""
    rewritten: list[str] = []
    any_proxy = False
    for name, value in list(env.items()):
        if name.lower() not in PROXY_VARIABLES or not value.strip():
            continue
        any_proxy = True
        reachable = host_proxy_url(value)
        if reachable != value:
            env[name] = reachable
            rewritten.append(name)
    if any_proxy:
        exempt = [HOST_ALIAS, GATEWAY_V4, GATEWAY_V6, *local_names]
        present = [name for name in NO_PROXY_VARIABLES if name in env] or list(NO_PROXY_VARIABLES)
        for name in present:
            entries = [e.strip() for e in env.get(name, "").split(",") if e.strip()]
            env[name] = ",".join(entries + [e for e in exempt if e not in entries])
    return rewritten


def host_proxy_url(value: str) -> str:
    """`value` with a loopback host replaced by the gateway's address for it (unchanged if
    the proxy is elsewhere, or the value is not a URL)."""
    has_scheme = "://" in value
    try:
        parts = urlsplit(value if has_scheme else f"http://{value}")
        host = parts.hostname
        port = parts.port
    except ValueError:
        return value
    if host is None:
        return value
    if host == "localhost" or host.endswith(".localhost"):
        gateway = HOST_ALIAS
    else:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return value
        if str(address) not in ("127.0.0.1", "::1"):  # what the gateway reaches on the host
            return value
        gateway = GATEWAY_V4 if address.version == 4 else f"[{GATEWAY_V6}]"
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (f"{userinfo}@" if userinfo else "") + gateway + (f":{port}" if port else "")
    url = urlunsplit(parts._replace(netloc=netloc))
    return url if has_scheme else url.removeprefix("http://")
