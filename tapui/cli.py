"""The `tapui` command line: run a command in the sandbox (with or without the UI), open a
saved session, show the CA."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from engine import tempdirs
from engine.addresses import HOST_ALIAS, Published, parse_add_host, parse_publish
from engine.errors import EXIT_INTERNAL, EXIT_USAGE, TapuiError
from engine.flow import EventKind, Flow, FlowBus, FlowEvent
from engine.printer import LinePrinter
from engine.runstatus import CommandState, RunStatus
from engine.sandbox import TUN_ENV, command_placement, spawn_helper

if TYPE_CHECKING:
    from engine.capture import Capture, CaptureOptions
    from engine.filters import OutputFilter
    from engine.session import SessionWriter

_EXAMPLES = [
    (f"tapui -- curl -s https://{HOST_ALIAS}:8443/", "live UI of every exchange curl makes"),
    ("tapui --no-ui -- python3 app.py", "one line per exchange on stderr"),
    ("tapui --no-ui --har out.har -- ./build.sh", "also write a HAR file at exit"),
    ("tapui --no-ui -v --filter '~d api' -- ./app", "headers too, of the api hosts' exchanges"),
    ("tapui --add-host api.test:127.0.0.1 -- node app.js", "api.test dials the host's loopback"),
    ("tapui -p 8000 -- python3 -m http.server", "localhost:8000 on the host reaches it"),
    ("tapui open out.har", "browse a saved HAR file"),
    ("tapui open session.tapui", "browse a saved session"),
    ("tapui open", "browse the newest kept session (tapui open 2: the one before)"),
    ("tapui sessions", "list the kept sessions, numbered"),
    ("tapui ca", "where tapui's CA is, and its fingerprint"),
]
_WIDTH = max(len(command) for command, _ in _EXAMPLES) + 3
EXAMPLES = "examples:\n" + "".join(
    f"  {command:<{_WIDTH}}{what}\n" for command, what in _EXAMPLES
) + f"""
Every run is saved as a session file (SQLite) under ~/.local/state/tapui/sessions
(the newest 10 are kept) unless --save names one or --no-save is given.

