"""One capture session: the sandboxed command, the stack on its TUN device, and the relay.

`Capture.start()` prepares everything that can fail with a clear message (CA, sandbox);
`Capture.run()` is the asyncio side: it lets the command run, relays until it exits (or, with
keep_running, until no process is left in the sandbox), then tears the stack down and returns
the command's exit status. Processes the command leaves running are ended by the sandbox's agent
once tapui lets it go (or dies).
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import shutil
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from engine import browser_trust, ca, heap, tempdirs, tls
from engine.addresses import GATEWAY_V4, AddressPlan, Published
from engine.errors import EXIT_INTERNAL, TapuiError
from engine.flow import ConnectionSummary, FlowBus
from engine.netstack import QUIC_PORT, Netstack
from engine.procinfo import ProcessFinder
from engine.proxy import Proxy, ProxyOptions
from engine.proxy_env import sandbox_proxy_env
from engine.publish import AgentLink, Publisher, listen
from engine.runstatus import CommandState, RunStatus
from engine.sandbox import (
    DEFAULT_TUN,
    TUN_ENV,
    Helper,
    Sandbox,
    SandboxConfig,
    command_placement,
    exit_status,
    foreground_tty,
)

#: System CA bundle paths that get the tapui CA appended inside the sandbox (those that exist).
CA_BUNDLE_PATHS = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
]
TRUST_ENV = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "DENO_CERT",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",  # gRPC's C core (grpcio, C++, Ruby, PHP)
]
#: The host's resolver services, reachable from the sandbox through their Unix sockets (a
#: network namespace does not hide those): systemd-resolved's, which glibc's nss-resolve
#: asks before DNS where nsswitch.conf says `resolve [!UNAVAIL=return] dns` (Fedora's
#: default) and Bun asks too, and nscd's. They would answer from the host's view, where
#: host.tapui.internal and --add-host names do not exist. /dev/null over each makes it refuse,
#: and a refused service is skipped: lookups go on to DNS, which tapui answers.
HOST_RESOLVER_SOCKETS = [
    "/run/systemd/resolve/io.systemd.Resolve",
    "/run/nscd/socket",
    "/var/run/nscd/socket",
]
KEEP_RUNNING_POLL = 0.5
DRAIN_TIME = 0.5  # seconds at most for the last bytes to be relayed once the command exited
DRAIN_POLL = 0.005
# glibc malloc: serve relay buffers (up to 256 KiB reads, TLS records) from the heap and keep
# a little free memory, instead of mmap-ing and page-faulting fresh buffers for every chunk.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_TUNING = {M_MMAP_THRESHOLD: 4 << 20, M_TRIM_THRESHOLD: 32 << 20, M_TOP_PAD: 8 << 20}


def tune_allocator() -> None:
    """About 1.5x on the TLS path here; a no-op where libc has no mallopt (e.g. musl)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for option, value in MALLOC_TUNING.items():
        mallopt(option, value)


