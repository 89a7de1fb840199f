"""Inside the sandbox: backpressure both ways. Usage: slowreader.py HOST PORT MODE MIB
MODE "download": read MIB MiB slowly (the app's window closes; tapui must stop reading upstream).
MODE "upload": send MIB MiB to a server that reads slowly (tapui's window to the app closes).
Prints "ok N" with the byte count."""

import socket
import sys
import time

host, port, mode, mib = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
total = mib * 1024 * 1024
with socket.create_connection((host, port)) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(mode.encode() + b" %d\n" % total)
    if mode == "download":
        got = 0
        while got < total:
            chunk = s.recv(256 * 1024)
            if not chunk:
                break
            got += len(chunk)
            if got < total // 2:
                time.sleep(0.01)  # about 25 MB/s for the first half: windows close and reopen
        print("ok", got)
    else:
        block = b"u" * (1 << 20)
        for _ in range(mib):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        print("ok", int(s.recv(100)))
