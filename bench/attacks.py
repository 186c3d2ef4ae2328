"""Hostile clients for the ``attack`` scenario of ``bench/run.py`` (issue 12, item 8).

    python bench/attacks.py cancel_flood --port PORT --duration 8 --client-key k1

Each attack is a function that attacks the gateway on 127.0.0.1:PORT (loopback only) for
``--duration`` seconds, in this process of its own, while ``bench/loadgen.py normal`` measures
one well-behaved client in another. It prints two JSON lines on stdout: ``{"event": "ready"}``
once the attack is under way (for ``slot_hog``: once its sockets hold the slots; the normal
client starts then), and at the end what the attacker saw (connections, close codes, messages
answered by type, error codes, and a one-line ``summary``).

Every wait is bounded (``asyncio.timeout`` against the end of the attack, and per answer), every
loop ends at the deadline, and a watchdog over the whole run aborts what is left: the gateway
under attack may stall for seconds or stop answering, and this process must end anyway.

The attacks (the six ways of issue 12):

- ``cancel_flood``: one authenticated connection sends frames of 1,000 cancels of unknown
  requests as fast as the connection takes them, reading whatever comes back.
- ``lines_unauth``: 3 connections without credentials each send one 1 MiB text frame of
  ``x`` lines and wait for the answer (or the close); again on new connections.
- ``lines_auth``: 3 authenticated connections send frames of 500,000 one-character lines
  (``1``), the next frame once the previous one was answered.
- ``deep_unauth``: 200 connections without credentials each send one line nested 1,000 deep
  around a 20-digit integer; again on new connections.
- ``deep_auth``: 200 authenticated connections send the same nesting inside a ``cancel``
  (after a ``ping``, so that it is not the connection's first message).
- ``slot_hog``: 200 connections complete the handshake and never send anything (the gateway
  runs with ``--max-connections 200``); a dropped or refused one is reopened after 0.1 s.
- ``ping_flood``: 5,000 pings a second in frames of 50 on an authenticated connection; a new
  connection when it is closed (4029).
- ``tracebacks``: ``/v1/stats`` subscribers that reset their TCP connection (RST), right after
  the handshake or after the first snapshot, in a loop; and chats with ``"metadata":
  {"tokens": true}`` at 200 a second on an authenticated connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loadgen import _emit, _runner
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

monotonic = time.monotonic

SUBPROTOCOL = "muxgate.v1.json"
#: Longest time the attack may take to get under way before ``ready``.
SETUP_MAX = 10.0
#: Longest wait for the answer to one probe (then the connection is dropped and reopened).
ANSWER_TIMEOUT = 5.0

_TYPE = re.compile(rb'"type":"([a-z_]+)"')
_CODE = re.compile(rb'"code":"([a-z_]+)"')


@dataclass
class Tally:
    """What the attacker saw. ``closes``: close code received -> count (``dropped``: the TCP
    connection ended without a close frame); ``first_close_s``: when each code first came,
    in seconds since ``ready``."""

    t_ready: float = 0.0
    connections: int = 0
    connect_failed: dict[str, int] = field(default_factory=dict)
    frames_sent: int = 0
    messages_sent: int = 0
    bytes_sent: int = 0
    frames_received: int = 0
    received: dict[str, int] = field(default_factory=dict)
    error_codes: dict[str, int] = field(default_factory=dict)
    closes: dict[str, int] = field(default_factory=dict)
    first_close_s: dict[str, float] = field(default_factory=dict)
    answer_timeouts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def bump(counts: dict[str, int], key: str, n: int = 1) -> None:
        counts[key] = counts.get(key, 0) + n

    def sent(self, frame: str | bytes, messages: int) -> None:
        self.frames_sent += 1
        self.messages_sent += messages
        self.bytes_sent += len(frame)

    def got(self, frame: str | bytes) -> None:
        data = frame.encode() if isinstance(frame, str) else frame
        self.frames_received += 1
        for kind in _TYPE.findall(data):
            self.bump(self.received, kind.decode())
        if b'"code"' in data:
            for code in _CODE.findall(data):
                self.bump(self.error_codes, code.decode())

    def closed(self, exc: ConnectionClosed | None) -> None:
        rcvd = exc.rcvd if exc is not None else None
        code = str(rcvd.code) if rcvd is not None else "dropped"
        self.bump(self.closes, code)
        if code not in self.first_close_s and self.t_ready:
            self.first_close_s[code] = round(monotonic() - self.t_ready, 3)

    def failed(self, exc: BaseException) -> None:
        self.bump(self.connect_failed, type(exc).__name__)


class Attack:
    """The shared state of one attack run: port, credentials, deadline, open sockets."""

    def __init__(self, port: int, client_key: str, duration: float) -> None:
        self.port = port
        self.client_key = client_key
        self.duration = duration
        self.tally = Tally()
        self.deadline = monotonic() + SETUP_MAX + duration  # until ready() sets the real one
        self.sockets: set[ClientConnection] = set()
        self.is_ready = False

    def ready(self) -> None:
        if self.is_ready:
            return
        self.is_ready = True
        self.tally.t_ready = monotonic()
        self.deadline = self.tally.t_ready + self.duration
        _emit({"event": "ready"})

    def left(self) -> float:
        return self.deadline - monotonic()

    async def open(
        self, *, auth: bool, path: str = "/v1/ws", subprotocol: bool = True
    ) -> ClientConnection | None:
        """A WebSocket connection (handshake done), or None after a failure and a short pause."""
        left = self.left()
        if left <= 0:
            return None
        try:
            ws = await connect(
                f"ws://127.0.0.1:{self.port}{path}",
                subprotocols=[SUBPROTOCOL] if subprotocol else None,  # type: ignore[list-item]
                additional_headers={"X-Muxi-Client-Key": self.client_key} if auth else None,
                compression=None,
                max_size=1 << 24,
                open_timeout=max(0.05, min(ANSWER_TIMEOUT, left)),
                ping_interval=None,
                close_timeout=1,
            )
        except Exception as exc:
            if not (isinstance(exc, TimeoutError) and self.left() <= 0):  # not the deadline's
                self.tally.failed(exc)
            await asyncio.sleep(max(0.0, min(0.05, self.left())))
            return None
        self.tally.connections += 1
        self.sockets.add(ws)
        return ws

    def drop(self, ws: ClientConnection, *, reset: bool = False) -> None:
        """Abort the TCP connection; ``reset``: with an RST (SO_LINGER 0), not a FIN."""
        if reset:
            sock = ws.transport.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.transport.abort()
        self.sockets.discard(ws)

    async def send(self, ws: ClientConnection, frame: str | bytes, messages: int) -> None:
        """Send one frame, never past the deadline (TimeoutError then)."""
        async with asyncio.timeout(max(0.0, self.left())):
            await ws.send(frame)
        self.tally.sent(frame, messages)

    async def read_all(self, ws: ClientConnection) -> None:
        """Count everything the gateway sends until the connection ends (its close code)."""
        try:
            while True:
                self.tally.got(await ws.recv(decode=False))
        except ConnectionClosed as exc:
            self.tally.closed(exc)

    # -- patterns ------------------------------------------------------------------------------

    async def flood(
        self, frames: Callable[[int], tuple[str, int]], *, auth: bool, pace: float | None = None
    ) -> None:
        """One connection at a time: send ``frames(i)`` (frame, messages in it) as fast as the
        connection takes them (or one per ``pace`` s) while reading everything; reopen it when
        the gateway closes it; until the deadline."""
        i = 0
        while self.left() > 0:
            ws = await self.open(auth=auth)
            if ws is None:
                continue
            reader = asyncio.create_task(self.read_all(ws))
            next_t = monotonic()
            try:
                while not reader.done() and self.left() > 0:
                    frame, messages = frames(i)
                    i += 1
                    await self.send(ws, frame, messages)
                    if pace is not None:
                        next_t += pace
                        await asyncio.sleep(max(0.0, min(next_t, self.deadline) - monotonic()))
            except (ConnectionClosed, TimeoutError):
                pass
            # The reader records the close code (if it comes soon); then the socket goes.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(reader), max(0.0, min(1.0, self.left())))
            self.drop(ws)
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def probe(
        self, payload: str | bytes, messages: int, *, auth: bool, greet: bool = False
    ) -> None:
        """Send ``payload`` and wait for the answer (at most ANSWER_TIMEOUT); authenticated,
        again on the same connection while it stays open; unauthenticated (no later message
        can count: the gateway refuses and closes), again on a new connection at once, as
        after a close. ``greet``: a ``ping`` first, answered (so that the payload is not the
        connection's first message)."""
        while self.left() > 0:
            ws = await self.open(auth=auth)
            if ws is None:
                continue
            try:
                if greet:  # not counted with the payload's: the ping, its welcome and pong
                    async with asyncio.timeout(max(0.0, min(ANSWER_TIMEOUT, self.left()))):
                        await ws.send('{"type":"ping","id":"hi"}')
                        while b'"pong"' not in await ws.recv(decode=False):
                            pass
                    self.tally.bump(self.tally.extra, "greeted")
                while self.left() > 0:
                    await self.send(ws, payload, messages)
                    wait = min(ANSWER_TIMEOUT, self.left())
                    try:
                        async with asyncio.timeout(wait):
                            self.tally.got(await ws.recv(decode=False))
                    except TimeoutError:
                        if wait == ANSWER_TIMEOUT:
                            self.tally.answer_timeouts += 1
                        break
                    if not auth:
                        break
            except ConnectionClosed as exc:
                self.tally.closed(exc)
            except TimeoutError:
                pass
            self.drop(ws)

    async def workers(self, n: int, work: Callable[[], Awaitable[None]]) -> None:
        await asyncio.gather(*(work() for _ in range(n)))


# -- the attacks -----------------------------------------------------------------------------------


async def cancel_flood(at: Attack) -> None:
    frames = [
        "\n".join(f'{{"type":"cancel","request_id":"nope-{k * 1000 + j}"}}' for j in range(1000))
        for k in range(4)
    ]
    at.ready()
    await at.flood(lambda i: (frames[i % 4], 1000), auth=True)


async def lines_unauth(at: Attack) -> None:
    frame = "x\n" * (1 << 19)  # 1 MiB, the gateway's largest frame
    at.ready()
    await at.workers(3, lambda: at.probe(frame, 1 << 19, auth=False))


async def lines_auth(at: Attack) -> None:
    frame = "1\n" * 500_000  # 1,000,000 bytes of valid one-character JSON lines
    at.ready()
    await at.workers(3, lambda: at.probe(frame, 500_000, auth=True))


DEEP = "[" * 1000 + "12345678901234567890" + "]" * 1000


async def deep_unauth(at: Attack) -> None:
    at.ready()
    await at.workers(200, lambda: at.probe(DEEP, 1, auth=False))


async def deep_auth(at: Attack) -> None:
    line = '{"type":"cancel","request_id":"deep-1","x":' + DEEP + "}"
    at.ready()
    # After a ping: an authenticated connection's frames are decoded and handled in the
    # callback that read them (gateway/connection.py), not only its first message.
    await at.workers(200, lambda: at.probe(line, 1, auth=True, greet=True))


async def slot_hog(at: Attack, slots: int = 200, reopen_after: float = 0.1) -> None:
    holding = 0

    async def hog() -> None:
        nonlocal holding
        while at.left() > 0:
            ws = await at.open(auth=False)
            if ws is None:
                continue
            holding += 1
            try:
                while at.left() > 0:  # in steps: ready() moves the deadline
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, min(0.5, at.left()))):
                            at.tally.got(await ws.recv(decode=False))  # cancelling is safe
            except ConnectionClosed as exc:
                at.tally.closed(exc)
            holding -= 1
            at.drop(ws)
            # Reopen, but not in a tight loop: a gateway that refuses at once would turn this
            # into a handshake flood (another attack).
            await asyncio.sleep(max(0.0, min(reopen_after, at.left())))

    tasks = [asyncio.create_task(hog()) for _ in range(slots)]
    # Under way once every slot is held, or once the count stops rising for a second (a
    # gateway that refuses some of them), within SETUP_MAX.
    most = 0
    t_rise = t0 = monotonic()
    while holding < slots and monotonic() - t0 < SETUP_MAX and monotonic() - t_rise < 1.0:
        await asyncio.sleep(0.05)
        if holding > most:
            most, t_rise = holding, monotonic()
    at.tally.extra["held_at_ready"] = holding
    at.ready()
    await asyncio.gather(*tasks)