Inside the sandbox, {HOST_ALIAS} reaches the host's 127.0.0.1 and ::1.
"""


def size_arg(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        size = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 10M or 512K)") from None
    if size < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return size


def add_host_arg(text: str) -> tuple[str, str]:
    try:
        return parse_add_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def publish_arg(text: str) -> Published:
    try:
        return parse_publish(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapui",
        usage="tapui [options] [--] [COMMAND [ARGS...]]\n       tapui open [--filter EXPR] [--upstream-ca FILE] [--insecure] [FILE | N]\n"
        "       tapui sessions\n       tapui ca [--pem FILE]",
        description=(
            "Run COMMAND in a rootless sandbox and show every HTTP and HTTPS exchange it makes. "
            "Without COMMAND, runs your $SHELL in the sandbox, with the terminal (as --no-ui)."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--no-ui",
        action="store_true",
        help="no terminal UI: the command keeps the terminal and tapui prints one line per "
        "exchange, per connection and per failed DNS lookup to stderr",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="with --no-ui: print no lines")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="with --no-ui: also print each exchange's headers; -vv its bodies too (the first "
        "4 KiB of text ones, decoded)",
    )
    parser.add_argument(
        "--filter",
        metavar="EXPR",
        help="keep only the flows EXPR matches (the UI's filter syntax, e.g. '~d api & ~m "
        "POST'): the lines printed, --har and --jsonl; the UI opens with it applied; the "
        "session file keeps every flow",
    )
    parser.add_argument("--har", metavar="FILE", help="write a HAR 1.2 file of the session at exit")
    parser.add_argument(
        "--jsonl", metavar="FILE", help="stream one JSON object per finished flow to FILE ('-' for stdout)"
    )
    parser.add_argument(
        "--add-host",
        metavar="NAME:IP",
        type=add_host_arg,
        action="append",
        default=[],
        help="make NAME resolve inside the sandbox and dial IP from the host, e.g. "
        "--add-host api.test:127.0.0.1 (repeatable)",
    )
    parser.add_argument(
        "-p",
        "--publish",
        metavar="[[IP:]HOST_PORT:]PORT",
        type=publish_arg,
        action="append",
        default=[],
        help="let the host reach a server the command runs on PORT in the sandbox: tapui "
        "listens on the host's localhost (or on IP) at HOST_PORT (default: PORT) and shows "
        "those exchanges too, e.g. -p 8000, -p 9000:8000 or -p 0.0.0.0:8000:8000 (repeatable)",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="keep capturing after COMMAND exits while processes it started still run "
        "(without it, those are ended when tapui ends)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify upstream TLS certificates (the app then trusts any server)",
    )
    parser.add_argument(
        "--upstream-ca",
        metavar="FILE",
        action="append",
        default=[],
        help="also trust the CA certificates in FILE (PEM) for upstream servers (repeatable)",
    )
    parser.add_argument(
        "--ignore-hosts",
        metavar="REGEX",
        action="append",
        default=[],
        help="relay TLS to matching hosts untouched, e.g. for pinned clients (repeatable)",
    )
    parser.add_argument(
        "--no-intercept", action="store_true", help="relay all TLS untouched (no CA needed)"
    )
    parser.add_argument(
        "--allow-quic",
        action="store_true",
        help="relay QUIC (UDP to port 443) as it is; by default it is refused, so that "
        "HTTP/3 clients fall back to HTTPS over TCP, which tapui decodes",
    )
    parser.add_argument(
        "--max-body-size",
        metavar="SIZE",
        type=size_arg,
        default=64 * 1024 * 1024,
        help="keep at most SIZE bytes of each body (the full size is still recorded; default 64M)",
    )
    parser.add_argument(
        "--save",
        metavar="FILE",
        help="write the session to FILE (default: a new file under ~/.local/state/tapui/sessions;"
        " the newest 10 are kept)",
    )
    parser.add_argument(
        "--no-save", action="store_true", help="keep flows in memory only; write no session file"
    )
    parser.add_argument(
        "--max-session-size",
        metavar="SIZE",
        type=size_arg,
        default=0,
        help="drop the oldest bodies (their metadata stays) to keep the session under SIZE",
    )
    parser.add_argument(
        "--tun-device",
        metavar="PATH",
        default=os.environ.get(TUN_ENV, "/dev/net/tun"),
        help=f"TUN clone device to use (default /dev/net/tun, or ${TUN_ENV})",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TAPUI_DEBUG"):
        import logging

        logging.basicConfig(
            level=logging.DEBUG, format="tapui %(asctime)s %(name)s: %(message)s",
            filename=os.environ.get("TAPUI_DEBUG_LOG"),
        )
    try:
        if not args_list or args_list[0] not in ("ca", "sessions"):
            tempdirs.sweep()  # what a killed tapui left behind (it may hold a private key)
        if args_list and args_list[0] == "open":
            return cmd_open(args_list[1:])
        if args_list and args_list[0] == "ca":
            return cmd_ca(args_list[1:])
        if args_list and args_list[0] == "sessions":
            from engine.sessions import cmd_sessions

            return cmd_sessions(args_list[1:])
        return cmd_run(args_list)
    except TapuiError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `tapui sessions | head`: the reader left, stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:  # a bug of ours: one line for the user, the trace on request
        if os.environ.get("TAPUI_DEBUG"):
            raise
        print(
            f"tapui: unexpected error: {type(exc).__name__}: {exc} "
            "(run with TAPUI_DEBUG=1 to see where)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def cmd_ca(argv: list[str]) -> int:
    from engine.ca import CertificateAuthority, default_directory

    parser = argparse.ArgumentParser(prog="tapui ca", description="Show tapui's CA certificate.")
    parser.add_argument("--pem", metavar="FILE", help="write the CA certificate (PEM) to FILE ('-' for stdout)")
    args = parser.parse_args(argv)
    try:
        ca = CertificateAuthority.load_or_create(default_directory())
    except OSError as exc:
        raise TapuiError(f"tapui: cannot prepare the CA in {default_directory()}: "
                         f"{exc.strerror or exc}", EXIT_INTERNAL) from None
    if args.pem == "-":
        sys.stdout.write(ca.cert_pem.decode())
        return 0
    if args.pem:
        try:
            Path(args.pem).write_bytes(ca.cert_pem)
        except OSError as exc:
            raise TapuiError(f"tapui ca: cannot write {args.pem}: {exc.strerror or exc}",
                             EXIT_USAGE) from None
    print(f"certificate: {ca.cert_path}")
    print(f"fingerprint (SHA-256): {ca.fingerprint}")
    print("trusted only inside tapui's sandboxes; never installed system-wide")
    return 0


def check_filter(parser: argparse.ArgumentParser, expr: str) -> None:
    """A usage error, naming where, when `expr` (--filter) is not a filter expression."""
    from engine.filters import FilterError, parse

    try:
        parse(expr)
    except FilterError as exc:
        parser.error(f"--filter {expr!r}: {exc.message} at character {exc.pos + 1}")


def check_upstream_ca(parser: argparse.ArgumentParser, paths: list[str]) -> None:
    """A usage error for an --upstream-ca file that is missing or holds no certificate."""
    for path in paths:
        why = "no such file" if not os.path.isfile(path) else unloadable_ca(path)
        if why:
            parser.error(f"--upstream-ca {path}: {why}")


def cmd_open(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tapui open", description="Browse a saved session file or a HAR file."
    )
    parser.add_argument(
        "file", nargs="?",
        help="a tapui session file, or a HAR file (from tapui, a browser or another tool); a "
             "number N: the Nth newest kept session, as `tapui sessions` numbers them; none: "
             "the newest",
    )
    parser.add_argument("--filter", metavar="EXPR", default="",
                        help="open with this filter applied (the filter bar's syntax)")
    parser.add_argument("--insecure", action="store_true",
                        help="replays (r): do not verify the servers' certificates")
    parser.add_argument("--upstream-ca", metavar="FILE", action="append", default=[],
                        help="replays (r): also trust the CA certificates in FILE (repeatable)")
    args = parser.parse_args(argv)
    from engine.replay import ReplayOptions
    from engine.sessions import session_to_open
    from tapui.app import run_viewer

    check_filter(parser, args.filter)
    check_upstream_ca(parser, args.upstream_ca)
    return run_viewer(session_to_open(args.file), args.filter,
                      ReplayOptions(args.insecure, list(args.upstream_ca)))


def cmd_run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        command = [os.environ.get("SHELL") or "/bin/sh"]
        if not args.no_ui:  # a shell needs the terminal, which the UI would take
            args.no_ui = True
            saved = "" if args.no_save else ", and the session saved (`tapui open` it later)"
            print(
                f"tapui: no command given: running {command[0]} in the sandbox with the terminal; "
                f"exchanges are printed here{saved}",
                file=sys.stderr,
            )
    check_upstream_ca(parser, args.upstream_ca)
    import re

    for pattern in args.ignore_hosts:
        try:
            re.compile(pattern)
        except re.error as exc:
            parser.error(f"--ignore-hosts {pattern!r}: {exc}")
    if args.save and args.no_save:
        parser.error("--save and --no-save exclude each other")
    if args.filter is not None:
        from engine.filters import OutputFilter

        check_filter(parser, args.filter)
        args.filter = OutputFilter(args.filter)
    if args.har:
        why = unwritable(args.har)
        if why:  # said now, not after the command has run
            parser.error(f"--har {args.har}: {why}")
    # The sandbox helper starts now, so its interpreter and pyroute2 load while the rest of
    # tapui does (about 0.15 s sooner to the command).
    new_session, own_process_group = command_placement(
        to_pty=not args.no_ui, interactive=args.no_ui)
    helper = spawn_helper(new_session=new_session, own_process_group=own_process_group)
    options = None
    try:
        from engine.capture import CaptureOptions

        options = CaptureOptions(
            argv=command,
            tun_path=args.tun_device,
            add_hosts=args.add_host,
            publish=args.publish,
            keep_running=args.keep_running,
            intercept_tls=not args.no_intercept,
            allow_quic=args.allow_quic,
            insecure=args.insecure,
            upstream_ca=args.upstream_ca,
            ignore_hosts=args.ignore_hosts,
            body_cap=args.max_body_size,
            helper=helper,
        )
        return _run(args, command, options)
    finally:
        if options is None or options.helper is not None:  # failed before the sandbox took it
            helper.close()


def _run(args: argparse.Namespace, command: list[str], options: CaptureOptions) -> int:
    bus = FlowBus()
    writer = None
    if not args.no_save:
        from engine.session import open_session_writer

        writer = open_session_writer(
            args.save, command, bus, max_session_size=args.max_session_size
        )
    only: OutputFilter | None = args.filter
    recorder = Recorder(bus, only) if args.har else None
    jsonl_out = open_jsonl(args.jsonl, bus, only) if args.jsonl else None
    status = RunStatus(command=command)
    finishing = threading.Lock()
    finished = threading.Event()

    def finish_outputs() -> None:
        """Close the JSON lines, write the HAR, finish the session: once, whoever comes first
        (the run's end, or the UI's watchdog when its shutdown stalls); a second caller waits
        for the first."""
        with finishing:
            if finished.is_set():
                return
            finished.set()
            if jsonl_out is not None and jsonl_out is not sys.stdout:
                jsonl_out.close()
            if recorder is not None:
                recorder.write(args.har)
            if writer is not None:
                writer.close()

    try:
        if args.no_ui:
            if writer is not None:
                writer.on_failure = _warn_once_when_saving_stops(writer)
            code = run_headless(options, bus, status, quiet=args.quiet, only=only,
                                detail=args.verbose)
        else:
            code = run_with_ui(options, bus, status, writer, finish_outputs,
                               initial_filter=only.expr if only is not None else "")
    finally:
        finish_outputs()
    return code


def unloadable_ca(path: str) -> str | None:
    """Why `path` cannot serve as trust anchors (PEM certificates), or None."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        return "no certificate in it (one or more PEM certificates expected)"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def unwritable(path: str) -> str | None:
    """Why a file could not be written at `path` later, or None."""
    if os.path.isdir(path):
        return "is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"no such directory: {parent}"
    target = path if os.path.exists(path) else parent
    if not os.access(target, os.W_OK):
        return "permission denied"
    return None


