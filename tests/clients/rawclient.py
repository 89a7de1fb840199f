"""Inside the sandbox: send a canned request, read the reply to the end, print its length and
SHA-256. Usage: rawclient.py HOST PORT (http1 PATH | h2)"""

import hashlib
import socket
import sys

host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == "http1":
    request = f"GET {sys.argv[4]} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
else:
    import h2.connection

    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                          (":authority", host)], end_stream=True)
    request = conn.data_to_send()
with socket.create_connection((host, port)) as s:
    s.sendall(request)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
print(len(data), hashlib.sha256(data).hexdigest())
