"""The state of the command tapui runs, as the UI and the headless printer see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class CommandState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"  # the sandbox or the command could not start


@dataclass
class RunStatus:
    command: list[str]
    state: CommandState = CommandState.STARTING
    exit_code: int | None = None
    message: str | None = None  # why it failed to start, when it did
    pid: int | None = None
    #: Processes the command left running in the sandbox when it exited (ended with it).
    left_running: int = 0
    #: File descriptor of the pseudo-terminal master carrying the command's output (UI mode).
    output_fd: int | None = field(default=None, repr=False)
