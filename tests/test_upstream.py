"""The relay's upstream transport on a real loopback TCP connection."""

from __future__ import annotations

import asyncio
import socket

from engine.upstream import ReadPoller, UpstreamTransport


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_with: Exception | None = None
        self.pauses = 0
        self.resumes = 0

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_with = exc
        self.lost.set()

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1


def connected_pair() -> tuple[socket.socket, socket.socket]:
    """(our non-blocking end, the peer's blocking end) of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    ours.setblocking(False)
    return ours, peer


async def read_until_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        got += chunk
    return bytes(got)


def test_a_large_write_is_buffered_paused_and_delivered_whole_before_the_fin() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, peer = connected_pair()
        peer.setblocking(False)
        proto = Recorder()
        up = UpstreamTransport(ReadPoller(loop), ours, proto, 65536, high_water=256 * 1024, low_water=64 * 1024)
        payload = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than the socket takes at once
        half = len(payload) // 2
        up.writelines([memoryview(payload)[:half], memoryview(payload)[half:]])
        assert up.get_write_buffer_size() > 0 and proto.pauses == 1
        up.write_eof()  # sent once the buffer drains
        assert await read_until_eof(peer) == payload
        assert up.get_write_buffer_size() == 0 and proto.resumes == 1
        up.close()
        await asyncio.wait_for(proto.lost.wait(), 5)
        assert proto.lost_with is None
        peer.close()

    asyncio.run(scenario())


def test_the_peers_data_and_fin_arrive_and_the_write_side_stays_open() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, peer = connected_pair()
        proto = Recorder()
        up = UpstreamTransport(ReadPoller(loop), ours, proto, 65536, high_water=1 << 20, low_water=1 << 18)
        peer.sendall(b"hello")
        peer.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(proto.eof.wait(), 5)
        assert bytes(proto.data) == b"hello" and not up.is_closing()
        up.write(b"still open")  # half-close: our side may go on sending
        up.write_eof()
        peer.setblocking(False)
        assert await read_until_eof(peer) == b"still open"
        up.close()
        await asyncio.wait_for(proto.lost.wait(), 5)
        peer.close()

    asyncio.run(scenario())


def test_a_reset_by_the_peer_ends_the_transport_with_the_error() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, peer = connected_pair()
        proto = Recorder()
        UpstreamTransport(ReadPoller(loop), ours, proto, 65536, high_water=1 << 20, low_water=1 << 18)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        peer.close()  # linger 0: an RST
        await asyncio.wait_for(proto.lost.wait(), 5)
        assert isinstance(proto.lost_with, ConnectionResetError)

    asyncio.run(scenario())


def test_a_reset_answering_our_last_bytes_after_the_peers_close_is_its_end() -> None:
    """The peer sends its reply and closes; our last bytes (an app's close_notify) meet its
    closed socket and the kernel answers with RST before our FIN: the reply is read whole
    and the connection ends without an error."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, peer = connected_pair()
        proto = Recorder()
        transport = UpstreamTransport(
            ReadPoller(loop), ours, proto, 65536, high_water=1 << 20, low_water=1 << 18
        )
        peer.sendall(b"the reply")
        peer.close()  # (the loop does not run our reader before the next lines)
        transport.write(b"close_notify")  # answered with RST at once on the loopback
        transport.write_eof()
        await asyncio.wait_for(proto.eof.wait(), 5)
        assert bytes(proto.data) == b"the reply"
        transport.close()
        await asyncio.wait_for(proto.lost.wait(), 5)
        assert proto.lost_with is None

    asyncio.run(scenario())


class Failing(Recorder):
    def data_received(self, data: bytes) -> None:
        raise ValueError("a bug in the relay")


def test_a_protocol_that_fails_on_data_ends_the_connection_with_its_error() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, peer = connected_pair()
        proto = Failing()
        UpstreamTransport(ReadPoller(loop), ours, proto, 65536, high_water=1 << 20, low_water=1 << 18)
        peer.sendall(b"anything")
        await asyncio.wait_for(proto.lost.wait(), 5)
        assert isinstance(proto.lost_with, ValueError)
        peer.settimeout(5)
        assert peer.recv(10) == b""  # our socket is closed
        peer.close()

    asyncio.run(scenario())
