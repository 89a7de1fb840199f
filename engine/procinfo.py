"""Which sandboxed process opened a connection.

The socket's inode comes from an exact sock_diag query (by the connection's four addresses) on
a netlink socket opened inside the sandbox's network namespace: one round trip, where reading
/proc/net/tcp makes the kernel walk its whole hash table (~1.6 ms here). The process is then
the one in the command's process tree (or, failing that, in the namespace) holding
`socket:[inode]`.
"""

from __future__ import annotations

import os
import socket
import struct

from engine import sandbox_agent
from engine.flow import Connection

SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI")
_SOCKID = struct.Struct(">HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
_DIAG_MSG_INODE_OFFSET = 4 + 48 + 4 * 4  # family..retrans, sockid, expires..uid


def _addr16(ip: str, family: int) -> bytes:
    raw = socket.inet_pton(family, ip)
    return raw + bytes(16 - len(raw))


def socket_inode(diag: socket.socket, client: tuple[str, int], server: tuple[str, int],
                 protocol: int = socket.IPPROTO_TCP) -> int | None:
    """The inode of the app's TCP or UDP socket for a connection or datagram flow (client =
    the app's own address)."""
    v6 = ":" in client[0]
    attempts = [(socket.AF_INET6 if v6 else socket.AF_INET, client, server)]
    if not v6:  # an IPv4 connection made from a dual-stack IPv6 socket
        attempts.append((socket.AF_INET6, ("::ffff:" + client[0], client[1]),
                         ("::ffff:" + server[0], server[1])))
    for seq, (family, src, dst) in enumerate(attempts, 1):
        if protocol == socket.IPPROTO_UDP:
            # The kernel's UDP lookup takes the addresses the other way round (udp_diag.c:
            # "src and dst are swapped for historical reasons").
            src, dst = dst, src
        req = _REQ.pack(family, protocol, 0, 0, 0xFFFFFFFF)
        req += _SOCKID.pack(src[1], dst[1], _addr16(src[0], family), _addr16(dst[0], family))
        req += _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
        msg = _NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + req
        try:
            diag.send(msg)
            reply = diag.recv(8192)
        except OSError:  # (BlockingIOError too: no answer came with the send)
            return None
        if len(reply) < _NLMSG.size:
            continue
        _length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(reply)
        if kind == NLMSG_ERROR:
            continue
        offset = _NLMSG.size + _DIAG_MSG_INODE_OFFSET
        if len(reply) >= offset + 4:
            inode = struct.unpack_from("=I", reply, offset)[0]
            return inode or None
    return None


def command_line(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part) or None


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, through /proc/<pid>/task/<tid>/children."""
    found = [pid]
    i = 0
    while i < len(found):
        current = found[i]
        i += 1
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    found.extend(int(child) for child in f.read().split())
            except (OSError, ValueError):
                continue
    return found


class ProcessFinder:
    """Finds the pid and command line behind a sandbox connection (about 0.1 ms)."""

    def __init__(self, diag: socket.socket | None, sandbox_pid: int, netns_inode: int | None) -> None:
        self.diag = diag
        self.sandbox_pid = sandbox_pid
        self.netns_inode = netns_inode
        self._tree: list[int] = []  # the command's process tree as last walked
        self._commands: dict[int, str | None] = {}
        self._last: tuple[int, str] | None = None  # (pid, fd) of the last socket found
        if diag is not None:
            # The kernel answers a sock_diag request within the send: no wait is ever needed
            # (and a blocking socket would poll before each send and receive).
            diag.setblocking(False)

    def lookup(self, info: Connection) -> None:
        """Fill in info.pid and info.command, if the app's socket is still open (and /proc
        can be read: out of file descriptors, the flow just names no process)."""
        if self.diag is None or info.pid is not None:
            return
        try:
            self._lookup(info)
        except OSError:
            pass

    def _lookup(self, info: Connection) -> None:
        protocol = socket.IPPROTO_UDP if info.transport == "udp" else socket.IPPROTO_TCP
        inode = socket_inode(self.diag, info.client, info.server, protocol)
        if inode is None:
            return
        target = f"socket:[{inode}]"
        pid = self._last_fd_holds(target)  # clients tend to reuse the same fd number
        if pid is None:
            pid = self._find(target, self._tree)  # the process of the last connection, usually
        if pid is None:
            self._tree = descendants(self.sandbox_pid)
            pid = self._find(target, self._tree)
        if pid is None:
            members = sandbox_agent.members(self.netns_inode, -1) if self.netns_inode else []
            pid = self._find(target, [p for p in members if p not in self._tree])
        if pid is None:
            return
        info.pid = pid
        if pid not in self._commands:
            self._commands[pid] = command_line(pid)
        info.command = self._commands[pid]

    def _last_fd_holds(self, target: str) -> int | None:
        if self._last is None:
            return None
        pid, fd = self._last
        try:
            return pid if os.readlink(f"/proc/{pid}/fd/{fd}") == target else None
        except OSError:
            return None

    def _find(self, target: str, pids: list[int]) -> int | None:
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        self._last = (pid, fd)
                        return pid
                except OSError:
                    continue
        return None

    def close(self) -> None:
        if self.diag is not None:
            self.diag.close()
            self.diag = None
