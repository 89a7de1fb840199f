"""Where a flow's connection went: addresses, TLS parameters, certificate, process."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from engine.addresses import host_port
from engine.flow import Flow


def _addr(addr: tuple[str, int] | None) -> str:
    return host_port(*addr) if addr is not None else "–"


def render_connection(flow: Flow) -> Table:
    conn = flow.conn
    table = Table.grid(padding=(0, 2))
    table.add_column("field", justify="right", style="bold")
    table.add_column("value")

    def row(name: str, value: object) -> None:
        table.add_row(name, Text("–" if value in (None, "") else str(value)))

    row("flow", f"#{flow.id} ({flow.kind.value}, {flow.state.value})")
    inbound = " (inbound, to a published port)" if conn.inbound else ""
    row("connection", f"#{conn.id} over {conn.transport}{inbound}")
    row("client", _addr(conn.client) + (" (on the host)" if conn.inbound else ""))
    row("server", _addr(conn.server) + (" (in the sandbox)" if conn.inbound else ""))
    row("upstream", _addr(conn.upstream))
    if conn.tunnel is not None:  # (server and upstream are then the proxy's)
        kind, far_end = conn.tunnel
        row("tunnel", f"to {far_end}, through the {'SOCKS' if kind == 'socks' else 'HTTP'} "
                      "proxy above")
    row("hostname", conn.hostname)
    row("process", f"{conn.pid} {conn.command or ''}".strip() if conn.pid else conn.command)
    row("SNI", conn.sni)
    row("ALPN", conn.alpn)
    row("TLS version", conn.tls_version)
    cert = conn.certificate
    if cert is not None:
        row("cert subject", cert.subject)
        row("cert issuer", cert.issuer)
        row("valid from", cert.not_before)
        row("valid until", cert.not_after)
        row("alt names", ", ".join(cert.sans))
    if flow.request is None:
        row("bytes sent", f"{flow.bytes_sent:,}")
        row("bytes received", f"{flow.bytes_received:,}")
    if flow.error:
        table.add_row("error", Text(flow.error, style="bold red"))
    return table


class ConnectionView(Static):
    def show_flow(self, flow: Flow) -> None:
        self.update(render_connection(flow))