def _warn_once_when_saving_stops(writer: SessionWriter):  # type: ignore[no-untyped-def]
    """An on_failure for headless runs: one stderr line as soon as the session stops being
    written (the flows' lines go on)."""
    warned = threading.Event()

    def warn(_flows: list[Flow]) -> None:
        if not warned.is_set():
            warned.set()
            print(f"tapui: {writer.path}: saving the session stopped: {writer.failure}; "
                  "exchanges are still shown here", file=sys.stderr)

    return warn


class Recorder:
    """Keeps finished flows (those `only` matches) for the HAR written at exit."""

    def __init__(self, bus: FlowBus, only: OutputFilter | None = None) -> None:
        self.flows: list[Flow] = []
        self.lock = threading.Lock()
        bus.subscribe(self if only is None else only.events(self))

    def __call__(self, event: FlowEvent) -> None:
        if event.kind == EventKind.DONE and event.flow.request is not None:
            with self.lock:
                self.flows.append(event.flow)

    def write(self, path: str) -> None:
        from engine.har import write_har

        with self.lock:
            flows = sorted(self.flows, key=lambda f: f.timings.start)
        try:
            write_har(path, flows)
        except OSError as exc:
            print(f"tapui: cannot write {path}: {exc.strerror}", file=sys.stderr)


