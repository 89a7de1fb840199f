"""Inside the sandbox: one HTTPS request on a socket whose TLS end this client shows.

Usage: tls_close.py HOST PORT MODE
  close_notify  read the reply (it ends with "end"), send close_notify, close the socket
  abrupt        read the reply, close the socket without close_notify (as node and Python do)
  close_notify_unread  send close_notify, leave the server's answer unread, close the socket
                (the kernel then sends RST, not FIN: curl does this when the answer is quick)
  until_eof     read until the server's end; print "clean end" after its close_notify, else
                the error (a bare TCP end is "UNEXPECTED_EOF_WHILE_READING")
"""

import socket
import ssl
import sys
import time

host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context()
raw = socket.create_connection((host, port))
conn = ctx.wrap_socket(raw, server_hostname=host, suppress_ragged_eofs=False)
conn.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
reply = b""
try:
    while not (mode != "until_eof" and reply.endswith(b"end")):
        chunk = conn.recv(4096)
        if not chunk:
            print("clean end")
            break
        reply += chunk
    else:
        print("got the reply")
except ssl.SSLError as exc:
    print(exc.reason)
if mode == "close_notify_unread":
    conn.setblocking(False)
    try:
        conn.unwrap()  # sends ours; the server's is not waited for
    except ssl.SSLWantReadError:
        pass
    time.sleep(0.5)  # it arrives meanwhile, and stays unread
if mode == "close_notify":
    try:
        conn.unwrap()  # sends ours, then waits for the server's
    except ssl.SSLError:
        pass  # the server closed without answering it
conn.close()
