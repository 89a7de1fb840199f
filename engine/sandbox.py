"""Starting the command in its sandbox, from the parent's side.

The namespaces are made by `engine.sandbox_helper`, a fresh interpreter (unshare(CLONE_NEWUSER)
refuses threaded callers, and tapui itself runs threads); this module spawns it, hands it its
config, receives the TUN fd and turns the helper's failures into clear `TapuiError`s.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine import sandbox_agent
from engine.errors import (
    EXIT_NOT_EXECUTABLE,
    EXIT_NOT_FOUND,
    EXIT_SANDBOX,
    EXIT_TUN,
    EXIT_USERNS,
    TapuiError,
)

TUN_ENV = "TAPUI_TUN_DEVICE"
DEFAULT_TUN = "/dev/net/tun"
MTU = 65520
#: Packets the kernel holds for tapui on the TUN (its default is 500). With 500, a burst of a
#: few hundred connections overflowed it: their segments were resent, but a DNS query lost
#: twice failed the app's lookup. About 60% of the app's packets in such a burst are ACKs
#: (24,000 packets of 25 KB on average, for 600 MB sent), and with 4,096 a busy machine still
#: overflowed it now and then. The queue costs little memory: TCP's queued segments share
#: their data with the sender's own buffer, and ACKs are small.
TUN_QUEUE_LEN = 16384


@dataclass
class SandboxConfig:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    tun_path: str = DEFAULT_TUN
    #: (source file on the host, path inside the sandbox) pairs bind-mounted over system files.
    mounts: list[tuple[str, str]] = field(default_factory=list)
    ipv4: str = "169.254.77.2"
    ipv4_prefix: int = 24
    ipv6: str = "fd7a:7a70:7a70::2"
    ipv6_prefix: int = 64
    tun_name: str = "tapui0"
    #: Where the command's stdin/stdout/stderr go (None: inherit tapui's).
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    #: Put the command in its own process group (made the terminal's foreground group by the CLI).
    own_process_group: bool = False
    new_session: bool = False


def _read_sysctl(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


CAP_SETFCAP = 31


def _root_without_setfcap() -> bool:
    """Root inside a user namespace (another tapui's sandbox, say) without CAP_SETFCAP: since
    Linux 5.12 such a root may not map itself into a new user namespace."""
    if os.geteuid() != 0:
        return False
    try:
        status = Path("/proc/self/status").read_text()
        identity = Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]
    except OSError:
        return False
    effective = next((line.split()[1] for line in status.splitlines()
                      if line.startswith("CapEff:")), "0")
    return not identity and not int(effective, 16) >> CAP_SETFCAP & 1


def explain_userns_failure(detail: str) -> TapuiError:
    """The one-paragraph explanation of why a user namespace could not be made."""
    if "uid_map" in detail and _root_without_setfcap():
        return TapuiError(
            "tapui cannot start its sandbox: it runs as root inside a user namespace (another "
            "tapui's sandbox, or a container) without the CAP_SETFCAP capability, and the kernel "
            "lets no such root map itself into a new user namespace. Fix: run tapui there as a "
            f"regular user (non-root users can nest sandboxes). ({detail})", EXIT_USERNS)
    if _read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        why = (
            "AppArmor restricts unprivileged user namespaces on this system "
            "(kernel.apparmor_restrict_unprivileged_userns=1, the default on Ubuntu 23.10 and "
            "later). Fix: allow them with `sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0`"
            ", or give tapui an AppArmor profile with the `userns,` rule (see the README)."
        )
    elif _read_sysctl("/proc/sys/user/max_user_namespaces") == "0":
        why = (
            "user namespaces are disabled (user.max_user_namespaces=0). Fix: "
            "`sudo sysctl user.max_user_namespaces=15000`."
        )
    elif _read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        why = (
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0). Fix: "
            "`sudo sysctl kernel.unprivileged_userns_clone=1`."
        )
    else:
        why = (
            "the kernel refused to create a user namespace. Inside a container this is usually "
            "its seccomp profile: run the container with `--security-opt seccomp=unconfined` (or a "
            "profile that allows unshare), or raise `user.max_user_namespaces` if it is at its limit."
        )
    return TapuiError(f"tapui cannot start its sandbox: {why} ({detail})", EXIT_USERNS)


def explain_tun_failure(path: str, err: int, detail: str) -> TapuiError:
    import errno

    if err == errno.ENOENT:
        why = (
            f"{path} does not exist. Fix: load the tun module (`sudo modprobe tun`), or in a "
            "container pass the device (`--device /dev/net/tun`)."
        )
    elif err in (errno.EACCES, errno.EPERM):
        if _read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
            return explain_userns_failure(detail)
        why = (
            f"{path} is not usable by this user (it is often mode 0666; here it is not). Fix: "
            f"`sudo chmod 0666 {path}`, or point {TUN_ENV} (or --tun-device) at a TUN node "
            "you may open."
        )
    else:
        why = f"the TUN device {path} could not be set up."
    return TapuiError(f"tapui cannot start its sandbox: {why} ({detail})", EXIT_TUN)


def _explain(report: dict, cfg: SandboxConfig) -> TapuiError:
    kind, err, detail = report.get("error"), report.get("errno", 0), report.get("detail", "")
    if kind == "userns":
        return explain_userns_failure(detail)
    if kind == "tun":
        return explain_tun_failure(cfg.tun_path, err, detail)
    if kind == "not-found":
        return TapuiError(f"tapui: command not found: {cfg.argv[0]}", EXIT_NOT_FOUND)
    if kind == "exec":
        return TapuiError(f"tapui: cannot run {cfg.argv[0]}: {detail}", EXIT_NOT_EXECUTABLE)
    if kind == "mount" and _read_sysctl(
        "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"
    ) == "1":
        return explain_userns_failure(detail)
    return TapuiError(f"tapui cannot start its sandbox: {detail}", EXIT_SANDBOX)


def resolve_command(argv: list[str], env: dict[str, str]) -> None:
    """Fail early, with the shell's exit codes, when the command cannot be run."""
    name = argv[0]
    if "/" in name:
        if not os.path.exists(name):
            raise TapuiError(f"tapui: no such file: {name}", EXIT_NOT_FOUND)
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise TapuiError(f"tapui: not executable: {name}", EXIT_NOT_EXECUTABLE)
        return
    if shutil.which(name, path=env.get("PATH", os.defpath)) is None:
        raise TapuiError(f"tapui: command not found: {name}", EXIT_NOT_FOUND)


@dataclass
class Helper:
    """A sandbox helper process started before its config is known: its interpreter and
    pyroute2 load while tapui loads itself and prepares the config."""

    proc: subprocess.Popen
    sock: socket.socket  # our end of its socketpair
    new_session: bool
    own_process_group: bool

    def close(self) -> None:
        """Not needed after all (it has been given nothing yet, so it just ends)."""
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def spawn_helper(*, new_session: bool, own_process_group: bool) -> Helper:
    """Start a sandbox helper (a fresh interpreter), in a new session for the UI (the command
    writes to a pty) or in its own process group when it is to get the terminal. Call it from
    the main thread: the command's parent-death signal fires when the spawning thread ends."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.sandbox_helper", str(child.fileno())],
            pass_fds=[child.fileno()],
            env=env,
            process_group=0 if own_process_group and not new_session else None,
            start_new_session=new_session,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return Helper(proc, parent, new_session, own_process_group)


def command_placement(*, to_pty: bool, interactive: bool) -> tuple[bool, bool]:
    """(new_session, own_process_group) for the command: a session of its own when its output
    goes to the UI's pty; a process group of its own when it is to get the terminal (headless
    and interactive, with tapui in the terminal's foreground). The CLI, starting the helper
    early, and the Capture, configuring it, both ask here."""
    return to_pty, interactive and not to_pty and foreground_tty() is not None


def foreground_tty() -> int | None:
    """stdin's fd when it is a terminal whose foreground process group is ours."""
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
            return 0
    except OSError:
        return None
    return None


class Sandbox:
    """One sandboxed command: `start()` sets it up and returns the TUN fd, `go()` runs it."""

    def __init__(self, cfg: SandboxConfig, helper: Helper | None = None) -> None:
        self.cfg = cfg
        self._helper = helper  # started early (spawn_helper), else start() starts one
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self.netns_inode: int | None = None
        #: A NETLINK_SOCK_DIAG socket inside the sandbox's network namespace.
        self.diag_socket: socket.socket | None = None
        #: tapui's end of the sandbox agent's socket (engine.sandbox_agent): closing it (or
        #: tapui's death) makes the agent end the processes left in the sandbox.
        self.agent: socket.socket | None = None
        self.agent_pid: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> int:
        cfg = self.cfg
        helper, self._helper = self._helper, None
        wanted = (cfg.new_session, cfg.own_process_group)
        if helper is not None and (helper.new_session, helper.own_process_group) != wanted:
            helper.close()  # started for another terminal setup
            helper = None
        try:
            resolve_command(cfg.argv, cfg.env)
        except BaseException:
            if helper is not None:
                helper.close()
            raise
        if helper is None:
            helper = spawn_helper(new_session=cfg.new_session,
                                  own_process_group=cfg.own_process_group)
        self.proc, self._sock = helper.proc, helper.sock
        parent = helper.sock
        stdio = [(target, fd) for target, fd in ((0, cfg.stdin), (1, cfg.stdout), (2, cfg.stderr))
                 if fd is not None]
        message = {
            "parent_pid": os.getpid(),
            "uid": os.getuid(),
            "gid": os.getgid(),
            "argv": cfg.argv,
            "env": cfg.env,
            "cwd": cfg.cwd,
            "tun_path": cfg.tun_path,
            "tun_name": cfg.tun_name,
            "mtu": MTU,
            "txqlen": TUN_QUEUE_LEN,
            "mounts": [[src, dst] for src, dst in cfg.mounts],
            "ipv4": cfg.ipv4,
            "ipv4_prefix": cfg.ipv4_prefix,
            "ipv6": cfg.ipv6,
            "ipv6_prefix": cfg.ipv6_prefix,
            "sysctls": {
                f"/proc/sys/net/ipv6/conf/{cfg.tun_name}/accept_ra": "0",
                f"/proc/sys/net/ipv6/conf/{cfg.tun_name}/router_solicitations": "0",
            },
            "stdio": [target for target, _fd in stdio],  # replaced by the fds sent along
        }
        payload = json.dumps(message).encode() + b"\n"
        try:
            sent = socket.send_fds(parent, [payload], [fd for _t, fd in stdio]) if stdio else 0
            parent.sendall(payload[sent:])
        except OSError:
            pass  # the helper is gone: said below
        msg, fds, _flags, _addr = socket.recv_fds(parent, 65536, 3)
        if not fds:
            self.proc.wait()
            try:
                report = json.loads(msg) if msg else {}
            except ValueError:
                report = {}
            if not report:
                raise TapuiError(
                    "tapui cannot start its sandbox: the sandbox helper exited early "
                    f"(status {self.proc.returncode})",
                    EXIT_SANDBOX,
                )
            raise _explain(report, cfg)
        try:
            self.netns_inode = os.stat(f"/proc/{self.proc.pid}/ns/net").st_ino
        except OSError:
            self.netns_inode = None
        for fd in fds:
            os.set_inheritable(fd, False)  # (recv_fds does not ask for close-on-exec)
        os.set_blocking(fds[0], False)
        self.diag_socket = socket.socket(fileno=fds[1])
        self.agent = socket.socket(fileno=fds[2])
        self.agent_pid = json.loads(msg)["agent_pid"]
        return fds[0]

    def go(self) -> None:
        """Let the helper exec the command; raise if the exec failed."""
        assert self._sock is not None and self.proc is not None
        self._sock.sendall(b"go")
        msg = self._sock.recv(65536)
        self._sock.close()
        self._sock = None
        if msg:
            self.proc.wait()
            try:
                report = json.loads(msg)
            except ValueError:
                report = {"error": "exec", "detail": msg.decode(errors="replace")}
            raise _explain(report, self.cfg)

    def end_agent(self) -> None:
        """Let the agent go: it ends the processes left in the sandbox, and itself."""
        if self.agent is not None:
            self.agent.close()
            self.agent = None

    def abort(self) -> None:
        self.end_agent()
        if self.diag_socket is not None:
            self.diag_socket.close()
            self.diag_socket = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def processes_left(self) -> list[int]:
        """The processes that still live in the sandbox (its agent aside)."""
        if self.netns_inode is None:
            return []
        return sandbox_agent.members(self.netns_inode, self.agent_pid or -1)


def exit_status(returncode: int) -> int:
    """A shell's view of a child's status: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode
