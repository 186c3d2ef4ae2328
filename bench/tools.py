"""Scenario ``tools`` (issue 14, item 6): a cancel reaches MCP tools and A2A agents, measured AT
THE TOOL SERVER / AGENT.

    python3 bench/run.py --only tools            # full run: ~5 minutes on 2 cores
    python3 bench/run.py --quick --only tools    # smoke: ~20 s (CI's --quick runs it too)
    python3 bench/tools.py render                # rewrite tools.md etc. from tools.json

Needs muxgate's ``tools`` and ``agents`` extras (the ``mcp`` and ``a2a-sdk`` SDKs); without them
the scenario prints a note and is skipped, it does not fail. Every part is a process of its own:

- the gateway, ``python3 -m gateway.cli serve --port 0 --config FLOW.toml`` (``backend =
  "flow"``, its URL read from its ``gateway.started`` log line), one per flow, one at a time;
- the bundled example MCP server (``gateway/tools/example_server.py``): on stdio, started and
  supervised by the gateway from its ``[tools.NAME]`` table, and on streamable HTTP, started
  here (``python3 -m gateway.tools.example_server --http --port N``);
- the bundled example A2A agent (``python3 -m gateway.agents.example_agent --port 0 --events
  FILE``, a reviewer whose 3 notes are paced so that its task takes ~2 s).

Flows (each a tool or agent step, then an ``answer`` from the simulated LLM):

1. ``slow_search`` (``seconds`` = 2) on stdio, abortable (``abortable = ["slow_search"]``);
2. the same on streamable HTTP, abortable (``[tools.NAME.tool.slow_search] abortable = true``;
   ``mode = "auto"``: MCP 2026-07-28 when the server speaks it);
3. ``slow_search`` on stdio, not abortable (the default);
4. the example agent, abortable (``[agents.NAME] abortable = true``: A2A ``tasks/cancel``).

**One request at a time.** A WebSocket client (JSON frames) sends a ``chat`` with ``"steps":
true``, waits for the tool's or agent's ``step`` ``started`` message, waits a random 20-200 ms,
sends ``cancel`` and records the instant it sent it. Then it waits for the ``cancelled``
response, for the server's or agent's records of the call (below), and for the final ``usage``
(the pipeline has halted) before the next request.

**Measured at the server.** The example MCP server and the example agent append one JSON line
per event to an events file, each with ``t`` = ``time.monotonic()`` of their process; the client
takes its instants with ``time.monotonic()`` too: on Linux one clock (CLOCK_MONOTONIC) for every
process of the machine, so the differences need no calibration. Per cancel:

- cancel → ``cancelled`` response: the client's round trip (and the gateway's own share, from its
  ``request.cancelled`` log line: reading the ``cancel`` → writing the response);
- cancel → the server learned of it: MCP: the server's ``cancel_notification`` record (a
  ``notifications/cancelled`` arrived; under 2026-07-28 on HTTP there is none: the gateway closes
  the request's stream) and its ``cancelled`` record (the tool's handler was cancelled); learned
  = the earlier of the two. A2A: the agent's ``cancel`` record (its ``cancel`` handler ran:
  ``tasks/cancel`` arrived) and its ``cancelled`` record (its ``execute`` was cancelled);
- work after the cancel: the call's last record (``finished``: it ran to its end; ``cancelled``:
  it was stopped) minus the cancel; the agent's notes written after the cancel;
- cancel → pipeline halted: the final ``usage`` message (``halt.state`` ``halted``).

These figures start at the client's ``send`` of the ``cancel``, not at the gateway's reading of
it: the difference is one loopback hop, estimated as half of (client round trip - the gateway's
own share) and reported.

Nothing asserts a speed: the scenario fails only if it could not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
from model import CpuMeter, fmt, render_main, summary, versions, wrap

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
EVENTS_ENV = "MUXGATE_EXAMPLE_EVENTS"
#: How long ``slow_search`` takes (its ``seconds`` argument), and the agent's task about as long.
TOOL_SECONDS = 2.0
AGENT_NOTES, AGENT_DELAY_MS = 3, 700
#: The client waits this long (uniformly at random) between the ``step`` started and its cancel.
CANCEL_DELAY_S = (0.020, 0.200)
START_TIMEOUT_S = 30.0
STEP_TIMEOUT_S = 30.0
POLL_S = 0.002
#: How long to wait for a ``notifications/cancelled`` record that may never come.
NOTIFICATION_WAIT_S = 2.0


@dataclass(frozen=True)
class Load:
    warmup: int
    per_flow: int


FULL = Load(warmup=3, per_flow=120)
QUICK = Load(warmup=1, per_flow=3)


@dataclass(frozen=True)
class Flow:
    name: str
    label: str
    kind: str  # "tool" or "agent"
    transport: str  # "stdio", "http" (MCP streamable HTTP), "a2a"
    abortable: bool


FLOWS = (
    Flow("mcp_stdio", "MCP `slow_search` on stdio, abortable", "tool", "stdio", True),
    Flow("mcp_http", "MCP `slow_search` on streamable HTTP, abortable", "tool", "http", True),
    Flow("mcp_stdio_nonabortable", "MCP `slow_search` on stdio, not abortable", "tool", "stdio",
         False),
    Flow("a2a_agent", "A2A example agent, abortable (`tasks/cancel`)", "agent", "a2a", True),
)  # fmt: skip


class BenchLike(Protocol):
    """What this scenario uses of ``run.Bench``."""

    quick: bool
    out: Path
    tmp: Path
    log: Callable[..., None]


def missing() -> str | None:
    """None when the ``tools`` and ``agents`` extras are installed, else why it is skipped."""
    for name, extra in (("mcp", "tools"), ("a2a", "agents"), ("uvicorn", "agents")):
        try:
            importlib.import_module(name)
        except ImportError:
            return (
                f"{name} is not importable: muxgate's {extra!r} extra is not installed; "
                "scenario 'tools' skipped"
            )
    return None


# -- processes --------------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _first_line(proc: subprocess.Popen[str], prefix: str, what: str) -> str:
    """The first stdout line of ``proc`` that starts with ``prefix`` (a helper announcing its
    port), or RuntimeError."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"{what} exited at start ({proc.wait()})")


