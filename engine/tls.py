"""TLS on the wire: the upstream leg's client contexts, ClientHello parsing, certificate
details."""

from __future__ import annotations

import functools
import ssl
import struct
import threading
from dataclasses import dataclass, field

from cryptography import x509

from engine.flow import Certificate

# -- upstream ---------------------------------------------------------------------------------

_upstream_cache: dict[tuple[bool, tuple[str, ...]], ResumingContext] = {}
_upstream_lock = threading.Lock()


class ResumingContext(ssl.SSLContext):
    """A client context that offers the last session it kept for the same server name.

    tapui opens a new upstream connection for every app connection; resuming a session whose
    certificate was verified skips the certificate exchange and its signatures (about 1 ms per
    connection here), as browsers and other clients do. asyncio creates its SSLObject through
    `wrap_bio`, which is where the session is offered.
    """

    sessions: dict[str, ssl.SSLSession]

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and server_hostname is not None and not server_side:
            session = self.__dict__.setdefault("sessions", {}).get(server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def remember(self, server_hostname: str, ssl_object: ssl.SSLObject) -> bool:
        """Keep `ssl_object`'s session (TLS 1.3 tickets arrive after the handshake); True if
        it was kept.

        A session that was just resumed is kept as it is: reading `ssl_object.session` copies
        it through DER, certificate chain included (about 0.3 ms)."""
        if ssl_object.session_reused and server_hostname in self.__dict__.get("sessions", {}):
            return False
        session = ssl_object.session
        if session is not None and session.has_ticket:
            self.__dict__.setdefault("sessions", {})[server_hostname] = session
            return True
        return False


def upstream_context(insecure: bool = False, extra_ca_files: list[str] | None = None) -> ResumingContext:
    """Client context for the upstream leg: system trust plus `extra_ca_files`.

    One per trust setting, whatever ALPN list the app offers: the caller sets the list on it
    just before making a connection (OpenSSL copies it into the connection as it is made).
    Loading the system roots takes ~55 ms, during which the event loop would stand still.
    """
    key = (insecure, tuple(extra_ca_files or ()))
    ctx = _upstream_cache.get(key)
    if ctx is not None:
        return ctx
    with _upstream_lock:  # (a loader started early may be at it: wait for its result)
        ctx = _upstream_cache.get(key)
        if ctx is None:
            ctx = _upstream_cache[key] = new_upstream_context(insecure, extra_ca_files)
        return ctx


def load_upstream_context_early(insecure: bool, extra_ca_files: list[str]) -> None:
    """Load the upstream context in a thread while the sandbox starts, so that the first
    intercepted connection does not wait for it (OpenSSL lets go of the GIL to load)."""

    def load() -> None:
        try:
            upstream_context(insecure, extra_ca_files)
        except (ssl.SSLError, OSError):
            pass  # the first connection tries again and reports it

    # Not a daemon: the interpreter's exit waits for it. OpenSSL's exit-time cleanup running
    # under a load still in progress crashed about one run in 40 of `tapui -- true`.
    threading.Thread(target=load, name="tapui-upstream-trust").start()


def new_upstream_context(insecure: bool, extra_ca_files: list[str] | None) -> ResumingContext:
    """A context of its own (not the shared one, whose ALPN list the relay sets per connection)."""
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    for path in extra_ca_files or ():
        ctx.load_verify_locations(cafile=path)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- ClientHello ------------------------------------------------------------------------------


class NotTLS(ValueError):
    """The bytes are not a TLS handshake (or the ClientHello is malformed)."""


@dataclass
class ClientHello:
    sni: str | None = None
    alpn: list[str] = field(default_factory=list)


_MAX_HELLO = 128 * 1024


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse the ClientHello at the start of `data`; None while more bytes are needed.

    The handshake message may span several TLS records. Raises NotTLS.
    """
    handshake = bytearray()
    pos = 0
    need: int | None = None  # full handshake message length, once known
    while need is None or len(handshake) < need:
        if len(data) < pos + 5:
            if pos == 0 and data and data[0] != 0x16:
                raise NotTLS("not a TLS handshake record")
            if pos == 0 and len(data) >= 2 and data[1] != 3:
                raise NotTLS("not a TLS record version")
            return None
        ctype, major, _minor, length = struct.unpack_from("!BBBH", data, pos)
        if ctype != 0x16 or major != 3:
            raise NotTLS("not a TLS handshake record")
        if length == 0 or length > 16384 + 2048:
            raise NotTLS("bad TLS record length")
        if len(data) < pos + 5 + length:
            # Record incomplete; if the header part we have is already wrong, say so early.
            if need is None and len(handshake) == 0 and len(data) > pos + 5:
                if data[pos + 5] != 1:
                    raise NotTLS("first handshake message is not a ClientHello")
            return None
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if need is None and len(handshake) >= 4:
            if handshake[0] != 1:
                raise NotTLS("first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(handshake[1:4], "big")
            if need > _MAX_HELLO:
                raise NotTLS("ClientHello too large")
    return _parse_hello_body(memoryview(handshake)[4:need])


def _parse_hello_body(body: memoryview) -> ClientHello:
    try:
        pos = 2 + 32  # legacy_version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        hello = ClientHello()
        if pos >= len(body):
            return hello  # no extensions
        ext_end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        if ext_end > len(body):
            raise NotTLS("ClientHello extensions overrun")
        while pos + 4 <= ext_end:
            etype, elen = struct.unpack_from("!HH", body, pos)
            ext = body[pos + 4 : pos + 4 + elen]
            if len(ext) != elen:
                raise NotTLS("ClientHello extension overruns")
            pos += 4 + elen
            if etype == 0:  # server_name
                hello.sni = _parse_sni(ext)
            elif etype == 16:  # application_layer_protocol_negotiation
                hello.alpn = _parse_alpn(ext)
        return hello
    except (IndexError, struct.error) as exc:
        raise NotTLS(f"malformed ClientHello: {exc}") from exc


def _parse_sni(ext: memoryview) -> str | None:
    end = 2 + int.from_bytes(ext[0:2], "big")
    pos = 2
    while pos + 3 <= end:
        kind = ext[pos]
        length = int.from_bytes(ext[pos + 1 : pos + 3], "big")
        name = bytes(ext[pos + 3 : pos + 3 + length])
        pos += 3 + length
        if kind == 0:
            return name.decode("ascii", errors="replace").rstrip(".").lower() or None
    return None


def _parse_alpn(ext: memoryview) -> list[str]:
    end = 2 + int.from_bytes(ext[0:2], "big")
    pos = 2
    protos: list[str] = []
    while pos < end:
        length = ext[pos]
        protos.append(bytes(ext[pos + 1 : pos + 1 + length]).decode("ascii", errors="replace"))
        pos += 1 + length
    return protos


# -- certificate details ------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def cert_info(der: bytes) -> Certificate:
    """Subject, issuer, validity (ISO 8601) and SANs of a DER certificate.

    Cached: every connection to a server shows the same certificate, and parsing it costs
    about 0.2 ms. Callers share the result and must not change it."""
    cert = x509.load_der_x509_certificate(der)
    sans: list[str] = []
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(n) for n in ext.get_values_for_type(x509.DNSName)]
        sans += [str(ip) for ip in ext.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    return Certificate(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        sans=sans,
    )
