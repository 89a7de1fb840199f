"""Saving a flow's body to a file: decoded, never overwriting, honest about what was kept."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from engine.body_file import BodyFileError, body_filename, save_body, unused_path
from engine.flow import Body
from tests.ui_fixtures import make_flow

JSON = b'{"ok": true, "items": [1, 2, 3]}'


def test_a_gzipped_body_is_saved_decoded(tmp_path: Path) -> None:
    flow = make_flow(1, path="/v1/stats", response_body=gzip.compress(JSON),
                     response_headers=[("Content-Type", "application/json"),
                                       ("Content-Encoding", "gzip")])
    saved = save_body(flow, "response", tmp_path / "out.json")
    assert (tmp_path / "out.json").read_bytes() == JSON
    assert saved.written == len(JSON) and saved.note == "gzip decoded"


def test_a_directory_target_gets_the_urls_name_and_never_overwrites(tmp_path: Path) -> None:
    flow = make_flow(1, path="/files/report%20final.csv?x=1", response_body=b"a,b\n1,2\n",
                     response_headers=[("Content-Type", "text/csv")])
    first = save_body(flow, "response", tmp_path)
    second = save_body(flow, "response", tmp_path)
    assert first.path == tmp_path / "report_final.csv"
    assert second.path == tmp_path / "report_final-1.csv"
    assert second.path.read_bytes() == b"a,b\n1,2\n"
    with pytest.raises(BodyFileError, match="already exists"):
        save_body(flow, "response", first.path)
    assert first.path.read_bytes() == b"a,b\n1,2\n"


def test_file_names_come_from_the_media_type_when_the_url_has_none() -> None:
    json_flow = make_flow(7, path="/", response_body=JSON,
                          response_headers=[("Content-Type", "application/problem+json")])
    assert body_filename(json_flow, "response") == "flow-7-response.json"
    form = make_flow(8, method="POST", path="/login", request_body=b"user=ada",
                     request_headers=[("Content-Type", "application/x-www-form-urlencoded")])
    assert body_filename(form, "request") == "login.txt"
    png = make_flow(9, path="/logo", response_body=b"\x89PNG",
                    response_headers=[("Content-Type", "image/png")])
    assert body_filename(png, "response") == "logo.png"
    unknown = make_flow(10, path="/../..", response_body=b"\x00\x01", response_headers=[])
    assert body_filename(unknown, "response") == "flow-10-response.bin"


def test_unused_path_numbers_before_the_extension(tmp_path: Path) -> None:
    (tmp_path / "a.tar.gz").write_bytes(b"")
    (tmp_path / "noext").write_bytes(b"")
    assert unused_path(tmp_path, "a.tar.gz") == tmp_path / "a.tar-1.gz"
    assert unused_path(tmp_path, "noext") == tmp_path / "noext-1"
    assert unused_path(tmp_path, "free.txt") == tmp_path / "free.txt"


def test_a_body_kept_in_part_is_saved_as_far_as_it_was_kept(tmp_path: Path) -> None:
    flow = make_flow(1, path="/big.bin", response_body=b"")
    body = Body(cap=1000)
    body.append(b"x" * 600)
    body.append(b"y" * 900)  # 400 of these are kept
    flow.response.body = body
    saved = save_body(flow, "response", tmp_path / "big.bin")
    assert saved.path.read_bytes() == b"x" * 600 + b"y" * 400
    assert saved.note == "only the first 1,000 of 1,500 bytes were kept"


def test_a_large_body_spilled_to_disk_is_copied_whole(tmp_path: Path) -> None:
    flow = make_flow(1, path="/big.bin", response_body=b"")
    body = Body(cap=0)
    data = bytes(range(256)) * (3 * 4096 + 17)  # ~3 MiB: past the in-memory threshold
    for i in range(0, len(data), 65536):
        body.append(data[i:i + 65536])
    flow.response.body = body
    saved = save_body(flow, "response", tmp_path / "big.bin")
    assert saved.written == len(data) and saved.path.read_bytes() == data


def test_a_body_that_does_not_decode_is_saved_as_it_came(tmp_path: Path) -> None:
    flow = make_flow(1, path="/x", response_body=b"not gzip at all",
                     response_headers=[("Content-Encoding", "gzip")])
    saved = save_body(flow, "response", tmp_path / "x")
    assert saved.path.read_bytes() == b"not gzip at all"
    assert saved.note.startswith("saved as it came (gzip): it does not decode")


def test_no_body_and_unwritable_paths_are_errors_in_words(tmp_path: Path) -> None:
    flow = make_flow(5, path="/missing", status=404)
    with pytest.raises(BodyFileError, match=r"^Flow #5 has no response body\.$"):
        save_body(flow, "response", tmp_path / "x")
    with pytest.raises(BodyFileError, match="has no request body"):
        body_filename(flow, "request")
    ok = make_flow(6, path="/a.txt", response_body=b"hi")
    with pytest.raises(BodyFileError, match=r"^Could not write .*nodir/a\.txt: No such file"):
        save_body(ok, "response", tmp_path / "nodir" / "a.txt")
