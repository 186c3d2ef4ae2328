"""A scripted peer that plays the gateway badly, for what a real gateway never does.

The real gateway is the reference everywhere else; this stand-in only exists to break the
protocol on purpose (a chunk after the response, a seq gap, a close with 1001 mid-request) and
check that the SDK refuses it. It speaks real WebSocket frames on an ephemeral port.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

import protocol
from protocol import Chat, Codec, Limits, Message, Sender, Welcome

Script = Callable[["Peer"], Awaitable[None]]


class Peer:
    """One connection of the scripted gateway."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.codec = Codec.from_subprotocol(ws.subprotocol)
        self.received: list[Message] = []

    async def send(self, *messages: Message | dict[str, Any]) -> None:
        """Send messages in one frame; dicts go out as they are (e.g. unknown types)."""
        encoded = [
            protocol.encode(m, self.codec)
            if not isinstance(m, dict)
            else protocol.codec._dump(m, self.codec)
            for m in messages
        ]
        await self.ws.send(protocol.join_batch(encoded, self.codec), text=self.codec.is_text)

    async def receive(self) -> Message:
        while True:
            if self.received:
                return self.received.pop(0)
            data = await self.ws.recv()
            for item in protocol.decode(data, self.codec, Sender.CLIENT):
                assert not isinstance(item, protocol.RemoteProtocolError), item
                self.received.append(item)

    async def welcome(self, **limits: int) -> None:
        """Answer the SDK's hello."""
        hello = await self.receive()
        assert isinstance(hello, protocol.Hello), hello
        await self.send(Welcome(connection_id="scripted", limits=Limits(**limits)))

    async def chat(self) -> Chat:
        message = await self.receive()
        assert isinstance(message, Chat), message
        return message


@contextlib.asynccontextmanager
async def scripted_gateway(script: Script) -> AsyncIterator[str]:
    """Serve ``script`` for every connection; yields the WebSocket URL."""

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            await script(Peer(ws))

    async with serve(
        handler,
        "127.0.0.1",
        0,
        subprotocols=[Subprotocol(s) for s in protocol.SUBPROTOCOLS],
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/ws"
