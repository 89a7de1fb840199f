"""The detail of one flow: request, response, timing, connection and WebSocket tabs."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static, TabbedContent, TabPane

from engine import grpc
from engine.body_file import Side
from engine.filters import SearchTerms
from engine.flow import Flow, Headers, WebSocketMessage, cut_short
from tapui.widgets.body_format import printable
from tapui.widgets.body_view import BodyView
from tapui.widgets.connection_view import ConnectionView
from tapui.widgets.flow_list import clock, human_duration, human_size
from tapui.widgets.timing_view import TimingView

_OPCODES = {0: "cont", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong"}


def header_lines(headers: Headers) -> list[Text]:
    lines = []
    for name, value in headers:
        line = Text()
        line.append(printable(name), style="bold cyan")
        line.append(": ")
        line.append(printable(value))
        lines.append(line)
    return lines


def summary(flow: Flow) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    request, response = flow.request, flow.response
    if request is not None:
        text.append(f"{request.method} ", style="bold")
        text.append(printable(request.url))
    else:
        text.append(f"{flow.kind.value.upper()} {flow.host}:{flow.conn.server[1]}", style="bold")
    if response is not None:
        style = "green" if response.status < 400 else "red"
        text.append(f"  → {response.status} {response.reason}", style=f"bold {style}")
        size = human_size(response.body.size)
        short = cut_short(flow)
        if short is not None:
            size += f" of {human_size(short[1])}"
        text.append(f"  {size}")
        failed = grpc.failure(response)
        if failed:
            text.append(f"  ✗ grpc {failed}", style="bold red")
    if flow.error:
        text.append(f"  ✗ {flow.error}", style="bold red")
    text.append(f"  {human_duration(flow.duration)}", style="dim")
    return text


def short_note(flow: Flow, of_request: bool = False) -> str | None:
    """What is said above a body that ended short of its Content-Length."""
    short = cut_short(flow, of_request)
    if short is None:
        return None
    return f"cut short: {short[0]:,} of {short[1]:,} bytes came"


def websocket_lines(messages: list[WebSocketMessage]) -> list[Text]:
    if not messages:
        return [Text("(no messages yet)", style="dim")]
    lines = []
    for message in messages:
        arrow, style = ("→ client", "cyan") if message.from_client else ("← server", "green")
        kind = _OPCODES.get(message.opcode, str(message.opcode))
        head = Text()
        head.append(clock(message.timestamp) + " ", style="dim")
        head.append(arrow, style=f"bold {style}")
        head.append(f"  {kind}  {len(message.content):,} bytes", style="dim")
        lines.append(head)
        if message.opcode == 1:
            content = printable(message.content.decode("utf-8", "replace"))
            lines.extend(Text("    " + line) for line in content.split("\n"))
        elif message.content:
            preview = message.content[:64]
            more = "…" if len(message.content) > 64 else ""
            lines.append(Text("    " + preview.hex(" ") + more, style="yellow"))
    return lines


def _signature(flow: Flow) -> tuple:
    """What changes when a flow progresses; the screen re-renders when it differs."""
    return (
        flow.state,
        flow.request.body.size if flow.request else None,
        flow.response is not None,
        flow.response.body.size if flow.response else None,
        len(flow.websocket_messages),
        flow.error,
        flow.timings.done,
    )


class FlowDetail(Screen):
    """One flow in full. `q`/`esc` go back to the list."""

    BINDINGS = [
        Binding("q,escape", "back", "Back"),
        # The app's, shown in this screen's footer (the list's has no room for them):
        Binding("b", "app.save_body", "Save body"),
        Binding("r", "app.replay", "Replay"),
        Binding("1", "tab('tab-request')", "Request", show=False),
        Binding("2", "tab('tab-response')", "Response", show=False),
        Binding("3", "tab('tab-timing')", "Timing", show=False),
        Binding("4", "tab('tab-connection')", "Connection", show=False),
        Binding("5", "tab('tab-websocket')", "WebSocket", show=False),
        Binding("tab", "next_tab", "Next tab", show=False),
    ]

    def __init__(self, flow: Flow, terms: SearchTerms | None = None) -> None:
        """`terms`: what the list's filter searches for, marked in the messages."""
        super().__init__()
        self.flow = flow
        self.terms = terms or SearchTerms()
        self._signature: tuple = ()

    def compose(self) -> ComposeResult:
        yield Static(id="detail-summary")
        with TabbedContent(id="detail-tabs"):
            with TabPane("Request", id="tab-request"):
                yield BodyView(id="request-view")
            with TabPane("Response", id="tab-response"):
                yield BodyView(id="response-view")
            with TabPane("Timing", id="tab-timing"):
                with VerticalScroll():
                    yield TimingView(id="timing-view")
            with TabPane("Connection", id="tab-connection"):
                with VerticalScroll():
                    yield ConnectionView(id="connection-view")
            if self._has_websocket():
                with TabPane("WebSocket", id="tab-websocket"):
                    yield BodyView(id="websocket-view")
        yield Footer()

    def _has_websocket(self) -> bool:
        return self.flow.kind.value == "websocket" or bool(self.flow.websocket_messages)

    def on_mount(self) -> None:
        self.render_flow(first=True)
        self.set_interval(0.5, self.render_flow)
        tabs = self.query_one(TabbedContent)
        if self.flow.request is None:
            tabs.active = "tab-connection"
        self.query_one("#request-view", BodyView).focus()

    def render_flow(self, first: bool = False) -> None:
        """Render the flow again when it progressed since the last render."""
        if not self.query("#response-view"):  # (switched to, not composed yet: on_mount will)
            return
        flow = self.flow
        signature = _signature(flow)
        if signature == self._signature:
            return
        self._signature = signature
        self.query_one("#detail-summary", Static).update(summary(flow))
        keep = not first
        request_view = self.query_one("#request-view", BodyView)
        request = flow.request
        if request is None:
            request_view.show_lines([Text("(no HTTP request on this connection)", style="dim")])
        else:
            head = [Text(f"{request.method} {printable(request.url)} {request.http_version}",
                         style="bold")]
            head += header_lines(request.headers)
            if request.trailers:
                head += [Text("trailers:", style="dim"), *header_lines(request.trailers)]
            head.append(Text(""))
            request_view.show_message(head, request.headers, request.body, keep_page=keep,
                                      note=short_note(flow, of_request=True),
                                      head_marks=self.terms.request_head,
                                      body_marks=self.terms.request_body)
        response_view = self.query_one("#response-view", BodyView)
        response = flow.response
        if response is None:
            note = f"✗ {flow.error}" if flow.error else "(no response yet)"
            style = "bold red" if flow.error else "dim"
            response_view.show_lines([Text(note, style=style)])
        else:
            head = [Text(f"{response.http_version} {response.status} {response.reason}",
                         style="bold")]
            head += header_lines(response.headers)
            if response.trailers:
                head += [Text("trailers:", style="dim"), *header_lines(response.trailers)]
            head.append(Text(""))
            response_view.show_message(head, response.headers, response.body, keep_page=keep,
                                       note=short_note(flow),
                                       head_marks=self.terms.response_head,
                                       body_marks=self.terms.response_body)
        self.query_one("#timing-view", TimingView).show_flow(flow)
        self.query_one("#connection-view", ConnectionView).show_flow(flow)
        if self._has_websocket() and self.query("#websocket-view"):
            self.query_one("#websocket-view", BodyView).show_lines(
                websocket_lines(flow.websocket_messages))

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        pane = event.pane
        views = pane.query(BodyView)
        if views:
            views.first().focus()

    def shown_side(self) -> Side:
        """Whose body the open tab is about: the request's on its tab, else the response's."""
        return "request" if self.query_one(TabbedContent).active == "tab-request" else "response"

    def action_tab(self, tab_id: str) -> None:
        tabs = self.query_one(TabbedContent)
        if self.query(f"#{tab_id}"):
            tabs.active = tab_id

    def action_next_tab(self) -> None:
        tabs = self.query_one(TabbedContent)
        ids = [pane.id for pane in tabs.query(TabPane) if pane.id]
        if tabs.active in ids:
            tabs.active = ids[(ids.index(tabs.active) + 1) % len(ids)]

    def action_back(self) -> None:
        self.dismiss()
