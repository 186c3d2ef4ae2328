"""The usual streaming LLM proxy, for comparison: FastAPI + httpx pass-through of an
OpenAI-compatible ``/v1/chat/completions`` with ``"stream": true``.

    python bench/llm_proxy_peer.py --port 8103 --upstream http://127.0.0.1:8080

Written the way such proxies usually are (the pattern of httpx's and Starlette's documentation):
one shared ``httpx.AsyncClient``; the request body is forwarded as it is; the upstream response is
opened with ``stream=True`` and its raw bytes are handed to a ``StreamingResponse`` (server-sent
events out), with ``response.aclose`` as the background task. A client cancels by closing its
HTTP connection: uvicorn reports ``http.disconnect``, Starlette cancels the streaming task, and the
upstream connection is closed when httpx's stream is closed. No cancel message, no request ids,
no checkpoints. ``bench/model.py`` measures, at the model, how soon the model stops.

Runs on uvloop when installed (uvicorn's ``loop="auto"``), like muxgate.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

UPSTREAM = "http://127.0.0.1:8080"
client: httpx.AsyncClient | None = None


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    global client
    client = httpx.AsyncClient(base_url=UPSTREAM, timeout=httpx.Timeout(60.0))
    try:
        yield
    finally:
        await client.aclose()


app = FastAPI(lifespan=lifespan)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    assert client is not None
    upstream = client.build_request(
        "POST",
        "/v1/chat/completions",
        content=await request.body(),
        headers={"content-type": "application/json"},
    )
    response = await client.send(upstream, stream=True)
    if response.status_code != 200:
        body = await response.aread()
        await response.aclose()
        return Response(body, status_code=response.status_code, media_type="application/json")
    return StreamingResponse(
        response.aiter_raw(),
        media_type="text/event-stream",
        background=BackgroundTask(response.aclose),
    )


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main() -> int:
    global UPSTREAM
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="the model server, e.g. http://127.0.0.1:8080")
    a = p.parse_args()
    UPSTREAM = a.upstream.rstrip("/")
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", loop="auto")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
