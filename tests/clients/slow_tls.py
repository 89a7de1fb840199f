"""Inside the sandbox: a TLS client that pauses after its ClientHello (so the server's first
bytes reach tapui before this handshake ends), then prints what the server said first.
Usage: slow_tls.py HOST PORT"""

import socket
import ssl
import sys
import time

host, port = sys.argv[1], int(sys.argv[2])
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=host)
sock = socket.create_connection((host, port))
plain = b""
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        sock.sendall(outgoing.read())
        time.sleep(0.5)  # let the upstream handshake finish and the server speak first
        incoming.write(sock.recv(65536))
sock.sendall(outgoing.read())
while not plain.endswith(b"\n"):
    try:
        plain += tls.read()
    except ssl.SSLWantReadError:
        incoming.write(sock.recv(65536))
print(plain.decode().strip())