@contextlib.contextmanager
def mcp_http_server(events: Path, log: Path) -> Iterator[tuple[str, int]]:
    """The example MCP server on streamable HTTP; yields its URL and pid."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [PY, "-m", "gateway.tools.example_server", "--http", "--port", "0"],
            cwd=ROOT, env=_env(**{EVENTS_ENV: str(events)}), stdout=subprocess.PIPE,
            stderr=err, text=True,
        )  # fmt: skip
    try:
        line = _first_line(proc, "listening on ", "the example MCP server")
        yield line.split()[-1], proc.pid
    finally:
        _stop(proc)


@contextlib.contextmanager
def example_agent(events: Path, log: Path) -> Iterator[tuple[str, int]]:
    """The example A2A agent; yields its URL and pid."""
    argv = [PY, "-m", "gateway.agents.example_agent", "--port", "0", "--events", str(events)]
    argv += ["--delay-ms", str(AGENT_DELAY_MS), "--notes", str(AGENT_NOTES)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        line = _first_line(proc, "PORT ", "the example agent")
        yield f"http://127.0.0.1:{int(line.split()[1])}/", proc.pid
    finally:
        _stop(proc)


def _toml(value: Any) -> str:
    """A TOML value (strings, numbers, booleans, lists, inline tables) for the flow files."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"


def flow_config(flow: Flow, events: Path, target: str) -> str:
    """The gateway's settings file for ``flow`` (``target``: the HTTP server's or agent's URL)."""
    lines = ['backend = "flow"', "", "[backend_options]", 'llm = "simulated"', ""]
    lines.append("[[backend_options.steps]]")
    if flow.kind == "tool":
        lines += ['kind = "tool"', 'server = "ex"', 'tool = "slow_search"']
        lines.append(f"arguments = {_toml({'query': '{prompt}', 'seconds': TOOL_SECONDS})}")
    else:
        lines += ['kind = "agent"', 'agent = "reviewer"', 'message = "{prompt}"']
    lines += ["", "[[backend_options.steps]]", 'kind = "answer"', 'prompt = "{prompt}"', ""]
    if flow.transport == "stdio":
        lines += ["[tools.ex]", f"command = {_toml([PY, '-m', 'gateway.tools.example_server'])}"]
        lines += [f"cwd = {_toml(str(ROOT))}", f"env = {_toml({EVENTS_ENV: str(events)})}"]
        if flow.abortable:
            lines.append('abortable = ["slow_search"]')
    elif flow.transport == "http":
        lines += ["[tools.ex]", f"url = {_toml(target)}", 'mode = "auto"', ""]
        lines += ["[tools.ex.tool.slow_search]", f"abortable = {_toml(flow.abortable)}"]
    else:
        lines += ["[agents.reviewer]", f"url = {_toml(target)}"]
        lines.append(f"abortable = {_toml(flow.abortable)}")
    return "\n".join(lines) + "\n"


