"""What a client can make the gateway log (security probe, issue 12, finding 6).

A client's disconnect or bad input is its own business: at most a line at warning (or lower)
without a traceback, never an error, and a bounded number of lines per connection, so no client
can fill the operator's logs or bury a real failure. A backend's bug still logs an error with
its traceback. Real gateway on an ephemeral port, real sockets; the logs are captured from
websockets' (stdlib) loggers and from structlog.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import structlog
from websockets.asyncio.client import ClientConnection, connect

from gateway.pipeline import RequestContext
from gateway.server import Gateway
from protocol import Codec, ResponseStatus

from .conftest import running_gateway, settled
from .http_client import http
from .wire import WireClient

ENDLESS = {"tokens": 100_000, "token_delay_ms": 1}


@dataclass
class Logs:
    """Everything logged while a test ran: stdlib records (websockets, asyncio) at warning and
    above, and every structlog event (as dicts, ``log_level`` included)."""

    records: list[logging.LogRecord]
    events: list[dict[str, Any]]

    def alarming(self) -> list[str]:
        """Lines at error level or carrying a traceback, described for the assertion message."""
        found = [
            f"{r.name} {r.levelname}: {r.getMessage()}"
            for r in self.records
            if r.levelno >= logging.ERROR or r.exc_info
        ]
        found += [
            f"structlog {e.get('log_level')}: {e}"
            for e in self.events
            if e.get("log_level") in ("error", "critical", "exception")
            or e.get("exc_info")
            or e.get("exception")
        ]
        return found

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logs() -> Iterator[Logs]:
    root = logging.getLogger()
    handler, level = _Collect(), root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING))
    try:
        with structlog.testing.capture_logs() as events:
            yield Logs(handler.records, events)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def stats_url(gw: Gateway) -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/stats"


def reset(ws: ClientConnection) -> None:
    """Drop the TCP connection with a RST (SO_LINGER 0), without a close handshake."""
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


# -- disconnects --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["reset", "abort"])
async def test_a_stats_subscriber_that_drops_its_connection_logs_no_error(
    logs: Logs, how: str
) -> None:
    # A tick every millisecond: the gateway is sending when the connection goes.
    async with running_gateway(stats_interval_ms=1) as gw:
        feed = await connect(stats_url(gw))
        await feed.recv()  # the first snapshot
        await feed.recv()  # and a tick: it is being fed
        if how == "reset":
            reset(feed)
        else:
            feed.transport.abort()
        await asyncio.wait_for(gw.stats_feed.idle(), 5)  # the gateway noticed: none left
        assert gw.stats_feed.subscribers == 0
        # The gateway still feeds the others.
        async with connect(stats_url(gw)) as other:
            await other.recv()
            await other.recv()
    # After the shutdown every handler has ended, so whatever it would log is logged.
    assert logs.alarming() == []


async def test_a_chat_connection_reset_mid_stream_logs_no_error(logs: Logs) -> None:
    async with running_gateway() as gw:
        async with WireClient.open(gw.url, Codec.JSON) as client:
            await client.chat("r1", metadata=ENDLESS)
            await client.chat("r2", metadata={**ENDLESS, "token_delay_ms": 0})
            await client.chunks("r2", 50)
            reset(client.ws)
        await settled(gw)  # the requests were cancelled (G7) and their pipelines halted
    assert logs.alarming() == []
    assert {e["reason"] for e in logs.named("request.cancelled")} == {"disconnect"}


# -- bad input reaching the backend ------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "key", "got"),
    [
        ({"tokens": True}, "tokens", "a boolean"),
        ({"tokens": -1}, "tokens", "-1"),
        ({"token_delay_ms": "x"}, "token_delay_ms", "a string"),
        ({"plan_ms": 1.5}, "plan_ms", "a number with a fraction part"),
        ({"tool_ms": None}, "tool_ms", "null"),
        ({"agent_ms": [1]}, "agent_ms", "an array"),
        ({"seed": {"a": 1}}, "seed", "an object"),
        ({"fail_at_token": False}, "fail_at_token", "a boolean"),
        ({"tokens": "9" * 5000}, "tokens", "a string"),  # the value is never echoed
    ],
    ids=lambda value: repr(value)[:40],
)
async def test_bad_metadata_fails_the_request_with_invalid_field(
    logs: Logs, metadata: dict[str, Any], key: str, got: str
) -> None:
    async with running_gateway() as gw:
        async with WireClient.open(gw.url, Codec.JSON) as client:
            await client.chat("bad", metadata=metadata)
            response = await client.response("bad")
            assert response.status is ResponseStatus.FAILED
            assert response.error is not None
            assert response.error.code == "invalid_field"
            assert response.error.message == f"metadata {key!r} must be an integer >= 0, got {got}"
            # The connection, and another request on it, carry on.
            await client.chat("good", metadata={"tokens": 3, "token_delay_ms": 0})
            assert (await client.response("good")).status is ResponseStatus.COMPLETED
            assert client.errors == []
        record = (await http("GET", gw.http_url + "/v1/requests/bad")).json()
        assert record["status"] == "failed"
        assert record["error"]["code"] == "invalid_field"
        await settled(gw)
    assert logs.alarming() == []
    (failed,) = logs.named("request.failed")
    assert failed["log_level"] == "info"  # one line, like any request's
    assert failed["error_code"] == "invalid_field"
    assert "exc_info" not in failed


async def test_a_failure_the_client_asked_for_is_explained_without_a_traceback(
    logs: Logs,
) -> None:
    async with running_gateway() as gw:
        async with WireClient.open(gw.url, Codec.JSON) as client:
            await client.chat("r1", metadata={"tokens": 10, "fail_at_token": 3})
            response = await client.response("r1")
        await settled(gw)
    assert response.status is ResponseStatus.FAILED
    assert response.error is not None
    assert (response.error.code, response.error.message) == (
        "backend_error",
        "simulated LLM failure after 3 tokens",
    )
    assert logs.alarming() == []
    (failed,) = logs.named("request.failed")
    assert (failed["log_level"], failed["error_code"]) == ("info", "backend_error")


async def test_an_answer_too_large_for_a_frame_is_explained_without_a_traceback(
    logs: Logs,
) -> None:
    async with running_gateway(max_content_chars=2000, max_pending_chars=2000) as gw:
        async with WireClient.open(gw.url, Codec.JSON) as client:
            await client.chat("big", stream=False, metadata={"tokens": 5000, "token_delay_ms": 0})
            response = await client.response("big")
        await settled(gw)
    assert response.error is not None
    assert response.error.code == "frame_too_large"
    assert logs.alarming() == []
    (failed,) = logs.named("request.failed")
    assert (failed["log_level"], failed["error_code"]) == ("info", "frame_too_large")


class Buggy:
    """A backend with a bug: that is worth an error and a traceback."""

    async def run(self, ctx: RequestContext) -> None:
        raise KeyError("oops")


async def test_a_backend_bug_still_logs_an_error_with_its_traceback(logs: Logs) -> None:
    async with running_gateway(backend_impl=Buggy()) as gw:
        async with WireClient.open(gw.url, Codec.JSON) as client:
            await client.chat("r1")
            response = await client.response("r1")
        await settled(gw)
    assert response.error is not None
    assert (response.error.code, response.error.message) == ("backend_error", "the backend failed")
    (failed,) = logs.named("request.failed")
    assert failed["log_level"] == "error"
    assert isinstance(failed["exc_info"], KeyError)
    assert failed["error_code"] == "backend_error"


# -- bad HTTP ----------------------------------------------------------------------------------


async def test_a_repeated_upgrade_header_on_the_stats_path_is_no_server_error(
    logs: Logs,
) -> None:
    async with running_gateway() as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            b"GET /v1/stats HTTP/1.1\r\nHost: x\r\n"
            b"Upgrade: websocket\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        await writer.wait_closed()
        # Not a valid handshake: websockets' own refusal, not a 500 with a traceback.
        assert status_line.startswith(b"HTTP/1.1 4"), status_line
    assert logs.alarming() == []


# -- volume ------------------------------------------------------------------------------------


async def test_a_hostile_connection_logs_a_bounded_number_of_lines(logs: Logs) -> None:
    """Garbage of every kind, many times over: nothing at warning or above, and no line but
    the one per accepted request."""
    bad_chats = 20
    async with running_gateway() as gw:
        async with WireClient.open(gw.url, Codec.JSON) as client:
            for round_ in range(20):
                await client.send_raw("{not json")
                await client.send_raw(b"\x00\x01binary on a JSON connection")
                await client.send_raw('{"type":"nope"}')
                await client.send_raw('{"type":"chat","request_id":"x"}')  # no message
                await client.send_raw('{"type":"hello"}')  # too late
                await client.send_raw(f'{{"type":"cancel","request_id":"none{round_}"}}')
            for i in range(bad_chats):
                await client.chat(f"bad{i}", metadata={"tokens": True})
            for i in range(bad_chats):
                await client.response(f"bad{i}")
            await client.send_raw('{"type":"ping","id":"last"}')
            await client.wait_for(lambda: bool(client.others))  # everything was read
        await settled(gw)
    assert logs.alarming() == []
    assert [r for r in logs.records if r.levelno >= logging.WARNING] == []
    assert [e for e in logs.events if e["log_level"] not in ("debug", "info")] == []
    per_request = [e for e in logs.events if str(e["event"]).startswith("request.")]
    assert len(per_request) == bad_chats  # one line per accepted request, nothing per message
    assert len(logs.events) - len(per_request) <= 3


def test_standard_library_records_are_json_lines_with_their_level() -> None:
    """websockets' and asyncio's own records (say "connection handler failed", "Fatal error on
    transport") come out as JSON lines with a level like ours, not as bare tracebacks between
    them; websockets' per-connection info lines stay out."""
    script = (
        "import logging\n"
        "from gateway.observability import configure_logging\n"
        "configure_logging('json', 'info')\n"
        "logging.getLogger('websockets.server').info('connection open')\n"
        "try:\n"
        "    raise ValueError('boom')\n"
        "except ValueError:\n"
        "    logging.getLogger('websockets.server').exception('connection handler failed')\n"
        "logging.getLogger('asyncio').warning('Fatal error on transport')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=True, timeout=30
    )
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    assert [(line["logger"], line["level"], line["event"]) for line in lines] == [
        ("websockets.server", "error", "connection handler failed"),
        ("asyncio", "warning", "Fatal error on transport"),
    ]
    assert "ValueError: boom" in lines[0]["exception"]
