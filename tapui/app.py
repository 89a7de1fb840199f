"""The tapui Textual app: a live list of flows, their details, a filter bar and exports."""

from __future__ import annotations

import os
import queue
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from textual.app import App, ComposeResult, SuspendNotSupported, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer

from engine.body_file import BodyFileError, Side, body_filename, save_body, unused_path
from engine.curl import CurlError, to_curl
from engine.filters import FilterError, search_terms
from engine.flow import Flow, FlowBus, Request, continue_flow_ids_after
from engine.replay import Replayer, ReplayError, ReplayOptions
from engine.request_text import RequestTextError, request_to_text, text_to_request
from engine.runstatus import CommandState, RunStatus
from engine.session_store import AddToSession, SessionStore
from engine.store import FlowStore
from tapui import clipboard
from tapui.filter_history import FilterHistory, filter_history_file
from tapui.messages import FilterChanged, FilterClosed, OpenFlow, ViewChanged
from tapui.widgets.body_view import BodyView
from tapui.widgets.export_dialog import ExportDialog
from tapui.widgets.filter_bar import FilterBar
from tapui.widgets.flow_detail import FlowDetail
from tapui.widgets.flow_list import FlowList
from tapui.widgets.help_screen import HelpScreen
from tapui.widgets.output_panel import OutputPanel, OutputReader
from tapui.widgets.status_bar import StatusBar, retention_note

if TYPE_CHECKING:
    from engine.session import SessionWriter

#: How often queued flow events and output lines are applied.
TICK = 0.075


def editor_command() -> list[str] | None:
    """The user's editor ($VISUAL, then $EDITOR, then nano or vi), as argv."""
    for variable in ("VISUAL", "EDITOR"):
        value = os.environ.get(variable, "").strip()
        if value:
            return shlex.split(value)
    for name in ("nano", "vi"):
        if shutil.which(name):
            return [name]
    return None


def default_har_path() -> str:
    return f"./tapui-{time.strftime('%Y%m%d-%H%M%S')}.har"


