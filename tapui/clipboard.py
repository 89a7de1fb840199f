"""Copy text to the clipboard: OSC 52 through the terminal, plus a desktop tool when present."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

from textual.app import App


def _tools() -> list[list[str]]:
    tools = []
    if os.environ.get("WAYLAND_DISPLAY") and shutil.which("wl-copy"):
        tools.append(["wl-copy"])
    if os.environ.get("DISPLAY"):
        if shutil.which("xclip"):
            tools.append(["xclip", "-selection", "clipboard"])
        elif shutil.which("xsel"):
            tools.append(["xsel", "--clipboard", "--input"])
    return tools


def _pipe(argv: list[str], text: str) -> None:
    try:
        subprocess.run(argv, input=text.encode("utf-8"), timeout=5, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        pass


def copy(app: App, text: str) -> list[str]:
    """Copy `text`; returns the ways it was sent (the tools run in the background, since xclip
    may wait for its selection to be taken)."""
    app.copy_to_clipboard(text)
    used = ["terminal (OSC 52)"]
    for argv in _tools():
        threading.Thread(target=_pipe, args=(argv, text), daemon=True).start()
        used.append(argv[0])
    return used
