"""The command's life under tapui: exit codes, signals, --keep-running, environment errors."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.errors import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, EXIT_TUN, EXIT_USERNS
from tests.conftest import (
    HOST,
    ROOT,
    command_pid,
    process_alive,
    process_gone,
    requires_root,
    run_tapui,
    tapui_command,
    tapui_in_background,
)

PY = sys.executable


@pytest.mark.usefixtures("sandbox")
def test_exit_code_of_command_is_tapuis() -> None:
    assert run_tapui("--no-ui", "--", "sh", "-c", "exit 7").returncode == 7


@pytest.mark.usefixtures("sandbox")
def test_death_by_signal_gives_128_plus_n() -> None:
    assert run_tapui("--no-ui", "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15


def test_command_not_found_is_127_with_message() -> None:
    result = run_tapui("--no-ui", "--", "no-such-command-tapui")
    assert result.returncode == EXIT_NOT_FOUND
    assert result.stderr.strip() == "tapui: command not found: no-such-command-tapui"


def test_not_executable_is_126(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    result = run_tapui("--no-ui", "--", str(script))
    assert result.returncode == EXIT_NOT_EXECUTABLE
    assert "not executable" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("sandbox")
@pytest.mark.parametrize("args", [["--no-ui"], []], ids=["no-ui", "default"])
def test_no_command_runs_users_shell_with_the_terminal(args: list[str]) -> None:
    env = dict(os.environ, SHELL="/bin/sh")
    proc = subprocess.run(
        tapui_command(*args), input="echo from-the-shell; exit 3\n", capture_output=True,
        text=True, env=env, cwd=ROOT, timeout=60,
    )
    assert proc.returncode == 3
    assert proc.stdout.strip() == "from-the-shell"


@pytest.mark.usefixtures("sandbox")
@pytest.mark.parametrize("save", [True, False], ids=["saved", "no-save"])
def test_no_command_says_where_the_exchanges_go(save: bool) -> None:
    env = dict(os.environ, SHELL="/bin/sh")
    args = [] if save else ["--no-save"]
    proc = subprocess.run(
        tapui_command(*args), input="exit 0\n", capture_output=True, text=True, env=env,
        cwd=ROOT, timeout=60,
    )
    assert proc.returncode == 0
    assert "no command given: running /bin/sh in the sandbox" in proc.stderr
    assert ("the session saved" in proc.stderr) == save


@pytest.mark.usefixtures("sandbox")
def test_command_runs_as_the_users_uid_in_the_callers_directory(tmp_path: Path) -> None:
    code = "import os; print(os.getuid(), os.getcwd())"
    proc = subprocess.run(
        tapui_command("--no-ui", "--", PY, "-c", code), capture_output=True, text=True,
        cwd=tmp_path, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout.split() == [str(os.getuid()), str(tmp_path)]


@pytest.mark.usefixtures("sandbox")
def test_command_has_no_capabilities() -> None:
    result = run_tapui("--no-ui", "--", "grep", "CapEff", "/proc/self/status")
    assert result.stdout.split() == ["CapEff:", "0000000000000000"]


@pytest.mark.usefixtures("sandbox")
@pytest.mark.parametrize("signum,expected", [(signal.SIGTERM, 42), (signal.SIGINT, 43)])
def test_signals_reach_the_command(signum: int, expected: int) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
        "signal.signal(signal.SIGINT, lambda *a: sys.exit(43))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    with tapui_in_background("--no-ui", "-q", "--", PY, "-c", code) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signum)
        assert proc.wait(30) == expected


@pytest.mark.usefixtures("sandbox")
def test_keep_running_waits_for_background_processes(http_server) -> None:  # type: ignore[no-untyped-def]
    port = http_server.server_address[1]
    script = f"(sleep 1; curl -s -o /dev/null http://{HOST}:{port}/late) & exit 0"
    result = run_tapui("--no-ui", "--keep-running", "--", "sh", "-c", script)
    assert result.returncode == 0
    assert [r["path"] for r in http_server.requests] == ["/late"]


@pytest.mark.usefixtures("sandbox")
def test_without_keep_running_tapui_ends_with_the_command(http_server) -> None:  # type: ignore[no-untyped-def]
    port = http_server.server_address[1]
    script = f"(sleep 1; curl -s -o /dev/null http://{HOST}:{port}/late) & exit 0"
    started = time.monotonic()
    result = run_tapui("--no-ui", "--", "sh", "-c", script)
    assert result.returncode == 0
    assert time.monotonic() - started < 1.0 + 5  # did not wait for the background job's curl
    time.sleep(2)
    assert http_server.requests == []


def test_missing_tun_device_explains_the_fix() -> None:
    result = run_tapui("--no-ui", "--tun-device", "/nonexistent/tun", "--", "true")
    assert result.returncode == EXIT_TUN
    assert "/nonexistent/tun does not exist" in result.stderr
    assert "modprobe tun" in result.stderr
    assert "Traceback" not in result.stderr


def test_tun_device_from_environment_variable() -> None:
    env = dict(os.environ, TAPUI_TUN_DEVICE="/nonexistent/tun2")
    result = run_tapui("--no-ui", "--", "true", env=env)
    assert result.returncode == EXIT_TUN
    assert "/nonexistent/tun2" in result.stderr


def test_user_namespaces_disabled_explains_the_fix() -> None:
    """Inside a user namespace whose user.max_user_namespaces is 0, tapui cannot make its own."""
    requires_root()
    script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    proc = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", script, "sh", *tapui_command("--no-ui", "--", "true")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == EXIT_USERNS, proc.stderr
    assert "user.max_user_namespaces=0" in proc.stderr
    assert "sysctl" in proc.stderr
    assert "Traceback" not in proc.stderr


#: unshare(2)'s number, and the AUDIT_ARCH value a seccomp filter checks, per machine.
UNSHARE_SYSCALL = {"x86_64": (272, 0xC000003E), "aarch64": (97, 0xC00000B7)}


def _deny_unshare() -> None:
    """Install a seccomp filter making unshare(2) fail with EPERM, as Docker's default
    profile does for a container without CAP_SYS_ADMIN; every other call is allowed."""
    import ctypes
    import errno
    import platform
    import struct

    number, arch = UNSHARE_SYSCALL[platform.machine()]
    load_word, jump_if_equal, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    allow, fail = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, _ERRNO
    program = [
        (load_word, 0, 0, 4),  # seccomp_data.arch
        (jump_if_equal, 1, 0, arch),
        (ret, 0, 0, allow),
        (load_word, 0, 0, 0),  # seccomp_data.nr
        (jump_if_equal, 0, 1, number),
        (ret, 0, 0, fail),
        (ret, 0, 0, allow),
    ]
    code = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code)
    fprog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]  # (pointers are 64-bit)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    fprog_buffer = ctypes.create_string_buffer(fprog)
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.addressof(fprog_buffer), 0, 0):
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def refused_user_namespace(setup: Callable[[], None]) -> str:
    """tapui's stderr when `setup` (run in its process before exec) makes user namespaces
    fail; it must exit with EXIT_USERNS and no traceback."""
    proc = subprocess.run(
        tapui_command("--no-ui", "--", "true"), capture_output=True, text=True, timeout=60,
        cwd=ROOT, stdin=subprocess.DEVNULL, preexec_fn=setup,
    )
    assert proc.returncode == EXIT_USERNS, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_seccomp_denying_user_namespaces_explains_the_fix() -> None:
    """A container's seccomp profile (simulated with a filter that denies unshare)."""
    stderr = refused_user_namespace(_deny_unshare)
    assert "seccomp" in stderr
    assert "--security-opt seccomp=unconfined" in stderr


