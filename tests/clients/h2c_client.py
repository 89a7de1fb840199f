"""Inside the sandbox: GET PATH over HTTP/2 with prior knowledge (h2c), sending the preface only
after WAIT seconds, when the server's SETTINGS have surely come. Prints status and body.

Usage: h2c_client.py HOST PORT PATH WAIT"""

import socket
import sys
import time

import h2.config
import h2.connection
import h2.events

host, port, path, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
sock = socket.create_connection((host, port))
time.sleep(wait)
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
conn.send_headers(1, [(":method", "GET"), (":path", path), (":scheme", "http"),
                      (":authority", f"{host}:{port}")], end_stream=True)
sock.sendall(conn.data_to_send())
status, body, done = "", b"", False
while not done:
    data = sock.recv(65536)
    if not data:
        break
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived):
            status = dict(event.headers)[b":status"].decode()
        elif isinstance(event, h2.events.DataReceived):
            body += event.data
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            done = True
    sock.sendall(conn.data_to_send())
sock.close()
print(status, body.decode())