async def ping_flood(at: Attack, per_s: int = 5000, per_frame: int = 50) -> None:
    def frame(i: int) -> tuple[str, int]:
        base = i * per_frame
        return "\n".join(f'{{"type":"ping","id":{base + j}}}' for j in range(per_frame)), per_frame

    at.ready()
    await at.flood(frame, auth=True, pace=per_frame / per_s)


async def tracebacks(at: Attack, subscribers: int = 20, chats_per_s: int = 200) -> None:
    extra = at.tally.extra
    extra.update(stats_resets=0, stats_snapshots=0)

    async def resetting_subscriber(k: int) -> None:
        n = 0
        while at.left() > 0:
            ws = await at.open(auth=False, path="/v1/stats", subprotocol=False)
            if ws is None:
                continue
            n += 1
            if (n + k) % 2:  # half of them after the first snapshot, half at once
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(max(0.0, min(2.0, at.left()))):
                        await ws.recv(decode=False)
                        extra["stats_snapshots"] += 1
            at.drop(ws, reset=True)
            extra["stats_resets"] += 1

    def chat(i: int) -> tuple[str, int]:
        return (
            f'{{"type":"chat","request_id":"tb-{i}","message":"hi","stream":true,'
            '"metadata":{"tokens":true}}',
            1,
        )

    at.ready()
    await asyncio.gather(
        at.flood(chat, auth=True, pace=1 / chats_per_s),
        *(resetting_subscriber(k) for k in range(subscribers)),
    )


