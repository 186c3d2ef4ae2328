"""The batched peer: a bare ``websockets`` server that writes the gateway's own chunk messages,
batched the way the gateway batches them, as fast as it can, to every client that connects.

    python bench/batched_server.py --port 8102 [--streams 16] [--message-bytes 66]

What a hand-written batched loop costs (issue 15, item 4): no backend, no state machine, no
request lifecycle, only what every chunk needs on the wire. Per connection, one task; every
turn of the event loop, each of ``--streams`` streams produces a burst of tokens (as many as the
gateway's simulated backend emits per loop turn at zero delay, ``ZERO_DELAY_BURST``), each token
encoded as its own chunk with the gateway's hot path (``protocol.chunk_prefix`` once per request,
``protocol.encode_chunks_from`` per burst, ``seq`` contiguous), and everything pending goes out as
one frame (``protocol.join_batch``, up to ``--max-batch-bytes``: one turn per stream, round
robin, at least one, as ``gateway/outbound.py`` packs), written with ``send`` (which awaits the
drain only when the socket is full). After ``--tokens`` chunks a stream starts a new request id
(a new prefix, ``seq`` from 0) but sends no ``response``: like the ceiling, it ignores what it
reads. The token texts are the ceiling's (padded to ``--message-bytes``), so both peers carry
the same chunks and differ only in how they are framed (and in encoding each chunk).

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

try:  # the gateway's burst, so the frames carry what the gateway's do
    from gateway.backends.simulated import ZERO_DELAY_BURST as BURST
except ImportError:  # pragma: no cover - the bench runs from the repository
    BURST = 8


class Streams:
    """The pending output of one connection's streams: the frames the gateway would write."""

    def __init__(
        self,
        codec: Codec,
        texts: list[str],
        *,
        tokens: int,
        burst: int = BURST,
        max_batch_bytes: int = protocol.limits.DEFAULT_BATCH_BYTES,
        conn: int = 0,
    ) -> None:
        self.codec = codec
        self.texts = texts
        self.tokens = tokens
        self.burst = burst
        self.cap = max_batch_bytes
        self.conn = conn
        self.serial = 0
        self.prefixes = [self._new_prefix() for _ in texts]
        self.seqs = [0] * len(texts)
        self.turn = 0  # the stream whose turn comes first in the next frame

    def _new_prefix(self) -> bytes:
        self.serial += 1
        return protocol.chunk_prefix(f"c{self.conn}-{self.serial}", self.codec)

    def frame(self) -> bytes:
        """The next frame: one turn (a burst of chunks) per stream, round robin, up to the cap
        (at least one turn); the streams left out go first in the next frame."""
        codec, encode = self.codec, protocol.encode_chunks_from
        burst, tokens = self.burst, self.tokens
        prefixes, seqs, texts = self.prefixes, self.seqs, self.texts
        n = len(texts)
        parts: list[bytes] = []
        size = 0
        start = i = self.turn
        while True:
            seq, left = seqs[i], burst
            while left:  # the burst, up to the end of the answer at a time
                count = min(left, tokens - seq)
                chunks = encode(prefixes[i], seq, [texts[i]] * count, codec)
                parts += chunks
                size += sum(map(len, chunks))
                seq += count
                left -= count
                if seq == tokens:  # the answer is complete: the stream's next request
                    prefixes[i] = self._new_prefix()
                    seq = 0
            seqs[i] = seq
            i = i + 1 if i + 1 < n else 0
            if i == start or (self.cap > 0 and size >= self.cap):
                break
        self.turn = i
        return protocol.join_batch(parts, codec) if len(parts) > 1 else parts[0]


def texts_for(streams: int, message_bytes: int, codec: Codec) -> list[str]:
    """The ceiling's token texts (bench/ceiling_server.py): `` xxxxx`` padded to the size."""
    texts = []
    for i in range(streams):
        rid, seq = f"c0-{i + 1}", 1000 + i
        pad = message_bytes - len(protocol.encode_chunk(rid, seq, " ", codec))
        texts.append(" " + "x" * max(pad, 5))
    return texts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--streams", type=int, default=16, help="concurrent streams per connection")
    p.add_argument(
        "--message-bytes", type=int, default=0, help="pad the chunk text to this message size"
    )
    p.add_argument("--tokens", type=int, default=2000, help="chunks per request (then a new id)")
    p.add_argument("--burst", type=int, default=BURST, help="chunks per stream per loop turn")
    p.add_argument(
        "--max-batch-bytes",
        type=int,
        default=protocol.limits.DEFAULT_BATCH_BYTES,
        help="stop adding streams' turns to a frame past this size (the gateway's default)",
    )
    a = p.parse_args()
    connections = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        codec = Codec.from_subprotocol(ws.subprotocol)
        text = codec.is_text
        streams = Streams(
            codec,
            texts_for(a.streams, a.message_bytes, codec),
            tokens=a.tokens,
            burst=a.burst,
            max_batch_bytes=a.max_batch_bytes,
            conn=connections,
        )
        reader = asyncio.create_task(drain_inbound(ws))
        send, frame, turn = ws.send, streams.frame, asyncio.sleep
        try:
            while True:
                await send(frame(), text=text)
                await turn(0)  # one frame per loop turn, as the gateway writes
        except ConnectionClosed:
            pass
        finally:
            reader.cancel()

    return run_peer(handler, a.host, a.port)


if __name__ == "__main__":
    raise SystemExit(main())
