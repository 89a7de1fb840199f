"""N sequential new connections, one small request each; prints each round trip in µs.
Usage: latency_client.py HOST PORT N [tls]"""

import socket
import ssl
import sys
import time

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = ssl.create_default_context() if len(sys.argv) > 4 else None
request = f"GET /small HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
times = []
for _ in range(n):
    start = time.perf_counter()
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is not None:
        s = ctx.wrap_socket(s, server_hostname=host)
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
