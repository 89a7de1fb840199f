"""N sequential new connections, one small request each; prints each round trip in µs.

Usage: latency_client.py HOST PORT N [tls] [proxy=PROXYHOST:PORT] [name=SERVERNAME]
With name=, TLS uses SERVERNAME for SNI and certificate checks while dialling HOST (an
address), so no DNS lookup is timed. With a proxy (mitmdump, for comparison), plain requests use the absolute form and TLS goes
through CONNECT, as clients configured with a proxy do."""

import socket
import ssl
import sys
import time

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tls = "tls" in sys.argv[4:]
proxy = next((a.split("=", 1)[1] for a in sys.argv[4:] if a.startswith("proxy=")), None)
name = next((a.split("=", 1)[1] for a in sys.argv[4:] if a.startswith("name=")), host)
ctx = ssl.create_default_context() if tls else None
target = f"http://{host}:{port}/small" if proxy and not tls else "/small"
request = f"GET {target} HTTP/1.1\r\nHost: {name}:{port}\r\nConnection: close\r\n\r\n".encode()


def connect() -> socket.socket:
    if proxy is None:
        s = socket.create_connection((host, port))
    else:
        proxy_host, proxy_port = proxy.rsplit(":", 1)
        s = socket.create_connection((proxy_host, int(proxy_port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if proxy is not None and tls:
        s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += s.recv(4096)
    if ctx is not None:
        s = ctx.wrap_socket(s, server_hostname=name)
    return s


times = []
for _ in range(n):
    start = time.perf_counter()
    s = connect()
    s.sendall(request)
    data = b""
    while not data.endswith(b"ok"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    s.close()
    times.append((time.perf_counter() - start) * 1e6)
print(" ".join(f"{t:.0f}" for t in times))