class TapuiApp(App[int]):
    """Shows flows as the engine reports them (through `bus`) or as given (`flows`)."""

    CSS_PATH = "app.tcss"

    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
        Binding("slash,f", "filter", "Filter"),
        Binding("c", "copy_curl", "Copy curl"),
        Binding("u", "copy_url", "Copy URL", show=False),
        Binding("b", "save_body", "Save body", show=False),
        Binding("r", "replay", "Replay", show=False),
        Binding("R", "edit_replay", "Edit and replay", show=False),
        Binding("e", "export", "Export HAR"),
        Binding("w", "save_session", "Save session"),
        Binding("z", "clear", "Clear", show=False),
        Binding("o", "toggle_output", "Output"),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(
        self,
        bus: FlowBus | None = None,
        status: RunStatus | None = None,
        flows: Iterable[Flow] = (),
        title: str = "tapui",
        store: FlowStore | SessionStore | None = None,
        session: SessionWriter | None = None,
        filter_history: Path | None = None,
        replayer: Replayer | None = None,
        initial_filter: str = "",
    ) -> None:
        """`filter_history`: the file that keeps the filters across runs (none: this run's).
        `replayer`: sends a flow's request again (a live run's; when browsing a saved session,
        one that adds the new flows to its file: see saved_session_replayer).
        `initial_filter`: applied from the start (a valid expression: --filter checked it)."""
        super().__init__()
        self.replayer = replayer
        self._initial_filter = initial_filter
        self._filter_history = FilterHistory(filter_history)
        self.title = title
        self.bus = bus
        self.status = status
        #: In memory by default; a SessionStore reads a session file (live or saved).
        self.store: FlowStore | SessionStore = store if store is not None else FlowStore()
        self.store.add(flows)
        self.last_copied: str | None = None
        self._last_state: tuple[CommandState, int | None] | None = None
        self._reader: OutputReader | None = None
        if bus is not None:
            # Subscribe now, not on mount: events emitted meanwhile wait in the queue.
            self.store.attach(bus)
        #: The live session's writer, whose death turns the list over to memory.
        self._session = session
        self._unsaved: queue.SimpleQueue[list[Flow]] = queue.SimpleQueue()
        self._session_note = ""  # says that flows are no longer saved
        if session is not None:
            session.on_failure = self._unsaved.put

    # --- layout -------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        # Kept as attributes: App.query_one looks only at the active screen, which may be a
        # dialog or the detail screen.
        self.flow_list = FlowList(self.store, id="flows")
        self.output_panel = OutputPanel(id="output")
        self.filter_bar = FilterBar(self._filter_history, id="filter-bar")
        self.status_bar = StatusBar(id="status")
        yield self.flow_list
        yield self.output_panel
        yield self.filter_bar
        yield self.status_bar
        yield Footer()

    def on_mount(self) -> None:
        self.filter_bar.display = False
        self.output_panel.display = False
        if self.status is not None and self.status.output_fd is not None:
            self._reader = OutputReader(self.status.output_fd)
            self._reader.start()
        if self._initial_filter:
            self.store.set_filter(self._initial_filter)
            self.filter_bar.applied = self._initial_filter
        self.flow_list.focus()
        self.flow_list.sync()
        self.update_status()
        self.set_interval(TICK, self.tick)

    def on_unmount(self) -> None:
        if self.bus is not None:
            self.store.detach(self.bus)
        if self.replayer is not None:
            self.replayer.stop()  # a replay waiting on a slow server must not hold up the exit

    # --- live updates -------------------------------------------------------------------------

    def tick(self) -> None:
        """Apply what the engine and the command produced since the last tick, in one repaint."""
        if not self.flow_list.is_attached:  # closing: a last tick can come after the screens
            return  # are gone ("No screens on stack", once in CI)
        with self.batch_update():
            failure = self._session.failure if self._session is not None else None
            if failure and not self._session_note:
                self._keep_flows_in_memory(failure)
            if self.store.drain():
                self.flow_list.sync()
                if isinstance(self.screen, FlowDetail):
                    self.screen.render_flow()
            if self._reader is not None:
                lines = self._reader.drain()
                if lines:
                    self.output_panel.add_lines(lines)
            self.update_status(at_once=False)

    def _keep_flows_in_memory(self, failure: str) -> None:
        """The session writer died: list what it saved plus every flow since, from memory,
        so the list goes on growing (the file no longer does)."""
        old = self.store
        memory = FlowStore()
        if self.bus is not None:
            memory.attach(self.bus)  # from now on the bus feeds the list directly
        if self._session is not None:
            self._session.on_failure = None
        memory.add(old)  # what the session file has
        while not self._unsaved.empty():  # what the writer could not save
            memory.add(self._unsaved.get())
        memory.set_sort(old.sort_key, old.sort_reverse)
        memory.set_hide_raw(old.hide_raw)
        try:
            memory.set_filter(old.filter_expr)
        except FilterError:
            pass
        if self.bus is not None:
            old.detach(self.bus)
        self.store = memory
        self.flow_list.store = memory
        self.flow_list.sync()
        self._session_note = "session not saved: flows kept in memory"
        self.notify(
            f"Saving the session stopped: {failure}. Flows are still listed (kept in memory "
            "from now on); press w to save them all as HAR.",
            title="session not saved", severity="error", timeout=30,
        )

    def update_status(self, *, at_once: bool = True) -> None:
        """The status bar; a tick passes at_once=False, so counts of a stream follow at a
        steady pace (see StatusBar.show)."""
        status = self.status
        if status is not None:
            state = (status.state, status.exit_code)
            if state != self._last_state:
                if status.state is CommandState.EXITED and self._last_state is not None:
                    self.notify(f"The command exited with code {status.exit_code}. "
                                "Press q to quit.", title="command finished")
                elif status.state is CommandState.FAILED:
                    self.notify(status.message or "the command could not start",
                                title="command failed", severity="error", timeout=10)
                self._last_state = state
        flows = self.flow_list
        store = self.store
        sort = store.sort_key + ("↓" if store.sort_reverse else "")
        self.status_bar.show(StatusBar.snapshot(
            status, source=self.title, shown=store.view_len, total=len(store),
            total_bytes=store.total_bytes, filter_expr=store.filter_expr, sort=sort,
            follow=flows.follow, marked=len(flows.marked), hide_raw=store.hide_raw,
            retention=" · ".join(filter(None, [
                self._session_note, retention_note(getattr(store, "counters", None))])),
        ), at_once=at_once)

    def on_view_changed(self, message: ViewChanged) -> None:
        self.update_status()

    # --- flows --------------------------------------------------------------------------------

    def current_flow(self) -> Flow | None:
        """The flow shown in the detail screen, else the one under the list cursor."""
        for screen in reversed(self.screen_stack):
            if isinstance(screen, FlowDetail):
                return screen.flow
        return self.flow_list.selected

    def on_open_flow(self, message: OpenFlow) -> None:
        flow = self.store.get(message.flow_id)
        if flow is not None:
            self.push_screen(FlowDetail(flow, search_terms(self.store.filter_expr)))

    # --- filter -------------------------------------------------------------------------------

    def action_filter(self) -> None:
        if isinstance(self.screen, FlowDetail):
            self.screen.dismiss()
        self.filter_bar.open()

    def on_filter_changed(self, message: FilterChanged) -> None:
        try:
            self.store.set_filter(message.expr)
        except FilterError as exc:  # the bar validated it; keep the last good filter anyway
            self.notify(str(exc), severity="error")
            return
        self.flow_list.sync()
        self.update_status()

    def on_filter_closed(self, message: FilterClosed) -> None:
        self.flow_list.focus()

    # --- copy and export ----------------------------------------------------------------------

    def action_copy_curl(self) -> None:
        flow = self.current_flow()
        if flow is None:
            self.notify("No flow selected.", severity="warning")
            return
        try:
            command = to_curl(flow)
        except CurlError as exc:
            self.notify(str(exc), severity="warning")
            return
        used = clipboard.copy(self, command)
        self.last_copied = command
        preview = command if len(command) <= 300 else command[:299] + "…"
        self.notify(preview, title=f"Copied curl command ({len(command):,} chars) via "
                    + ", ".join(used), markup=False)

    def action_copy_url(self) -> None:
        flow = self.current_flow()
        if flow is None or flow.request is None:
            self.notify("No flow with a URL selected.", severity="warning")
            return
        url = flow.request.url
        used = clipboard.copy(self, url)
        self.last_copied = url
        self.notify(url, title="Copied URL via " + ", ".join(used), markup=False)

    def action_save_body(self) -> None:
        """The body shown (the request's on the Request tab, else the response's) to a file."""
        screen = self.screen
        flow = screen.flow if isinstance(screen, FlowDetail) else self.flow_list.selected
        if flow is None:
            self.notify("No flow selected.", severity="warning")
            return
        side: Side = screen.shown_side() if isinstance(screen, FlowDetail) else "response"
        try:
            default = unused_path(Path("."), body_filename(flow, side))
        except BodyFileError as exc:
            self.notify(str(exc), severity="warning", markup=False)
            return

        def chosen(path: str | None) -> None:
            if path:
                self.run_worker(lambda: self._write_body(flow, side, path), thread=True,
                                name="save-body", group="export")

        self.push_screen(ExportDialog(f"Save flow #{flow.id}'s {side} body to:",
                                      f"./{default.name}"), chosen)

    def _write_body(self, flow: Flow, side: Side, path: str) -> None:
        """Runs in a worker thread: a body can be large."""
        try:
            saved = save_body(flow, side, path)
        except BodyFileError as exc:
            self.call_from_thread(self.notify, str(exc), severity="error", markup=False)
            return
        note = f" ({saved.note})" if saved.note else ""
        self.call_from_thread(self.notify, f"Wrote {saved.written:,} bytes to {saved.path}{note}",
                              markup=False)

    def _to_replay(self) -> tuple[Flow, Replayer] | None:
        """The flow to replay and the replayer, or None (and the user told why)."""
        flow = self.current_flow()
        if flow is None:
            self.notify("No flow selected.", severity="warning")
            return None
        if self.replayer is None:
            self.notify("Nothing here can send a request again.", severity="warning")
            return None
        try:
            self.replayer.check(flow)
        except ReplayError as exc:
            self.notify(str(exc), severity="warning", markup=False)
            return None
        return flow, self.replayer

    def action_replay(self) -> None:
        """Send the flow's request again from tapui; the answer comes as a new flow."""
        target = self._to_replay()
        if target is None:
            return
        flow, replayer = target
        self.notify(f"Replaying flow #{flow.id}…", markup=False)
        detail = self.screen if isinstance(self.screen, FlowDetail) else None
        self.run_worker(lambda: self._replay(replayer, flow, None, detail), thread=True,
                        name="replay", group="replay")

    def action_edit_replay(self) -> None:
        """The flow's request in $VISUAL or $EDITOR; what is saved there is sent to the same
        server, and its answer comes as a new flow."""
        target = self._to_replay()
        if target is None:
            return
        flow, replayer = target
        assert flow.request is not None  # (check() saw to it)
        try:
            text = request_to_text(flow.request)
        except RequestTextError as exc:
            self.notify(f"Flow #{flow.id}'s request cannot be edited as text: {exc} "
                        "(r replays it as it is).", severity="warning", markup=False)
            return
        editor = editor_command()
        if editor is None:
            self.notify("No editor: set $VISUAL or $EDITOR (or install nano or vi).",
                        severity="error")
            return
        with tempfile.NamedTemporaryFile("w", suffix=".http", prefix=f"tapui-{flow.id}-",
                                         delete=False, encoding="utf-8") as file:
            file.write(text)
        try:
            try:
                with self.suspend():
                    result = subprocess.run([*editor, file.name], check=False)
            except (SuspendNotSupported, OSError) as exc:
                self.notify(f"Could not run {shlex.join(editor)}: {exc}", severity="error",
                            markup=False)
                return
            edited = Path(file.name).read_text(encoding="utf-8", errors="surrogateescape")
        finally:
            os.unlink(file.name)
        if result.returncode != 0:
            self.notify(f"The editor exited with status {result.returncode}: nothing sent.",
                        severity="warning")
            return
        if edited == text:
            self.notify("The request is unchanged: nothing sent (r replays it as it is).",
                        severity="warning")
            return
        try:
            request = text_to_request(edited, flow.request)
        except RequestTextError as exc:
            self.notify(f"Not sent: {exc}", severity="error", markup=False)
            return
        self.notify(f"Sending flow #{flow.id}'s request, edited…", markup=False)
        detail = self.screen if isinstance(self.screen, FlowDetail) else None
        self.run_worker(lambda: self._replay(replayer, flow, request, detail), thread=True,
                        name="replay", group="replay")

    def _replay(self, replayer: Replayer, flow: Flow, edited: Request | None,
                detail: FlowDetail | None) -> None:
        """Runs in a worker thread: the server may take its time. Started from a flow's detail
        screen, the new flow's replaces it (still open), so its answer is in view."""
        try:
            new = replayer.replay(flow, edited)
        except ReplayError as exc:
            self.call_from_thread(self.notify, str(exc), severity="warning", markup=False)
            return
        if detail is not None:
            self.call_from_thread(self._show_instead, detail, new)
        kept = next((listener for listener in replayer.bus.listeners
                     if isinstance(listener, AddToSession)), None)
        if kept is not None and kept.error:  # (browsing a saved session: not in its list)
            self.call_from_thread(self.notify, f"Replayed #{flow.id}, but {kept.error}",
                                  severity="error", markup=False)
            return
        if new.error:
            self.call_from_thread(self.notify, f"Replay of #{flow.id} (#{new.id}): {new.error}",
                                  severity="error", markup=False)
            return
        status = f"{new.response.status} {new.response.reason}" if new.response else "no answer"
        self.call_from_thread(self.notify, f"Replayed #{flow.id} as #{new.id}: {status}",
                              markup=False)

    def _show_instead(self, detail: FlowDetail, flow: Flow) -> None:
        if self.screen is detail:
            self.switch_screen(FlowDetail(flow, detail.terms))

    def action_export(self) -> None:
        detail = self.screen.flow if isinstance(self.screen, FlowDetail) else None
        if detail is not None:
            flows, what = [detail], f"flow #{detail.id}"
        elif self.flow_list.marked:
            flows = self.flow_list.marked_flows()
            what = f"{len(flows)} marked flows"
        elif isinstance(self.store, SessionStore):  # streamed from the file, never all in RAM
            store = self.store
            self._ask_and_write(store.view_len, f"Export {store.view_len} shown flows as HAR to:",
                                lambda path: store.write_har(path, view_only=True))
            return
        else:
            flows = self.store.view_flows()
            what = f"{len(flows)} shown flows"
        self._ask_and_write(len(flows), f"Export {what} as HAR to:", self._har_writer(flows))

    def action_save_session(self) -> None:
        store = self.store
        if isinstance(store, SessionStore):
            self._ask_and_write(len(store), f"Save the whole session ({len(store)} flows) as HAR to:",
                                lambda path: store.write_har(path, view_only=False))
            return
        flows = list(store)
        self._ask_and_write(len(flows), f"Save the whole session ({len(flows)} flows) as HAR to:",
                            self._har_writer(flows))

    @staticmethod
    def _har_writer(flows: list[Flow]) -> Callable[[str], int]:
        from engine.har import write_har

        return lambda path: write_har(path, flows)

    def _ask_and_write(self, count: int, title: str, write: Callable[[str], int]) -> None:
        if not count:
            self.notify("Nothing to export.", severity="warning")
            return

        def chosen(path: str | None) -> None:
            if path:
                self.run_worker(lambda: self._write_har(path, count, write), thread=True,
                                name="har-export", group="export")

        self.push_screen(ExportDialog(title, default_har_path()), chosen)

    def _write_har(self, path: str, total: int, write: Callable[[str], int]) -> None:
        """Runs in a worker thread: large sessions take a while to write."""
        path = os.path.expanduser(path)
        try:
            count = write(path)
        except Exception as exc:  # report any failure, never crash the session
            self.call_from_thread(self.notify, f"Could not write {path}: {exc}",
                                  severity="error", markup=False)
            return
        skipped = total - count
        note = f" ({skipped} raw TCP/UDP flows have no HAR form)" if skipped else ""
        self.call_from_thread(self.notify, f"Wrote {count} flows to {path}{note}", markup=False)

    # --- misc ---------------------------------------------------------------------------------

    def action_clear(self) -> None:
        self.store.clear()
        self.flow_list.marked.clear()
        self.flow_list.sync()
        self.update_status()

    def action_toggle_output(self) -> None:
        output = self.output_panel
        output.display = not output.display
        if output.display and self._reader is None and not output.lines:
            output.write("(this session has no command output)")

    def help_sections(self) -> list[tuple[str, list[Binding]]]:
        return [
            ("Flow list", list(FlowList.BINDINGS)),
            ("Everywhere", [*self.BINDINGS, Binding("ctrl+p", "command_palette",
                                                    "Command palette")]),
            ("Flow detail", [b for b in (*FlowDetail.BINDINGS, *BodyView.BINDINGS)
                             if not b.action.startswith("app.")]),  # (listed as the app's)
            ("Filter bar", [Binding("enter", "", "Keep filter and close"),
                            *FilterBar.BINDINGS]),
        ]

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.help_sections()))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        flows = self.flow_list
        commands = [
            ("Filter flows", "Open the filter bar (/ or f)", self.action_filter),
            ("Copy as curl", "Copy the selected flow as a curl command (c)",
             self.action_copy_curl),
            ("Copy URL", "Copy the selected flow's URL (u)", self.action_copy_url),
            ("Save body", "Write the shown body to a file, decoded (b)", self.action_save_body),
            ("Replay", "Send the selected flow's request again; the answer is a new flow (r)",
             self.action_replay),
            ("Edit and replay", "Edit the request in $EDITOR, then send it (R)",
             self.action_edit_replay),
            ("Export HAR", "Export marked or shown flows as HAR (e)", self.action_export),
            ("Save session", "Save every flow as HAR (w)", self.action_save_session),
            ("Clear flows", "Forget every flow shown so far (z)", self.action_clear),
            ("Toggle output", "Show or hide the command's output (o)",
             self.action_toggle_output),
            ("Help", "List every key (?)", self.action_help),
            ("Open flow", "Show the selected flow in detail (enter)", flows.action_open),
            ("Toggle follow", "Keep the cursor on the newest flow (F)", flows.action_follow),
            ("Toggle mark", "Mark or unmark the selected flow (m)", flows.action_mark),
            ("Unmark all", "Clear every mark (M)", flows.action_unmark_all),
            ("Cycle sort", "Sort by time, host, status, size, duration (s)", flows.action_sort),
            ("Reverse sort", "Reverse the sort order (S)", flows.action_reverse_sort),
            ("Toggle raw flows", "Hide or show raw TCP/UDP/DNS flows (t)",
             flows.action_toggle_raw),
        ]
        for title, help_text, callback in commands:
            yield SystemCommand(title, help_text, callback)


def saved_session_replayer(store: SessionStore, options: ReplayOptions) -> Replayer:
    """Replays while browsing a saved session: the new flows are written into its file (the
    list reads them from there), numbered after its last row."""
    continue_flow_ids_after(store.last_row())
    bus = FlowBus()
    bus.subscribe(AddToSession(store))
    return Replayer(bus, options)


def run_viewer(path: str, initial_filter: str = "",
               replay_options: ReplayOptions | None = None) -> int:
    """`tapui open FILE`: browse a session file or a HAR file. Returns the exit code."""
    from engine.errors import TapuiError
    from engine.har import HarError
    from engine.sessions import open_any

    try:
        store = open_any(path)
    except (HarError, TapuiError) as exc:
        message = str(exc).strip().splitlines()[0]  # parsers add pointer lines; one line will do
        print(message if message.startswith("tapui") else f"tapui: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tapui: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        replayer = saved_session_replayer(store, replay_options or ReplayOptions())
        TapuiApp(store=store, title=f"tapui · {os.path.basename(path)}",
                 filter_history=filter_history_file(), initial_filter=initial_filter,
                 replayer=replayer).run()
    finally:
        store.close()
    return 0


run_har_viewer = run_viewer  # the name the first releases used
