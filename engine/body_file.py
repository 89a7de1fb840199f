"""A flow's request or response body written to a file, as the app saw it: Content-Encoding
undone, so a gzip'd JSON answer is saved as JSON and an image as the image."""

from __future__ import annotations

import mimetypes
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from engine.content import ContentDecodeError, decode_body, is_text_type, media_type
from engine.flow import Body, Flow, Headers, header

Side = Literal["request", "response"]

#: Decoded bodies larger than this are saved as they came (a guard against compression bombs).
MAX_DECODED = 1 << 30
_COPY_CHUNK = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class BodyFileError(Exception):
    """Why a body could not be saved, in words for the user."""


@dataclass
class SavedBody:
    path: Path
    written: int
    note: str  # what the user should know about the bytes written ("" when nothing)


def message_of(flow: Flow, side: Side) -> tuple[Headers, Body]:
    message = flow.request if side == "request" else flow.response
    if message is None or message.body.size == 0:
        raise BodyFileError(f"Flow #{flow.id} has no {side} body.")
    return message.headers, message.body


def body_filename(flow: Flow, side: Side) -> str:
    """A file name for the body: the URL's last path segment when it names something, else
    flow-ID-SIDE; with the extension its media type suggests when it has none."""
    headers, _ = message_of(flow, side)
    name = ""
    if flow.request is not None:
        segment = urlsplit(flow.request.url).path.rsplit("/", 1)[-1]
        name = _UNSAFE.sub("_", unquote(segment)).strip("._")[:100]
    if not name:
        name = f"flow-{flow.id}-{side}"
    if "." not in name:
        mime = media_type(headers)
        extension = ".json" if mime.endswith("+json") else mimetypes.guess_extension(mime or "-")
        name += extension or (".txt" if is_text_type(mime) else ".bin")
    return name


def unused_path(directory: Path, name: str) -> Path:
    """`directory/name`, or `name-1`, `name-2`, ... before its extension, whichever is free."""
    path = directory / name
    stem, dot, extension = name.rpartition(".")
    if not stem:
        stem, dot, extension = name, "", ""
    n = 1
    while path.exists():
        path = directory / f"{stem}-{n}{dot}{extension}"
        n += 1
    return path


def save_body(flow: Flow, side: Side, target: str | os.PathLike[str]) -> SavedBody:
    """Write the body to `target` (a new file, or a directory to put `body_filename` in).

    Never overwrites a file. A body kept only in part (--max-body-size, --max-session-size)
    is written as far as it was kept, and the note says so.
    """
    headers, body = message_of(flow, side)
    path = Path(os.path.expanduser(os.fspath(target)))
    if path.is_dir():
        path = unused_path(path, body_filename(flow, side))
    notes = []
    if body.kept == 0:
        raise BodyFileError(f"Flow #{flow.id}'s {side} body was not kept ({body.size:,} bytes "
                            "came; see --max-body-size and --max-session-size).")
    if body.truncated:
        notes.append(f"only the first {body.kept:,} of {body.size:,} bytes were kept")
    coding = header(headers, "content-encoding")
    data: bytes | None = None
    if coding and coding.strip().lower() != "identity":
        try:
            data = decode_body(body.read(), coding, max_size=MAX_DECODED,
                               partial=body.truncated)
        except ContentDecodeError as exc:
            notes.append(f"saved as it came ({coding}): it does not decode ({exc})")
        else:
            notes.append(f"{coding} decoded")
    try:
        out = open(path, "xb")  # noqa: SIM115 - closed below, removed when writing fails
    except FileExistsError:
        raise BodyFileError(f"{path} already exists: choose another name.") from None
    except OSError as exc:
        raise BodyFileError(f"Could not write {path}: {exc.strerror or exc}") from None
    try:
        with out:
            if data is not None:
                out.write(data)
                written = len(data)
            else:
                written = _copy(body, out)
    except OSError as exc:
        path.unlink(missing_ok=True)  # no half-written file left behind
        raise BodyFileError(f"Could not write {path}: {exc.strerror or exc}") from None
    return SavedBody(path, written, "; ".join(notes))


def _copy(body: Body, out) -> int:  # noqa: ANN001 - a binary file
    offset = 0
    while offset < body.kept:
        chunk = body.read(_COPY_CHUNK, offset)
        if not chunk:
            break
        out.write(chunk)
        offset += len(chunk)
    return offset
