"""The tapui CA, leaf certificates, SSL contexts and the ClientHello parser (no network)."""

from __future__ import annotations

import ssl
import stat
import struct
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from engine.ca import CertificateAuthority, default_directory, java_truststore, trust_bundle
from engine.tls import NotTLS, cert_info, parse_client_hello, upstream_context


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("tapui") / "data")


def client_hello(server_hostname: str | None, alpn: list[str] | None) -> bytes:
    """A real ClientHello from OpenSSL, taken from a memory BIO."""
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if server_hostname is None:
        ctx.check_hostname = False
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def resplit(hello: bytes, sizes: list[int]) -> bytes:
    """The same handshake message re-framed into several TLS records."""
    assert hello[0] == 0x16
    body = hello[5 : 5 + struct.unpack("!H", hello[3:5])[0]]
    out, pos = b"", 0
    for size in [*sizes, len(body)]:
        piece = body[pos : pos + size]
        if piece:
            out += b"\x16\x03\x01" + struct.pack("!H", len(piece)) + piece
        pos += size
    return out


ClientEnd = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]  # the object, its in and out


def client_end(client_ctx: ssl.SSLContext, hostname: str) -> ClientEnd:
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    return client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname), c_in, c_out


def complete(end: ClientEnd, server_ctx: ssl.SSLContext):
    """Run a TLS handshake in memory between a client end and a server context; returns
    (client, server) objects."""
    client, c_in, c_out = end
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, obj in (("c", client), ("s", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return client, server
    raise AssertionError("handshake did not finish")


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str):
    """Run a TLS handshake between two contexts in memory; returns (client, server) objects."""
    return complete(client_end(client_ctx, hostname), server_ctx)


# -- ClientHello ----------------------------------------------------------------------------


def test_client_hello_sni_and_alpn() -> None:
    hello = parse_client_hello(client_hello("Example.TEST", ["h2", "http/1.1"]))
    assert hello is not None
    assert hello.sni == "example.test"
    assert hello.alpn == ["h2", "http/1.1"]


def test_client_hello_without_sni_or_alpn() -> None:
    hello = parse_client_hello(client_hello(None, None))
    assert hello is not None and hello.sni is None and hello.alpn == []


def test_client_hello_split_across_records_and_reads() -> None:
    raw = client_hello("split.example.test", ["http/1.1"])
    multi = resplit(raw, [3, 50, 100])  # four records, the first holding only 3 bytes
    assert multi.count(b"\x16\x03\x01") >= 4
    for n in range(len(multi)):
        assert parse_client_hello(multi[:n]) is None, n
    hello = parse_client_hello(multi)
    assert hello is not None and hello.sni == "split.example.test" and hello.alpn == ["http/1.1"]
    # Trailing bytes after the hello are fine.
    assert parse_client_hello(multi + b"\x14\x03\x03\x00\x01\x01").sni == "split.example.test"


def test_not_tls() -> None:
    for data in (b"GET / HTTP/1.1\r\n", b"\x16\x02\x00", b"\x15\x03\x03\x00\x02\x02\x28"):
        with pytest.raises(NotTLS):
            parse_client_hello(data)
    with pytest.raises(NotTLS):  # a handshake record holding a ServerHello
        parse_client_hello(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00")
    with pytest.raises(NotTLS):  # garbage inside a ClientHello
        body = b"\x01\x00\x00\x05\x03\x03\xff\xff\xff"
        parse_client_hello(b"\x16\x03\x01" + struct.pack("!H", len(body)) + body)


# -- the CA ---------------------------------------------------------------------------------


def test_ca_files_modes_and_reuse(tmp_path: Path) -> None:
    directory = tmp_path / "tapui"
    first = CertificateAuthority.load_or_create(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in ("ca.pem", "ca-key.pem"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    second = CertificateAuthority.load_or_create(directory)
    assert second.fingerprint == first.fingerprint
    assert second.cert_pem == first.cert_pem == (directory / "ca.pem").read_bytes()
    assert second.cert_path == directory / "ca.pem"
    assert len(first.fingerprint.split(":")) == 32
    cert = x509.load_pem_x509_certificate(first.cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_default_directory(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_directory() == tmp_path / "tapui"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_directory() == Path.home() / ".local" / "share" / "tapui"


@pytest.mark.parametrize(("sni", "ip", "hostname"), [
    ("www.example.test", "192.0.2.7", "www.example.test"),
    (None, "127.0.0.1", "127.0.0.1"),
    (None, "::1", "::1"),
])  # fmt: skip
def test_leaf_verifies_against_ca(ca: CertificateAuthority, sni, ip, hostname) -> None:
    server_ctx = ca.server_context(sni, ip, ["h2", "http/1.1"])
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    client_ctx.set_alpn_protocols(["http/1.1", "h2"])
    client, _ = handshake(server_ctx, client_ctx, hostname)
    assert client.selected_alpn_protocol() in ("h2", "http/1.1")
    info = cert_info(client.getpeercert(binary_form=True))
    assert info.sans == [hostname]
    assert "tapui" in info.issuer


def test_leaf_rejected_for_other_name(ca: CertificateAuthority) -> None:
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(
            ca.server_context("a.example.test", "192.0.2.1", []), client_ctx, "b.example.test"
        )


def test_server_context_alpn_is_exactly_the_given_list(ca: CertificateAuthority) -> None:
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    client, _ = handshake(
        ca.server_context("alpn.test", "192.0.2.1", ["http/1.1"]), client_ctx, "alpn.test"
    )
    assert client.selected_alpn_protocol() == "http/1.1"


def test_leaf_validity_and_speed(ca: CertificateAuthority) -> None:
    start = time.perf_counter()
    path = ca.leaf_for("speed.example.test", "192.0.2.9")
    assert time.perf_counter() - start < 0.05  # ~1 ms here; generous for slow CI
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    now = time.time()
    assert cert.not_valid_before_utc.timestamp() < now - 23 * 3600
    assert (
        cert.not_valid_after_utc.timestamp() - cert.not_valid_before_utc.timestamp() <= 366 * 86400
    )
    assert ca.leaf_for("speed.example.test", "192.0.2.99") is path  # cached per SNI
    ca.server_context("speed.example.test", "192.0.2.9", ["h2"])
    start = time.perf_counter()
    for _ in range(1000):
        ca.server_context("speed.example.test", "192.0.2.9", ["h2"])
    assert (time.perf_counter() - start) / 1000 < 50e-6


def test_leaf_chain_leaves_out_the_ca(ca: CertificateAuthority) -> None:
    """Servers do not send their root; parsing it costs every app handshake ~0.3 ms."""
    pem = ca.leaf_for("chain.test", "192.0.2.7").read_bytes()
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 1
    assert x509.load_pem_x509_certificate(pem).issuer == ca.certificate.subject


def test_upstream_context(tmp_path: Path, ca: CertificateAuthority) -> None:
    strict = upstream_context(False, [str(ca.cert_path)])
    assert strict.check_hostname and strict.verify_mode is ssl.CERT_REQUIRED
    assert upstream_context(False, [str(ca.cert_path)]) is strict
    loose = upstream_context(True, [])
    assert not loose.check_hostname and loose.verify_mode is ssl.CERT_NONE
    # The extra CA is a trust anchor: a tapui leaf verifies through the upstream context.
    strict.set_alpn_protocols(["h2", "http/1.1"])
    client, _ = handshake(ca.server_context("up.test", "192.0.2.1", ["h2"]), strict, "up.test")
    assert client.selected_alpn_protocol() == "h2"


def test_one_upstream_context_offers_each_connection_the_alpn_set_when_it_was_made(
    ca: CertificateAuthority,
) -> None:
    """The list set before a connection is made is the one it offers, later settings aside."""
    ctx = upstream_context(False, [str(ca.cert_path)])
    server = ca.server_context("alpn.test", "192.0.2.1", ["h2", "http/1.1"])
    ctx.set_alpn_protocols(["http/1.1"])
    first = client_end(ctx, "alpn.test")
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    second = client_end(ctx, "alpn.test")
    assert complete(first, server)[0].selected_alpn_protocol() == "http/1.1"
    assert complete(second, server)[0].selected_alpn_protocol() == "h2"


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_trust_bundle_and_java_truststore(tmp_path: Path, ca: CertificateAuthority) -> None:
    bundle = trust_bundle(ca, tmp_path)
    data = bundle.read_bytes()
    assert data.endswith(ca.cert_pem)
    assert data.count(b"-----BEGIN CERTIFICATE-----") > 1  # system roots kept
    ctx = ssl.create_default_context(cafile=str(bundle))
    client, _ = handshake(ca.server_context("bundle.test", "192.0.2.1", []), ctx, "bundle.test")
    assert client.version()
    store = java_truststore(ca, tmp_path)
    loaded = pkcs12.load_pkcs12(store.read_bytes(), None)
    certs = [c.certificate for c in loaded.additional_certs]
    assert ca.certificate in certs and len(certs) > 1


def test_records_before_an_error_are_read_and_the_error_comes_next(
    ca: CertificateAuthority,
) -> None:
    """A server's last records (HTTP/2 trailers, say) followed by an alert or a bad record in
    the same read: the records are passed on, then the error is raised."""
    from engine.tls_endpoint import TlsEndpoint

    client = TlsEndpoint(ssl.create_default_context(cafile=str(ca.cert_path)), server_side=False,
                         server_hostname="example.test")
    server = TlsEndpoint(ca.server_context("example.test", "192.0.2.1", []), server_side=True)
    for _ in range(5):
        client_done = client.handshake()
        server.feed(client.output())
        server_done = server.handshake()
        client.feed(server.output())
        if client_done and server_done:
            break
    assert client.handshake_done and server.handshake_done
    server.write(b"trailers")
    record = server.output()
    server.write(b"more")
    broken = bytearray(server.output())
    broken[-1] ^= 0xFF  # its authentication tag no longer matches
    client.feed(record + bytes(broken))
    assert b"".join(client.read()) == b"trailers"
    assert isinstance(client.failed, ssl.SSLError)
    with pytest.raises(ssl.SSLError):
        client.read()
