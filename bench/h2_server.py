"""An HTTP/2-over-TLS server for the benchmarks, on the host's loopback only.

GET /<n> answers n MiB. Usage: h2_server.py PORT CERT KEY"""

from __future__ import annotations

import socket
import ssl
import sys
import threading

import h2.config
import h2.connection
import h2.events

BLOCK = b"x" * (1 << 20)


def serve(sock: ssl.SSLSocket) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 30})
    sock.sendall(conn.data_to_send())
    pending: dict[int, int] = {}  # stream -> bytes left to send
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    path = dict(event.headers)[b":path"].decode()
                    size = int(path.strip("/") or 1) << 20
                    conn.send_headers(event.stream_id, [(":status", "200"),
                                                        ("content-length", str(size))])
                    pending[event.stream_id] = size
            _pump(conn, pending)
            sock.sendall(conn.data_to_send())
            while pending and conn.outbound_flow_control_window > 0:
                _pump(conn, pending)
                sock.sendall(conn.data_to_send())
                if any(conn.local_flow_control_window(s) == 0 for s in pending):
                    break
    except (OSError, h2.exceptions.ProtocolError):
        pass
    finally:
        sock.close()


def _pump(conn: h2.connection.H2Connection, pending: dict[int, int]) -> None:
    for stream, left in list(pending.items()):
        budget = min(left, conn.local_flow_control_window(stream), 4 << 20)
        frame = conn.max_outbound_frame_size
        while budget > 0:
            n = min(frame, budget)
            conn.send_data(stream, BLOCK[:n])
            budget -= n
            left -= n
        if left == 0:
            conn.end_stream(stream)
            del pending[stream]
        else:
            pending[stream] = left


def main() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    ctx.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=512)

    def accept() -> None:
        while True:
            raw, _ = listener.accept()
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock = ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                raw.close()
                continue
            threading.Thread(target=serve, args=(sock,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
