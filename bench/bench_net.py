"""Throughput and added latency through tapui, direct versus sandboxed, in one run.

Plain HTTP and HTTPS (HTTP/1.1 and HTTP/2) between a client (curl, or a Python loop for
latency) and a server on the host's loopback. Prints MB/s and the ratio tapui/direct, and the
latency tapui adds per new connection.

    python bench/bench_net.py [--size-mib 1024] [--connections 500] [--only plain|https]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
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


def curl_speed(url: str, via_tapui: bool, upload: str | None = None, extra: tuple = ()) -> float:
    cmd = ["curl", "-4", "-s", "-o", "/dev/null", *extra]
    if upload:
        cmd += ["-T", upload, "-X", "POST", "-H", "Expect:", "-w", "%{speed_upload}"]
    else:
        cmd += ["-w", "%{speed_download}"]
    cmd.append(url)
    return float(run(tapui(*cmd) if via_tapui else cmd)) / 1e6


def latencies(
    host: str, port: int, n: int, via_tapui: bool, ca_file: str | None = None
) -> list[float]:
    cmd = [sys.executable, str(HERE / "latency_client.py"), host, str(port), str(n)]
    env = None
    if ca_file is not None:
        cmd.append("tls")
        if not via_tapui:  # through tapui the client trusts tapui's CA, set by tapui
            env = dict(os.environ, SSL_CERT_FILE=ca_file)
    out = run(tapui(*cmd) if via_tapui else cmd, env)
    return [float(x) / 1000 for x in out.split()]  # ms


def percentile(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100)[int(p) - 1]


def report_throughput(name: str, direct: float, through: float, target: float) -> None:
    ratio = through / direct
    verdict = "meets" if ratio >= target else "BELOW"
    print(f"{name:<28} direct {direct:8.0f} MB/s   tapui {through:8.0f} MB/s   "
          f"ratio {ratio:4.2f}x  ({verdict} target {target}x)")


def report_latency(name: str, direct: list[float], through: list[float], target_ms: float) -> None:
    p50 = percentile(through, 50) - percentile(direct, 50)
    p90 = percentile(through, 90) - percentile(direct, 90)
    verdict = "meets" if p50 <= target_ms else "ABOVE"
    print(f"{name:<28} direct p50 {percentile(direct, 50):.3f} ms   tapui p50 "
          f"{percentile(through, 50):.3f} ms   added p50 {p50:.3f} ms, p90 {p90:.3f} ms  "
          f"({verdict} target {target_ms} ms)")


def plain(args: argparse.Namespace, upload: str) -> None:
    server, port = start_server()
    try:
        print(f"plain HTTP, {args.size_mib} MiB each way, {args.connections} new connections")
        down = f"http://127.0.0.1:{port}/{args.size_mib}"
        down_t = f"http://{ALIAS}:{port}/{args.size_mib}"
        report_throughput("download", curl_speed(down, False), curl_speed(down_t, True), 0.5)
        up = f"http://127.0.0.1:{port}/upload"
        up_t = f"http://{ALIAS}:{port}/upload"
        report_throughput(
            "upload", curl_speed(up, False, upload), curl_speed(up_t, True, upload), 0.5
        )
        report_latency(
            "new connection + request",
            latencies("127.0.0.1", port, args.connections, False),
            latencies(GATEWAY, port, args.connections, True),
            0.5,
        )
    finally:
        stop(server)


def https(args: argparse.Namespace, tmp: str) -> None:
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
            direct = curl_speed(
                f"https://127.0.0.1:{port}/{args.size_mib}", False, extra=("--cacert", ca_file, flag)
            )
            through = curl_speed(f"https://{ALIAS}:{port}/{args.size_mib}", True, extra=(flag,))
            report_throughput(name, direct, through, 0.4)
        report_latency(
            "new TLS connection + request",
            latencies("127.0.0.1", h1_port, args.connections, False, ca_file),
            latencies(ALIAS, h1_port, args.connections, True, ca_file),
            3.0,
        )
    finally:
        TAPUI_OPTIONS.clear()
        stop(h1)
        stop(h2)


def stop(server: subprocess.Popen) -> None:
    server.stdin.close()  # type: ignore[union-attr]
    server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--only", choices=["plain", "https"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "plain"):
            upload = os.path.join(tmp, "upload.bin")
            with open(upload, "wb") as f:
                block = os.urandom(1 << 20)
                for _ in range(args.size_mib):
                    f.write(block)
            plain(args, upload)
            os.unlink(upload)
        if args.only in (None, "https"):
            https(args, tmp)


if __name__ == "__main__":
    main()
