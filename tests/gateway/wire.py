"""A strict test client for end-to-end tests: real WebSocket, real frames, protocol-checked.

Every frame the gateway sends is decoded with ``protocol`` and fed to a client-side
:class:`RequestStateMachine` per request, so any violation of G1-G3 (a chunk after the response,
a seq gap, content differing from the chunks, a second response) raises in the reader and fails
the test. Tests wait on events (``asyncio.Condition``), never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

import protocol
from protocol import (
    Cancel,
    CancelResult,
    Chat,
    Chunk,
    Codec,
    Error,
    GatewayMessage,
    Message,
    Moved,
    RemoteProtocolError,
    RequestStateMachine,
    Response,
    Resumable,
    Resume,
    ResumeResult,
    Sender,
    Step,
    UsageReport,
    Welcome,
)


@dataclass
class Track:
    """What one request received."""

    machine: RequestStateMachine
    chunks: list[Chunk] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    response: Response | None = None
    usage_report: UsageReport | None = None
    cancel_results: list[CancelResult] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)
    #: monotonic times
    cancel_sent_at: float | None = None
    response_at: float | None = None
    #: chunks received after this client sent its first cancel (in flight; allowed)
    chunks_after_cancel_sent: int = 0
    #: every message about this request, in arrival order
    log: list[GatewayMessage] = field(default_factory=list)
    #: resumable requests (SPEC.md §5.8): the gateway's ``resumable``, resume results, moved
    resumable: Resumable | None = None
    resume_results: list[ResumeResult] = field(default_factory=list)
    moved: bool = False
    #: monotonic time the chat or resume that opened this track was sent
    opened_at: float = field(default_factory=time.monotonic)


class WireClient:
    def __init__(self, ws: ClientConnection, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec
        self.tracks: dict[str, Track] = {}
        self.welcome: Welcome | None = None
        self.errors: list[Error] = []  # errors without request_id
        self.others: list[Message] = []  # pongs etc.
        self.frames = 0
        self.violations: list[BaseException] = []
        #: abort() cut the TCP connection: the reader's end is not a violation.
        self.aborted = False
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        url: str,
        codec: Codec = Codec.JSON,
        *,
        headers: Mapping[str, str] | None = None,
        subprotocols: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        protos = [codec.subprotocol] if subprotocols is None else subprotocols
        ws = await connect(
            url,
            subprotocols=protos,  # type: ignore[arg-type]
            additional_headers=dict(headers or {}),
            max_size=protocol.limits.MAX_FRAME_BYTES,
            **kwargs,
        )
        async with ws, cls.attach(ws, codec) as client:
            yield client

    @classmethod
    @contextlib.asynccontextmanager
    async def attach(cls, ws: ClientConnection, codec: Codec) -> Any:
        """The strict client over a connection opened by hand; raises its first violation."""
        client = cls(ws, codec)
        try:
            yield client
        finally:
            client._reader.cancel()
            with contextlib.suppress(BaseException):
                await client._reader
        if client.violations:
            raise client.violations[0]

    # -- sending -----------------------------------------------------------------------------

    async def send(self, *messages: Message) -> None:
        await self.send_raw(protocol.encode_batch(messages, self.codec))

    async def send_raw(self, data: bytes | str) -> None:
        if isinstance(data, bytes) and self.codec.is_text:
            await self.ws.send(data, text=True)
        else:
            await self.ws.send(data)

    async def chat(self, request_id: str, message: str = "hello", **fields: Any) -> Track:
        track = self.track(
            request_id,
            stream=fields.get("stream", True),
            resumable=fields.get("resumable", False),
        )
        await self.send(Chat(request_id=request_id, message=message, **fields))
        return track

    def track(self, request_id: str, *, stream: bool = True, resumable: bool = False) -> Track:
        machine = RequestStateMachine(request_id, Sender.CLIENT, stream=stream, resumable=resumable)
        track = Track(machine)
        self.tracks[request_id] = track
        return track

    async def resume(
        self, request_id: str, epoch: str, after_seq: int | None = None, **fields: Any
    ) -> Track:
        """Send ``resume``; the new track follows the request from ``after_seq + 1``."""
        machine = RequestStateMachine.resuming(request_id, epoch, after_seq)
        track = self.tracks[request_id] = Track(machine)
        await self.send(Resume(request_id=request_id, epoch=epoch, after_seq=after_seq, **fields))
        return track

    async def resume_result(self, request_id: str, timeout: float = 10.0) -> ResumeResult:
        track = self.tracks[request_id]
        await self.wait_for(lambda: bool(track.resume_results) or bool(track.errors), timeout)
        if not track.resume_results:
            raise AssertionError(f"resume refused: {track.errors}")
        return track.resume_results[0]

    async def resumable(self, request_id: str, timeout: float = 10.0) -> Resumable:
        track = self.tracks[request_id]
        await self.wait_for(lambda: track.resumable is not None, timeout)
        assert track.resumable is not None
        return track.resumable

    async def cancel(self, request_id: str, **fields: Any) -> None:
        track = self.tracks.get(request_id)
        if track is not None:
            track.machine.on_cancel()
            if track.cancel_sent_at is None:
                track.cancel_sent_at = time.monotonic()
        await self.send(Cancel(request_id=request_id, **fields))

    def abort(self) -> None:
        """Cut the TCP connection without a close frame (a network drop, a killed tab)."""
        self.aborted = True
        self.ws.transport.abort()

    # -- waiting -----------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: predicate() or bool(self.violations))
        if self.violations:
            raise self.violations[0]

    async def response(self, request_id: str, timeout: float = 10.0) -> Response:
        track = self.tracks[request_id]
        await self.wait_for(lambda: track.response is not None, timeout)
        assert track.response is not None
        return track.response

    async def chunks(self, request_id: str, n: int, timeout: float = 10.0) -> None:
        track = self.tracks[request_id]
        await self.wait_for(lambda: len(track.chunks) >= n or track.response is not None, timeout)

    async def cancel_result(self, request_id: str, timeout: float = 10.0) -> CancelResult:
        track = self.tracks[request_id]
        await self.wait_for(lambda: bool(track.cancel_results), timeout)
        return track.cancel_results[0]

    async def final_usage(self, request_id: str, timeout: float = 10.0) -> protocol.Usage:
        track = self.tracks[request_id]
        await self.wait_for(
            lambda: (
                track.response is not None
                and (track.response.usage.final or track.usage_report is not None)
            ),
            timeout,
        )
        assert track.response is not None
        if track.response.usage.final:
            return track.response.usage
        assert track.usage_report is not None
        return track.usage_report.usage

    # -- reading -----------------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                if isinstance(data, str) != self.codec.is_text:
                    raise AssertionError("frame kind does not match the codec")
                self.frames += 1
                for item in protocol.decode(data, self.codec, Sender.GATEWAY):
                    if isinstance(item, RemoteProtocolError):
                        raise item
                    self._on_message(item)  # type: ignore[arg-type]
                async with self._changed:
                    self._changed.notify_all()
        except Exception as exc:  # a protocol violation by the gateway fails the test
            if not isinstance(exc, asyncio.CancelledError) and not self.aborted:
                self.violations.append(exc)
        finally:
            async with self._changed:
                self._changed.notify_all()

    def _on_message(self, m: GatewayMessage) -> None:
        rid = getattr(m, "request_id", None)
        track = self.tracks.get(rid) if rid is not None else None
        if isinstance(m, Welcome):
            if self.welcome is not None:
                raise AssertionError("second welcome")
            self.welcome = m
            return
        if isinstance(m, Error):
            (track.errors if track is not None else self.errors).append(m)
            if track is not None:
                track.log.append(m)
            return
        if track is None:
            if rid is not None and not isinstance(m, CancelResult):
                raise AssertionError(f"message for unknown request {rid}: {m}")
            if isinstance(m, CancelResult):  # a cancel for an id this client never chatted
                self.others.append(m)
                return
            self.others.append(m)
            return
        track.log.append(m)
        if isinstance(m, Chunk):
            track.machine.on_chunk(m.seq, m.text)
            track.chunks.append(m)
            if track.cancel_sent_at is not None:
                track.chunks_after_cancel_sent += 1
        elif isinstance(m, Step):
            track.machine.on_step(m)
            track.steps.append(m)
        elif isinstance(m, Response):
            track.machine.on_response(m)
            track.response = m
            track.response_at = time.monotonic()
        elif isinstance(m, UsageReport):
            track.machine.on_usage(m)
            track.usage_report = m
        elif isinstance(m, CancelResult):
            track.machine.on_cancel_result(m)
            track.cancel_results.append(m)
        elif isinstance(m, Resumable):
            track.machine.on_resumable(m)
            track.resumable = m
        elif isinstance(m, ResumeResult):
            track.machine.on_resume_result(m)
            track.resume_results.append(m)
        elif isinstance(m, Moved):
            track.machine.on_moved()
            track.moved = True
