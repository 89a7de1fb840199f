"""A scrollable, line-API view of a message: a header block followed by one page of its body.

Text the list's filter searched for is marked where it occurs (`n`/`N` move between the lines
that have it), so a flow found by a search shows why it was found.
"""

from __future__ import annotations

import re

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from engine.flow import Body, Headers, header
from tapui.widgets.body_format import (
    PAGE_SIZE,
    VIEWS,
    Decoded,
    decode,
    first_page_with,
    format_body,
)

Patterns = tuple[re.Pattern[str], ...]


def mark_matches(line: Text, patterns: Patterns, style: Style) -> bool:
    """Style what `patterns` find in `line`; True if they found anything."""
    found = False
    for pattern in patterns:
        for match in pattern.finditer(line.plain):
            if match.end() > match.start():  # (a pattern may match the empty string)
                line.stylize(style, match.start(), match.end())
                found = True
    return found


class BodyView(ScrollView, can_focus=True):
    """Shows `head` lines (request line, headers) then the current page of a decoded body."""

    COMPONENT_CLASSES = {"body-view--match"}

    DEFAULT_CSS = """
    BodyView { height: 1fr; }
    """

    BINDINGS = [
        Binding("]", "page(1)", "Next page", show=False),
        Binding("[", "page(-1)", "Previous page", show=False),
        Binding("j", "scroll_down", "Down", show=False),
        Binding("k", "scroll_up", "Up", show=False),
        Binding("g", "scroll_home", "Top", show=False),
        Binding("G", "scroll_end", "Bottom", show=False),
        Binding("n", "match(1)", "Next match", show=False),
        Binding("N", "match(-1)", "Previous match", show=False),
        Binding("v", "next_view", "View mode"),
    ]

    def __init__(self, *, page_size: int = PAGE_SIZE, id: str | None = None) -> None:
        super().__init__(id=id)
        self.page_size = page_size
        self.head: list[Text] = []
        self.decoded: Decoded | None = None
        self.content_type: str | None = None
        self.note: str | None = None
        self.head_marks: Patterns = ()
        self.body_marks: Patterns = ()
        self.match_lines: list[int] = []  # lines with a mark, in order
        self.page = 0
        self.pages = 1
        self.view = "auto"  # one of VIEWS: kept while the flow updates
        self.lines: list[Text] = []
        self._strips: dict[int, Strip] = {}

    # --- content ------------------------------------------------------------------------------

    def show_lines(self, lines: list[Text]) -> None:
        """Show plain lines, no body."""
        self.head = []
        self.decoded = None
        self.note = None
        self.head_marks = self.body_marks = ()
        self._set_lines(lines)

    def show_message(self, head: list[Text], headers: Headers, body: Body | None,
                     keep_page: bool = False, note: str | None = None,
                     head_marks: Patterns = (), body_marks: Patterns = ()) -> None:
        """Show header lines and a body, decoded from its Content-Encoding; `note` is said
        above the body (e.g. that it was cut short); what the `marks` find is marked."""
        self.head = head
        self.head_marks, self.body_marks = head_marks, body_marks
        self.content_type = header(headers, "content-type")
        self.decoded = decode(body, headers) if body is not None else None
        self.note = note
        if not keep_page:  # the first page, or the first with the filter's text
            self.page = 0
            if body_marks and self.decoded is not None:
                self.page = first_page_with(self.decoded.data, self.content_type, body_marks,
                                            self.page_size, self.view)
        self._render_page()

    def action_page(self, delta: int) -> None:
        if self.decoded is None or not 0 <= self.page + delta < self.pages:
            self.app.bell()
            return
        self.page += delta
        self._render_page()
        self.scroll_to(y=len(self.head), animate=False)

    def action_next_view(self) -> None:
        """Show the body the next way: as its type suggests, as plain text, as a hex dump."""
        if self.decoded is None:
            self.app.bell()
            return
        self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]
        self.page = 0
        if self.body_marks:
            self.page = first_page_with(self.decoded.data, self.content_type, self.body_marks,
                                        self.page_size, self.view)
        self._render_page()

    def action_match(self, step: int) -> None:
        """Scroll the next (`step` 1) or previous (-1) line with a mark to the top (as far as
        the view scrolls); a bell when there is none to move to."""
        top = self.scroll_offset.y
        if step > 0:
            ahead = [y for y in self.match_lines if y > top] if top < self.max_scroll_y else []
        else:
            ahead = [y for y in reversed(self.match_lines) if y < top]
        if not ahead:
            self.app.bell()
            return
        self.scroll_to(y=ahead[0], animate=False)

    def _render_page(self) -> None:
        style = self.get_component_rich_style("body-view--match", partial=True)
        lines = [line.copy() for line in self.head]
        matched = [y for y, line in enumerate(lines)
                   if self.head_marks and mark_matches(line, self.head_marks, style)]
        if self.decoded is not None:
            page = format_body(self.decoded.data, self.content_type, self.page, self.page_size,
                               self.view)
            self.page, self.pages = page.page, page.pages
            body = [line.copy() for line in page.lines]
            found = [y for y, line in enumerate(body)
                     if self.body_marks and mark_matches(line, self.body_marks, style)]
            info = [self.note] if self.note else []
            if self.decoded.note:
                info.append(self.decoded.note)
            if self.view != "auto":
                info.append(f"shown as {self.view} · v: next view")
            if page.pages > 1:
                info.append(f"page {page.page + 1}/{page.pages} of {len(self.decoded.data):,}"
                            " bytes · ] next page · [ previous page")
            if found:
                info.append(f"the filter's text in {len(found):,} line"
                            f"{'s' if len(found) > 1 else ''} · n next · N previous")
            if info:
                lines.append(Text("── " + " · ".join(info) + " ──", style="italic dim"))
            matched += [len(lines) + y for y in found]
            lines.extend(body)
            if page.pages > 1 and page.page + 1 < page.pages:
                lines.append(Text(f"── more: press ] for page {page.page + 2}/{page.pages} ──",
                                  style="italic dim"))
        self.match_lines = matched
        self._set_lines(lines)

    def _set_lines(self, lines: list[Text]) -> None:
        self.lines = lines
        self._strips.clear()
        width = max((cell_len(line.plain) for line in lines[:5000]), default=0)
        self.virtual_size = Size(width, len(lines))
        self.refresh()

    # --- line API -----------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        index = scroll_y + y
        width = self.scrollable_content_region.width
        style = self.rich_style
        if index >= len(self.lines):
            return Strip.blank(width, style)
        strip = self._strips.get(index)
        if strip is None:
            text = self.lines[index]
            segments = [Segment(s.text.replace("\t", "    "), s.style)
                        for s in text.render(self.app.console) if s.text != "\n"]
            strip = Strip(segments)
            if len(self._strips) > 2000:
                self._strips.clear()
            self._strips[index] = strip
        return strip.crop_extend(scroll_x, scroll_x + width, None).apply_style(style)
