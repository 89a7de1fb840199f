"""A scrollable, line-API view of a message: a header block followed by one page of its body."""

from __future__ import annotations

from rich.cells import cell_len
from rich.segment import Segment
from rich.text import Text
from textual.binding import Binding
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from engine.flow import Body, Headers, header
from tapui.widgets.body_format import PAGE_SIZE, Decoded, decode, format_body


class BodyView(ScrollView, can_focus=True):
    """Shows `head` lines (request line, headers) then the current page of a decoded body."""

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
    ]

    def __init__(self, *, page_size: int = PAGE_SIZE, id: str | None = None) -> None:
        super().__init__(id=id)
        self.page_size = page_size
        self.head: list[Text] = []
        self.decoded: Decoded | None = None
        self.content_type: str | None = None
        self.note: str | None = None
        self.page = 0
        self.pages = 1
        self.lines: list[Text] = []
        self._strips: dict[int, Strip] = {}

    # --- content ------------------------------------------------------------------------------

    def show_lines(self, lines: list[Text]) -> None:
        """Show plain lines, no body."""
        self.head = []
        self.decoded = None
        self.note = None
        self._set_lines(lines)

    def show_message(self, head: list[Text], headers: Headers, body: Body | None,
                     keep_page: bool = False, note: str | None = None) -> None:
        """Show header lines and a body, decoded from its Content-Encoding; `note` is said
        above the body (e.g. that it was cut short)."""
        self.head = head
        self.content_type = header(headers, "content-type")
        self.decoded = decode(body, headers) if body is not None else None
        self.note = note
        if not keep_page:
            self.page = 0
        self._render_page()

    def action_page(self, delta: int) -> None:
        if self.decoded is None or not 0 <= self.page + delta < self.pages:
            self.app.bell()
            return
        self.page += delta
        self._render_page()
        self.scroll_to(y=len(self.head), animate=False)

    def _render_page(self) -> None:
        lines = list(self.head)
        if self.decoded is not None:
            page = format_body(self.decoded.data, self.content_type, self.page, self.page_size)
            self.page, self.pages = page.page, page.pages
            info = [self.note] if self.note else []
            if self.decoded.note:
                info.append(self.decoded.note)
            if page.pages > 1:
                info.append(f"page {page.page + 1}/{page.pages} of {len(self.decoded.data):,}"
                            " bytes · ] next page · [ previous page")
            if info:
                lines.append(Text("── " + " · ".join(info) + " ──", style="italic dim"))
            lines.extend(page.lines)
            if page.pages > 1 and page.page + 1 < page.pages:
                lines.append(Text(f"── more: press ] for page {page.page + 2}/{page.pages} ──",
                                  style="italic dim"))
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
