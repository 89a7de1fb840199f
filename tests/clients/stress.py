"""Inside the sandbox: N concurrent connections, each sending and receiving 1-5 MiB at once.

Usage: stress.py HOST PORT CONNECTIONS SEED. Prints "ok N" when every byte arrived intact.
"""

import asyncio
import hashlib
import random
import struct
import sys

sys.path.insert(0, __file__.rsplit("/", 3)[0])
from tests.servers import random_pool  # noqa: E402

MIB = 1024 * 1024


async def one(host: str, port: int, pool: bytes, rng: random.Random) -> None:
    n_up = rng.randint(MIB, 5 * MIB)
    n_down = rng.randint(MIB, 5 * MIB)
    up_off = rng.randint(0, len(pool) - n_up)
    down_off = rng.randint(0, len(pool) - n_down)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(struct.pack("!III", n_up, n_down, down_off))

    async def send() -> None:
        view = memoryview(pool)[up_off : up_off + n_up]
        for i in range(0, n_up, 256 * 1024):
            writer.write(view[i : i + 256 * 1024])
            await writer.drain()

    sender = asyncio.create_task(send())
    received = await reader.readexactly(n_down + 32)
    await sender
    writer.close()
    if received[:n_down] != pool[down_off : down_off + n_down]:
        raise SystemExit(f"download corrupted ({n_down} bytes from {down_off})")
    if received[n_down:] != hashlib.sha256(pool[up_off : up_off + n_up]).digest():
        raise SystemExit(f"upload corrupted ({n_up} bytes from {up_off})")


async def main() -> None:
    host, port, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    pool = random_pool()
    rng = random.Random(seed)
    await asyncio.gather(*(one(host, port, pool, random.Random(rng.random())) for _ in range(count)))
    print("ok", count)


asyncio.run(main())
