"""Throughput and added latency through tapui, direct versus sandboxed, in one run.

Plain HTTP and HTTPS (HTTP/1.1 and HTTP/2) between a client (curl, or a Python loop for
latency) and a server on the host's loopback. Prints MB/s and the ratio tapui/direct, and the
latency tapui adds per new connection.

    python bench/bench_net.py [--size-mib 1024] [--connections 500] [--only plain|https]
                              [--repeat 3] [--mitmdump]

With the plain figures it prints a bare relay's (bench/bare_relay.py: a recv/send loop between
two loopback sockets, no sandbox, no decoding) against direct: about the most any relay, tapui
included, can reach on the machine at hand. With the HTTPS figures it prints the TLS work
tapui does for a download done alone (decrypt, encrypt again, in memory, on one core), as a
ratio to the direct download: a ceiling for tapui's HTTPS relay on the machine at hand.

Each throughput figure is the median of --repeat transfers; latencies are p50/p90 over
--connections sequential connections, dialled by address (no DNS lookup is timed). Direct and
tapui runs alternate (direct, tapui, direct, ...), so a slow spell of a noisy machine weighs
on both sides of a ratio alike.

--mitmdump also runs every case through mitmproxy's mitmdump as an explicit proxy, for
comparison; it makes a Python 3.12 venv with mitmproxy under ~/.cache/tapui-bench on first use.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ALIAS = "host.tapui.internal"
GATEWAY = "169.254.77.1"  # the alias's address: connection latency without a DNS lookup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TAPUI_OPTIONS: list[str] = []  # e.g. --upstream-ca for the HTTPS runs


def tapui(*command: str) -> list[str]:
    return [sys.executable, "-m", "tapui.cli", "--no-ui", "-q", *TAPUI_OPTIONS, "--", *command]


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, stdin=subprocess.DEVNULL, env=env
    )
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr}")
    return out.stdout


def start_server(*extra: str, script: str = "loopback_server.py") -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(HERE / script), str(port), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    return server, port


class Mitmdump:
    """mitmdump as an explicit proxy on the loopback, trusting `upstream_ca` upstream."""

    def __init__(self, workdir: str) -> None:
        self.python = mitmproxy_python()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.ca = os.path.join(workdir, "mitm", "mitmproxy-ca-cert.pem")

    def start(self, upstream_ca: str | None = None) -> None:
        self.stop()
        self.port = free_port()
        cmd = [os.path.join(os.path.dirname(self.python), "mitmdump"), "-q",
               "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
               "--set", f"confdir={os.path.join(self.workdir, 'mitm')}"]
        if upstream_ca:
            cmd += ["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("mitmdump did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def mitmproxy_python() -> str:
    """A Python 3.12 venv with mitmproxy (made on first use)."""
    venv = Path.home() / ".cache" / "tapui-bench" / "mitmproxy-venv"
    python = venv / "bin" / "python"
    if not (venv / "bin" / "mitmdump").exists():
        candidates = sorted(Path.home().glob(".pyenv/versions/3.1[2-9]*/bin/python3"))
        found = shutil.which("python3.12")
        if found and "/shims/" not in found:  # a pyenv shim may have no version behind it
            candidates.insert(0, Path(found))
        base = candidates[0] if candidates else None
        if base is None:
            raise SystemExit("--mitmdump needs python3.12 (mitmproxy needs Python 3.12+)")
        subprocess.run([str(base), "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "mitmproxy"], check=True)
    return str(python)


REPEAT = [3]  # transfers per measurement; the median is reported (--repeat)


def curl_command(url: str, upload: str | None = None, extra: tuple = ()) -> list[str]:
    """curl moving one body to or from `url`, printing its speed in bytes/s."""
    cmd = ["curl", "-4", "-s", "-o", "/dev/null", *extra]
    if upload:
        cmd += ["-T", upload, "-X", "POST", "-H", "Expect:", "-w", "%{speed_upload}"]
    else:
        cmd += ["-w", "%{speed_download}"]
    return [*cmd, url]


def paired_speeds(direct: list[str], through: list[str]) -> tuple[float, float]:
    """Median MB/s of REPEAT runs of each command, run alternately."""
    pairs = [(float(run(direct)) / 1e6, float(run(through)) / 1e6) for _ in range(REPEAT[0])]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def curl_pair(direct_url: str, tapui_url: str, upload: str | None = None,
              direct_extra: tuple = (), tapui_extra: tuple = ()) -> tuple[float, float]:
    """(direct, through tapui) MB/s of the same transfer, measured alternately."""
    return paired_speeds(curl_command(direct_url, upload, direct_extra),
                         tapui(*curl_command(tapui_url, upload, tapui_extra)))


def latencies(
    host: str, port: int, n: int, via_tapui: bool, ca_file: str | None = None,
    proxy: Mitmdump | None = None, name: str | None = None,
) -> list[float]:
    """Round trips of `n` new connections to host:port (an address: no DNS lookup is timed);
    `name` is the TLS server name when it differs from `host`."""
    cmd = [sys.executable, str(HERE / "latency_client.py"), host, str(port), str(n)]
    if name is not None:
        cmd.append(f"name={name}")
    env = None
    if proxy is not None:
        cmd.append(f"proxy=127.0.0.1:{proxy.port}")
    if ca_file is not None:
        cmd.append("tls")
        if not via_tapui:  # through tapui the client trusts tapui's CA, set by tapui
            env = dict(os.environ, SSL_CERT_FILE=proxy.ca if proxy is not None else ca_file)
    out = run(tapui(*cmd) if via_tapui else cmd, env)
    return [float(x) / 1000 for x in out.split()]  # ms


def latency_pair(
    direct: Callable[[int], list[float]], through: Callable[[int], list[float]], n: int
) -> tuple[list[float], list[float]]:
    """Latencies of `n` connections each way, in alternating rounds of about 100 or more."""
    rounds = max(1, min(REPEAT[0], n // 100))
    direct_ms: list[float] = []
    through_ms: list[float] = []
    for i in range(rounds):
        k = n // rounds + (1 if i < n % rounds else 0)
        direct_ms += direct(k)
        through_ms += through(k)
    return direct_ms, through_ms


def percentile(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100)[int(p) - 1]


def report_throughput(
    name: str, direct: float, through: float, target: float, who: str = "tapui"
) -> None:
    ratio = through / direct
    verdict = f"meets target {target}x" if ratio >= target else f"BELOW target {target}x"
    print(f"{name:<28} direct {direct:8.0f} MB/s   {who:>10} {through:8.0f} MB/s   "
          f"ratio {ratio:4.2f}x  ({verdict if who == 'tapui' else 'for comparison'})")


def report_latency(
    name: str, direct: list[float], through: list[float], target_ms: float, who: str = "tapui"
) -> None:
    p50 = percentile(through, 50) - percentile(direct, 50)
    p90 = percentile(through, 90) - percentile(direct, 90)
    verdict = "meets" if p50 <= target_ms else "ABOVE"
    verdict = f"{verdict} target {target_ms} ms" if who == "tapui" else "for comparison"
    print(f"{name:<28} direct p50 {percentile(direct, 50):.3f} ms   {who} p50 "
          f"{percentile(through, 50):.3f} ms   added p50 {p50:.3f} ms, p90 {p90:.3f} ms  "
          f"({verdict})")


def plain(args: argparse.Namespace, upload: str, mitm: Mitmdump | None) -> None:
    server, port = start_server()
    try:
        print(f"plain HTTP, {args.size_mib} MiB each way, {args.connections} new connections")
        down = f"http://127.0.0.1:{port}/{args.size_mib}"
        down_t = f"http://{ALIAS}:{port}/{args.size_mib}"
        report_throughput("download", *curl_pair(down, down_t), 0.5)
        up = f"http://127.0.0.1:{port}/upload"
        up_t = f"http://{ALIAS}:{port}/upload"
        report_throughput("upload", *curl_pair(up, up_t, upload), 0.5)
        relay, relay_port = start_server(str(port), script="bare_relay.py")
        try:
            for name, path, body in (("download", args.size_mib, None), ("upload", "upload", upload)):
                url = f"http://127.0.0.1:{{}}/{path}"
                report_throughput(f"  bare relay, {name}", *paired_speeds(
                    curl_command(url.format(port), body), curl_command(url.format(relay_port), body)
                ), 0.5, "bare relay")
        finally:
            stop(relay)
        print(f"{'':<28} (bare relay: a recv/send loop between two loopback sockets, no sandbox,")
        print(f"{'':<28}  no TCP stack, no decoding: about the most any relay reaches here)")
        direct_lat, tapui_lat = latency_pair(
            lambda k: latencies("127.0.0.1", port, k, False),
            lambda k: latencies(GATEWAY, port, k, True), args.connections,
        )
        report_latency("new connection + request", direct_lat, tapui_lat, 0.5)
        if mitm is not None:
            mitm.start()
            proxy = ("-x", f"http://127.0.0.1:{mitm.port}")
            report_throughput("download", *paired_speeds(curl_command(down), curl_command(down, extra=proxy)), 0.5, "mitmdump")
            report_throughput("upload", *paired_speeds(curl_command(up, upload), curl_command(up, upload, proxy)), 0.5, "mitmdump")
            report_latency("new connection + request", direct_lat,
                           latencies("127.0.0.1", port, args.connections, False, proxy=mitm), 0.5, "mitmdump")
            mitm.stop()
    finally:
        stop(server)


def https(args: argparse.Namespace, tmp: str, mitm: Mitmdump | None) -> None:
    import trustme  # the test extra

    ca = trustme.CA()
    cert = ca.issue_cert("host.tapui.internal", "127.0.0.1")
    cert_file, key_file, ca_file = (os.path.join(tmp, n) for n in ("c.pem", "k.pem", "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    ca.cert_pem.write_to_path(ca_file)
    TAPUI_OPTIONS[:] = ["--upstream-ca", ca_file]
    h1, h1_port = start_server(cert_file, key_file)
    h2, h2_port = start_server(cert_file, key_file, script="h2_server.py")
    try:
        print(f"HTTPS, {args.size_mib} MiB download, {args.connections} new connections")
        for name, port, flag in (("download --http1.1", h1_port, "--http1.1"),
                                 ("download --http2", h2_port, "--http2")):
            direct, through = curl_pair(
                f"https://127.0.0.1:{port}/{args.size_mib}", f"https://{ALIAS}:{port}/{args.size_mib}",
                direct_extra=("--cacert", ca_file, flag), tapui_extra=(flag,),
            )
            report_throughput(name, direct, through, 0.4)
            if flag == "--http1.1":
                alone = tls_work_alone(cert_file, key_file, ca_file)
                print(f"{'  TLS work alone, one core':<28} {alone:8.0f} MB/s"
                      f"{'':>26}ratio {alone / direct:4.2f}x  (decrypt and encrypt again, in "
                      "memory: the ceiling here)")
            if mitm is not None:
                mitm.start(ca_file)
                url = f"https://127.0.0.1:{port}/{args.size_mib}"
                report_throughput(name, *paired_speeds(
                    curl_command(url, extra=("--cacert", ca_file, flag)),
                    curl_command(url, extra=("-x", f"http://127.0.0.1:{mitm.port}",
                                             "--cacert", mitm.ca, flag)),
                ), 0.4, "mitmdump")
        direct_lat, tapui_lat = latency_pair(
            lambda k: latencies("127.0.0.1", h1_port, k, False, ca_file),
            lambda k: latencies(GATEWAY, h1_port, k, True, ca_file, name=ALIAS),
            args.connections,
        )
        report_latency("new TLS connection + request", direct_lat, tapui_lat, 3.0)
        if mitm is not None:
            mitm.start(ca_file)
            report_latency(
                "new TLS connection + request", direct_lat,
                latencies("127.0.0.1", h1_port, args.connections, False, ca_file, mitm), 3.0,
                "mitmdump",
            )
            mitm.stop()
    finally:
        TAPUI_OPTIONS.clear()
        stop(h1)
        stop(h2)


def tls_work_alone(cert_file: str, key_file: str, ca_file: str, mib: int = 256) -> float:
    """MB/s of the TLS work tapui does for a download, alone: decrypting the server's records
    and encrypting them again for the app, in memory, on one core (no sockets, no copies to
    the kernel). A ceiling for its HTTPS relay on this machine."""
    import ssl

    from engine.tls_endpoint import TlsEndpoint

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(ca_file)

    def pair() -> tuple[TlsEndpoint, TlsEndpoint]:
        server = TlsEndpoint(server_ctx, server_side=True)
        client = TlsEndpoint(client_ctx, server_side=False, server_hostname=ALIAS)
        while not (client.handshake() and server.handshake()):
            server.feed(client.output())
            server.handshake()
            client.feed(server.output())
        client.read()  # (the session tickets)
        return server, client

    upstream, tapui_client = pair()  # the server's records, and tapui reading them
    tapui_server, _app = pair()  # tapui writing them again for the app
    chunk = b"x" * (1 << 20)
    records = []
    for _ in range(mib):
        upstream.write(chunk)
        records.append(upstream.output())
    start = time.perf_counter()
    for data in records:
        tapui_client.feed(data)
        for part in tapui_client.read():
            tapui_server.write(part)
        tapui_server.output()
    return mib * (1 << 20) / (time.perf_counter() - start) / 1e6


def stop(server: subprocess.Popen) -> None:
    server.stdin.close()  # type: ignore[union-attr]
    server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--only", choices=["plain", "https"])
    parser.add_argument("--repeat", type=int, default=3,
                        help="transfers per throughput figure; the median is shown (default 3)")
    parser.add_argument("--mitmdump", action="store_true", help="also run through mitmdump")
    args = parser.parse_args()
    REPEAT[0] = max(1, args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        mitm = Mitmdump(tmp) if args.mitmdump else None
        if args.only in (None, "plain"):
            upload = os.path.join(tmp, "upload.bin")
            with open(upload, "wb") as f:
                block = os.urandom(1 << 20)
                for _ in range(args.size_mib):
                    f.write(block)
            plain(args, upload, mitm)
            os.unlink(upload)
        if args.only in (None, "https"):
            https(args, tmp, mitm)


if __name__ == "__main__":
    main()
