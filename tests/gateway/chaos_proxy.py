"""A TCP proxy process for tests: forwards to a gateway and, on command, loses the traffic.

    python tests/gateway/chaos_proxy.py TARGET_PORT

Prints ``port N`` once listening on an ephemeral port of 127.0.0.1. Commands on stdin, one per
line, each answered ``ok`` once done:

- ``drop``: from now on, the bytes of every open connection are read and thrown away in both
  directions (the network lost them: neither end learns anything);
- ``cut``: every open connection is reset on both sides (``abort``: RST, no close frame), as a
  dropped link finally is; new connections are forwarded normally again.

A separate process, so that what the gateway and the client see is real TCP from a third party.
"""

from __future__ import annotations

import asyncio
import sys


class Link:
    def __init__(self) -> None:
        self.transports: list[asyncio.Transport] = []
        self.dropping = False


class Half(asyncio.Protocol):
    """One side of a forwarded connection: what it reads goes to ``peer`` (unless dropping)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.peer: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.link.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        if self.link.dropping:
            return
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and not self.link.dropping:
            self.peer.close()

    def attach(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        for data in self.pending:
            peer.write(data)
        self.pending.clear()


async def main() -> None:
    target = int(sys.argv[1])
    loop = asyncio.get_running_loop()
    links: list[Link] = []
    connecting: set[asyncio.Task[None]] = set()

    def client_side() -> Half:
        link = Link()
        links.append(link)
        half = Half(link)

        async def connect() -> None:
            try:
                transport, upstream = await loop.create_connection(
                    lambda: Half(link), "127.0.0.1", target
                )
            except OSError:
                if half.transport is not None:
                    half.transport.abort()
                return
            assert isinstance(upstream, Half)
            upstream.attach(half.transport)  # type: ignore[arg-type]
            half.attach(transport)

        task = loop.create_task(connect())
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return half

    server = await loop.create_server(client_side, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"port {port}", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        if line == "drop":
            for link in links:
                link.dropping = True
        elif line == "cut":
            for link in links:
                link.dropping = True
                for transport in link.transports:
                    transport.abort()
            links.clear()
        print("ok", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
