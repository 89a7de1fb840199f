"""The command's terminal output, read from the pty master in a background thread."""

from __future__ import annotations

import codecs
import os
import queue
import re
import threading

from rich.text import Text
from textual.widgets import RichLog

MAX_LINES = 5000
#: Control characters other than tab and ESC (ESC starts the sequences Text.from_ansi reads).
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1a\x1c-\x1f\x7f]")


def clean_line(line: str) -> Text:
    """A terminal line as styled text: carriage-return overwrites keep the last part, colours
    (SGR) are kept, other control sequences dropped."""
    line = line.rstrip("\r")
    if "\r" in line:
        line = line.rsplit("\r", 1)[1]
    text = Text.from_ansi(_CONTROLS.sub("", line))
    if "\x1b" in text.plain:  # a sequence the decoder did not understand
        text = Text(text.plain.replace("\x1b", ""))
    return text


class OutputReader:
    """Reads a file descriptor until EOF or EIO (the pty's other side closed) into a queue of
    complete lines. The reader must run even when nobody looks: a full pty blocks the command."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tapui-output", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                break
            if not chunk:
                break
            pending += decoder.decode(chunk)
            *complete, pending = pending.split("\n")
            for line in complete:
                self.lines.put(line)
        pending += decoder.decode(b"", final=True)
        if pending:
            self.lines.put(pending)

    def drain(self, limit: int = 10_000) -> list[str]:
        out = []
        try:
            while len(out) < limit:
                out.append(self.lines.get_nowait())
        except queue.Empty:
            pass
        return out


class OutputPanel(RichLog):
    """The last MAX_LINES lines the command printed."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, max_lines=MAX_LINES, wrap=False, markup=False, highlight=False)
        self.border_title = "output (o to hide)"

    def add_lines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(clean_line(line))
