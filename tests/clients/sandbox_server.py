"""Inside the sandbox: a test server the host reaches through a published port.

Usage: sandbox_server.py http|digest ADDRESS PORT [CERT KEY]. Serves the tests' recording HTTP
handler (over TLS with CERT and KEY) or the stress protocol's digest handler on ADDRESS:PORT
(ADDRESS 127.0.0.1 or ::1), prints "ready PID" once it listens, and serves until it is ended.
"""

import os
import socket
import ssl
import sys

sys.path.insert(0, __file__.rsplit("/", 3)[0])
from tests import servers  # noqa: E402

kind, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if address == "::1" else socket.AF_INET
make = servers.http_server if kind == "http" else servers.digest_server
server = make(servers.random_pool(), family, port)
if len(sys.argv) > 5:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(sys.argv[4], sys.argv[5])
    server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", os.getpid(), flush=True)
server.serve_forever(poll_interval=0.05)
