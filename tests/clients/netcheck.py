"""Inside the sandbox: small socket-level checks, one per sub-command; prints the result."""

import hashlib
import os
import socket
import struct
import sys
import time

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


def fin_acked(host: str, port: str) -> None:
    """Shut down the write side while the server stays open: tapui's ACK of the FIN must
    come on its own, before the app's kernel sends the FIN again (its socket moves from
    FIN_WAIT1 to FIN_WAIT2 with no retransmission counted)."""
    fin_wait2 = 5  # tcp_info.tcpi_state, as in the kernel's tcp_states.h

    def state_and_retransmissions(s: socket.socket) -> tuple[int, int]:
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return info[0], struct.unpack_from("I", info, 100)[0]  # tcpi_total_retrans

    with socket.create_connection((host, int(port))) as s:
        s.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        state, retransmitted = state_and_retransmissions(s)
        while state != fin_wait2 and time.monotonic() < deadline:
            time.sleep(0.005)
            state, retransmitted = state_and_retransmissions(s)
    if state == fin_wait2 and retransmitted == 0:
        print("fin acked")
    else:
        print(f"fin not acked in time (state {state}, {retransmitted} retransmissions)")


def _segments_in(s: socket.socket) -> int:
    return struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 144), 140)[0]


def ack_rides_reply(host: str, port: str, size: str = "14") -> None:
    """Twenty exchanges of `size`-byte messages with an echo server: the ACK of each message
    comes on its reply, not in a segment of its own, so about one segment arrives per exchange
    (two without)."""
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(20):
            message = f"<message {i:04d}>".encode().ljust(int(size), b".")  # raw TCP
            s.sendall(message)
            reply = b""
            while len(reply) < len(message):
                reply += s.recv(1 << 17)
            assert reply == message, reply
        segments = _segments_in(s) - 1  # the SYN-ACK
    print("segments per exchange", round(segments / 20, 2))


def short_message(host: str, port: str) -> None:
    """A first message that could still begin an HTTP request ("message " might be a method)
    and no newline: the app waits for the echo, and gets it."""
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(5)
        s.sendall(b"message 0000")
        print("echo", s.recv(100).decode())


def small_data_acked(host: str, port: str) -> None:
    """A message the server never answers is still acknowledged, soon: nothing stays unacked
    and nothing is sent twice."""
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"no reply to this")
        time.sleep(0.2)
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        unacked, retransmitted = struct.unpack_from("I", info, 24)[0], struct.unpack_from(
            "I", info, 100)[0]
    print("unacked", unacked, "retransmitted", retransmitted)


def send_and_exit(host: str, port: str, size: str) -> None:
    """Sends `size` bytes and exits at once (the kernel closes the socket): whatever is still
    in flight then is tapui's to relay. Prints the SHA-256 of what was sent."""
    data = bytes(i * 7 % 251 for i in range(int(size)))
    s = socket.create_connection((host, int(port)))
    s.sendall(data)
    print(hashlib.sha256(data).hexdigest(), flush=True)
    os._exit(0)


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


def dns_over_tcp(name: str) -> None:
    """Its A and then its AAAA records, asked over one TCP connection to the resolver."""
    import dns.message
    import dns.query

    with open("/etc/resolv.conf") as f:
        server = next(line.split()[1] for line in f if line.startswith("nameserver"))
    found = []
    with socket.create_connection((server, 53), timeout=5) as s:
        for rdtype in ("A", "AAAA"):
            answer = dns.query.tcp(dns.message.make_query(name, rdtype), server, sock=s)
            found += [r.to_text() for rrset in answer.answer for r in rrset]
    print(" ".join(found))


def many_at_once(host: str, port: str, count: str) -> None:
    """Its own soft limit of file descriptors; then `count` connections open at once, each
    asking for /hello: how many were answered, and how many connections were refused."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print("soft limit", soft)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks, refused, answered = [], 0, 0
    for _ in range(int(count)):
        try:
            socks.append(socket.create_connection((host, int(port)), timeout=10))
        except ConnectionRefusedError:
            refused += 1
    for s in socks:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        answered += s.recv(65536).startswith(b"HTTP/1.1 200")
    print("answered", answered, "refused", refused)


def udp(host: str, port: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"ping", (host, int(port)))
        print(s.recvfrom(100)[0].decode())


def quic(address: str, port: str) -> None:
    """A QUIC client's first datagram (a long-header Initial, padded to 1,200 bytes) from a
    connected socket, as HTTP/3 clients send it; prints what came back."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.connect((address, int(port)))
        s.send(bytes([0xC3, 0, 0, 0, 1]) + os.urandom(1195))
        try:
            print("answer", len(s.recv(2048)))
        except ConnectionRefusedError:
            print("refused")
        except TimeoutError:
            print("no answer")


def raw_http(host: str, port: str) -> None:
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    print(data.split(b"\r\n", 1)[0].decode(), data.rsplit(b"\r\n\r\n", 1)[1].decode().strip())


if __name__ == "__main__":
    globals()[sys.argv[1].replace("-", "_")](*sys.argv[2:])