ATTACKS: dict[str, Callable[[Attack], Awaitable[None]]] = {
    "cancel_flood": cancel_flood,
    "lines_unauth": lines_unauth,
    "lines_auth": lines_auth,
    "deep_unauth": deep_unauth,
    "deep_auth": deep_auth,
    "slot_hog": slot_hog,
    "ping_flood": ping_flood,
    "tracebacks": tracebacks,
}


def summary(name: str, t: Tally) -> str:
    """The attacker's outcome in one line (the table's last column)."""
    closes = ", ".join(f"{c} x{n}" for c, n in sorted(t.closes.items())) or "none received"
    first = ", ".join(f"{c} after {s:g} s" for c, s in sorted(t.first_close_s.items()))
    answered = sum(n for kind, n in t.received.items() if kind != "welcome")
    conns = f"{t.connections:,} connection{'s' if t.connections != 1 else ''}"
    parts = [conns, f"closes: {closes}"]
    if name == "ping_flood":
        parts = [
            f"{t.received.get('pong', 0):,} pongs",
            f"{t.error_codes.get('rate_limited', 0):,} rate_limited",
            f"closes: {closes}" + (f" (first {first})" if first else ""),
            conns,
        ]
    elif name == "slot_hog":
        parts.insert(1, f"{t.extra.get('held_at_ready', 0)} held at start")
    elif name == "tracebacks":
        parts = [
            f"{t.extra.get('stats_resets', 0):,} stats resets",
            f"{t.messages_sent:,} chats, {answered:,} answers",
            f"closes: {closes}",
        ]
    else:
        parts.append(f"{t.messages_sent:,} msgs sent in {t.frames_sent:,} frames")
        parts.append(f"{answered:,} answered")
    if t.answer_timeouts:
        parts.append(f"{t.answer_timeouts} unanswered in {ANSWER_TIMEOUT:g} s")
    if t.connect_failed:
        parts.append(f"failed connects {sum(t.connect_failed.values())}")
    return "; ".join(parts)


