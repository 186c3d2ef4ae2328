"""A small A2A agent to try flows with, written with ``a2a-sdk``'s server side (extra
``agents``): a *reviewer* that reads the text it is sent, streams a few notes about it, and
completes with a one-line review. It honours ``tasks/cancel`` (``CancelTask``): the task ends
``canceled`` and no further note is written.

    python3 -m gateway.agents.example_agent --port 9999     # http://127.0.0.1:9999/

``--delay-ms`` paces the notes (default 200 ms each, 3 notes), so a cancel visibly lands while
the agent works. ``--port 0`` picks a free port; the first line printed is ``PORT <n>``.

**What it records.** With ``--events FILE`` (or ``MUXGATE_EXAMPLE_EVENTS=FILE`` in its
environment, as the example MCP server) the agent appends one JSON object per line to that file:
``started`` (``pid``, ``transport``, ``port``), ``call`` (``task_id``: ``execute`` began),
``note`` (``task_id``, ``index``: a note written), ``cancel`` (``task_id``: its ``cancel``
handler ran, i.e. ``tasks/cancel`` arrived), and ``finished`` or ``cancelled`` (``task_id``:
``execute`` ran to its end, or was cancelled mid-way). Each carries ``t``, ``time.monotonic()``
of this process (on Linux the same clock as every other process's ``time.monotonic()``), so a
benchmark can tell how long after its cancel the agent learned of it and what it did after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import time
from typing import Any

import uvicorn
from a2a.helpers.proto_helpers import new_task, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import TaskUpdater
from a2a.server.tasks.inmemory_task_store import InMemoryTaskStore
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Role,
    TaskState,
)
from starlette.applications import Starlette

__all__ = ["EVENTS_ENV", "Reviewer", "build_app", "main"]

#: The environment variable naming the file the agent appends its events to (``--events``).
EVENTS_ENV = "MUXGATE_EXAMPLE_EVENTS"

#: The events file (``--events``, else ``MUXGATE_EXAMPLE_EVENTS``); None: nothing is recorded.
_events_path: str | None = None


def record(event: str, **fields: Any) -> None:
    """Append an event to the events file, when one is configured."""
    path = _events_path or os.environ.get(EVENTS_ENV)
    if path:
        entry = {"event": event, "t": time.monotonic(), **fields}
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry) + "\n")


class Reviewer(AgentExecutor):
    """Streams ``notes`` notes ``delay`` seconds apart, then a one-line review."""

    def __init__(self, *, delay: float = 0.2, notes: int = 3) -> None:
        self.delay = delay
        self.notes = notes

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None
        task_id = context.task_id
        record("call", task_id=task_id)
        try:
            await self._review(context, event_queue)
        except BaseException:  # the cancellation of its task (or of the server)
            record("cancelled", task_id=task_id)
            raise
        record("finished", task_id=task_id)

    async def _review(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None
        assert context.context_id is not None
        text = context.get_user_input()
        words = text.split()
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        await event_queue.enqueue_event(
            new_task(context.task_id, context.context_id, TaskState.TASK_STATE_SUBMITTED)
        )
        await updater.start_work()
        notes = [
            f"read {len(words)} words",
            f"{sum(1 for w in words if w[:1].isupper())} capitalised",
            "nothing contradicts itself",
        ]
        for i in range(self.notes):
            await asyncio.sleep(self.delay)
            note = notes[i % len(notes)]
            await updater.add_artifact(
                [new_text_part(f"{note}; ")], artifact_id="review", append=i > 0
            )
            record("note", task_id=context.task_id, index=i)
        await updater.complete(_message(updater, "review: looks fine"))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None
        assert context.context_id is not None
        record("cancel", task_id=context.task_id)
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def _message(updater: TaskUpdater, text: str) -> Any:
    return new_text_message(
        text, context_id=updater.context_id, task_id=updater.task_id, role=Role.ROLE_AGENT
    )


def agent_card(port: int, *, name: str, description: str, skill: str) -> AgentCard:
    """The card of an agent served by this machine on ``port``: JSON-RPC at ``/`` (A2A 1.0),
    streaming, text in and out, one skill."""
    return AgentCard(
        name=name,
        description=description,
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(
                url=f"http://127.0.0.1:{port}/", protocol_binding="JSONRPC", protocol_version="1.0"
            )
        ],
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id=skill, name=skill, description=description, tags=[])],
    )


def build_app(port: int, *, delay: float = 0.2, notes: int = 3) -> Starlette:
    """The agent's Starlette app: the JSON-RPC endpoint at ``/`` and its card."""
    card = agent_card(
        port,
        name="muxgate example reviewer",
        description="reviews a text: a few notes, then a one-line review",
        skill="review",
    )
    handler = DefaultRequestHandler(Reviewer(delay=delay, notes=notes), InMemoryTaskStore(), card)
    return Starlette(routes=[*create_agent_card_routes(card), *create_jsonrpc_routes(handler, "/")])


async def _serve(port: int, delay: float, notes: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    app = build_app(port, delay=delay, notes=notes)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    record("started", pid=os.getpid(), transport="http", port=port)
    print(f"PORT {port}", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await server.serve(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9999, help="0: a free port")
    parser.add_argument("--delay-ms", type=int, default=200, help="pause before each note")
    parser.add_argument("--notes", type=int, default=3)
    parser.add_argument(
        "--events", metavar="FILE", help=f"record events to FILE (default: ${EVENTS_ENV})"
    )
    args = parser.parse_args(argv)
    global _events_path
    _events_path = args.events
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.delay_ms / 1000, args.notes))


if __name__ == "__main__":
    main()