def open_jsonl(target: str, bus: FlowBus, only: OutputFilter | None = None):  # type: ignore[no-untyped-def]
    from engine.jsonl import JsonLinesWriter

    try:
        out = sys.stdout if target == "-" else open(target, "w", buffering=1)  # noqa: SIM115
    except OSError as exc:
        raise TapuiError(f"tapui: cannot write {target}: {exc.strerror}", EXIT_USAGE) from None
    writer = JsonLinesWriter(out)
    bus.subscribe(writer if only is None else only.events(writer))
    return out


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
#: Under the UI, Ctrl-C and Ctrl-\ are keys; these come from outside and end the run (an
#: outside SIGINT already does, through Textual).
UI_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def run_headless(options: CaptureOptions, bus: FlowBus, status: RunStatus, quiet: bool,
                 only: OutputFilter | None = None, detail: int = 0) -> int:
    from engine.capture import Capture

    capture = Capture(options, bus, status)
    if not quiet:
        printer = LinePrinter(detail=detail)
        if only is None:
            bus.subscribe(printer)
            capture.connection_listeners.append(printer.connection_closed)
        else:
            bus.subscribe(only.events(printer))
            capture.connection_listeners.append(only.connections(printer.connection_closed))
    try:
        capture.start()
    except BaseException:
        capture.cleanup()
        raise
    import asyncio  # (loaded after the sandbox helper was started)

    code = asyncio.run(_headless(capture))
    if status.left_running and not quiet:
        n = status.left_running
        print(f"tapui: ending {n} {'process' if n == 1 else 'processes'} the command left "
              "running in the sandbox (--keep-running keeps capturing while they run)",
              file=sys.stderr)
    return code


async def _headless(capture: Capture) -> int:
    import asyncio

    loop = asyncio.get_running_loop()
    for signum in FORWARDED_SIGNALS:
        loop.add_signal_handler(signum, capture.signal_command, signum)
    return await capture.run()


#: Seconds the UI has to close after a stop signal before tapui finishes without it.
UI_STOP_GRACE = 5.0


