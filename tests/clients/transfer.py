"""Inside the sandbox: download and upload over HTTP, checking every byte, until STOPFILE
exists. Usage: transfer.py HOST PORT STOPFILE. Prints "ready" first and "ok N" at the end."""

import hashlib
import http.client
import os
import sys

sys.path.insert(0, __file__.rsplit("/", 3)[0])
from tests.servers import random_pool  # noqa: E402

host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pool = random_pool()
size = 4 * 1024 * 1024
print("ready", flush=True)
done = 0
while not os.path.exists(stop) or done < 4:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", f"/bytes/{size}")
    body = conn.getresponse().read()
    if body != pool[:size]:
        raise SystemExit(f"download {done} corrupted")
    conn.request("POST", "/upload", body=pool[size : 2 * size])
    if conn.getresponse().read().decode() != hashlib.sha256(pool[size : 2 * size]).hexdigest():
        raise SystemExit(f"upload {done} corrupted")
    conn.close()
    done += 1
print("ok", done)
