"""Inside the sandbox: small socket-level checks, one per sub-command; prints the result."""

import hashlib
import socket
import sys

sys.path.insert(0, __file__.rsplit("/", 3)[0])
from tests.servers import random_pool  # noqa: E402


def half_close(host: str, port: str) -> None:
    pool = random_pool()
    payload = pool[:1024 * 1024]
    with socket.create_connection((host, int(port))) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(1 << 20):
            reply += chunk
    ok = reply[:32] == hashlib.sha256(payload).digest() and reply[32:] == pool[: 2 * 1024 * 1024]
    print("half-close", "ok" if ok else f"bad ({len(reply)} bytes)")


def connect(host: str, port: str, family: str = "any") -> None:
    fam = {"any": 0, "4": socket.AF_INET, "6": socket.AF_INET6}[family]
    info = socket.getaddrinfo(host, int(port), fam, socket.SOCK_STREAM)[0]
    s = socket.socket(info[0], socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(info[4])
    except ConnectionRefusedError:
        print("refused")
        return
    except OSError as exc:
        print("error", exc.errno)
        return
    print("connected", info[4][0])
    s.close()


def resolve(name: str) -> None:
    addresses = sorted({ai[4][0] for ai in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)})
    print(" ".join(addresses))


def dns_query(name: str, rdtype: str) -> None:
    import dns.resolver

    answer = dns.resolver.resolve(name, rdtype, search=False)
    print(" ".join(sorted(r.to_text() for r in answer)))


def udp(host: str, port: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"ping", (host, int(port)))
        print(s.recvfrom(100)[0].decode())


def raw_http(host: str, port: str) -> None:
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    print(data.split(b"\r\n", 1)[0].decode(), data.rsplit(b"\r\n\r\n", 1)[1].decode().strip())


if __name__ == "__main__":
    globals()[sys.argv[1].replace("-", "_")](*sys.argv[2:])
