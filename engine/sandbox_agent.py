"""The sandbox's agent: a small process that lives in the sandbox's namespaces beside the command.

The sandbox helper forks it (twice, so that it is no child of the command) just before it
sends the TUN device to tapui. It serves tapui over a SOCK_SEQPACKET socket:

- `{"connect": [host, port]}`: it dials host:port from inside the sandbox (its loopback is
  the sandbox's own) and answers `{"ok": true}` with the connected socket's fd, or
  `{"errno": n}`. That is how a published port reaches a server the command runs: tapui itself
  cannot enter the sandbox's network namespace without privileges.
- End of file (tapui ended, however it ended, SIGKILL included): it ends every process left in
  the sandbox (SIGTERM, then SIGKILL for those still there after END_GRACE seconds) and exits.
  Cut off from the network those would run on for nothing, out of the user's sight.

Only the standard library is used: it is forked from the helper before the command runs.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import struct
import time

END_GRACE = 2.0
CONNECT_TIMEOUT = 5.0
PR_SET_NAME = 15
NAME = b"tapui-agent"
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def start() -> tuple[socket.socket, int]:
    """Fork the agent; returns tapui's end of its socket and the agent's pid."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the intermediate: it makes the agent and exits, orphaning it
        try:
            os.close(read_end)
            os.setsid()  # no terminal: the terminal's signals are not for it
            if os.fork() == 0:
                os.write(write_end, str(os.getpid()).encode())
                serve(theirs, keep=[theirs.fileno()])
        finally:
            os._exit(0)
    os.close(write_end)
    theirs.close()
    os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as pipe:
        pid = int(pipe.read() or 0)
    return ours, pid


def _detach(keep: list[int]) -> None:
    """Hold nothing of the command's: stdio to /dev/null (an open pty would keep the UI from
    seeing the command's output end) and every other inherited fd closed."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # (the listing's own fd)


def _drop_capabilities() -> None:
    """Name it, and give up the capabilities it has as the helper's fork: connecting
    sockets and signalling the user's own processes need none."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, NAME, 0, 0, 0)
    header = struct.pack("Ii", LINUX_CAPABILITY_VERSION_3, 0)
    libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(bytes(24)))  # nothing, in two words


def serve(sock: socket.socket, keep: list[int]) -> None:
    """The agent's life: answer tapui until it goes, then end the sandbox. Never returns."""
    try:
        _detach(keep)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_IGN)  # a killpg in the sandbox is not for it
        _drop_capabilities()
        while True:
            try:
                message = sock.recv(4096)
            except InterruptedError:
                continue
            except OSError:
                message = b""
            if not message:
                break
            _answer(sock, message)
        end_sandbox()
    finally:
        os._exit(0)


def _answer(sock: socket.socket, message: bytes) -> None:
    try:
        request = json.loads(message)
        host, port = request["connect"]
    except (ValueError, KeyError, TypeError):
        reply, fds = {"errno": 22}, []
        conn = None
    else:
        conn = None
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            conn = socket.socket(family, socket.SOCK_STREAM)
            conn.settimeout(CONNECT_TIMEOUT)
            conn.connect((host, int(port)))
            conn.settimeout(None)
            reply, fds = {"ok": True}, [conn.fileno()]
        except OSError as exc:
            reply, fds = {"errno": exc.errno or 110}, []  # (a timeout has no errno)
    try:
        socket.send_fds(sock, [json.dumps(reply).encode()], fds)
    except OSError:
        pass
    if conn is not None:
        conn.close()


def members(netns_inode: int, me: int) -> list[int]:
    """The pids of the live processes in the network namespace `netns_inode`, but `me`."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino == netns_inode:
                pids.append(int(entry.name))
        except OSError:
            continue  # gone, or a zombie
    return pids


def end_sandbox() -> None:
    """End every process left in this network namespace: SIGTERM, then SIGKILL."""
    me = os.getpid()
    netns = os.stat("/proc/self/ns/net").st_ino
    for signum, grace in ((signal.SIGTERM, END_GRACE), (signal.SIGKILL, END_GRACE)):
        pids = members(netns, me)
        if not pids:
            return
        for pid in pids:
            _signal(pid, signum, netns)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and members(netns, me):
            time.sleep(0.02)


def _signal(pid: int, signum: int, netns: int) -> None:
    """Signal `pid` if it is still the process found in the namespace (not a reused pid)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if os.stat(f"/proc/{pid}/ns/net").st_ino == netns:
            signal.pidfd_send_signal(pidfd, signum)
    except OSError:
        pass
    finally:
        os.close(pidfd)
