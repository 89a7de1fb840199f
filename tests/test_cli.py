"""Bad options are refused before anything runs: exit code 2 and one line naming the option."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import run_tapui

BAD_OPTIONS = {
    "upstream CA missing": (["--upstream-ca", "{tmp}/missing.pem"], "--upstream-ca {tmp}/missing.pem: no such file"),
    "upstream CA not PEM": (["--upstream-ca", "{tmp}/not.pem"], "--upstream-ca {tmp}/not.pem: no certificate in it"),
    "HAR in a missing directory": (["--har", "{tmp}/missing/out.har"], "--har {tmp}/missing/out.har: no such directory"),
    "HAR path a directory": (["--har", "{tmp}"], "--har {tmp}: is a directory"),
    "negative body size": (["--max-body-size", "-5"], "--max-body-size: a size cannot be negative"),
    "body size not a size": (["--max-body-size", "lots"], "--max-body-size: not a size: 'lots'"),
    "add-host without an address": (["--add-host", "foo"], "--add-host wants NAME:IP"),
    "ignore-hosts not a regex": (["--ignore-hosts", "("], "--ignore-hosts '(':"),
    "save and no-save": (["--save", "{tmp}/s.tapui", "--no-save"], "--save and --no-save exclude each other"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_option_is_refused_before_the_command_runs(tmp_path: Path, case: str) -> None:
    (tmp_path / "not.pem").write_text("not a certificate\n")
    options, message = BAD_OPTIONS[case]
    marker = tmp_path / "ran"
    args = [o.replace("{tmp}", str(tmp_path)) for o in options]
    result = run_tapui("--no-ui", *args, "--", "touch", str(marker))
    assert result.returncode == 2, result.stderr
    assert message.replace("{tmp}", str(tmp_path)) in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_ca_pem_to_a_path_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"))
    result = run_tapui("ca", "--pem", str(tmp_path / "missing" / "ca.pem"), env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"tapui ca: cannot write {tmp_path / 'missing' / 'ca.pem'}: No such file or directory")


def test_help_explains_every_option_and_shows_examples() -> None:
    from tapui.cli import build_parser

    result = run_tapui("--help")
    assert result.returncode == 0
    options = [a for a in build_parser()._actions if a.option_strings]
    assert options and all(a.help for a in options)
    for action in options:
        assert action.option_strings[-1] in result.stdout
    examples = result.stdout.split("examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(examples) >= 5
    columns = {re.search(r"\S {3,}(\S)", line).start(1) for line in examples}  # type: ignore[union-attr]
    assert len(columns) == 1  # the explanations line up
