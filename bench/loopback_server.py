"""A fast HTTP/1.1 server for the benchmarks, on the host's loopback only.

GET /<n> answers n MiB; POST or PUT reads and discards the body; GET /small answers 2 bytes.
Usage: loopback_server.py PORT [CERT KEY]  (with CERT and KEY it speaks TLS, ALPN http/1.1)."""

from __future__ import annotations

import socket
import ssl
import sys
import threading

CHUNK = b"x" * (1 << 20)


def handle(conn: socket.socket) -> None:
    f = conn.makefile("rb")
    try:
        while True:
            line = f.readline()
            if not line:
                return
            headers = {}
            while True:
                h = f.readline()
                if h in (b"\r\n", b""):
                    break
                k, _, v = h.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            method, path, _ = line.decode().split()
            if method == "GET" and path == "/small":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            elif method == "GET":
                n = int(path.strip("/")) << 20
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                for _ in range(n >> 20):
                    conn.sendall(CHUNK)
            else:
                left = int(headers.get("content-length", 0))
                if headers.get("expect", "").lower() == "100-continue":
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                while left:
                    data = f.read1(min(left, 1 << 20))
                    if not data:
                        return
                    left -= len(data)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    except (OSError, ValueError):
        pass
    finally:
        conn.close()


def main() -> None:
    port = int(sys.argv[1])
    ctx = None
    if len(sys.argv) > 3:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[2], sys.argv[3])
        ctx.set_alpn_protocols(["http/1.1"])
    listeners = []
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(512)
        listeners.append(s)

    def accept(s: socket.socket) -> None:
        while True:
            conn, _ = s.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ctx is not None:
                try:
                    conn = ctx.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    conn.close()
                    continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threads = [threading.Thread(target=accept, args=(s,), daemon=True) for s in listeners]
    for t in threads:
        t.start()
    print("ready", flush=True)
    sys.stdin.read()  # runs until the benchmark closes our stdin


if __name__ == "__main__":
    main()