async def run(name: str, port: int, client_key: str, duration: float) -> dict[str, Any]:
    at = Attack(port, client_key, duration)
    t0 = monotonic()
    watchdog = False
    try:
        async with asyncio.timeout(SETUP_MAX + duration + 5):
            await ATTACKS[name](at)
    except TimeoutError:
        watchdog = True
    for ws in list(at.sockets):
        at.drop(ws)
    t = at.tally
    return {
        "attack": name,
        "seconds": round(monotonic() - (t.t_ready or t0), 3),
        "ready_after_s": round(t.t_ready - t0, 3) if t.t_ready else None,
        "watchdog_fired": watchdog,
        "connections": t.connections,
        "connect_failed": t.connect_failed,
        "frames_sent": t.frames_sent,
        "messages_sent": t.messages_sent,
        "mib_sent": round(t.bytes_sent / 2**20, 1),
        "frames_received": t.frames_received,
        "received": t.received,
        "error_codes": t.error_codes,
        "closes": t.closes,
        "first_close_s": t.first_close_s,
        "answer_timeouts": t.answer_timeouts,
        **t.extra,
        "summary": summary(name, t),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attack", choices=sorted(ATTACKS))
    p.add_argument("--port", type=int, required=True, help="the gateway on 127.0.0.1")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--client-key", default="k1")
    a = p.parse_args()
    result = _runner()(run(a.attack, a.port, a.client_key, a.duration))
    _emit(result)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
