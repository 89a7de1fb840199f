"""Relaying each app connection to its real destination, and handing a copy to the decoders.

For every SYN the stack reports, the upstream is dialled first (so a refused port is refused for
the app too); then the first bytes decide: TLS is intercepted (upstream handshake verified first,
then the app's, offering only the ALPN upstream chose), HTTP goes to its decoder, anything else
is relayed as a raw TCP flow. Bytes are relayed unchanged in every case.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine import browser_trust, procinfo, sniff, tls
from engine.addresses import AddressPlan, host_port
from engine.ca import CertificateAuthority
from engine.dns import DnsResolver
from engine.flow import Connection, ConnectionSummary, FlowBus, Timings, next_connection_id
from engine.http2 import looks_like_h2_settings
from engine.observer import StreamObserver
from engine.socks import SocksObserver
from engine.tcp import TcpConnection
from engine.tls_endpoint import TlsEndpoint
from engine.upstream import ReadPoller, UpstreamTransport

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0
#: A DNS answer counts as a connection's DNS phase when the SYN follows within this many seconds.
DNS_PHASE_WINDOW = 2.0
SNIFF_LIMIT = 16 * 1024
#: How long the first bytes may leave the protocol open (a prefix of "POST", a word and a space,
#: part of a TLS record) before they are relayed as they are: an app that sent a short message
#: of its own protocol waits for an answer, and must get one.
SNIFF_WAIT = 0.3
# The upstream buffer's marks sit well below the app's window (tcp.RCV_BUF, 4 MiB): asyncio
# pauses us before the window closes, and its resume_writing() is our cue to reopen it.
UPSTREAM_HIGH_WATER = 2 * 1024 * 1024
UPSTREAM_LOW_WATER = 512 * 1024
#: Bytes read from an upstream socket at once (asyncio reads 256 KiB by default).
READ_SIZE = 1024 * 1024
#: Seconds a spare upstream ClientHello may wait for the connection that will use it.
SPARE_TLS_MAX_AGE = 10.0
#: Spares kept before stale ones are dropped (one per upstream address).
MAX_SPARES = 64
# A fatal TLS alert (handshake_failure), sent to the app when the upstream handshake fails.
TLS_ALERT_HANDSHAKE_FAILURE = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40])


Address = tuple[str, int]
Hello = tuple[str | None, tuple[str, ...]]  # (SNI, ALPN offered) of a ClientHello


class SpareHellos:
    """Upstream endpoints with their ClientHello ready, at most one per upstream address,
    each for the next connection there (see Relay._make_spare_tls_up). A spare is good for
    `SPARE_TLS_MAX_AGE` seconds, and only for the SNI and ALPN it was made for."""

    def __init__(self) -> None:
        self._spares: dict[Address, tuple[Hello, TlsEndpoint, float]] = {}

    def __contains__(self, address: Address) -> bool:
        return address in self._spares

    def take(self, address: Address, hello: Hello) -> TlsEndpoint | None:
        """The spare for `address` if it is fresh and made for `hello`; it is used up either
        way."""
        spare = self._spares.pop(address, None)
        if spare is None or spare[0] != hello or self._stale(spare[2], time.monotonic()):
            return None
        return spare[1]

    def keep(self, address: Address, hello: Hello, endpoint: TlsEndpoint) -> None:
        now = time.monotonic()
        if len(self._spares) >= MAX_SPARES:  # many addresses: forget the stale ones
            for key in [k for k, spare in self._spares.items() if self._stale(spare[2], now)]:
                del self._spares[key]
        self._spares[address] = (hello, endpoint, now)

    def drop(self, address: Address) -> None:
        self._spares.pop(address, None)

    @staticmethod
    def _stale(made: float, now: float) -> bool:
        return now - made >= SPARE_TLS_MAX_AGE


@dataclass
class ProxyOptions:
    intercept_tls: bool = True
    insecure: bool = False
    upstream_ca: list[str] = field(default_factory=list)
    ignore_hosts: list[re.Pattern[str]] = field(default_factory=list)
    body_cap: int = 64 * 1024 * 1024


class Proxy:
    """Owns the policy: where to dial, whether to intercept, which observer decodes."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        plan: AddressPlan,
        bus: FlowBus,
        options: ProxyOptions,
        ca: CertificateAuthority | None,
        processes: procinfo.ProcessFinder | None = None,
    ) -> None:
        self.loop = loop
        self.upstream_readers = ReadPoller(loop)
        self.plan = plan
        self.bus = bus
        self.options = options
        self.ca = ca
        self.processes = processes
        self.dns: DnsResolver | None = None
        self.relays: set[Relay] = set()
        self.closed_listeners: list[Callable[[ConnectionSummary], None]] = []
        self._dns_claimed: dict[str, float] = {}
        #: (server name, upstream address, ALPN offered) -> ALPN the upstream chose last time
        self.alpn_chosen: dict[tuple[str, tuple[str, int], tuple[str, ...]], str | None] = {}
        #: upstream address -> (SNI, ALPN offered) of the last ClientHello intercepted for it
        self.last_hello: dict[Address, Hello] = {}
        self.spare_tls_up = SpareHellos()

    def claim_dns(self, address: str, answered: float) -> bool:
        """True once per DNS answer: only the first connection after it had to wait for it."""
        if self._dns_claimed.get(address) == answered:
            return False
        self._dns_claimed[address] = answered
        return True

    def connection_closed(self, summary: ConnectionSummary) -> None:
        for listener in self.closed_listeners:
            listener(summary)

    def on_connection(self, conn: TcpConnection) -> None:
        relay = Relay(self, conn)
        self.relays.add(relay)
        relay.connect()

    def shutdown(self) -> None:
        """tapui is stopping: finish every open connection's flows and summary."""
        for relay in list(self.relays):
            relay.stop()
        self.upstream_readers.close()

    def ignored(self, host: str) -> bool:
        return any(p.search(host) for p in self.options.ignore_hosts)


