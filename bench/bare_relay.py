"""The least a userspace relay can do: copy a TCP stream between two loopback sockets.

Usage: bare_relay.py LISTEN_PORT UPSTREAM_PORT. Listens on 127.0.0.1:LISTEN_PORT and, for
each connection, dials 127.0.0.1:UPSTREAM_PORT and copies bytes both ways with a
recv_into/sendall loop per direction (threads, which run without the GIL while in the
kernel; a C relay measured the same here). No sandbox, no TCP stack, no decoding: what it
reaches bounds any relay on the machine at hand, tapui's included, which copies as many
bytes through the kernel and does its own TCP on top. Prints "ready", runs until stdin closes.
"""

from __future__ import annotations

import socket
import sys
import threading

BUFFER = 256 * 1024


def pump(source: socket.socket, sink: socket.socket) -> None:
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    try:
        while n := source.recv_into(buf):
            sink.sendall(view[:n])
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def serve(listener: socket.socket, upstream_port: int) -> None:
    while True:
        app, _ = listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", upstream_port))
        except OSError:
            app.close()
            continue
        for source, sink in ((app, upstream), (upstream, app)):
            threading.Thread(target=pump, args=(source, sink), daemon=True).start()


def main() -> None:
    listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", listen_port))
    listener.listen(64)
    threading.Thread(target=serve, args=(listener, upstream_port), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