class Gateway:
    """``muxgate serve --port 0 --config FILE`` (JSON log on stderr, to a file); its URL is read
    from its ``gateway.started`` line."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        argv = [PY, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
        argv += ["--config", str(config), "--log-format", "json", "--log-level", "info"]
        argv += ["--shutdown-grace", "1"]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=err
            )
        self.pid = self.proc.pid
        self.url = ""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.url:
            started = self.lines("gateway.started")
            if started:
                self.url = str(started[0]["url"])
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_bytes()[-2000:].decode(errors="replace")
                self.stop()
                raise RuntimeError(f"the gateway did not start: {tail}")
            else:
                time.sleep(0.02)

    def lines(self, event: str) -> list[dict[str, Any]]:
        """Its JSON log lines of one event."""
        out = []
        needle = f'"{event}"'.encode()
        for line in self.log_path.read_bytes().splitlines():
            if needle in line:
                with contextlib.suppress(ValueError):
                    entry = orjson.loads(line)
                    if entry.get("event") == event:
                        out.append(entry)
        return out

    def children(self) -> list[int]:
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = (entry / "stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == self.pid:
                        out.append(int(entry.name))
        return out

    def stop(self) -> None:
        _stop(self.proc)


# -- the client -------------------------------------------------------------------------------


@dataclass
class Req:
    rid: str
    t_chat: float = 0.0
    t_step: float | None = None
    step: dict[str, Any] | None = None
    t_cancel: float | None = None
    t_response: float | None = None
    response: dict[str, Any] | None = None
    t_final: float | None = None
    final: dict[str, Any] | None = None
    chunks: int = 0
    error: str | None = None


class Client:
    """One WebSocket to the gateway, JSON codec; a reader task records each message's receipt
    (``time.monotonic()``) on its request."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.reqs: dict[str, Req] = {}
        self.changed = asyncio.Event()
        self.welcome = False
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for frame in self.ws:
                t = time.monotonic()
                text = frame if isinstance(frame, str) else frame.decode()
                for line in text.split("\n"):
                    if line:
                        self._message(orjson.loads(line), t)
                self.changed.set()
        except ConnectionClosed:
            pass
        finally:
            for r in self.reqs.values():
                r.error = r.error or "the gateway closed the connection"
            self.changed.set()

    def _message(self, m: dict[str, Any], t: float) -> None:
        kind = m.get("type")
        if kind == "welcome":
            self.welcome = True
            return
        r = self.reqs.get(m.get("request_id", ""))
        if r is None:
            return
        if kind == "step" and m.get("state") == "started" and m.get("kind") in ("tool", "agent"):
            r.t_step, r.step = t, m
        elif kind == "chunk":
            r.chunks += 1
        elif kind == "response":
            r.t_response, r.response = t, m
            if m.get("usage", {}).get("final", True):
                r.t_final, r.final = t, m
        elif kind == "usage" and m.get("usage", {}).get("final"):
            r.t_final, r.final = t, m
        elif kind == "error":
            r.error = f"error message {m}"

    async def until(self, predicate: Callable[[], bool], seconds: float) -> None:
        async with asyncio.timeout(seconds):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def chat(self, rid: str, text: str) -> Req:
        r = self.reqs[rid] = Req(rid)
        message = {"type": "chat", "request_id": rid, "message": text, "stream": True}
        r.t_chat = time.monotonic()
        await self.ws.send(orjson.dumps({**message, "steps": True}).decode())
        return r

    async def cancel(self, r: Req) -> None:
        frame = orjson.dumps({"type": "cancel", "request_id": r.rid}).decode()
        r.t_cancel = time.monotonic()
        await self.ws.send(frame)


class Events:
    """An events file another process appends to (JSON lines with ``event`` and ``t``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.all: list[dict[str, Any]] = []

    def poll(self) -> None:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            end = data.rfind(b"\n") + 1  # complete lines only
            self.offset += end
            self.all += [orjson.loads(line) for line in data[:end].splitlines() if line.strip()]

    async def find(
        self, match: Callable[[dict[str, Any]], bool], start: int, seconds: float
    ) -> dict[str, Any] | None:
        """The first record from index ``start`` on that matches, once it is there; None after
        ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            self.poll()
            for e in self.all[start:]:
                if match(e):
                    return e
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(POLL_S)


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000, 3)