class AppSide:
    """The TcpConnection's handler: forwards to the relay."""

    __slots__ = ("relay",)

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def data_received(self, parts: list[memoryview]) -> None:
        self.relay.from_app(parts)

    def eof_received(self) -> None:
        self.relay.app_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.app_lost(exc)

    def pause_writing(self) -> None:
        if self.relay.upstream is not None:
            self.relay.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.relay.upstream is not None:
            self.relay.upstream.resume_reading()

    def upstream_buffered(self) -> int:
        up = self.relay.upstream
        return up.get_write_buffer_size() if up is not None else 0


class UpstreamSide(asyncio.Protocol):
    """The asyncio protocol of the host-side socket (TLS, when intercepted, is done by the relay)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.from_upstream(data)

    def eof_received(self) -> bool:
        self.relay.upstream_eof()
        return True  # keep our write side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.upstream_lost(exc)

    def pause_writing(self) -> None:
        pass  # the app's window shrinks by itself as the buffer grows

    def resume_writing(self) -> None:
        self.relay.app.window_update()


class Relay:
    def __init__(self, proxy: Proxy, conn: TcpConnection) -> None:
        self.proxy = proxy
        self.intercept_tls = proxy.options.intercept_tls
        self.app = conn
        self.upstream: UpstreamTransport | None = None
        self.observer: StreamObserver | None = None
        self.mode = "sniff"  # sniff -> plain | tls-handshake -> tls | closed
        self.pending = bytearray()  # app bytes held while sniffing or handshaking
        #: Server bytes relayed while sniffing, kept for the decoder: an h2c server sends its
        #: SETTINGS as soon as it accepts, often before the app's preface reaches tapui.
        self.early_server: list[bytes] = []
        self.sniff_timer: asyncio.TimerHandle | None = None  # see SNIFF_WAIT
        self.tls_up: TlsEndpoint | None = None  # tapui as the client of the upstream
        # An upstream endpoint made ahead of the app's ClientHello, for the SNI and ALPN the
        # last one to this address had: ((SNI, ALPN), endpoint with its ClientHello ready).
        self.early_tls_up: tuple[Hello, TlsEndpoint] | None = None
        self.tls_app: TlsEndpoint | None = None  # tapui as the app's server
        self.hello: tls.ClientHello | None = None
        self.app_flight_alpn: str | None = None  # the ALPN of a server flight prepared early
        self.app_fed = 0  # bytes of `pending` the app's TLS endpoint already has
        self.upstream_close_sent = False
        self.early_upstream: list[bytes] = []  # server bytes that came before the app's handshake
        self.tls_session_kept = False  # the upstream's TLS session was offered for resumption
        self.app_eof_seen = False
        self.upstream_eof_seen = False
        server_ip, server_port = conn.server
        self.info = Connection(
            id=next_connection_id(), client=conn.client, server=conn.server
        )
        self.info.upstream = (proxy.plan.upstream_address(server_ip), server_port)
        self.started = time.time()
        self.dns_time: float | None = None
        named = proxy.dns.name_for(server_ip) if proxy.dns is not None else None
        if named is not None:
            self.info.hostname, asked, answered = named
            if self.started - answered < DNS_PHASE_WINDOW and proxy.claim_dns(server_ip, answered):
                self.started, self.dns_time = asked, answered  # the flow's life began with DNS
        else:
            self.info.hostname = proxy.plan.name_of(server_ip)
        self.sent = 0
        self.received = 0
        self.error: str | None = None
        self.connected: float | None = None
        self.tls_done: float | None = None
        self.tunnel_opened: float | None = None  # when a proxy accepted the app's CONNECT

    # ---- connecting -----------------------------------------------------------------------

    def connect(self) -> None:
        """Dial the upstream with a non-blocking connect; the SYN-ACK waits for the result.

        Done by hand rather than with loop.create_connection, which takes five trips round the
        event loop (~0.3 ms here) on the path of every new connection. The host alias refused
        on one loopback is tried on the other (`AddressPlan.other_loopback`).
        """
        host, port = self.info.upstream  # type: ignore[misc]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # (SOCK_NONBLOCK spares a system call; TCP_NODELAY: the transport sets it)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # out of file descriptors, most likely: refused, and why
            self._failed_connect(f"tapui could not open a socket: {exc.strerror or exc}")
            self.app.refuse()
            return
        address = (host, port)
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            # On loopback the handshake is usually over already: asking again tells, in one
            # system call, whether it is (EISCONN), still going (EALREADY) or failed.
            err = sock.connect_ex(address)
            if err == errno.EISCONN:
                err = 0
            elif err == errno.EALREADY:
                err = errno.EINPROGRESS
        if err == 0:
            self._connected(sock)
        elif err == errno.EINPROGRESS:
            loop = self.proxy.loop
            timer = loop.call_later(CONNECT_TIMEOUT, self._connect_done, sock, errno.ETIMEDOUT)
            loop.add_writer(sock.fileno(), lambda: self._connect_done(sock, None, timer))
        else:
            self._connect_done(sock, err)

    def _connect_done(
        self, sock: socket.socket, err: int | None, timer: asyncio.TimerHandle | None = None
    ) -> None:
        loop = self.proxy.loop
        if timer is not None or err == errno.ETIMEDOUT:
            loop.remove_writer(sock.fileno())
        if timer is not None:
            timer.cancel()
        if err is None:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                self._connected(sock)
                return
        sock.close()
        if err == errno.ECONNREFUSED:
            host, port = self.info.upstream  # type: ignore[misc]
            other = self.proxy.plan.other_loopback(self.app.server[0], host)
            if other is not None:
                self.info.upstream = (other, port)
                self.connect()
                return
            self._failed_connect("connection refused")
            self.app.refuse()
        elif err == errno.ETIMEDOUT:
            self._failed_connect("connect timed out")
            self.app.refuse()
        else:
            self._failed_connect(os.strerror(err))
            if err in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                self.app.unreachable(1 if err == errno.EHOSTUNREACH else 0)
            else:
                self.app.refuse()

    def _connected(self, sock: socket.socket) -> None:
        self.connected = time.time()
        if self.app.state == "CLOSED":  # the app gave up while we dialled
            sock.close()
            return
        self.upstream = UpstreamTransport(
            self.proxy.upstream_readers, sock, UpstreamSide(self), READ_SIZE, UPSTREAM_HIGH_WATER,
            UPSTREAM_LOW_WATER,
        )
        self.app.accept(AppSide(self))
        self._find_process()
        self._prepare_upstream_tls()

    def _failed_connect(self, why: str) -> None:
        host, port = self.info.upstream  # type: ignore[misc]
        first = self.proxy.plan.upstream_address(self.app.server[0])  # host, unless it fell back
        tried = f"{host}:{port}" if first == host else f"{first}:{port} and {host}:{port}"
        self._record_failure(f"upstream {tried}: {why}")

    def _record_failure(self, why: str) -> None:
        """The connection ends before any exchange: a raw flow with the error, and its line."""
        self._find_process()  # (before the app hears of it: its socket is still open)
        self.mode = "closed"
        self.error = why
        self.proxy.relays.discard(self)
        observer = sniff.make_observer(
            "unknown", self.info, self.proxy.bus, "tcp", 0, self._connection_timings()
        )
        observer.close(why)
        self._summarise()

    def _summarise(self) -> None:
        self.proxy.connection_closed(
            ConnectionSummary(
                self.info, self.started, time.time(), self.sent, self.received, self.error
            )
        )

    # ---- deciding what the connection carries ----------------------------------------------

    def _start_observer(self, kind: str, scheme: str) -> None:
        self.observer = sniff.make_observer(
            kind, self.info, self.proxy.bus, scheme, self.proxy.options.body_cap,
            self._connection_timings(),  # copied into the connection's first flow
        )

    def _connection_timings(self) -> Timings:
        if self.tunnel_opened is not None:  # the flows in a tunnel start with it, connected
            opened = self.tunnel_opened
            return Timings(start=opened, connect=opened, tls=self.tls_done)
        t = self.info.timings
        t.start, t.dns, t.connect, t.tls = self.started, self.dns_time, self.connected, self.tls_done
        return t

    def _find_process(self) -> None:
        """Which process made the connection: looked up right after the SYN-ACK, while the
        app completes its handshake and writes its request, when tapui would wait anyway
        (and while the app surely still holds the socket)."""
        if self.proxy.processes is not None:
            self.proxy.processes.lookup(self.info)

    def from_app(self, parts: list[memoryview]) -> None:
        """The app's bytes, as the payloads of the segments that brought them."""
        mode = self.mode
        if mode == "plain":
            self.sent += sum(map(len, parts))
            self._to_upstream(parts)
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.sent += len(data)
        if mode == "tls":
            self._tls_from_app(data)
        elif mode == "sniff":
            self.pending += data
            self._sniff()
        elif mode == "tls-handshake":
            self.pending += data

    def _to_upstream(self, parts: list[bytes] | list[memoryview]) -> None:
        """The app's plaintext to the upstream: encrypted when TLS is intercepted, else as it
        came, in one system call (a 64 KiB write of the app arrives as a 65,480 and a 56 byte
        segment, and joining them would copy every byte again). Forward first, decode after:
        the decoder's time is then off the request's path."""
        if self.tls_up is not None:
            for part in parts:
                self.tls_up.write(part)
            self._upstream_send(self.tls_up.output())
        elif self.upstream is not None:
            self.upstream.writelines(parts)
        self._decode(parts, from_client=True)

    def _decode(self, parts: list[bytes] | list[memoryview], from_client: bool) -> None:
        """What was relayed, to the decoder a part at a time (it may fail on any part)."""
        for part in parts:
            observer = self.observer
            if observer is None:  # (none, or it failed on an earlier part)
                break
            self._observe(observer.client_data if from_client else observer.server_data, part)

    def _observe(self, method, data: bytes) -> None:  # type: ignore[no-untyped-def]
        try:
            method(data)
        except Exception:  # a decoder bug must never break the relay
            log.exception("observer failed")
            self.observer = None

    def _sniff(self) -> None:
        buf = bytes(self.pending)
        kind = sniff.classify(buf)
        if kind == "need-more" and len(buf) < SNIFF_LIMIT:
            self._wait_for_more()
            return
        if kind == "tls" and self.intercept_tls and self.proxy.ca is not None:
            try:
                hello = tls.parse_client_hello(buf)
            except tls.NotTLS:
                hello = None
                kind = "unknown"
            if hello is None and kind == "tls":
                if len(buf) < SNIFF_LIMIT * 4:
                    self._wait_for_more()
                    return  # the ClientHello spans more segments
                kind = "unknown"
            if hello is not None:
                self.info.sni = hello.sni
                name = hello.sni or self.info.hostname or self.info.server[0]
                if self.proxy.ignored(name):
                    self._go_plain("unknown", "tcp")
                    return
                self._start_upstream_tls(hello)
                return
        if kind == "tls":
            kind = "unknown"
        if kind in ("socks5", "socks4"):
            self._go_plain(kind, "tcp")
            return
        self._go_plain(kind if kind in ("http1", "h2") else "unknown", "http")

    def _wait_for_more(self) -> None:
        if self.sniff_timer is None:
            self.sniff_timer = self.proxy.loop.call_later(SNIFF_WAIT, self._sniff_timed_out)

    def _sniff_timed_out(self) -> None:
        """No more bytes came to tell the protocol: relay these, decoded as HTTP/1 if they
        begin like a request, else as raw TCP."""
        self.sniff_timer = None
        if self.mode == "sniff" and self.pending:
            self._go_plain("http1" if sniff.begins_like_http(bytes(self.pending)) else "unknown",
                           "http")

    def _go_plain(self, kind: str, scheme: str) -> None:
        self.mode = "plain"
        self._start_observer(kind, scheme)
        data, self.pending = bytes(self.pending), bytearray()
        if data:
            self._to_upstream([data])
        early, self.early_server = self.early_server, []
        self._decode(early, from_client=False)  # (relayed already, decoded after the app's)
        if self.app_eof_seen:
            self._upstream_write_eof()

    # ---- TLS interception -------------------------------------------------------------------

    def _prepare_upstream_tls(self) -> None:
        """If the last TLS connection to this address was intercepted, have the upstream
        endpoint for the same SNI and ALPN ready when the app's ClientHello arrives.

        Offering a kept session costs ~0.4 ms (Python copies it through DER) and the first
        flight ~0.2 ms: made here, that work would hold up the app's ClientHello, so the last
        connection to the address left a spare made while tapui waited for its app (see
        `_make_spare_tls_up`). Nothing is sent upstream before the ClientHello is compared;
        a different one means the endpoint is made again."""
        guess = self.proxy.last_hello.get(self.info.upstream)  # type: ignore[arg-type]
        if guess is None:  # (only intercepted ClientHellos are remembered)
            return
        endpoint = self.proxy.spare_tls_up.take(self.info.upstream, guess)  # type: ignore[arg-type]
        if endpoint is None:
            endpoint = self._early_tls_up(guess)
        if endpoint is not None:
            self.early_tls_up = (guess, endpoint)

    def _early_tls_up(self, guess: Hello) -> TlsEndpoint | None:
        try:
            endpoint = self._upstream_endpoint(*guess)
            endpoint.handshake()  # the ClientHello, held in the endpoint
        except (ssl.SSLError, ValueError):
            return None  # the real attempt reports it
        return endpoint

    def _make_spare_tls_up(self) -> None:
        """Ready the next connection's upstream ClientHello now, while the app checks our
        certificate (about 1 ms in which tapui has nothing to do for this connection)."""
        address = self.info.upstream
        guess = self.proxy.last_hello.get(address)  # type: ignore[arg-type]
        if guess is None or address in self.proxy.spare_tls_up:
            return
        endpoint = self._early_tls_up(guess)
        if endpoint is not None:
            self.proxy.spare_tls_up.keep(address, guess, endpoint)  # type: ignore[arg-type]

    def _upstream_endpoint(self, sni: str | None, alpn: tuple[str, ...]) -> TlsEndpoint:
        """tapui's client end of the upstream TLS, offering `alpn` (and a kept session)."""
        opts = self.proxy.options
        ctx = tls.upstream_context(opts.insecure, opts.upstream_ca)
        ctx.set_alpn_protocols(list(alpn))  # copied into the connection made on the next line
        server_name = sni or self.info.upstream[0]  # type: ignore[index]
        return TlsEndpoint(ctx, server_side=False, server_hostname=server_name)

    def _start_upstream_tls(self, hello: tls.ClientHello) -> None:
        """Begin the upstream handshake, offering the app's ALPN list; the app waits."""
        self.hello = hello
        self.mode = "tls-handshake"
        wanted = (hello.sni, tuple(hello.alpn))
        self.proxy.last_hello[self.info.upstream] = wanted  # type: ignore[index]
        early, self.early_tls_up = self.early_tls_up, None
        if early is not None and early[0] == wanted:
            self.tls_up = early[1]
        else:
            try:
                self.tls_up = self._upstream_endpoint(*wanted)
            except (ssl.SSLError, ValueError) as exc:
                self._tls_failed(f"upstream TLS setup failed: {_ssl_reason(exc)}")
                return
        self._upstream_handshake()
        if self.mode == "tls-handshake":
            self._prepare_app_flight()

    def _alpn_key(self) -> tuple[str, tuple[str, int], tuple[str, ...]]:
        assert self.hello is not None and self.tls_up is not None
        server_name = self.tls_up.ssl_object.server_hostname
        return (server_name, self.info.upstream, tuple(self.hello.alpn))  # type: ignore[return-value]

    def _app_endpoint(self, alpn: str | None) -> TlsEndpoint:
        assert self.proxy.ca is not None and self.hello is not None
        server_ctx = self.proxy.ca.server_context(
            self.hello.sni, self.app.server[0], [alpn] if alpn else []
        )
        return TlsEndpoint(server_ctx, server_side=True)

    def _prepare_app_flight(self) -> None:
        """While the upstream handshake is under way, compute our answer to the app's
        ClientHello (key exchange and signature, ~0.4 ms) with the ALPN the upstream chose
        last time, or none when the app offered none. Nothing reaches the app before the
        upstream is verified; a different choice this time means starting over."""
        assert self.hello is not None
        key = self._alpn_key()
        if self.hello.alpn and key not in self.proxy.alpn_chosen:
            return
        alpn = self.proxy.alpn_chosen.get(key)
        try:
            app_tls = self._app_endpoint(alpn)
            app_tls.feed(bytes(self.pending))
            app_tls.handshake()  # False: the flight waits in the endpoint's output
        except (ssl.SSLError, ValueError, OSError):
            return  # the real attempt, after the upstream's answer, reports it
        self.tls_app, self.app_flight_alpn, self.app_fed = app_tls, alpn, len(self.pending)

    def _upstream_send(self, data: bytes) -> None:
        if data and self.upstream is not None and not self.upstream.is_closing():
            self.upstream.write(data)

    def _upstream_handshake(self) -> None:
        up = self.tls_up
        assert up is not None
        try:
            done = up.handshake()
        except ssl.SSLError as exc:
            self._upstream_send(up.output())  # the alert that tells the server why
            self._tls_failed(f"upstream TLS handshake failed: {_ssl_reason(exc)}")
            return
        self._upstream_send(up.output())
        if done:
            self._upstream_tls_ready()

    def _upstream_tls_ready(self) -> None:
        """Upstream verified: now answer the app, offering only the ALPN upstream chose."""
        assert self.proxy.ca is not None and self.tls_up is not None and self.hello is not None
        self.tls_done = time.time()
        upstream_ssl = self.tls_up.ssl_object
        alpn = upstream_ssl.selected_alpn_protocol()
        self.info.alpn = alpn
        self.info.tls_version = upstream_ssl.version()
        der = upstream_ssl.getpeercert(binary_form=True)
        if der:
            self.info.certificate = tls.cert_info(der)
        self.proxy.alpn_chosen[self._alpn_key()] = alpn
        if self.tls_app is None or self.app_flight_alpn != alpn:
            try:
                self.tls_app = self._app_endpoint(alpn)
            except Exception as exc:  # noqa: BLE001 - reported on the flow
                self._tls_failed(f"making a certificate failed: {exc}")
                return
            self.app_fed = 0
        self.mode = "tls"
        self._start_observer("h2" if alpn == "h2" else "http1", "https")
        self._read_upstream()  # server bytes that came with its last handshake message
        data, self.pending = bytes(self.pending[self.app_fed:]), bytearray()
        self._tls_from_app(data)
        self.proxy.loop.call_soon(self._make_spare_tls_up)  # (unless there is a spare)

    def _tls_failed(self, why: str) -> None:
        self._record_failure(why)
        if self.app.state != "CLOSED":
            self.app.write(TLS_ALERT_HANDSHAKE_FAILURE)
            self.app.write_eof()
        if self.upstream is not None:
            self.upstream.abort()

    def _tls_from_app(self, data: bytes) -> None:
        app_tls = self.tls_app
        assert app_tls is not None
        app_tls.feed(data)
        try:
            if not app_tls.handshake_done:
                if not app_tls.handshake():
                    self._flush_tls()
                    return
                self._flush_tls()
                early, self.early_upstream = self.early_upstream, []
                if early:
                    self.from_upstream_plaintext(early)
            plain = app_tls.read()
            if plain:
                self._to_upstream(plain)
            if app_tls.failed is not None:  # (after records it sent before its alert)
                raise app_tls.failed
        except ssl.SSLError as exc:
            self._flush_tls()
            reason = _ssl_reason(exc)
            if app_tls.handshake_done:
                why = f"TLS error from the app: {reason}"
            else:
                why = f"the app rejected tapui's TLS: {reason}"
                hint = browser_trust.rejection_hint(self.info.command, reason)
                if hint is not None:
                    why += f" ({hint})"
            # An OpenSSL app answers a server's close without close_notify with an alert
            # (decode_error): the connection ended as the server chose.
            self._close_observer(why, of_connection=not self._server_closed_bare)
            self.app.write_eof()
            if self.upstream is not None:
                self.upstream.close()
            return
        self._flush_tls()
        if app_tls.closed:  # close_notify from the app: pass it on
            self._upstream_write_eof()

    def _flush_tls(self) -> None:
        if self.tls_app is not None:
            out = self.tls_app.output()
            if out:
                self.app.write(out)

    # ---- upstream to app ----------------------------------------------------------------

    def _remember_tls_session(self) -> None:
        if self.tls_session_kept or self.tls_up is None:
            return
        self.tls_session_kept = True  # once is enough
        ssl_object = self.tls_up.ssl_object
        ctx = ssl_object.context
        if isinstance(ctx, tls.ResumingContext) and ssl_object.server_hostname:
            if ctx.remember(ssl_object.server_hostname, ssl_object):
                # A spare made before this session was kept would not resume: make it again.
                self.proxy.spare_tls_up.drop(self.info.upstream)  # type: ignore[arg-type]
                self.proxy.loop.call_soon(self._make_spare_tls_up)

    def from_upstream(self, data: bytes) -> None:
        self.received += len(data)
        mode = self.mode
        if mode == "tls":
            self.tls_up.feed(data)  # type: ignore[union-attr]
            self._read_upstream()
            return
        if mode == "tls-handshake":
            self.tls_up.feed(data)  # type: ignore[union-attr]
            self._upstream_handshake()
            return
        if mode == "sniff":
            if self._maybe_h2c_server(data):
                self.early_server.append(data)  # relayed now, decoded once the app is told
                self.from_upstream_plaintext([data])
                return
            self._go_plain("unknown", "tcp")  # the server spoke first
        self.from_upstream_plaintext([data])

    def _maybe_h2c_server(self, data: bytes) -> bool:
        """The server spoke first with what may be an HTTP/2 server's preface (SETTINGS): the
        app's bytes, when they come, tell whether it is HTTP/2 over plain TCP."""
        if self.early_server:
            return sum(map(len, self.early_server)) + len(data) <= SNIFF_LIMIT
        return looks_like_h2_settings(data)

    def _read_upstream(self) -> None:
        up = self.tls_up
        assert up is not None
        try:
            plain = up.read()
        except ssl.SSLError as exc:
            self._upstream_tls_error(exc)
            return
        self._upstream_send(up.output())  # e.g. the answer to a key update
        if plain:
            self._remember_tls_session()  # TLS 1.3 tickets come before the first data
            self.from_upstream_plaintext(plain)
        if up.failed is not None:  # (after records it sent before its alert)
            self._upstream_tls_error(up.failed)
            return
        if up.closed:
            self.upstream_eof()  # close_notify: the server has said all it will say

    def _upstream_tls_error(self, exc: ssl.SSLError) -> None:
        # An app that closed its socket without close_notify (node and Python do) gets an
        # alert from an OpenSSL server (decode_error) that its kernel drops: not an error
        # of the connection, though a flow still open fails with it.
        app_left = (self.app_eof_seen and self.tls_app is not None
                    and not self._app_said_close_notify)
        self._close_observer(f"TLS error from the server: {_ssl_reason(exc)}",
                             of_connection=not app_left)
        self.app.abort()
        if self.upstream is not None:
            self.upstream.abort()

    def from_upstream_plaintext(self, parts: list[bytes]) -> None:
        """The server's plaintext, to the app and then to the decoder: as it came in plain mode,
        a decrypted record a part under TLS (written on one by one, not joined)."""
        if self.mode == "tls":
            app_tls = self.tls_app
            assert app_tls is not None
            if not app_tls.handshake_done:
                # The server spoke first (HTTP/2 SETTINGS) before the app finished its handshake
                # with us: hold the bytes until it has.
                self.early_upstream.extend(parts)
                return
            try:
                for part in parts:
                    app_tls.write(part)
            except ssl.SSLError as exc:
                self._close_observer(f"TLS error toward the app: {_ssl_reason(exc)}")
                self.app.abort()
                return
            self._flush_tls()
        else:
            for part in parts:
                self.app.write(part)
        self._decode(parts, from_client=False)
        if self.mode == "plain" and self.observer is not None and self.observer.tunnel:
            self._enter_tunnel()  # an HTTP proxy's CONNECT, or a SOCKS proxy's, was granted

    def _enter_tunnel(self) -> None:
        """A proxy (HTTP or SOCKS) accepted the app's CONNECT: what the app sends next is meant
        for the far end, so it is told apart afresh (TLS intercepted, HTTP decoded) as on a new
        connection."""
        observer = self.observer
        if isinstance(observer, SocksObserver) and observer.target is not None:
            self.info.tunnel = ("socks", host_port(*observer.target))
        elif getattr(observer, "tunnel_target", None):
            self.info.tunnel = ("connect", observer.tunnel_target)  # type: ignore[union-attr]
        self._close_observer(None)  # (the CONNECT flow is done)
        self.mode = "sniff"
        self.tunnel_opened = time.time()

    # ---- closing ----------------------------------------------------------------------------

    def app_eof(self) -> None:
        self.app_eof_seen = True
        if self.observer is not None:
            self._observe(lambda _d: self.observer.client_eof(), b"")  # type: ignore[union-attr]
        if self.mode in ("plain", "tls"):
            self._upstream_write_eof()

    def _upstream_write_eof(self) -> None:
        up = self.upstream
        if up is None or up.is_closing():
            return
        # close_notify goes upstream only if the app sent one: an app that just closes its
        # socket must look the same to the server as without tapui.
        if (self.tls_up is not None and self.mode == "tls" and not self.upstream_close_sent
                and self._app_said_close_notify):
            self.upstream_close_sent = True
            self.tls_up.close()
            self._upstream_send(self.tls_up.output())
        up.write_eof()

    def upstream_eof(self) -> None:
        if self.upstream_eof_seen:
            return
        self.upstream_eof_seen = True
        if self.mode == "tls-handshake":
            self._tls_failed("upstream TLS handshake failed: the server closed the connection")
            return
        if self.mode == "sniff":
            self._go_plain("unknown", "tcp")
        if self.observer is not None:
            self._observe(lambda _d: self.observer.server_eof(), b"")  # type: ignore[union-attr]
        # Likewise close_notify to the app only if the server sent one. (One the server never
        # sent reached apps that had closed already, and their kernels answered with RST.)
        if (self.mode == "tls" and self.tls_app is not None and self.tls_up is not None
                and self.tls_up.closed):
            self.tls_app.close()
            self._flush_tls()
        self.app.write_eof()

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.mode == "closed":
            return
        if exc is not None:
            if self.mode == "tls-handshake":
                self._tls_failed(f"upstream TLS handshake failed: {exc}")
                return
            # After the server's FIN, a failing socket (its RST) only says it is gone.
            self._close_observer(f"upstream error: {exc}", of_connection=not self.upstream_eof_seen)
            self.app.abort()
        else:
            if not self.upstream_eof_seen:
                self.upstream_eof()
            self._close_observer(None)
        self._finish()

    def app_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            # After its FIN or its close_notify, an app's RST only says its socket is closed:
            # it answers what came after (the server's close_notify), or the kernel sent it for
            # that unread reply instead of a FIN. The connection ended as the app chose.
            ended = self.app_eof_seen or self._app_said_close_notify
            self._close_observer("app reset the connection", of_connection=not ended)
            if self.upstream is not None:
                self.upstream.abort()
        else:
            self._close_observer(None)
            if self.upstream is not None and not self.upstream.is_closing():
                self.upstream.close()
        self._finish()

    def stop(self) -> None:
        if self.mode == "closed":
            return
        self.mode = "closed"
        self.proxy.relays.discard(self)
        observer, self.observer = self.observer, None
        if observer is not None:
            try:  # exchanges still open end with this error; finished ones stay as they are
                observer.close("tapui stopped before the exchange finished")
            except Exception:
                log.exception("observer failed on close")
        if self.upstream is not None:
            self.upstream.abort()
        self._summarise()

    @property
    def awaits_server(self) -> bool:
        """The server may still send what completes an exchange (its connection is open)."""
        up, observer = self.upstream, self.observer
        return (self.mode != "closed" and up is not None and not up.is_closing()
                and not self.upstream_eof_seen and observer is not None
                and observer.answers_pending())

    @property
    def _server_closed_bare(self) -> bool:
        """The server closed its side of the TLS connection without close_notify."""
        return self.upstream_eof_seen and self.tls_up is not None and not self.tls_up.closed

    @property
    def _app_said_close_notify(self) -> bool:
        return self.tls_app is not None and self.tls_app.closed

    def _close_observer(self, error: str | None, of_connection: bool = True) -> None:
        """End the observer's open flows with `error`; also the connection's, if `of_connection`."""
        if error and of_connection and not self.error:
            self.error = error
        observer, self.observer = self.observer, None
        if observer is not None:
            try:
                observer.close(error)
            except Exception:
                log.exception("observer failed on close")

    def _finish(self) -> None:
        if self.mode != "closed" and self.app.state == "CLOSED":
            self.mode = "closed"
            self.proxy.relays.discard(self)
            self._summarise()


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    return str(reason or exc)
