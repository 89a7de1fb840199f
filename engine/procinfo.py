"""Which sandboxed process opened a connection, read from /proc while the connection is open.

The socket's inode comes from the sandbox's /proc/<pid>/net/tcp{,6} (by the app's local port);
the process is the one among the sandbox's processes holding `socket:[inode]`. The work runs in
a worker thread so it never delays the relay.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from engine.flow import Connection


def socket_inode(net_pid: int, local_port: int, ipv6: bool) -> int | None:
    path = f"/proc/{net_pid}/net/{'tcp6' if ipv6 else 'tcp'}"
    port_hex = f":{local_port:04X}"
    try:
        with open(path) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1].endswith(port_hex):
                    return int(fields[9])
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return None


def command_line(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part) or None


class ProcessFinder:
    """Finds the pid and command line behind a sandbox connection."""

    def __init__(self, sandbox_pid: int, netns_inode: int | None) -> None:
        self.sandbox_pid = sandbox_pid
        self.netns_inode = netns_inode
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tapui-procinfo")

    def lookup(self, info: Connection, local_port: int, ipv6: bool) -> None:
        self.pool.submit(self._lookup, info, local_port, ipv6)

    def _sandbox_pids(self) -> list[int]:
        pids = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry.name}/ns/net").st_ino == self.netns_inode:
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def _lookup(self, info: Connection, local_port: int, ipv6: bool) -> None:
        inode = socket_inode(self.sandbox_pid, local_port, ipv6)
        if inode is None and not ipv6:
            inode = socket_inode(self.sandbox_pid, local_port, True)  # v4-mapped on a v6 socket
        if inode is None:
            return
        target = f"socket:[{inode}]"
        for pid in self._sandbox_pids():
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        info.pid = pid
                        info.command = command_line(pid)
                        return
                except OSError:
                    continue

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
