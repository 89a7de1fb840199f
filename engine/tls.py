"""TLS interception: the user's CA, leaf certificates, SSL contexts, ClientHello parsing.

One ECDSA P-256 CA per user lives in the data directory. All leaf certificates share one
ECDSA key made at start-up, so minting a leaf is one signature (well under 5 ms) and contexts
are cached per (name, ALPN list).
"""

from __future__ import annotations

import datetime as dt
import functools
import getpass
import ipaddress
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine import tempdirs
from engine.flow import Certificate

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"

#: Bundle paths distributions use; the sandbox binds the tapui bundle over those that exist.
SYSTEM_BUNDLE_PATHS = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
)


def default_directory() -> Path:
    """$XDG_DATA_HOME/tapui, else ~/.local/share/tapui."""
    base = os.environ.get("XDG_DATA_HOME")
    root = Path(base) if base else Path.home() / ".local" / "share"
    return root / "tapui"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class CertificateAuthority:
    """The tapui CA plus the leaf certificates and server contexts it signs."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path):
        self.certificate = cert
        self.key = key
        self.cert_path = cert_path
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
        self._lock = threading.Lock()
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_dir = tempdirs.make("leaf")
        weakref.finalize(self, shutil.rmtree, self._leaf_dir, True)
        self._leaf_key_path = self._leaf_dir / "leaf-key.pem"
        _write_private(
            self._leaf_key_path,
            self._leaf_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        self._leaves: dict[str, Path] = {}
        self._contexts: dict[tuple[str, tuple[str, ...]], ssl.SSLContext] = {}
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(cert.public_key())

    # -- the CA itself --------------------------------------------------------------------

    @classmethod
    def load_or_create(cls, directory: Path | None = None) -> CertificateAuthority:
        """Load the CA from `directory` (default: `default_directory()`), creating it once."""
        directory = Path(directory) if directory is not None else default_directory()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        cert_path = directory / CA_CERT_FILE
        key_path = directory / CA_KEY_FILE
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path}: not an EC private key")
            os.chmod(key_path, 0o600)
            os.chmod(cert_path, 0o600)
            return cls(cert, key, cert_path)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _make_ca_cert(key)
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert, key, cert_path)

    # -- leaves ---------------------------------------------------------------------------

    def leaf_for(self, name: str | None, ip: str) -> Path:
        """Path of a PEM file holding the leaf certificate for SNI `name` or `ip`.

        The matching private key is `leaf_key_path`, shared by every leaf. The CA is left out
        of the chain, as servers leave out their root: the sandbox already trusts it, and an
        extra certificate to parse costs each app handshake about 0.3 ms (OpenSSL 3.0).
        """
        key = name or ip
        path = self._leaves.get(key)
        if path is not None:
            return path
        with self._lock:
            path = self._leaves.get(key)
            if path is None:
                try:
                    cert = self._make_leaf(key)
                except ValueError:  # an SNI no certificate can name: fall back to the IP
                    cert = self._make_leaf(ip)
                path = self._leaf_dir / f"leaf-{len(self._leaves)}.pem"
                path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
                self._leaves[key] = path
        return path

    @property
    def leaf_key_path(self) -> Path:
        return self._leaf_key_path

    def server_context(self, sni: str | None, ip: str, alpn: list[str]) -> ssl.SSLContext:
        """Server-side context presenting the leaf for `sni` (or `ip`), offering exactly `alpn`."""
        cache_key = (sni or ip, tuple(alpn))
        ctx = self._contexts.get(cache_key)
        if ctx is not None:
            return ctx
        cert_path = self.leaf_for(sni, ip)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, self._leaf_key_path)
        ctx.num_tickets = 1  # enough for the app to resume its next connection (OpenSSL sends 2)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        with self._lock:
            return self._contexts.setdefault(cache_key, ctx)

    def _make_leaf(self, name: str) -> x509.Certificate:
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        now = _now()
        not_after = min(now + dt.timedelta(days=365), self.certificate.not_valid_after_utc)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "tapui")])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self.key, hashes.SHA256())
        )


def _make_ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    try:
        who = f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        who = "user"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tapui"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"tapui CA ({who})"[:64]),
        ]
    )
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


# -- upstream ---------------------------------------------------------------------------------

_upstream_cache: dict[tuple[tuple[str, ...], bool, tuple[str, ...]], ssl.SSLContext] = {}
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


def upstream_context(
    alpn: list[str], insecure: bool = False, extra_ca_files: list[str] | None = None
) -> ssl.SSLContext:
    """Client context for the upstream leg: system trust plus `extra_ca_files`, offering `alpn`."""
    key = (tuple(alpn), insecure, tuple(extra_ca_files or ()))
    ctx = _upstream_cache.get(key)
    if ctx is not None:
        return ctx
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    for path in extra_ca_files or ():
        ctx.load_verify_locations(cafile=path)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    with _upstream_lock:
        return _upstream_cache.setdefault(key, ctx)


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


# -- trust stores for the sandbox ---------------------------------------------------------


def system_roots_pem() -> bytes:
    """The system's root certificates as PEM (empty if none are found)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, *SYSTEM_BUNDLE_PATHS):
        if candidate and os.path.isfile(candidate):
            try:
                data = Path(candidate).read_bytes()
            except OSError:
                continue
            if b"-----BEGIN CERTIFICATE-----" in data:
                return data if data.endswith(b"\n") else data + b"\n"
    ders = ssl.create_default_context().get_ca_certs(binary_form=True)
    return "".join(ssl.DER_cert_to_PEM_cert(d) for d in ders).encode()


def _write_if_changed(path: Path, data: bytes, mode: int = 0o644) -> Path:
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def trust_bundle(ca: CertificateAuthority, directory: Path | None = None) -> Path:
    """A PEM bundle of the system roots plus the tapui CA, for use inside the sandbox."""
    directory = Path(directory) if directory is not None else ca.cert_path.parent
    directory.mkdir(parents=True, exist_ok=True)
    data = system_roots_pem() + b"# tapui CA\n" + ca.cert_pem
    return _write_if_changed(directory / "ca-bundle.pem", data)


def _load_pem_certs(data: bytes) -> list[x509.Certificate]:
    """Every parseable certificate in a PEM bundle (unparseable ones are skipped)."""
    marker = b"-----END CERTIFICATE-----"
    certs = []
    for chunk in data.split(marker)[:-1]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old roots with negative serials
                certs.append(x509.load_pem_x509_certificate(chunk + marker))
        except ValueError:
            continue
    return certs


def java_truststore(ca: CertificateAuthority, directory: Path | None = None) -> Path:
    """A password-less PKCS12 trust store (tapui CA + system roots) for the JVM.

    Use with `-Djavax.net.ssl.trustStore=PATH -Djavax.net.ssl.trustStoreType=PKCS12`.
    """
    directory = Path(directory) if directory is not None else ca.cert_path.parent
    directory.mkdir(parents=True, exist_ok=True)
    entries = [pkcs12.PKCS12Certificate(ca.certificate, b"tapui-ca")]
    for i, cert in enumerate(_load_pem_certs(system_roots_pem())):
        entries.append(pkcs12.PKCS12Certificate(cert, f"system-{i}".encode()))
    data = pkcs12.serialize_java_truststore(entries, serialization.NoEncryption())
    return _write_if_changed(directory / "truststore.p12", data)


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
