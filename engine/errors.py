"""Errors tapui reports to the user as one clear paragraph and a distinct exit code."""

from __future__ import annotations

# Exit codes of tapui's own failures (the command's own exit code passes through otherwise).
EXIT_USAGE = 2
EXIT_USERNS = 120  # user namespaces unavailable (AppArmor, sysctl, seccomp)
EXIT_TUN = 121  # no usable TUN device
EXIT_SANDBOX = 122  # any other sandbox setup failure
EXIT_INTERNAL = 123  # tapui's engine failed
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class TapuiError(Exception):
    """A failure the user can act on: `str(err)` is the whole message."""

    def __init__(self, message: str, exit_code: int = EXIT_SANDBOX) -> None:
        super().__init__(message)
        self.exit_code = exit_code