async def _one(
    flow: Flow, client: Client, events: Events, rid: str, rng: random.Random, notify: bool
) -> dict[str, Any]:
    """One chat, cancelled 20-200 ms after its tool/agent step started; its record."""
    events.poll()
    start = len(events.all)
    r = await client.chat(rid, f"benchmark request {rid}")
    await client.until(lambda: r.t_step is not None or r.error is not None, STEP_TIMEOUT_S)
    if r.error is not None:
        raise RuntimeError(f"{rid}: {r.error}")
    delay = rng.uniform(*CANCEL_DELAY_S)
    await asyncio.sleep(delay)
    await client.cancel(r)
    await client.until(lambda: r.t_response is not None or r.error is not None, STEP_TIMEOUT_S)
    key = "task_id" if flow.kind == "agent" else "request_id"
    call = await events.find(lambda e: e["event"] == "call", start, STEP_TIMEOUT_S)
    if call is None:
        raise RuntimeError(f"{rid}: no call record at the {flow.transport} server")
    cid = call[key]

    def of(name: str) -> Callable[[dict[str, Any]], bool]:
        return lambda e: e["event"] == name and e.get(key) == cid

    def ended(e: dict[str, Any]) -> bool:
        return e["event"] in ("finished", "cancelled") and e.get(key) == cid

    end = await events.find(ended, start, TOOL_SECONDS * AGENT_NOTES + STEP_TIMEOUT_S)
    if flow.kind == "agent":
        told = await events.find(of("cancel"), start, NOTIFICATION_WAIT_S)
    elif notify:
        told = await events.find(of("cancel_notification"), start, NOTIFICATION_WAIT_S)
    else:
        events.poll()
        told = next((e for e in events.all[start:] if of("cancel_notification")(e)), None)
    await client.until(lambda: r.t_final is not None or r.error is not None, STEP_TIMEOUT_S)
    t0 = r.t_cancel
    handler_cancelled = end["t"] if end and end["event"] == "cancelled" else None
    learned = [t for t in (told and told["t"], handler_cancelled) if t is not None]
    notes = [e for e in events.all[start:] if of("note")(e)]
    assert r.response is not None
    assert r.final is not None
    return {
        "request_id": rid,
        "call_id": cid,
        "error": r.error,
        "status": r.response.get("status"),
        "step_to_cancel_ms": _ms(r.t_step, t0),
        "call_before_cancel": call["t"] < (t0 or 0.0),
        "cancel_to_response_ms": _ms(t0, r.t_response),
        "cancel_to_told_ms": _ms(t0, told["t"] if told else None),
        "cancel_to_handler_cancelled_ms": _ms(t0, handler_cancelled),
        "cancel_to_learned_ms": _ms(t0, min(learned)) if learned else None,
        "ran_to_end": bool(end and end["event"] == "finished"),
        # What the call still had to run when the cancel was sent (slow_search's ``seconds``).
        "rest_of_call_ms": _ms(t0, call["t"] + call["seconds"]) if "seconds" in call else None,
        "work_after_cancel_ms": _ms(t0, end["t"] if end else None),
        "notes_after_cancel": sum(1 for e in notes if e["t"] > (t0 or 0.0)),
        "cancel_to_halted_ms": _ms(t0, r.t_final),
        "response_halt": r.response.get("halt"),
        "final_halt": r.final.get("halt"),
        "chunks": r.chunks,
    }


