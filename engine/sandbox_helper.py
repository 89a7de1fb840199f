"""The sandbox helper: a fresh, single-threaded interpreter that becomes the user's command.

Run as `python -m engine.sandbox_helper FD` with FD one end of a socketpair, as early as tapui
can (its imports overlap tapui's). It reads its config (JSON, with the command's stdio as
passed fds) from the socket, unshares user + network + mount namespaces, maps the user's own
uid/gid, brings up `lo` and a TUN device, bind-mounts files over system paths, starts the
sandbox's agent (`engine.sandbox_agent`), sends the TUN fd and the agent's socket back, waits
for "go" and execs the command. Any failure is reported on the socket as JSON ({"error": kind,
"errno": n, "detail": text}) so the parent can explain it; on a successful exec the socket
(close-on-exec) just closes.

Only the standard library, pyroute2 and the agent are imported here: this module runs before
anything else.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys

from engine import sandbox_agent

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
IFA_F_NODAD = 0x02
PR_SET_SECUREBITS = 28
PR_SET_PDEATHSIG = 1
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
VNET_HDR_LEN = 10
NETLINK_SOCK_DIAG = 4

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    def __init__(self, kind: str, err: int, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.errno = err
        self.detail = detail


def _check(result: int, kind: str, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(kind, err, f"{what}: {os.strerror(err)}")


def _write(path: str, text: str, kind: str = "userns") -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise SetupError(kind, exc.errno or 0, f"writing {path}: {exc.strerror}") from None


def enter_namespaces(uid: int, gid: int) -> None:
    _check(
        _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS), "userns", "unshare(USER|NET|NS)"
    )
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def bind_mounts(mounts: list[tuple[str, str]]) -> None:
    _check(
        _libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None),
        "mount",
        "making / private",
    )
    for source, target in mounts:
        _check(
            _libc.mount(source.encode(), target.encode(), None, MS_BIND, None),
            "mount",
            f"bind-mounting {source} over {target}",
        )


def open_tun(path: str, name: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SetupError("tun", exc.errno or 0, f"opening {path}: {exc.strerror}") from None
    try:
        ifr = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM)
    except OSError as exc:
        os.close(fd)
        raise SetupError("tun", exc.errno or 0, f"creating TUN device: {exc.strerror}") from None
    return fd


def configure_network(cfg: dict) -> None:
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            tun = ipr.link_lookup(ifname=cfg["tun_name"])[0]
            ipr.link("set", index=tun, mtu=cfg["mtu"], txqlen=cfg["txqlen"], state="up")
            ipr.addr("add", index=tun, address=cfg["ipv4"], prefixlen=cfg["ipv4_prefix"])
            ipr.addr(
                "add",
                index=tun,
                address=cfg["ipv6"],
                prefixlen=cfg["ipv6_prefix"],
                flags=IFA_F_NODAD,
            )
            ipr.route("add", dst="0.0.0.0/0", oif=tun)
            ipr.route("add", dst="::/0", oif=tun)
    except Exception as exc:  # pyroute2 raises NetlinkError and others
        code = getattr(exc, "code", 0) or 0
        raise SetupError("network", code, f"configuring the sandbox network: {exc}") from None


def drop_root_privileges() -> None:
    """For a uid-0 user: make execve grant no capabilities, so the command runs without any."""
    bits = SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP
    bits |= SECBIT_NO_SETUID_FIXUP_LOCKED
    _check(_libc.prctl(PR_SET_SECUREBITS, bits, 0, 0, 0), "caps", "setting securebits")


def end_with_tapui(parent_pid: int) -> None:
    """SIGTERM for the command if tapui dies without passing on a signal (kill -9): cut off
    from the network, it would run on for nothing. Set last, as changing credentials clears
    it; it outlives execve. (It follows the thread that spawned us: tapui's main thread.)"""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "exec", "setting PDEATHSIG")
    if os.getppid() != parent_pid:  # tapui died before that took hold
        os._exit(1)


def report(sock: socket.socket, kind: str, err: int, detail: str) -> None:
    try:
        sock.sendall(json.dumps({"error": kind, "errno": err, "detail": detail}).encode())
    except OSError:
        pass


def read_config(sock: socket.socket) -> dict:
    """The config (one JSON line); the command's stdin/stdout/stderr replacements, listed in
    its "stdio", come with its first bytes and are put in place here."""
    raw, fds, _flags, _addr = socket.recv_fds(sock, 65536, 3)
    while raw and not raw.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        raw += chunk
    if not raw.endswith(b"\n"):
        os._exit(1)  # tapui went away before configuring us
    cfg = json.loads(raw)
    for target, fd in zip(cfg.get("stdio", []), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    return cfg


def run(sock: socket.socket) -> None:
    cfg = read_config(sock)
    try:
        enter_namespaces(cfg["uid"], cfg["gid"])
        bind_mounts([tuple(m) for m in cfg["mounts"]])
        tun_fd = open_tun(cfg["tun_path"], cfg["tun_name"])
        configure_network(cfg)
        for path, value in cfg.get("sysctls", {}).items():
            try:
                _write(path, value, "sysctl")
            except SetupError:
                pass  # tuning only
    except SetupError as exc:
        report(sock, exc.kind, exc.errno, exc.detail)
        os._exit(1)
    # A sock_diag netlink socket made inside the namespace lets tapui find which process owns
    # a connection without reading /proc/net/tcp (which walks the kernel's whole hash table).
    diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    try:
        agent, agent_pid = sandbox_agent.start()
    except OSError as exc:  # (fork refused: the user's process limit, say)
        report(sock, "agent", exc.errno or 0, f"starting the sandbox's agent: {exc.strerror}")
        os._exit(1)
    socket.send_fds(
        sock, [json.dumps({"agent_pid": agent_pid}).encode()],
        [tun_fd, diag.fileno(), agent.fileno()],
    )
    os.close(tun_fd)
    diag.close()
    agent.close()
    if sock.recv(16) != b"go":
        os._exit(1)
    try:
        os.chdir(cfg["cwd"])
    except OSError:
        os.chdir("/")
    try:
        if cfg["uid"] == 0:
            drop_root_privileges()
        end_with_tapui(cfg["parent_pid"])
        os.execvpe(cfg["argv"][0], cfg["argv"], cfg["env"])
    except SetupError as exc:
        report(sock, exc.kind, exc.errno, exc.detail)
    except OSError as exc:
        kind = "not-found" if exc.errno == errno.ENOENT else "exec"
        report(sock, kind, exc.errno or 0, f"{cfg['argv'][0]}: {exc.strerror}")
    os._exit(127)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    os.set_inheritable(sock.fileno(), False)
    # tapui starts us before it has loaded itself: pyroute2's import (about 0.15 s; it starts
    # no thread, so unshare still works) runs meanwhile, not after the config arrives.
    import pyroute2  # noqa: F401
    run(sock)


if __name__ == "__main__":
    main()
