"""tapui's temporary directories and files, named after the process that made them.

A tapui that ends normally removes its own. One that is killed (kill -9, an OOM kill, a lost
machine) cannot, and its directories hold the sandbox's trust bundle and the private key of the
leaf certificates. So each name carries the pid of its maker (`tapui-KIND-PID-XXXXXXXX`), and
the next tapui removes those whose maker is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_NAME = re.compile(r"tapui-([a-z]+)-(\d+)-")


def prefix(kind: str) -> str:
    """The name prefix of this process's temporary files of `kind` (for mkstemp)."""
    return f"tapui-{kind}-{os.getpid()}-"


def make(kind: str) -> Path:
    """A new private directory for this process (mode 0700)."""
    return Path(tempfile.mkdtemp(prefix=prefix(kind)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def sweep(directory: str | None = None) -> list[Path]:
    """Remove what tapui processes that no longer run left here; the paths removed.

    Only this user's directories and files are touched, and only when their maker's pid is free (a
    reused pid keeps its directory: the next sweep after that process ends takes it)."""
    base = Path(directory or tempfile.gettempdir())
    removed: list[Path] = []
    uid = os.getuid()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        match = _NAME.match(entry.name)
        if match is None:
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            pid = int(match.group(2))
            if pid == os.getpid() or _alive(pid):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed
