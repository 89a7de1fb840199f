"""SVG snapshots of the main screens, built from deterministic fixture flows.

Regenerate with `pytest tests/test_ui_snapshots.py --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

import time

import pytest

from tapui.app import TapuiApp
from tests.ui_fixtures import sample_flows

SIZE = (140, 32)


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def app() -> TapuiApp:
    return TapuiApp(flows=sample_flows())


def test_flow_list(snap_compare) -> None:
    assert snap_compare(app(), press=["j", "m", "j", "j"], terminal_size=SIZE)


def test_json_response_detail(snap_compare) -> None:
    assert snap_compare(app(), press=["enter", "2"], terminal_size=SIZE)


def test_filtered_list(snap_compare) -> None:
    assert snap_compare(app(), press=["f", *"~d api | ~c 500", "enter"], terminal_size=SIZE)


def test_filter_syntax_error(snap_compare) -> None:
    async def type_bad_filter(pilot) -> None:
        await pilot.press("f", *"~c 404 & (")
        await pilot.pause(0.3)
        pilot.app.filter_bar.input.cursor_blink = False

    assert snap_compare(app(), run_before=type_bad_filter, terminal_size=SIZE)


def test_timing_view(snap_compare) -> None:
    assert snap_compare(app(), press=["enter", "3"], terminal_size=SIZE)


def test_help_screen(snap_compare) -> None:
    assert snap_compare(app(), press=["question_mark"], terminal_size=(100, 50))
