"""A real A2A agent for the tests, built with ``a2a-sdk``'s server side, run as its own process.

``python -m tests.gateway.a2a_agent_server`` listens on an ephemeral port of 127.0.0.1 and
prints ``PORT <n>`` on its first stdout line. It serves the A2A JSON-RPC endpoint at ``/``, its
agent card at ``/.well-known/agent-card.json`` and, for the tests, ``GET /_test/{tag}`` (what
happened to the task asked with that tag, waiting with ``?until=started|working|cancelled|finished``
for it).

What a task does comes from the message's text, ``"<mode> <tag> [n] [ms]"``:

- ``slow TAG N MS``: N working updates (an artifact chunk ``"part i "`` each), MS ms apart, then
  completed with the text ``"done TAG"``;
- ``fail TAG``: failed, with a status message; ``reject TAG``: rejected;
- ``hang TAG``: never ends on its own;
- ``slowstart TAG N MS``: as ``slow``, but the task (and so its id) is announced only MS ms
  after the executor started: a window where a cancel races the start of the remote task.

Every task records (by tag): when it started and when its executor's ``cancel`` ran
(``time.monotonic()``: the same clock as the gateway's ``time.perf_counter()`` on Linux), how
many updates it sent, how many cancels arrived, and the terminal state it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from a2a.helpers.proto_helpers import new_task, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events.event_queue_v2 import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import TaskUpdater
from a2a.server.tasks.inmemory_task_store import InMemoryTaskStore
from a2a.types.a2a_pb2 import (
    Role,
    TaskState,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.agents.example_agent import agent_card


@dataclass
class Record:
    tag: str
    mode: str
    started_at: float
    task_id: str
    cancel_at: float | None = None
    cancels: int = 0
    updates: int = 0
    final_state: str | None = None
    working: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def as_json(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "mode": self.mode,
            "task_id": self.task_id,
            "started_at": self.started_at,
            "cancel_at": self.cancel_at,
            "cancels": self.cancels,
            "updates": self.updates,
            "final_state": self.final_state,
        }


RECORDS: dict[str, Record] = {}
#: Set when a record appears (a waiter for a tag not started yet waits on it).
_NEW = asyncio.Condition()


class TestAgent(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        words = context.get_user_input().split()
        mode = words[0] if words else "slow"
        tag = words[1] if len(words) > 1 else "untagged"
        count = int(words[2]) if len(words) > 2 else 5
        delay = int(words[3]) / 1000 if len(words) > 3 else 0.05
        assert context.task_id is not None
        assert context.context_id is not None
        record = Record(tag, mode, time.monotonic(), context.task_id)
        RECORDS[tag] = record
        async with _NEW:
            _NEW.notify_all()
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        if mode == "slowstart":  # the client learns the task's id only after this pause
            await asyncio.sleep(delay)
        await event_queue.enqueue_event(
            new_task(context.task_id, context.context_id, TaskState.TASK_STATE_SUBMITTED)
        )
        await updater.start_work()
        if mode == "fail":
            await self._end(
                record, updater.failed(_agent_text(updater, f"cannot do {tag}")), "failed"
            )
        elif mode == "reject":
            await self._end(record, updater.reject(_agent_text(updater, "no")), "rejected")
        elif mode == "hang":
            await asyncio.Event().wait()
        else:
            for i in range(count):
                await asyncio.sleep(delay)
                await updater.add_artifact(
                    [new_text_part(f"part {i} ")], artifact_id="answer", append=i > 0
                )
                record.updates += 1
                record.working.set()
            await self._end(
                record, updater.complete(_agent_text(updater, f"done {tag}")), "completed"
            )

    async def _end(self, record: Record, write: Any, state: str) -> None:
        await write
        record.final_state = state
        record.finished.set()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        now = time.monotonic()
        record = next((r for r in RECORDS.values() if r.task_id == context.task_id), None)
        if record is not None:
            record.cancels += 1
            if record.cancel_at is None:
                record.cancel_at = now
        assert context.task_id is not None
        assert context.context_id is not None
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        await updater.cancel()
        if record is not None:
            record.final_state = "canceled"
            record.cancelled.set()
            record.finished.set()


def _agent_text(updater: TaskUpdater, text: str) -> Any:
    return new_text_message(
        text, context_id=updater.context_id, task_id=updater.task_id, role=Role.ROLE_AGENT
    )


async def _record(request: Request) -> JSONResponse:
    tag = request.path_params["tag"]
    until = request.query_params.get("until")
    timeout = float(request.query_params.get("timeout", "10"))
    try:
        async with asyncio.timeout(timeout):
            async with _NEW:
                await _NEW.wait_for(lambda: tag in RECORDS)
            record = RECORDS.get(tag)
            if record is not None and until == "working":
                await record.working.wait()
            elif record is not None and until == "cancelled":
                await record.cancelled.wait()
            elif record is not None and until == "finished":
                await record.finished.wait()
    except TimeoutError:
        pass
    record = RECORDS.get(tag)
    return JSONResponse(record.as_json() if record else None)


def build_app(port: int) -> Starlette:
    card = agent_card(
        port,
        name="muxgate test agent",
        description="streams a few updates slowly; records tasks/cancel",
        skill="slow",
    )
    handler = DefaultRequestHandler(TestAgent(), InMemoryTaskStore(), card)
    routes = [
        *create_agent_card_routes(card),
        *create_jsonrpc_routes(handler, "/"),
        Route("/_test/{tag}", _record, methods=["GET"]),
    ]
    return Starlette(routes=routes)


async def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = build_app(port)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    print(f"PORT {port}", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await server.serve(sockets=[sock])


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
