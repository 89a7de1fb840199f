"""How the body pane shows bodies by type (tapui/widgets/body_format.py)."""

from __future__ import annotations

import re

from tapui.widgets.body_format import first_page_with, format_body

SSE = (b'event: message\nid: 1\ndata: {"delta": "Hel", "n": 3}\n\n'
       b": keep-alive\ndata: [DONE]\n\n")


def test_server_sent_events_show_their_fields_and_json_data_highlighted() -> None:
    page = format_body(SSE, "text/event-stream; charset=utf-8")
    assert page.kind == "sse"
    assert [line.plain for line in page.lines][:3] == [
        "event: message", "id: 1", 'data: {"delta": "Hel", "n": 3}']
    data = page.lines[2]
    styled = {data.plain[span.start:span.end] for span in data.spans}
    assert "data" in styled and '"' in "".join(styled)  # the field name and the JSON's strings


def test_first_page_with_finds_the_page_that_has_the_text() -> None:
    body = "\n".join(f"line {i}" for i in range(3000)).encode() + b"\nthe needle\n"
    pages = format_body(body, "text/plain", page_size=4096).pages
    assert first_page_with(body, "text/plain", [re.compile("needle")], 4096) == pages - 1
    assert first_page_with(body, "text/plain", [re.compile("absent")], 4096) == 0
    assert first_page_with(b"\x00\x01needle", "application/octet-stream",
                           [re.compile("needle")], 4096) == 0  # a hex dump is not searched