def _apparmor_restricts_userns() -> None:
    """What an Ubuntu 23.10+ user sees: kernel.apparmor_restrict_unprivileged_userns=1 (in a
    private mount namespace, over a tmpfs on /proc/sys/kernel) and user namespaces refused."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    clone_newns, ms_rec, ms_private = 0x00020000, 0x4000, 0x40000
    if libc.unshare(clone_newns) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(None, b"/", None, ms_rec | ms_private, None) != 0:  # nothing leaks out
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    if libc.mount(b"tmpfs", b"/proc/sys/kernel", b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount tmpfs on /proc/sys/kernel")
    Path("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").write_text("1\n")
    _deny_unshare()


def test_apparmor_restricting_user_namespaces_explains_the_fix() -> None:
    requires_root()
    stderr = refused_user_namespace(_apparmor_restricts_userns)
    assert "AppArmor restricts unprivileged user namespaces" in stderr
    assert "sysctl kernel.apparmor_restrict_unprivileged_userns=0" in stderr


@pytest.mark.usefixtures("sandbox")
def test_root_inside_a_sandbox_is_told_why_it_cannot_make_another() -> None:
    """Root without CAP_SETFCAP (as every command in a sandbox is) may not map itself into a
    new user namespace (Linux 5.12 and later): the message says so, not that seccomp did it."""
    requires_root()
    result = run_tapui("--no-ui", "-q", "--no-save", "--", *tapui_command("--no-ui", "--", "true"))
    assert result.returncode == EXIT_USERNS, result.stderr
    assert "runs as root inside a user namespace" in result.stderr
    assert "seccomp" not in result.stderr and "Traceback" not in result.stderr


@contextmanager
def traversable_interpreter() -> Iterator[None]:
    """Let other users traverse (o+x, no listing) the directories above this interpreter and
    this checkout for the test's duration: pyenv keeps Python under /root, mode 0700."""
    changed: list[tuple[Path, int]] = []
    paths = [Path(os.path.realpath(sys.executable)), Path(sys.prefix), Path(sys.base_prefix), ROOT]
    for path in paths:
        for parent in [path, *path.parents]:
            mode = parent.stat().st_mode
            if parent.is_dir() and not mode & stat.S_IXOTH:
                changed.append((parent, mode))
                os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)
    try:
        yield
    finally:
        for parent, mode in reversed(changed):
            os.chmod(parent, stat.S_IMODE(mode))


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory other users may traverse (pytest keeps its own temp root at 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tapui-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_as_nobody(directory: Path, tun_mode: int, *args: str) -> subprocess.CompletedProcess:
    """`tapui ARGS` as uid 65534, with a TUN node of `tun_mode` made in `directory` (root can
    mknod one; the node's mode is what decides whether the user may open it)."""
    node = directory / "tun"
    os.mknod(node, stat.S_IFCHR | tun_mode, os.makedev(10, 200))
    os.chmod(node, tun_mode)
    home = directory / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    env = dict(os.environ, TAPUI_TUN_DEVICE=str(node), HOME=str(home), XDG_DATA_HOME=str(home),
               XDG_STATE_HOME=str(home))
    with traversable_interpreter():
        return subprocess.run(
            tapui_command(*args), capture_output=True, text=True, timeout=60, cwd="/", env=env,
            preexec_fn=_as_nobody, stdin=subprocess.DEVNULL,
        )


def test_unprivileged_user_through_private_tun_node(shared_tmp: Path, http_port: int) -> None:
    """As uid 65534, with a 0666 TUN node the test made (CI runs as root; mknod needs it)."""
    requires_root()
    script = f"id -u; curl -sS http://{HOST}:{http_port}/hello"
    proc = run_as_nobody(shared_tmp, 0o666, "--no-ui", "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "65534\nhello from the host\n"


def test_unprivileged_user_without_tun_access_explains_the_fix(shared_tmp: Path) -> None:
    requires_root()
    proc = run_as_nobody(shared_tmp, 0o600, "--no-ui", "--", "true")
    assert proc.returncode == EXIT_TUN, proc.stderr
    assert f"chmod 0666 {shared_tmp / 'tun'}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_session_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env = dict(os.environ, XDG_STATE_HOME=str(blocker))
    result = run_tapui("--no-ui", "--", "true", env=env)
    assert result.returncode == 2
    assert "cannot keep sessions in" in result.stderr and "--no-save" in result.stderr
    assert "Traceback" not in result.stderr


def _leftovers(directory: Path, pid: int) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("tapui-")
                  and f"-{pid}-" in p.name)


@contextmanager
def _killed_tapui(tmp: Path) -> Iterator[int]:
    """A tapui (with TMPDIR=`tmp`) killed by SIGKILL once its sandbox runs; yields its pid.
    Its command gets SIGTERM; one that survives that is ended when the block ends."""
    code = "print('ready', flush=True); import time; time.sleep(120)"
    command = None
    with tapui_in_background("--no-ui", "-q", "--no-save", "--", PY, "-c", code,
                             env=dict(os.environ, TMPDIR=str(tmp))) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            command = command_pid(proc.pid)
            proc.kill()
            proc.wait(30)
            yield proc.pid
        finally:
            if command is not None:
                try:
                    os.kill(command, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.mark.usefixtures("sandbox")
def test_the_command_of_a_tapui_killed_by_sigkill_ends_too(tmp_path: Path) -> None:
    """Cut off from the network, it would run on for nothing: it gets SIGTERM."""
    code = ("import os, sys, time; print(os.getpid(), flush=True); sys.stdout.close(); "
            "time.sleep(120)")
    with tapui_in_background("--no-ui", "-q", "--no-save", "--", PY, "-c", code) as proc:
        assert proc.stdout is not None
        command = int(proc.stdout.readline())
        proc.kill()
        proc.wait(30)
        try:
            assert process_gone(command, 10)
        finally:
            if process_alive(command):
                os.kill(command, signal.SIGKILL)


def _background_pids(stdout: str) -> list[int]:
    return [int(word) for word in stdout.split()]


# A command that starts two processes in the background (one ignoring SIGTERM), prints
# their pids and ends: they run on in the sandbox.
LEAVES_TWO = ("sleep 120 & echo $!; (trap '' TERM; exec sleep 121) & echo $!")


@pytest.mark.usefixtures("sandbox")
def test_processes_the_command_leaves_are_ended_with_tapui() -> None:
    """Without --keep-running, what still runs when tapui ends would be cut off from the
    network: tapui says so and ends it (SIGTERM, then SIGKILL)."""
    result = run_tapui("--no-ui", "--no-save", "--", "sh", "-c", LEAVES_TWO)
    pids = _background_pids(result.stdout)
    try:
        assert result.returncode == 0
        assert len(pids) == 2
        assert "ending 2 processes the command left running in the sandbox" in result.stderr
        assert all(process_gone(pid, 10) for pid in pids)
    finally:
        for pid in filter(process_alive, pids):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.usefixtures("sandbox")
def test_processes_of_a_tapui_killed_by_sigkill_end_too() -> None:
    """Not only the command: the processes it started in the background, which no signal
    from tapui can reach once tapui is gone, are ended by the sandbox's agent."""
    script = LEAVES_TWO + "; echo ready; sleep 120"
    with tapui_in_background("--no-ui", "-q", "--no-save", "--", "sh", "-c", script) as proc:
        assert proc.stdout is not None
        pids = [int(proc.stdout.readline()), int(proc.stdout.readline())]
        assert proc.stdout.readline().strip() == "ready"
        command = command_pid(proc.pid)
        try:
            proc.kill()
            proc.wait(30)
            assert all(process_gone(pid, 10) for pid in [command, *pids])
        finally:
            for pid in filter(process_alive, [command, *pids]):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.usefixtures("sandbox")
def test_the_sandbox_agent_holds_none_of_the_commands_files() -> None:
    """The agent (which ends what is left when tapui goes) holds nothing of the command's: an
    open pty would keep the UI from seeing the command's output end. Nor any capability."""
    script = "pgrep -x --ns $$ --nslist net tapui-agent; echo ready; sleep 60"
    with tapui_in_background("--no-ui", "-q", "--no-save", "--", "sh", "-c", script) as proc:
        assert proc.stdout is not None
        agent = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "ready"
        fds = Path(f"/proc/{agent}/fd")
        links = sorted(os.readlink(fd) for fd in fds.iterdir())
        status = Path(f"/proc/{agent}/status").read_text()
    assert links[:3] == ["/dev/null"] * 3
    assert len(links) == 4 and links[3].startswith("socket:"), links  # its link to tapui
    assert "CapEff:\t0000000000000000" in status and "CapPrm:\t0000000000000000" in status


@pytest.mark.usefixtures("sandbox")
def test_temporary_files_of_a_killed_tapui_are_removed_by_the_next_run(tmp_path: Path) -> None:
    with _killed_tapui(tmp_path) as pid:
        left = _leftovers(tmp_path, pid)
        assert any(n.startswith(f"tapui-run-{pid}-") for n in left), left
        assert any(n.startswith(f"tapui-leaf-{pid}-") for n in left), left  # a private key
        env = dict(os.environ, TMPDIR=str(tmp_path))
        assert run_tapui("--no-ui", "-q", "--no-save", "--", "true", env=env).returncode == 0
        assert _leftovers(tmp_path, pid) == []


@pytest.mark.usefixtures("sandbox")
def test_a_running_tapuis_temporary_files_are_left_alone(tmp_path: Path) -> None:
    env = dict(os.environ, TMPDIR=str(tmp_path))
    code = "print('ready', flush=True); import sys; sys.stdin.readline()"
    with tapui_in_background("--no-ui", "-q", "--no-save", "--", PY, "-c", code, env=env,
                             stdin=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        mine = _leftovers(tmp_path, proc.pid)
        assert len(mine) == 2, mine
        assert run_tapui("--no-ui", "-q", "--no-save", "--", "true", env=env).returncode == 0
        assert _leftovers(tmp_path, proc.pid) == mine
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
        assert _leftovers(tmp_path, proc.pid) == []  # and it removed them itself