def run_with_ui(
    options: CaptureOptions, bus: FlowBus, status: RunStatus, writer: SessionWriter | None = None,
    finish_outputs: Callable[[], None] | None = None, initial_filter: str = "",
) -> int:
    import asyncio
    import pty

    from engine.capture import Capture
    from engine.replay import Replayer, ReplayOptions
    from tapui.app import TapuiApp
    from tapui.filter_history import filter_history_file

    master, slave = pty.openpty()
    options.output_fd = slave
    options.interactive = False
    status.output_fd = master
    capture = Capture(options, bus, status)
    try:
        capture.start()
    except BaseException:
        capture.cleanup()
        os.close(slave)
        os.close(master)
        raise
    os.close(slave)
    result: dict[str, object] = {}

    def engine_thread() -> None:
        try:
            result["code"] = asyncio.run(capture.run())
        except TapuiError as exc:
            status.state = CommandState.FAILED
            status.message = str(exc)
            result["error"] = exc
        except Exception as exc:  # noqa: BLE001 - shown to the user, not a traceback
            status.state = CommandState.FAILED
            status.message = f"tapui's engine failed: {exc}"
            result["error"] = TapuiError(status.message, EXIT_INTERNAL)

    thread = threading.Thread(target=engine_thread, name="tapui-engine", daemon=True)
    thread.start()
    store = None
    if writer is not None:  # the UI reads the session file: memory stays bounded
        from engine.session_store import SessionStore

        store = SessionStore(writer.path)
    replayer = Replayer(bus, ReplayOptions(options.insecure, list(options.upstream_ca),
                                           options.body_cap))
    app = TapuiApp(bus=bus, status=status, title="tapui " + " ".join(options.argv), store=store,
                   session=writer, filter_history=filter_history_file(), replayer=replayer,
                   initial_filter=initial_filter)

    ui_done = threading.Event()

    def finish_without_the_ui(signum: int) -> None:
        """The UI did not close within UI_STOP_GRACE of a stop signal. Seen after SIGHUP: the
        main thread blocked in Textual's shutdown, on its output thread's full queue. Finish
        what the run owes (the command's end, the HAR, the session) and exit."""
        if ui_done.wait(UI_STOP_GRACE):
            return
        if thread.is_alive():
            capture.signal_command(signal.SIGKILL)
            thread.join(3)
        if finish_outputs is not None:
            finish_outputs()
        _restore_terminal(terminal)
        os._exit(128 + signum)

    def stop(signum: int, _frame: object) -> None:
        """SIGTERM, SIGQUIT, or SIGHUP (the terminal went away): the command gets it, as it would
        without the UI, and the UI closes; the session and the HAR are finished as on `q`.
        (Python's default was to die at once, leaving the command running cut off from the
        network, and the terminal in the UI's mode.)"""
        capture.signal_command(signum)
        try:
            asyncio.get_running_loop().call_soon_threadsafe(app.exit)
        except RuntimeError:  # the UI is not running
            pass
        threading.Thread(target=finish_without_the_ui, args=(signum,), daemon=True,
                         name="tapui-stop-watchdog").start()

    terminal = _terminal_mode()
    previous = {signum: signal.signal(signum, stop) for signum in UI_STOP_SIGNALS}
    try:
        app.run()
    finally:
        ui_done.set()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if thread.is_alive():
            capture.signal_command(signal.SIGTERM)
            thread.join(3)
            if thread.is_alive():
                capture.signal_command(signal.SIGKILL)
                thread.join(3)
        try:
            os.close(master)
        except OSError:
            pass
        if store is not None:
            store.close()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return int(result.get("code", 0))  # type: ignore[arg-type]


def _terminal_mode() -> list | None:  # type: ignore[type-arg]
    import termios

    try:
        return termios.tcgetattr(sys.stdin.fileno()) if sys.stdin.isatty() else None
    except (OSError, ValueError, termios.error):
        return None


def _restore_terminal(mode: list | None) -> None:  # type: ignore[type-arg]
    """Best effort, for a UI that could not close itself: the terminal's mode as it was, the
    main screen and the cursor back (only if the terminal takes the bytes at once)."""
    import select
    import termios

    if mode is None:
        return
    try:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, mode)
        if select.select([], [sys.stdout.fileno()], [], 0)[1]:
            os.write(sys.stdout.fileno(), b"\x1b[?1000l\x1b[?1006l\x1b[?1049l\x1b[?25h")
    except (OSError, ValueError, termios.error):
        pass


if __name__ == "__main__":
    sys.exit(main())
