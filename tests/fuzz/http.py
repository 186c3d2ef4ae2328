"""Fuzz the gateway's own HTTP/1.1 transport: ``gateway.transport.HttpConnection``.

The entry point is the real one, the ``asyncio.Protocol`` the server runs per TCP connection:
``connection_made``, then ``data_received`` with the client's bytes split at fuzzed points, then
``eof_received`` (per flag) and ``connection_lost``; its h11 parsing, refusals (400/413/431/501,
lingering close), keep-alive and pipelining, backpressure (``pause_writing``), the WebSocket
upgrade through websockets' sans-I/O server and the frames after it all run as in the server.
Around it: a fake socket (``_Transport``: what asyncio's transport does, including refusing a
write after ``write_eof``) and a small application standing in for the gateway (``_App``: the
gateway's routing decisions, no backend; answers synchronously or as an awaitable).

Input: byte 0 = flags (``_formats.HTTP_*``), byte 1 = split (0: one read; n: the stream cut at
n points, from a PRNG seeded with n: n + 1 reads), then the bytes the client sends.

Properties:

- nothing raises out of the protocol's methods, nothing is logged at error level by the
  transport (``http.response_refused``, ``http.handler_failed``: the application here never
  fails), and the event loop reports no exception from a callback;
- once the client stops sending, the connection is closed, or a WebSocket, or waiting for the
  application, or has a deadline (the gateway's watchdog closes it): never open for ever;
- everything written is valid HTTP/1.1, parsed by an h11 client: one response per request the
  application answered, in order, each with the status it gave (HEAD answered without a body),
  then at most one refusal with an error status h11 (or the body limit) hints, and nothing
  after a response that closes; an accepted upgrade is answered 101 (the rest are WebSocket
  frames) or refused by websockets (400, 414, 426, 431), never by a silent close.

Its findings (issue 18), fixed since, and run by the test suite from
``tests/fuzz/regressions/``: a header value with a control byte (h11 accepts it, websockets'
``Headers`` do not) escaped ``data_received`` (now: 400); the same, pipelined after an
asynchronous answer, escaped to the loop and left the connection open for ever; a request body
that stops half-way left the connection with no deadline (now: the keep-alive's); a handshake
over websockets' own parser limits was closed without a response (now: websockets' 431/414).

Run: ``python3 -m tests.fuzz.http [libFuzzer flags] [corpus dirs]``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import atheris

from tests.fuzz import _formats as f

with atheris.instrument_imports(include=["gateway", "h11", "websockets"]):
    import h11
    from websockets.exceptions import NegotiationError
    from websockets.typing import Subprotocol

    from gateway.transport import (
        HttpConnection,
        HttpRequest,
        HttpResponse,
        WebSocket,
    )

WS_PATH = "/v1/ws"
SUBPROTOCOLS = (Subprotocol("muxgate.v1.msgpack"), Subprotocol("muxgate.v1.json"))
#: gateway/connection.py: PREAUTH_MAX_FRAME_BYTES + a frame's header.
PREAUTH_INPUT = 16_384 + 14
#: What h11 hints for a request it cannot parse, and the transport's own 413.
REFUSALS = frozenset((400, 413, 431, 501))
#: websockets' refusals of a handshake h11 accepted (bad key or version: 400; no upgrade: 426).
WEBSOCKET_REFUSALS = frozenset((400, 414, 426, 431))


@dataclass(slots=True)
class _Answer:
    """A request the application answered: how, so the response can be checked."""

    method: str
    status: int | None  # None: an accepted upgrade (websockets answers)
    #: An accepted upgrade: its request.
    upgrade: HttpRequest | None = None


@dataclass(slots=True)
class _Handler:
    socket: WebSocket
    echo: bool
    messages: list[tuple[bytes, bool]] = field(default_factory=list)

    def message(self, data: bytes, text: bool) -> None:
        assert type(data) is bytes, type(data)
        self.messages.append((data, text))
        self.socket.limit_input(None)  # "welcomed": frames up to max_message_bytes from now on
        if self.echo and self.socket.writable():
            self.socket.write(data, text)

    def lost(self) -> None:
        pass


class _App:
    """The gateway's Application in miniature (gateway/server.py, gateway/http_api.py)."""

    max_message_bytes = 1 << 20
    subprotocols: Sequence[Subprotocol] = SUBPROTOCOLS

    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.answers: list[_Answer] = []
        self.handlers: list[_Handler] = []

    def select_subprotocol(self, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        for name in SUBPROTOCOLS:
            if name in offered:
                return name
        if offered:
            raise NegotiationError("unsupported subprotocols")
        return None

    def _response(self, request: HttpRequest) -> HttpResponse:
        status = 200
        _, _, code = request.path.partition("/status/")
        if (
            len(code) == 3
            and code.isdigit()
            and 200 <= int(code) <= 599
            and code not in ("204", "304")
        ):
            status = int(code)  # 204 and 304 carry no body; the transport sends Content-Length
        if request.method == "CONNECT":
            # Every route of the gateway answers another method than its own 405 (http_api.py);
            # a 2xx to CONNECT would switch protocols (h11), which no route of it does.
            status = 405
        body = request.target.encode("ascii", "replace")[:64]
        self.answers.append(_Answer(request.method, status))
        return HttpResponse(status, [("Content-Type", "text/plain")], body)

    def http(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        assert isinstance(request, HttpRequest)
        if self.flags & f.HTTP_ASYNC or request.path.startswith("/a/"):
            return self._later(request)
        return self._response(request)

    async def _later(self, request: HttpRequest) -> HttpResponse:
        await asyncio.sleep(0)
        return self._response(request)

    def is_websocket(self, request: HttpRequest) -> bool:
        return request.path == WS_PATH

    def upgrade(self, request: HttpRequest) -> HttpResponse | None:
        if request.method != "GET":
            self.answers.append(_Answer(request.method, 405))
            return HttpResponse(405, [("Allow", "GET")], b"method not allowed")
        if self.flags & f.HTTP_REFUSE_UPGRADE:
            self.answers.append(_Answer(request.method, 503))
            return HttpResponse(503, [], b"shutting down")
        self.answers.append(_Answer(request.method, None, upgrade=request))
        return None

    def opened(self, request: HttpRequest, socket: WebSocket) -> _Handler:
        if self.flags & f.HTTP_LIMIT_INPUT:
            socket.limit_input(PREAUTH_INPUT)
        handler = _Handler(socket, echo=bool(self.flags & f.HTTP_ECHO))
        self.handlers.append(handler)
        return handler

    def connection_made(self, conn: HttpConnection) -> None:
        pass

    def connection_lost(self, conn: HttpConnection) -> None:
        pass


class _Transport:
    """An asyncio transport without a socket: records what is written; pauses the protocol's
    writing above its high-water mark until the client "reads" (``drain``)."""

    def __init__(self, flags: int) -> None:
        self.protocol: HttpConnection | None = None
        self.out = bytearray()
        self.reading = True
        self.closing = False
        self.eof_written = False
        self.stall = bool(flags & f.HTTP_STALL)
        self.can_eof = not flags & f.HTTP_NO_WRITE_EOF
        self.high = 64 if self.stall else 1 << 16
        self.buffered = 0
        self.write_paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if not self.stall and high is not None:
            self.high = high

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("198.51.100.7", 50_000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:  # asyncio's selector transport does the same
            raise RuntimeError("Cannot call write() after write_eof()")
        self.out += data
        self.buffered += len(data)
        if self.buffered > self.high and not self.write_paused and not self.closing:
            self.write_paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()

    def drain(self) -> None:
        """The client read everything written."""
        self.buffered = 0
        if self.write_paused and not self.closing:
            self.write_paused = False
            assert self.protocol is not None
            try:
                self.protocol.resume_writing()
            except Exception as exc:  # what asyncio does (_maybe_resume_protocol)
                message = "protocol.resume_writing() failed"
                context = {"message": message, "exception": exc, "protocol": self.protocol}
                asyncio.get_running_loop().call_exception_handler(context)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return self.can_eof

    def write_eof(self) -> None:
        assert self.can_eof, "write_eof on a transport that cannot"
        self.eof_written = True


class _Errors(logging.Handler):
    """Error records of the transport's loggers: each one is a finding here."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


ERRORS = _Errors()
for _name in ("muxgate.transport", "muxgate.websockets"):
    logging.getLogger(_name).addHandler(ERRORS)
LOOP = asyncio.new_event_loop()
LOOP_ERRORS: list[dict[str, Any]] = []
LOOP.set_exception_handler(lambda _loop, context: LOOP_ERRORS.append(context))


def _chunks(stream: bytes, split: int) -> list[bytes]:
    """``stream`` cut at ``split`` points (positions from a PRNG seeded with ``split``)."""
    if len(stream) < 2 or not split:
        return [stream] if stream else []
    rng = random.Random(split)
    cuts = sorted(rng.sample(range(1, len(stream)), min(split, len(stream) - 1)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@dataclass(slots=True)
class _Outcome:
    app: _App
    transport: _Transport
    #: Why the connection was left open with nothing to close it (None: it was not).
    stuck: str | None


async def _drive(flags: int, chunks: list[bytes]) -> _Outcome:
    app = _App(flags)
    transport = _Transport(flags)
    conn = HttpConnection(app, write_limit=1 << 15, keepalive=10.0)
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        for _ in range(8):  # reading paused: an answer being computed, or backpressure
            if transport.closing or transport.reading:
                break
            await asyncio.sleep(0)
            transport.drain()
        if transport.closing or not transport.reading:
            break
        conn.data_received(chunk)
        if not transport.stall:
            transport.drain()
    await _turns(3)
    if flags & f.HTTP_EOF and not transport.closing:
        if not conn.eof_received():
            transport.close()  # asyncio closes the transport itself
        await _turns(3)
    transport.drain()
    await _turns(3)
    stuck = _stuck(conn, transport)
    conn.connection_lost(None)
    await _turns(2)
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.cancel()
    await _turns(2)
    return _Outcome(app, transport, stuck)


def _stuck(conn: HttpConnection, transport: _Transport) -> str | None:
    """Why the client can hold this connection open for ever, or None.

    Open, not a WebSocket (pinged), no answer being computed (the application's time), and no
    deadline: the gateway's watchdog (server.py ``_watch_writers``) would never close it.
    """
    if transport.closing or conn.websocket is not None or conn.deadline is not None:
        return None
    if conn._busy:
        return None
    parser = conn._h11
    state = (parser.our_state, parser.their_state) if parser is not None else None
    return f"an HTTP connection left open with no deadline (h11 states {state})"


def _check_output(out: bytes, answers: list[_Answer]) -> None:
    """Parse what the transport wrote as the responses to ``answers``, then one refusal."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(out)
    expected = [*answers, _Answer("GET", None)]  # the last: a refusal, if any
    for index, answer in enumerate(expected):
        refusal = index == len(answers)
        pending, _ = client.trailing_data
        if not pending:
            if answer.upgrade is not None:
                raise AssertionError("an accepted upgrade was closed without any response")
            return  # nothing more was answered (the connection ended first)
        headers = [("Host", "fuzz")]
        if answer.upgrade is not None:
            headers += [("Connection", "Upgrade"), ("Upgrade", "websocket")]
        client.send(h11.Request(method=answer.method, target="/", headers=headers))
        client.send(h11.EndOfMessage())
        status = None
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                raise AssertionError(f"a truncated response: {bytes(pending[:200])!r}")
            if isinstance(event, h11.InformationalResponse):
                assert event.status_code == 101, f"informational {event.status_code}"
                assert answer.upgrade is not None, "101 without an accepted upgrade"
                return  # the rest are WebSocket frames
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                break
        if refusal:
            assert status in REFUSALS, f"a refusal with status {status}"
        elif answer.upgrade is not None:
            assert status in WEBSOCKET_REFUSALS, f"websockets answered an upgrade {status}"
        else:
            assert status == answer.status, f"answered {answer.status}, sent {status}"
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
            continue
        rest, _ = client.trailing_data
        assert not rest, f"bytes after a response that closes: {bytes(rest[:200])!r}"
        return
    rest, _ = client.trailing_data
    raise AssertionError(f"more responses than requests: {bytes(rest[:200])!r}")


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, split, stream = data[0], data[1], data[2:]
    ERRORS.records.clear()
    LOOP_ERRORS.clear()
    outcome = LOOP.run_until_complete(_drive(flags, _chunks(stream, split)))
    if ERRORS.records:
        record = ERRORS.records[0]
        raise AssertionError(f"the transport logged an error: {record.getMessage()}") from (
            record.exc_info[1] if record.exc_info else None
        )
    if LOOP_ERRORS:
        context = LOOP_ERRORS[0]
        raise AssertionError(f"the event loop caught: {context.get('message')}") from context.get(
            "exception"
        )
    if outcome.stuck is not None:
        raise AssertionError(outcome.stuck)
    _check_output(bytes(outcome.transport.out), outcome.app.answers)


def main() -> None:
    f.fuzz(test_one_input, max_len=32_768)


if __name__ == "__main__":
    main()
