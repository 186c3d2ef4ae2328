"""The per-frame ceiling: a bare ``websockets`` server that sends pre-encoded chunk messages, one
per frame, as fast as it can, to every client that connects.

    python bench/ceiling_server.py --port 8101 [--streams 16]

It does nothing a gateway must do (no backend, no state machine, no encoding, no batching): its
CPU per frame is what one ``send`` of a small message costs in this stack. It speaks the same
subprotocols as muxgate so the same load generator connects to it, and ignores what it reads.
Prints ``ready`` once listening; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio

from bare_peer import drain_inbound, run_peer
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

import protocol
from protocol import Codec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--streams", type=int, default=16, help="distinct request ids per connection")
    p.add_argument(
        "--message-bytes", type=int, default=0, help="pad the chunk text to this message size"
    )
    a = p.parse_args()

    async def handler(ws: ServerConnection) -> None:
        codec = Codec.from_subprotocol(ws.subprotocol)
        text = codec.is_text
        # Pre-encoded, the size of the gateway's typical chunk message.
        messages = []
        for i in range(a.streams):
            rid, seq = f"c0-{i + 1}", 1000 + i
            pad = a.message_bytes - len(protocol.encode_chunk(rid, seq, " ", codec))
            messages.append(protocol.encode_chunk(rid, seq, " " + "x" * max(pad, 5), codec))
        reader = asyncio.create_task(drain_inbound(ws))
        send = ws.send
        try:
            while True:
                for m in messages:
                    await send(m, text=text)
        except ConnectionClosed:
            pass
        finally:
            reader.cancel()

    return run_peer(handler, a.host, a.port)


if __name__ == "__main__":
    raise SystemExit(main())