async def _flow_run(
    flow: Flow, load: Load, url: str, events: Events, notify: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from websockets.asyncio.client import connect

    rng = random.Random(f"tools-{flow.name}")
    async with connect(url, subprotocols=["muxgate.v1.json"], compression=None) as ws:
        client = Client(ws)
        await ws.send('{"type":"hello"}')  # dev mode: no credentials; answered with welcome
        await client.until(lambda: client.welcome, STEP_TIMEOUT_S)
        warm = [
            await _one(flow, client, events, f"warm-{i}", rng, notify) for i in range(load.warmup)
        ]
        records = [
            await _one(flow, client, events, f"{flow.name}-{i}", rng, notify)
            for i in range(load.per_flow)
        ]
        client.reader.cancel()
    return warm, records


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- the scenario -----------------------------------------------------------------------------


def run_flow(
    bench: BenchLike, flow: Flow, load: Load, target: str, events_path: Path, pids: list[int]
) -> dict[str, Any]:
    config = bench.tmp / f"tools-{flow.name}.toml"
    config.write_text(flow_config(flow, events_path, target))
    gw = Gateway(config, bench.tmp / f"tools-{flow.name}.gateway.log")
    try:
        up = gw.lines("tools.server_up")
        protocol = str(up[0].get("protocol")) if up else None
        # Under MCP 2026-07-28 on streamable HTTP, a cancel closes the request's stream; no
        # notifications/cancelled is sent (stdio, and HTTP under 2025-11-25, send one).
        # A call that is not abortable is not cancelled at all: nothing to wait for.
        notify = (
            flow.kind == "tool"
            and flow.abortable
            and not (flow.transport == "http" and protocol == "2026-07-28")
        )
        meter = CpuMeter(gw.pid, *gw.children(), *pids)
        warm, records = _run_async(_flow_run(flow, load, gw.url, Events(events_path), notify))
        cpu = meter.result()
        logged = {str(e.get("request_id")): e for e in gw.lines("request.cancelled")}
        agent_logged = gw.lines("agent.cancel")
    finally:
        gw.stop()
    for rec in records:
        line = logged.get(rec["request_id"], {})
        rec["gateway_cancel_to_terminal_ms"] = line.get("cancel_to_terminal_ms")
        rec["gateway_halt_ms"] = line.get("halt_ms")
    return {
        "flow": flow.__dict__,
        "config": config.read_text(),
        "protocol": protocol if flow.kind == "tool" else "A2A 1.0 (JSON-RPC)",
        "notifications_expected": notify,
        "cpu": cpu,
        "warmup": len(warm),
        "records": records,
        "agent_cancel_log": [
            {k: e.get(k) for k in ("final_state", "delivered", "cancel_ms")} for e in agent_logged
        ],
    }


def flow_summary(x: dict[str, Any]) -> dict[str, Any]:
    recs = x["records"]

    def s(key: str) -> dict[str, Any]:
        return summary([r[key] for r in recs if r[key] is not None])

    hop = [
        (r["cancel_to_response_ms"] - r["gateway_cancel_to_terminal_ms"]) / 2
        for r in recs
        if r["gateway_cancel_to_terminal_ms"] is not None and r["cancel_to_response_ms"]
    ]
    statuses: dict[str, int] = {}
    for r in recs:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    out = {
        "label": x["flow"]["label"],
        "protocol": x["protocol"],
        "requests": len(recs),
        "statuses": statuses,
        "cancel_to_response_ms": s("cancel_to_response_ms"),
        "gateway_cancel_to_terminal_ms": s("gateway_cancel_to_terminal_ms"),
        "one_way_hop_ms_estimate": summary(hop),
        "cancel_to_told_ms": s("cancel_to_told_ms"),
        "cancel_to_handler_cancelled_ms": s("cancel_to_handler_cancelled_ms"),
        "cancel_to_learned_ms": s("cancel_to_learned_ms"),
        "work_after_cancel_ms": s("work_after_cancel_ms"),
        "rest_of_call_ms": s("rest_of_call_ms"),
        "cancel_to_halted_ms": s("cancel_to_halted_ms"),
        "step_to_cancel_ms": s("step_to_cancel_ms"),
        "ran_to_end": sum(r["ran_to_end"] for r in recs),
        "told": sum(r["cancel_to_told_ms"] is not None for r in recs),
        "calls_started_after_cancel": sum(not r["call_before_cancel"] for r in recs),
        "notes_after_cancel": sum(r["notes_after_cancel"] for r in recs),
        "chunks": sum(r["chunks"] for r in recs),
        "aborted_halts": sum(bool((r["final_halt"] or {}).get("aborted")) for r in recs),
        "cpu": x["cpu"],
    }
    if x["agent_cancel_log"]:
        states: dict[str, int] = {}
        for e in x["agent_cancel_log"]:
            states[str(e["final_state"])] = states.get(str(e["final_state"]), 0) + 1
        out["agent_cancel_log"] = {
            "final_states": states,
            "delivered": sum(bool(e["delivered"]) for e in x["agent_cancel_log"]),
            "cancel_ms": summary([e["cancel_ms"] for e in x["agent_cancel_log"] if e["cancel_ms"]]),
        }
    return out


def _idle(seconds: float = 1.0) -> float:
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return round((idle1 - idle0) / max(1, total1 - total0), 3)


def run(bench: BenchLike, machine: dict[str, Any]) -> dict[str, Any]:
    """Run every flow, write ``tools.json``, ``tools.md`` and ``tools_readme_section.md`` into
    ``bench.out``; return the summary (for ``latest.json``)."""
    note = missing()
    if note is not None:
        bench.log(f"  note: {note}")
        return {"skipped": note}
    load = QUICK if bench.quick else FULL
    t_start = time.monotonic()
    idle = _idle()
    bench.log(f"  machine idle before: {idle:.0%}")
    result: dict[str, Any] = {
        "quick": bench.quick,
        "load": load.__dict__,
        "tool_seconds": TOOL_SECONDS,
        "agent": {"notes": AGENT_NOTES, "delay_ms": AGENT_DELAY_MS},
        "cancel_delay_ms": [round(v * 1000) for v in CANCEL_DELAY_S],
        "versions": versions("mcp", "a2a-sdk", "websockets", "uvicorn"),
        "machine_idle_before": idle,
        "loadavg_before": os.getloadavg()[0],
    }
    raw: dict[str, dict[str, Any]] = {}
    http_events = bench.tmp / "tools-mcp-http.events.jsonl"
    agent_events = bench.tmp / "tools-agent.events.jsonl"
    with (
        mcp_http_server(http_events, bench.tmp / "tools-mcp-http.log") as (mcp_url, mcp_pid),
        example_agent(agent_events, bench.tmp / "tools-agent.log") as (agent_url, agent_pid),
    ):
        for flow in FLOWS:
            if flow.transport == "stdio":
                args = ("", bench.tmp / f"tools-{flow.name}.events.jsonl", [])
            elif flow.transport == "http":
                args = (mcp_url, http_events, [mcp_pid])
            else:
                args = (agent_url, agent_events, [agent_pid])
            x = run_flow(bench, flow, load, args[0], args[1], args[2])
            raw[flow.name] = x
            _log(bench, flow.name, flow_summary(x))
    result["flows"] = {name: flow_summary(x) for name, x in raw.items()}
    result["machine_idle_after"] = _idle()
    result["loadavg_after"] = os.getloadavg()[0]
    result["wall_seconds"] = round(time.monotonic() - t_start, 1)
    full = {**result, "machine": machine, "raw": raw}
    bench.out.mkdir(parents=True, exist_ok=True)
    (bench.out / "tools.json").write_text(json.dumps(full, indent=1) + "\n")
    (bench.out / "tools.md").write_text(markdown(full))
    (bench.out / "tools_readme_section.md").write_text(readme_section(full))
    return result


def _log(bench: BenchLike, name: str, f: dict[str, Any]) -> None:
    def p(key: str) -> str:
        x = f[key]
        return f"p50 {x['p50']} p99 {x['p99']} max {x['max']}"

    bench.log(
        f"  {name:24} n {f['requests']}; cancel->cancelled {p('cancel_to_response_ms')} ms; "
        f"->server learned {p('cancel_to_learned_ms')} ms; work after cancel "
        f"{p('work_after_cancel_ms')} ms; ran to end {f['ran_to_end']}"
    )
    others = f["cpu"]["others_cores"]
    if others > 0.1:
        bench.log(f"  warning: other processes used {others:.2f} cores during {name}")


# -- reports ----------------------------------------------------------------------------------


def _q(
    x: dict[str, Any], digits: int = 2, qs: tuple[str, ...] = ("p50", "p90", "p99", "max")
) -> str:
    return " / ".join(fmt(x[q], digits) for q in qs)


def _machine_line(r: dict[str, Any]) -> str:
    m, v = r["machine"], r["versions"]
    dirty = ", plus uncommitted gateway changes" if m.get("gateway_uncommitted_changes") else ""
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['date']} (commit "
        f"{m['commit']}{dirty}); mcp {v['mcp']}, a2a-sdk {v['a2a-sdk']}, websockets "
        f"{v['websockets']}. Machine idle before the run: {r['machine_idle_before']:.0%}, after: "
        f"{r['machine_idle_after']:.0%}. Run time {r['wall_seconds']} s."
    )


