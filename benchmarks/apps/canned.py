"""A server that answers every request with the same 200 at once: what ``benchmarks.overload --client-ceiling`` drives.

    python -m benchmarks.apps.canned PORT

It reads the request's head and answers from a constant, so nearly all the CPU a request costs is
the client's: the rate at which the client stops keeping to its schedule against it is the client's
own ceiling on this machine (an upper bound for what it can drive against a real server, which
takes its share of the same cores).
"""

from __future__ import annotations

import asyncio
import sys

ANSWER = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{"ok":true}'
)


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ANSWER)
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(answer, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