def raise_fd_limit() -> None:
    """Each connection the command holds open holds a socket in tapui: let tapui have as many
    file descriptors as the system allows it (the hard limit; the soft one is often 1,024).
    The command keeps its own limits: its helper was started before."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # what there is will do


def existing(paths: list[str]) -> list[str]:
    """The paths that exist, each once, with symbolic links resolved (what a mount covers)."""
    return list(dict.fromkeys(os.path.realpath(p) for p in paths if os.path.exists(p)))


@dataclass
class CaptureOptions:
    argv: list[str]
    tun_path: str = field(default_factory=lambda: os.environ.get(TUN_ENV, DEFAULT_TUN))
    add_hosts: list[tuple[str, str]] = field(default_factory=list)
    #: (host port, sandbox port) pairs: servers in the sandbox reached from the host.
    publish: list[Published] = field(default_factory=list)
    keep_running: bool = False
    intercept_tls: bool = True
    #: Relay QUIC; otherwise it is refused while TLS is intercepted (see Netstack).
    allow_quic: bool = False
    insecure: bool = False
    upstream_ca: list[str] = field(default_factory=list)
    ignore_hosts: list[str] = field(default_factory=list)
    body_cap: int = 64 * 1024 * 1024
    ca_dir: Path | None = None
    #: Command I/O: None inherits tapui's (headless); the UI passes a pty's slave fd.
    output_fd: int | None = None
    interactive: bool = True  # headless: the command keeps the terminal
    #: A sandbox helper the CLI started before loading the rest of tapui (spawn_helper).
    helper: Helper | None = None


class Capture:
    def __init__(self, options: CaptureOptions, bus: FlowBus, status: RunStatus) -> None:
        self.options = options
        self.bus = bus
        bus.subscribe(heap.HeapFreezer())  # kept flows must not make full collections long
        self.status = status
        self.plan = AddressPlan.build(options.add_hosts)
        self.workdir = tempdirs.make("run")
        self.sandbox: Sandbox | None = None
        self.tun_fd: int | None = None
        self.ca: ca.CertificateAuthority | None = None
        self.proxy: Proxy | None = None
        self.netstack: Netstack | None = None
        self.listeners: list[tuple[socket.socket, int]] = []  # published ports, on the host
        self.publisher: Publisher | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        #: Called with a ConnectionSummary for each closed connection (headless lines).
        self.connection_listeners: list[Callable[[ConnectionSummary], None]] = []
        self._tty_fd: int | None = None

    # ---- preparing ----------------------------------------------------------------------

    def _trust_setup(self, env: dict[str, str]) -> list[tuple[str, str]]:
        mounts: list[tuple[str, str]] = []
        if not self.options.intercept_tls:
            return mounts
        try:
            self.ca = ca.CertificateAuthority.load_or_create(
                self.options.ca_dir or ca.default_directory()
            )
            bundle = ca.trust_bundle(self.ca, self.workdir)
        except OSError as exc:
            raise TapuiError(
                f"tapui cannot prepare its certificate authority: {exc}", EXIT_INTERNAL
            ) from None
        mounts += [(str(bundle), path) for path in existing(CA_BUNDLE_PATHS)]
        der = self.ca.certificate.public_bytes(serialization.Encoding.DER)
        mounts += browser_trust.policy_mounts(der, self.workdir, existing(browser_trust.POLICY_DIRS))
        for name in TRUST_ENV:
            env[name] = str(bundle)
        env["NODE_EXTRA_CA_CERTS"] = str(self.ca.cert_path)
        try:
            store = ca.java_truststore(self.ca, self.workdir)
        except Exception:  # noqa: BLE001 - Java trust is a convenience
            store = None
        if store is not None:
            java = f"-Djavax.net.ssl.trustStore={store} -Djavax.net.ssl.trustStoreType=PKCS12"
            env["JDK_JAVA_OPTIONS"] = " ".join(filter(None, [env.get("JDK_JAVA_OPTIONS"), java]))
        return mounts

    def start(self) -> None:
        """Set up the CA and the sandbox; raises TapuiError with the user-facing message."""
        self.listeners = listen(self.options.publish)  # (a port in use is said before all)
        if self.options.intercept_tls:
            tls.load_upstream_context_early(self.options.insecure, self.options.upstream_ca)
        env = dict(os.environ)
        sandbox_proxy_env(env, [name for name, _ip in self.options.add_hosts])
        mounts = self._trust_setup(env)
        resolv = self.workdir / "resolv.conf"
        resolv.write_text(f"nameserver {GATEWAY_V4}\noptions timeout:2 attempts:2\n")
        mounts += [(str(resolv), path) for path in existing(["/etc/resolv.conf"])]
        mounts += [(os.devnull, path) for path in existing(HOST_RESOLVER_SOCKETS)]
        out = self.options.output_fd
        new_session, own_process_group = command_placement(
            to_pty=out is not None, interactive=self.options.interactive)
        cfg = SandboxConfig(
            argv=self.options.argv,
            env=env,
            cwd=os.getcwd(),
            tun_path=self.options.tun_path,
            mounts=mounts,
            # With the UI the command's output goes to the pty and its stdin is closed.
            stdin=os.open(os.devnull, os.O_RDONLY) if out is not None else None,
            stdout=out,
            stderr=out,
            own_process_group=own_process_group,
            new_session=new_session,
        )
        self.sandbox = Sandbox(cfg, self.options.helper)
        self.options.helper = None  # the sandbox's now
        try:
            self.tun_fd = self.sandbox.start()
        finally:
            if out is not None and cfg.stdin is not None:
                os.close(cfg.stdin)
        self.status.pid = self.sandbox.pid
        heap.settle_after_start()

    # ---- running ------------------------------------------------------------------------

    async def run(self) -> int:
        assert self.sandbox is not None and self.tun_fd is not None
        tune_allocator()
        raise_fd_limit()
        loop = asyncio.get_running_loop()
        self.loop = loop
        sandbox = self.sandbox
        processes = ProcessFinder(sandbox.diag_socket, sandbox.pid, sandbox.netns_inode)
        sandbox.diag_socket = None  # the finder owns it now
        self.proxy = Proxy(
            loop,
            self.plan,
            self.bus,
            ProxyOptions(
                intercept_tls=self.options.intercept_tls,
                insecure=self.options.insecure,
                upstream_ca=self.options.upstream_ca,
                ignore_hosts=[re.compile(p) for p in self.options.ignore_hosts],
                body_cap=self.options.body_cap,
            ),
            self.ca,
            processes,
        )
        self.proxy.closed_listeners.extend(self.connection_listeners)
        refuse_quic = self.options.intercept_tls and not self.options.allow_quic
        self.netstack = Netstack(
            self.tun_fd, loop, self.plan, self.proxy.on_connection, self.bus, processes,
            refused_udp_ports=frozenset({QUIC_PORT}) if refuse_quic else frozenset(),
        )
        self.proxy.dns = self.netstack.dns
        self.netstack.start()
        if self.listeners and sandbox.agent is not None:
            self.publisher = Publisher(self.proxy, AgentLink(loop, sandbox.agent), self.listeners)
            self.listeners = []
        exited = loop.create_future()
        pidfd = os.pidfd_open(sandbox.pid)
        loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
        if sandbox.cfg.own_process_group:
            self._tty_fd = foreground_tty()
            if self._tty_fd is not None:
                os.tcsetpgrp(self._tty_fd, sandbox.pid)
        try:
            sandbox.go()
        except TapuiError:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._restore_tty()
            self._teardown(processes)
            raise
        self.status.state = CommandState.RUNNING
        try:
            await exited
            loop.remove_reader(pidfd)
            os.close(pidfd)
            assert sandbox.proc is not None
            code = exit_status(sandbox.proc.wait())
            self._restore_tty()
            self.status.exit_code = code
            if self.options.keep_running:
                while not self._stop.is_set() and sandbox.processes_left():
                    await asyncio.sleep(KEEP_RUNNING_POLL)
            else:
                await self._drain(loop)
                self.status.left_running = len(sandbox.processes_left())
            self.status.state = CommandState.EXITED
            return code
        finally:
            self._teardown(processes)

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """After the command exits: relay what it sent last, for up to DRAIN_TIME. The app's
        kernel still sends what its sockets held (then their FIN), and tapui may hold bytes
        the upstream has not taken yet; once nothing is left to move, tapui ends at once (a
        run that made no connection does not wait at all)."""
        deadline = loop.time() + DRAIN_TIME
        while loop.time() < deadline and self._relaying():
            await asyncio.sleep(DRAIN_POLL)

    def _relaying(self) -> bool:
        """Packets wait in the TUN device, the app's side of a connection has not ended
        (its FIN not yet received), bytes wait for the upstream, or a server may still send
        the rest of an answer (an app that stops reading at Content-Length leaves an HTTP/2
        server's trailers on their way)."""
        tun, netstack, proxy = self.tun_fd, self.netstack, self.proxy
        if tun is not None and select.select([tun], [], [], 0)[0]:
            return True
        if netstack is not None and any(
            conn.state == "OPEN" and not conn.fin_received
            for conn in netstack.connections.values()
        ):
            return True
        return proxy is not None and any(
            (relay.upstream is not None and relay.upstream.get_write_buffer_size())
            or relay.awaits_server
            for relay in proxy.relays
        )

    def _restore_tty(self) -> None:
        if self._tty_fd is None:
            return
        old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(self._tty_fd, os.getpgrp())
        except OSError:
            pass
        finally:
            signal.signal(signal.SIGTTOU, old)
            self._tty_fd = None

    def _teardown(self, processes: ProcessFinder) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self._close_listeners()
        if self.proxy is not None:
            self.proxy.shutdown()
        if self.netstack is not None:
            self.netstack.close()
        processes.close()
        if self.tun_fd is not None:
            os.close(self.tun_fd)
            self.tun_fd = None
        if self.sandbox is not None:
            self.sandbox.end_agent()  # it ends what the command left running
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _close_listeners(self) -> None:
        for sock, _port in self.listeners:
            sock.close()
        self.listeners = []

    def cleanup(self) -> None:
        """Remove temporary files when run() never ran (start failed)."""
        self._close_listeners()
        if self.tun_fd is not None:
            os.close(self.tun_fd)
            self.tun_fd = None
        if self.sandbox is not None:
            self.sandbox.abort()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def signal_command(self, signum: int) -> None:
        """Forward a signal to the command (safe from any thread): to its whole process group
        when it has one of its own (under the UI, or with the terminal), as a terminal would,
        so the processes it started get it too."""
        if signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            self._stop.set()
        sandbox = self.sandbox
        proc = sandbox.proc if sandbox is not None else None
        if sandbox is None or proc is None or proc.returncode is not None:
            return
        own_group = sandbox.cfg.new_session or sandbox.cfg.own_process_group
        try:
            if own_group:
                os.killpg(proc.pid, signum)
            else:
                os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass
