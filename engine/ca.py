"""The user's CA, the leaf certificates it signs, and the trust stores the sandbox gets.

One ECDSA P-256 CA per user lives in the data directory, trusted only inside sandboxes. All leaf
certificates share one ECDSA key made at start-up, so minting a leaf is one signature (well
under 5 ms) and server contexts are cached per (name, ALPN list).
"""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import os
import shutil
import socket
import ssl
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from engine import tempdirs

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
    _write_atomic(path, data, 0o600)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` through a temporary file renamed over it, with `mode`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        os.fchmod(fd, mode)
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
            .add_extension(_key_usage(signs_certificates=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self.key, hashes.SHA256())
        )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Signatures only (ECDSA keys), and certificates and CRLs for the CA."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=signs_certificates,
        crl_sign=signs_certificates, encipher_only=False, decipher_only=False,
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
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


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
    _write_atomic(path, data, mode)
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
