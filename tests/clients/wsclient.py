"""Inside the sandbox: a WebSocket echo round trip. Usage: wsclient.py URL"""

import sys

from websockets.sync.client import connect

with connect(sys.argv[1]) as ws:
    for message in ("hello", "tapui", b"\x00\x01binary"):
        ws.send(message)
        print(repr(ws.recv()))