def markdown(r: dict[str, Any]) -> str:
    fl = r["flows"]
    n = r["load"]["per_flow"]
    lines = [
        "# Cancel → MCP tool server / A2A agent: measured at the server"
        + (" (quick smoke: tiny loads, not figures)" if r["quick"] else ""),
        "",
        _machine_line(r),
        "",
        "Reproduce: `python3 -m pip install -e '.[bench,tools,agents]' && python3 bench/run.py "
        "--only tools` (`--quick` for a smoke run; `python3 bench/tools.py render` rewrites "
        "these files from `tools.json`). Code: `bench/tools.py`.",
        "",
        "**Setup.** Every part is a process: the gateway (`python3 -m gateway.cli serve --port 0 "
        '--config FLOW.toml`, `backend = "flow"`, one per flow, its URL from its '
        "`gateway.started` log line), the bundled example MCP server "
        "(`gateway/tools/example_server.py`: on stdio, started by the gateway from `[tools.ex]`; "
        "on streamable HTTP, started by the bench), the bundled example A2A agent "
        f"(`gateway/agents/example_agent.py --events FILE`, {r['agent']['notes']} notes "
        f"{r['agent']['delay_ms']} ms apart). Each flow is one step (`slow_search`, "
        f"`seconds` = {r['tool_seconds']:g}, or the agent) then an `answer` from the simulated "
        "LLM. One request at a time, on one WebSocket (JSON frames): a `chat` with "
        "`\"steps\": true`; at the tool's or agent's `step` `started` message the client waits "
        f"a random {r['cancel_delay_ms'][0]}-{r['cancel_delay_ms'][1]} ms, sends `cancel`, then "
        "waits for the `cancelled` response, the server's records of the call and the final "
        f"`usage` (the pipeline halted). {r['load']['warmup']} warm-up requests per flow, then "
        f"n = {n}.",
        "",
        "**Measured at the server.** The example MCP server and agent append a JSON line per "
        "event with `t` = `time.monotonic()`; the client's instants are `time.monotonic()` too "
        "(CLOCK_MONOTONIC: one clock for every process on Linux, no calibration). *Told*: MCP: "
        "the server's `notifications/cancelled` arrived (its middleware's record); A2A: the "
        "agent's `cancel` handler ran (`tasks/cancel` arrived). *Handler cancelled*: the tool's "
        "handler, or the agent's `execute`, was cancelled mid-way. *Learned*: the earlier of the "
        "two. *Work after the cancel*: the call's last record (`finished`, it ran to its end, "
        "or `cancelled`) minus the cancel. All from the client's `send` of the `cancel`: the "
        "gateway reads it one loopback hop later (estimate below).",
        "",
        "## Cancel → the tool server / agent learned of it, ms",
        "",
        "| flow | protocol | n | told p50 / p90 / p99 / max | handler cancelled p50 / p90 / "
        "p99 / max | learned p50 / p90 / p99 / max |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for f in fl.values():
        told = f"{_q(f['cancel_to_told_ms'])} ({f['told']})" if f["told"] else "none sent"
        lines.append(
            f"| {f['label']} | {f['protocol']} | {f['requests']} | {told} | "
            f"{_q(f['cancel_to_handler_cancelled_ms'])} | {_q(f['cancel_to_learned_ms'])} |"
        )
    lines += [
        "",
        "## Work the tool / agent did after the cancel",
        "",
        "| flow | ran to its end | work after the cancel ms p50 / p90 / p99 / max | what the "
        "call had left at the cancel ms p50 / max | agent notes written after the cancel | "
        "cancel → pipeline halted ms p50 / p99 / max |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, f in fl.items():
        notes = str(f["notes_after_cancel"]) if name == "a2a_agent" else "-"
        lines.append(
            f"| {f['label']} | {f['ran_to_end']} / {f['requests']} | "
            f"{_q(f['work_after_cancel_ms'], 1)} | "
            f"{_q(f['rest_of_call_ms'], 1, ('p50', 'max')) if f['rest_of_call_ms']['n'] else '-'}"
            f" | {notes} | "
            f"{_q(f['cancel_to_halted_ms'], 1, ('p50', 'p99', 'max'))} |"
        )
    lines += [
        "",
        "## Cancel → `cancelled` response (the client's round trip), ms",
        "",
        "| flow | n | p50 / p90 / p99 / max | of which in the gateway (its `request.cancelled` "
        "log line) p50 / p99 | one-way hop estimate p50 / p99 |",
        "|---|---:|---:|---:|---:|",
    ]
    for f in fl.values():
        lines.append(
            f"| {f['label']} | {f['requests']} | {_q(f['cancel_to_response_ms'], 3)} | "
            f"{_q(f['gateway_cancel_to_terminal_ms'], 3, ('p50', 'p99'))} | "
            f"{_q(f['one_way_hop_ms_estimate'], 3, ('p50', 'p99'))} |"
        )
    lines += ["", "## Cross-checks", ""]
    for f in fl.values():
        extra = ""
        if "agent_cancel_log" in f:
            a = f["agent_cancel_log"]
            extra = (
                "; the gateway's `agent.cancel` log lines (warm-up included): final states "
                f"{a['final_states']}, "
                f"delivered {a['delivered']}, `cancel_ms` p50 {fmt(a['cancel_ms']['p50'])} / "
                f"p99 {fmt(a['cancel_ms']['p99'])}"
            )
        lines.append(
            f"- {f['label']}: statuses {f['statuses']}; halts `aborted` {f['aborted_halts']}; "
            f"calls that reached the server only after the cancel was sent "
            f"{f['calls_started_after_cancel']}; chunks received {f['chunks']}; step started → "
            f"cancel sent ms p50 {fmt(f['step_to_cancel_ms']['p50'], 0)}; CPU: measured "
            f"processes {f['cpu']['ours_cores']} cores, others {f['cpu']['others_cores']}"
            f"{extra}."
        )
    lines.append("")
    return "\n".join(lines)


def readme_section(r: dict[str, Any]) -> str:
    fl = r["flows"]
    m = r["machine"]
    n = r["load"]["per_flow"]
    na = fl["mcp_stdio_nonabortable"]
    lines = [
        "**A cancel reaches tools and agents (measured).**",
        "",
        "`python3 bench/run.py --only tools` runs `muxgate serve --config flow.toml` with four "
        "flows, each a step then a simulated answer: the example MCP server's `slow_search` "
        f"({r['tool_seconds']:g} s) on stdio and on streamable HTTP, abortable; the same on stdio, "
        "not abortable; the example A2A agent, abortable. For each, "
        f"{n} chats one at a time, cancelled {r['cancel_delay_ms'][0]}-{r['cancel_delay_ms'][1]} "
        "ms after the tool's `step` started; the server and agent record, with "
        "`time.monotonic()` (the client's clock), when the cancel reached them and when their "
        f"call ended. {m['cores']} cores ({m['cpu']}); method and all figures in "
        "[`bench/results/tools.md`](bench/results/tools.md).",
        "",
        "| flow | cancel → server learned of it, ms p50 / p90 / p99 / max | work after the "
        "cancel, ms p50 / p99 | cancel → `cancelled` response, ms p50 / p99 |",
        "|---|---:|---:|---:|",
    ]
    for f in fl.values():
        learned = (
            _q(f["cancel_to_learned_ms"])
            if f["cancel_to_learned_ms"]["n"]
            else "not told (by design)"
        )
        lines.append(
            f"| {f['label']} | {learned} | {_q(f['work_after_cancel_ms'], 1, ('p50', 'p99'))} | "
            f"{_q(f['cancel_to_response_ms'], 2, ('p50', 'p99'))} |"
        )
    http = fl["mcp_http"]
    hop = fl["mcp_stdio"]["one_way_hop_ms_estimate"]["p50"]
    lines += [
        "",
        "Stdio: the server's `notifications/cancelled` arrives and its handler is cancelled; "
        f"HTTP ({http['protocol']}): "
        + (
            "the gateway closes the request's stream, the server cancels the handler (no "
            "notification is sent under that version)"
            if not http["told"]
            else "`notifications/cancelled` as on stdio"
        )
        + "; A2A: `tasks/cancel` runs the agent's `cancel` handler and its task ends `canceled`. "
        "An abortable call stops at once; the non-abortable one runs to its end "
        f"({na['ran_to_end']} of {na['requests']}): work after the cancel = what it had left "
        f"(p50 {fmt(na['rest_of_call_ms']['p50'], 0)} ms of its {r['tool_seconds']:g} s), and the "
        "pipeline halts after it (no LLM call starts), while "
        "the client has its `cancelled` response at once either way. Times are from the "
        f"client's `send` of the `cancel`; the gateway reads it ~{fmt(hop, 2)} ms later (p50).",
    ]
    idle = min(r["machine_idle_before"], r["machine_idle_after"])
    if idle < 0.9:
        lines += ["", f"The machine was {idle:.0%} idle around the run: other load skews figures."]
    return "\n".join(wrap(line) for line in lines) + "\n"


def main() -> int:
    return render_main("tools", markdown, readme_section)


if __name__ == "__main__":
    raise SystemExit(main())
