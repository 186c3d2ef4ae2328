"""The peer users would otherwise pick: a FastAPI/uvicorn WebSocket endpoint written the usual way.

    python bench/fastapi_peer.py --port 8102

One task per request streaming one ``send_json`` (or ``send_bytes`` for msgpack) per chunk;
``task.cancel()`` on a ``cancel`` message or ``DELETE /v1/requests/{id}``, then the cancelled
response. It speaks the subset of the muxgate wire protocol the load generator uses (``chat``
with ``metadata.tokens`` / ``token_delay_ms``, ``cancel``; ``chunk``, ``response``,
``cancel_result``), one message per frame, so the same clients measure it. No batching, no
backpressure policy, no checkpoints: the baseline, not a gateway.

Runs on the plain asyncio event loop, like the gateway, so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()

Send = Callable[[dict[str, Any]], Awaitable[None]]
# request_id -> (its task, how to send on its connection): for DELETE /v1/requests/{id}.
running: dict[str, tuple[asyncio.Task[None], Send]] = {}

_USAGE = {"input_tokens": 0, "output_tokens": 0, "saved_tokens": 0, "final": True}


def _cancelled(request_id: str, reason: str) -> dict[str, Any]:
    return {
        "type": "response",
        "request_id": request_id,
        "status": "cancelled",
        "content": "",
        "reason": reason,
        "usage": _USAGE,
    }


async def generate(send: Send, request_id: str, tokens: int, delay: float) -> None:
    parts: list[str] = []
    try:
        for seq in range(tokens):
            await asyncio.sleep(delay)  # the "LLM" producing its next token
            parts.append(" token")
            await send({"type": "chunk", "request_id": request_id, "seq": seq, "text": " token"})
        await send(
            {
                "type": "response",
                "request_id": request_id,
                "status": "completed",
                "content": "".join(parts),
                "usage": {**_USAGE, "output_tokens": tokens},
            }
        )
    finally:
        running.pop(request_id, None)


@app.websocket("/v1/ws")
async def chat_socket(websocket: WebSocket) -> None:
    binary = "muxgate.v1.msgpack" in websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol="muxgate.v1.msgpack" if binary else "muxgate.v1.json")

    async def send(message: dict[str, Any]) -> None:
        if binary:
            await websocket.send_bytes(msgpack.packb(message))
        else:
            await websocket.send_json(message)

    mine: set[str] = set()
    try:
        while True:
            if binary:
                message = msgpack.unpackb(await websocket.receive_bytes())
            else:
                message = await websocket.receive_json()
            request_id = message.get("request_id", "")
            if message["type"] == "chat":
                meta = message.get("metadata") or {}
                task = asyncio.create_task(
                    generate(
                        send,
                        request_id,
                        int(meta.get("tokens", 60)),
                        int(meta.get("token_delay_ms", 30)) / 1000,
                    )
                )
                running[request_id] = (task, send)
                mine.add(request_id)
            elif message["type"] == "cancel":
                entry = running.pop(request_id, None)
                if entry is None:
                    status = "not_found"
                else:
                    entry[0].cancel()
                    await send(_cancelled(request_id, "client"))
                    status = "cancelled"
                await send({"type": "cancel_result", "request_id": request_id, "status": status})
    except WebSocketDisconnect:
        for request_id in mine:
            entry = running.pop(request_id, None)
            if entry is not None:
                entry[0].cancel()


@app.delete("/v1/requests/{request_id}")
async def cancel_request(request_id: str) -> dict[str, str]:
    entry = running.pop(request_id, None)
    if entry is None:
        return {"request_id": request_id, "status": "not_found"}
    entry[0].cancel()
    await entry[1](_cancelled(request_id, "api"))
    return {"request_id": request_id, "status": "cancelled"}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    uvicorn.run(
        app, host=a.host, port=a.port, log_level="warning", loop="auto"
    )  # uvloop when installed, like muxgate
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
