"""Typed protocol messages (SPEC.md §3-§4).

A *message* is one protocol object with a ``type``; a WebSocket *frame* carries one or more
messages (batching, SPEC.md §2.4). Every message is a frozen, slotted dataclass, named by the
noun on the wire, and validated at construction: an invalid message cannot exist. Constructing one
with bad fields raises :class:`LocalProtocolError`; :func:`parse_message` turns a decoded peer
object into a message and reports the same failure as :class:`RemoteProtocolError`.

Field order in each class is the canonical order on the wire (SPEC.md §9): ``type`` first, then
the fields as declared; optional fields that are ``None`` are omitted.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import orjson

from . import limits
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "USAGE_FIGURES",
    "Cancel",
    "CancelReason",
    "CancelResult",
    "CancelStatus",
    "Chat",
    "ChatMessage",
    "Chunk",
    "ClientMessage",
    "Error",
    "ErrorInfo",
    "GatewayMessage",
    "Halt",
    "HaltState",
    "Hello",
    "Limits",
    "Message",
    "Moved",
    "Ping",
    "Pong",
    "Response",
    "ResponseStatus",
    "Resumable",
    "Resume",
    "ResumeResult",
    "ResumeStatus",
    "Role",
    "Sender",
    "Step",
    "StepInfo",
    "StepState",
    "Usage",
    "UsageReport",
    "Welcome",
    "parse_message",
]

JSONValue: TypeAlias = Any  # what orjson/msgpack produce: None, bool, int, float, str, list, dict


class Sender(enum.Enum):
    """Who sent a message; decides which ``type`` values are valid (SPEC.md §3)."""

    CLIENT = "client"
    GATEWAY = "gateway"


class Role(enum.StrEnum):
    """Author of one turn in ``chat.messages``."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ResponseStatus(enum.StrEnum):
    """How a request ended: ``response.status``."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


class CancelReason(enum.StrEnum):
    """Why a request was cancelled: ``response.reason`` of a cancelled response."""

    CLIENT = "client"  # a cancel message on the WebSocket
    API = "api"  # DELETE /v1/requests/{id}
    TIMEOUT = "timeout"  # timeout_ms or the gateway's maximum expired
    DISCONNECT = "disconnect"  # the connection that ran the request closed
    SHUTDOWN = "shutdown"  # the gateway stopped before the request finished


class CancelStatus(enum.StrEnum):
    """The outcome of one cancel: ``cancel_result.status`` (G4)."""

    CANCELLED = "cancelled"
    ALREADY_CANCELLED = "already_cancelled"
    ALREADY_COMPLETED = "already_completed"
    NOT_FOUND = "not_found"


class ResumeStatus(enum.StrEnum):
    """The outcome of one ``resume``: ``resume_result.status`` (SPEC.md §5.8)."""

    #: The stream continues on this connection: the chunks after ``after_seq`` follow.
    RESUMED = "resumed"
    #: Nothing to resume for this user, id and epoch (never resumable, forgotten, another
    #: user's, another incarnation of the id, or the gateway restarted).
    NOT_FOUND = "not_found"


class StepState(enum.StrEnum):
    """``step.state``: a pipeline step began or finished (SPEC.md §3.12)."""

    STARTED = "started"
    ENDED = "ended"


class HaltState(enum.StrEnum):
    """``halt.state``: whether the pipeline of a cancelled request has halted (SPEC.md §3.12)."""

    #: Not yet: it is finishing ``halt.step`` (non-abortable) or runs to its next checkpoint.
    PENDING = "pending"
    #: It halted, after ``halt.step`` (or inside it when ``halt.aborted``).
    HALTED = "halted"


# --- field validation ---------------------------------------------------------------------------
# Each check raises LocalProtocolError(INVALID_FIELD); parse_message() re-raises it as remote.


def _invalid(message: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.INVALID_FIELD, message)


def _check_str(name: str, value: object, max_chars: int, *, min_chars: int = 0) -> None:
    if type(value) is not str:
        raise _invalid(f"{name} must be a string")
    if not min_chars <= len(value) <= max_chars:
        raise _invalid(f"{name} must have {min_chars}-{max_chars} characters")


def _check_opt_str(name: str, value: object, max_chars: int) -> None:
    if value is not None:
        _check_str(name, value, max_chars)


def _check_int(name: str, value: object, minimum: int, maximum: int) -> None:
    # bool is a subclass of int in Python but not an integer on the wire.
    if type(value) is not int:
        raise _invalid(f"{name} must be an integer")
    if not minimum <= value <= maximum:
        raise _invalid(f"{name} must be in {minimum}..{maximum}")


def _check_bool(name: str, value: object) -> None:
    if type(value) is not bool:
        raise _invalid(f"{name} must be a boolean")


def _check_request_id(value: object) -> None:
    if type(value) is not str or not limits.REQUEST_ID_PATTERN.fullmatch(value):
        raise _invalid("request_id must be 1-128 characters of [A-Za-z0-9._:-]")


def _check_epoch(value: object) -> None:
    if type(value) is not str or not limits.EPOCH_PATTERN.fullmatch(value):
        raise _invalid("epoch must be 1-64 characters of [A-Za-z0-9._:-]")


def _check_user_id(value: object) -> None:
    if value is not None and (
        type(value) is not str or not limits.USER_ID_PATTERN.fullmatch(value)
    ):
        raise _invalid("user_id must be 1-128 characters of [A-Za-z0-9._:@-]")


def _check_enum(name: str, value: object, enum_type: type[enum.StrEnum]) -> None:
    if not isinstance(value, enum_type):
        allowed = ", ".join(m.value for m in enum_type)
        raise _invalid(f"{name} must be one of: {allowed}")


def _check_ping_id(value: object) -> None:
    if value is None:
        return
    if type(value) is str:
        _check_str("id", value, limits.MAX_PING_ID_CHARS)
    elif type(value) is int:
        _check_int("id", value, -limits.MAX_SAFE_INTEGER, limits.MAX_SAFE_INTEGER)
    else:
        raise _invalid("id must be a string or an integer")


def _check_json_value(value: object, depth: int) -> None:
    """Metadata must be plain JSON so every codec and SDK can carry it unchanged.

    ``depth`` is the nesting level of ``value`` if it is a container (the metadata object
    itself is 1); scalars add no level. A container deeper than ``MAX_METADATA_DEPTH`` is refused
    before its items are looked at, so the recursion is at most ``MAX_METADATA_DEPTH + 1`` calls
    deep whatever the value: :func:`parse_message` is safe on values that did not come through
    the decoder's ``MAX_NESTING_DEPTH`` check too.
    """
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return
    if (kind is list or kind is dict) and depth > limits.MAX_METADATA_DEPTH:
        raise _invalid(f"metadata nests deeper than {limits.MAX_METADATA_DEPTH}")
    if kind is int:
        if not -limits.MAX_SAFE_INTEGER <= value <= limits.MAX_SAFE_INTEGER:  # type: ignore[operator]
            raise _invalid("metadata integers must be within +-(2**53-1)")
    elif kind is float:
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise _invalid("metadata numbers must be finite")
    elif kind is list:
        for item in value:  # type: ignore[attr-defined]
            _check_json_value(item, depth + 1)
    elif kind is dict:
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) is not str:
                raise _invalid("metadata keys must be strings")
            _check_json_value(item, depth + 1)
    else:
        raise _invalid("metadata must contain only JSON values")


def _check_metadata(value: object) -> None:
    if value is None:
        return
    if type(value) is not dict:
        raise _invalid("metadata must be an object")
    _check_json_value(value, 1)
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate in a key
        raise _invalid("metadata is not encodable as JSON") from exc
    if size > limits.MAX_METADATA_BYTES:
        raise _invalid(f"metadata exceeds {limits.MAX_METADATA_BYTES} bytes as JSON")


def _coerce_enum(value: object, enum_type: type[enum.StrEnum]) -> object:
    """Map a wire string to its enum member; leave anything else for the check to refuse."""
    if type(value) is str:
        try:
            return enum_type(value)
        except ValueError:
            return value
    return value


# --- nested values ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    """One turn of a conversation in ``chat.messages``."""

    role: Role
    content: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", _coerce_enum(self.role, Role))
        _check_enum("messages[].role", self.role, Role)
        _check_str("messages[].content", self.content, limits.MAX_MESSAGE_CHARS)


#: The figures of a ``usage`` object that ``usage.estimated`` may name, in canonical order.
USAGE_FIGURES: tuple[str, ...] = ("input_tokens", "output_tokens", "saved_tokens")


def _check_estimated(value: object) -> tuple[str, ...]:
    """``usage.estimated`` in canonical order; an array of distinct figure names (§3.8)."""
    if type(value) is not tuple and type(value) is not list:
        raise _invalid("usage.estimated must be an array")
    names = set()
    for item in value:
        if type(item) is not str or item not in USAGE_FIGURES:
            raise _invalid(f"usage.estimated entries must be one of {', '.join(USAGE_FIGURES)}")
        if item in names:
            raise _invalid(f"usage.estimated lists {item} twice")
        names.add(item)
    return tuple(name for name in USAGE_FIGURES if name in names)


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """Token accounting of one request (SPEC.md §5.4).

    ``saved_tokens`` is an estimate of the tokens a cancel avoided (0 unless cancelled).
    ``final`` is false when the figures may still grow: a cancelled request's pipeline can run
    on to its next checkpoint after the ``response`` is sent; the final figures then follow in
    one ``usage`` message.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    saved_tokens: int = 0
    final: bool = True
    #: The names of the figures that are the gateway's estimates rather than the provider's own
    #: count (SPEC.md §3.8), a subset of :data:`USAGE_FIGURES`; ``None`` when the sender does not
    #: say (an older gateway), ``()`` when every figure is reported. Stored in canonical order
    #: (any order is accepted); a duplicate or an unknown name is refused.
    estimated: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in USAGE_FIGURES:
            _check_int(f"usage.{name}", getattr(self, name), 0, limits.MAX_SAFE_INTEGER)
        _check_bool("usage.final", self.final)
        if self.estimated is not None:
            object.__setattr__(self, "estimated", _check_estimated(self.estimated))


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorInfo:
    """``response.error`` of a failed request."""

    code: str
    message: str

    def __post_init__(self) -> None:
        _check_error_code("error.code", self.code)
        _check_str("error.message", self.message, limits.MAX_ERROR_MESSAGE_CHARS)


def _check_error_code(name: str, value: object) -> None:
    if type(value) is not str and not isinstance(value, ErrorCode):
        raise _invalid(f"{name} must be a string")
    if not limits.ERROR_CODE_PATTERN.fullmatch(str(value)):
        raise _invalid(f"{name} must be a snake_case word of at most 64 characters")


def _check_step_fields(index: object, kind: object, name: object) -> None:
    _check_int("step.index", index, 0, limits.MAX_SAFE_INTEGER)
    if type(kind) is not str or not limits.STEP_KIND_PATTERN.fullmatch(kind):
        raise _invalid("step.kind must be a snake_case word of at most 32 characters")
    _check_str("step.name", name, limits.MAX_STEP_NAME_CHARS, min_chars=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepInfo:
    """One pipeline step, as ``halt.step`` names it (SPEC.md §3.12)."""

    index: int
    kind: str
    name: str

    def __post_init__(self) -> None:
        _check_step_fields(self.index, self.kind, self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Halt:
    """Where the pipeline of a cancelled request halts (``response.halt``, ``usage.halt``).

    ``pending`` (in the cancelled ``response``): ``step`` is the non-abortable step the pipeline
    is finishing, after which it halts; absent, it halts at its next checkpoint without waiting
    for a step. ``halted`` (in the ``usage`` message): ``step`` is the last step it started, and
    ``aborted`` tells whether that step was stopped mid-way (an abortable LLM stream: the model
    stopped) rather than finished; absent, it halted before any step started.
    """

    state: HaltState
    step: StepInfo | None = None
    aborted: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", _coerce_enum(self.state, HaltState))
        _check_enum("halt.state", self.state, HaltState)
        if self.step is not None and not isinstance(self.step, StepInfo):
            raise _invalid("halt.step must be an object")
        _check_bool("halt.aborted", self.aborted)
        if self.aborted and (self.state is not HaltState.HALTED or self.step is None):
            raise _invalid("halt.aborted names a step the pipeline halted in")


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Operational limits a gateway announces in ``welcome`` (SPEC.md §3.5)."""

    max_streams: int = limits.DEFAULT_MAX_STREAMS
    max_frame_bytes: int = limits.MAX_FRAME_BYTES
    max_batch_messages: int = limits.MAX_BATCH_MESSAGES
    max_timeout_ms: int = limits.MAX_TIMEOUT_MS

    def __post_init__(self) -> None:
        _check_int("limits.max_streams", self.max_streams, 1, 1_000_000)
        _check_int("limits.max_frame_bytes", self.max_frame_bytes, 1024, limits.MAX_FRAME_BYTES)
        _check_int(
            "limits.max_batch_messages", self.max_batch_messages, 1, limits.MAX_BATCH_MESSAGES
        )
        _check_int("limits.max_timeout_ms", self.max_timeout_ms, 1, limits.MAX_TIMEOUT_MS)


# --- client -> gateway ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """Optional first message: credentials for clients that cannot set headers (browsers)."""

    TYPE: ClassVar[str] = "hello"
    token: str | None = None
    client_key: str | None = None
    user_id: str | None = None

    def __post_init__(self) -> None:
        _check_opt_str("token", self.token, limits.MAX_TOKEN_CHARS)
        _check_opt_str("client_key", self.client_key, limits.MAX_CLIENT_KEY_CHARS)
        _check_user_id(self.user_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Chat:
    """Start one request. Exactly one of ``message`` and ``messages`` is given."""

    TYPE: ClassVar[str] = "chat"
    request_id: str
    message: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    stream: bool = True
    user_id: str | None = None
    timeout_ms: int | None = None
    metadata: dict[str, JSONValue] | None = None
    #: Ask for ``step`` messages and ``halt`` objects (SPEC.md §3.12). Written only when true.
    steps: bool = False
    #: Survive the connection: a closed connection detaches the request instead of cancelling
    #: it, and ``resume`` continues it on another (SPEC.md §5.8). Written only when true.
    resumable: bool = False
    #: How long a detached request waits for a ``resume`` (capped by the gateway); only with
    #: ``resumable``.
    grace_ms: int | None = None

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if (self.message is None) == (self.messages is None):
            raise _invalid("exactly one of message and messages is required")
        _check_opt_str("message", self.message, limits.MAX_MESSAGE_CHARS)
        if self.messages is not None:
            messages: object = self.messages
            if type(messages) is list:
                messages = tuple(messages)
                object.__setattr__(self, "messages", messages)
            if type(messages) is not tuple:
                raise _invalid("messages must be a list")
            if not 1 <= len(self.messages) <= limits.MAX_MESSAGES:
                raise _invalid(f"messages must have 1-{limits.MAX_MESSAGES} entries")
            for item in self.messages:
                if not isinstance(item, ChatMessage):
                    raise _invalid("messages[] entries must be ChatMessage")
        _check_bool("stream", self.stream)
        _check_user_id(self.user_id)
        if self.timeout_ms is not None:
            _check_int("timeout_ms", self.timeout_ms, 1, limits.MAX_TIMEOUT_MS)
        _check_metadata(self.metadata)
        _check_bool("steps", self.steps)
        _check_bool("resumable", self.resumable)
        if self.grace_ms is not None:
            if not self.resumable:
                raise _invalid("grace_ms is only for a resumable chat")
            _check_int("grace_ms", self.grace_ms, 1, limits.MAX_GRACE_MS)


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    """Cancel one request of this user. Answered by exactly one ``cancel_result``."""

    TYPE: ClassVar[str] = "cancel"
    request_id: str
    user_id: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_user_id(self.user_id)
        _check_opt_str("reason", self.reason, limits.MAX_REASON_CHARS)


@dataclass(frozen=True, slots=True, kw_only=True)
class Resume:
    """Continue a resumable request of this user on this connection, after the chunk
    ``after_seq`` (absent: from the first chunk). Answered by exactly one ``resume_result``."""

    TYPE: ClassVar[str] = "resume"
    request_id: str
    epoch: str
    after_seq: int | None = None
    user_id: str | None = None

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_epoch(self.epoch)
        if self.after_seq is not None:
            _check_int("after_seq", self.after_seq, 0, limits.MAX_SAFE_INTEGER)
        _check_user_id(self.user_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """Keep-alive probe; answered by a ``pong`` echoing ``id``."""

    TYPE: ClassVar[str] = "ping"
    id: str | int | None = None

    def __post_init__(self) -> None:
        _check_ping_id(self.id)


# --- gateway -> client ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """First message from the gateway once the connection is authenticated."""

    TYPE: ClassVar[str] = "welcome"
    connection_id: str
    user_id: str | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        _check_str("connection_id", self.connection_id, limits.MAX_CONNECTION_ID_CHARS, min_chars=1)
        _check_user_id(self.user_id)
        if not isinstance(self.limits, Limits):
            raise _invalid("limits must be an object")


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """One piece of streamed text. ``seq`` counts 0, 1, 2, ... per request (G3)."""

    TYPE: ClassVar[str] = "chunk"
    request_id: str
    seq: int
    text: str

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_int("seq", self.seq, 0, limits.MAX_SAFE_INTEGER)
        _check_str("text", self.text, limits.MAX_FRAME_BYTES, min_chars=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """A pipeline step of a request began or finished (SPEC.md §3.12); only for a ``chat``
    with ``steps: true``, before its ``response``, in order with its chunks."""

    TYPE: ClassVar[str] = "step"
    request_id: str
    index: int
    kind: str
    name: str
    state: StepState

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_step_fields(self.index, self.kind, self.name)
        object.__setattr__(self, "state", _coerce_enum(self.state, StepState))
        _check_enum("step.state", self.state, StepState)


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """The terminal message of a request (G1).

    ``content`` is the whole text when completed and ``""`` otherwise (no partial results).
    ``reason`` is present exactly when cancelled; ``error`` exactly when failed.
    """

    TYPE: ClassVar[str] = "response"
    request_id: str
    status: ResponseStatus
    content: str = ""
    reason: CancelReason | None = None
    error: ErrorInfo | None = None
    usage: Usage = field(default_factory=Usage)
    #: Only when cancelled and the chat asked for steps (SPEC.md §3.12).
    halt: Halt | None = None

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        object.__setattr__(self, "status", _coerce_enum(self.status, ResponseStatus))
        _check_enum("status", self.status, ResponseStatus)
        if type(self.content) is not str:
            raise _invalid("content must be a string")
        if self.status is not ResponseStatus.COMPLETED and self.content:
            raise _invalid("content must be empty unless completed (no partial results)")
        if self.status is ResponseStatus.CANCELLED:
            object.__setattr__(self, "reason", _coerce_enum(self.reason, CancelReason))
            _check_enum("reason", self.reason, CancelReason)
        elif self.reason is not None:
            raise _invalid("reason is only for cancelled responses")
        if self.status is ResponseStatus.FAILED:
            if not isinstance(self.error, ErrorInfo):
                raise _invalid("error is required for failed responses")
        elif self.error is not None:
            raise _invalid("error is only for failed responses")
        if not isinstance(self.usage, Usage):
            raise _invalid("usage must be an object")
        if not self.usage.final and self.status is not ResponseStatus.CANCELLED:
            raise _invalid("usage.final may be false only for cancelled responses")
        if self.halt is not None:
            if not isinstance(self.halt, Halt):
                raise _invalid("halt must be an object")
            if self.status is not ResponseStatus.CANCELLED:
                raise _invalid("halt is only for cancelled responses")
            if self.halt.state is HaltState.PENDING and self.usage.final:
                raise _invalid("a pending halt comes with usage.final false")


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageReport:
    """Final usage of a cancelled request whose ``response`` carried ``usage.final: false``."""

    TYPE: ClassVar[str] = "usage"
    request_id: str
    usage: Usage
    #: Where the pipeline halted; only when the chat asked for steps (SPEC.md §3.12).
    halt: Halt | None = None

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if not isinstance(self.usage, Usage) or not self.usage.final:
            raise _invalid("usage must be an object with final: true")
        if self.halt is not None and (
            not isinstance(self.halt, Halt) or self.halt.state is not HaltState.HALTED
        ):
            raise _invalid("usage.halt must be an object with state halted")


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelResult:
    """The answer to one ``cancel`` (G4)."""

    TYPE: ClassVar[str] = "cancel_result"
    request_id: str
    status: CancelStatus

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        object.__setattr__(self, "status", _coerce_enum(self.status, CancelStatus))
        _check_enum("status", self.status, CancelStatus)


@dataclass(frozen=True, slots=True, kw_only=True)
class Resumable:
    """The first message about a resumable request: the incarnation ``epoch`` a ``resume``
    names, and the grace period the gateway grants (SPEC.md §5.8)."""

    TYPE: ClassVar[str] = "resumable"
    request_id: str
    epoch: str
    grace_ms: int

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_epoch(self.epoch)
        _check_int("grace_ms", self.grace_ms, 1, limits.MAX_GRACE_MS)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeResult:
    """The answer to one ``resume``; when ``resumed``, the request's chunks after the resume's
    ``after_seq`` follow on this connection, then its ``response`` (SPEC.md §5.8)."""

    TYPE: ClassVar[str] = "resume_result"
    request_id: str
    status: ResumeStatus

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        object.__setattr__(self, "status", _coerce_enum(self.status, ResumeStatus))
        _check_enum("status", self.status, ResumeStatus)


@dataclass(frozen=True, slots=True, kw_only=True)
class Moved:
    """The request was resumed on another connection: nothing more about it comes on this
    one (SPEC.md §5.8)."""

    TYPE: ClassVar[str] = "moved"
    request_id: str

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """A refused message. With ``request_id`` when the refused message named a valid one."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    request_id: str | None = None

    def __post_init__(self) -> None:
        _check_error_code("code", self.code)
        if isinstance(self.code, ErrorCode):
            object.__setattr__(self, "code", self.code.value)
        _check_str("message", self.message, limits.MAX_ERROR_MESSAGE_CHARS)
        if self.request_id is not None:
            _check_request_id(self.request_id)

    @classmethod
    def from_exception(cls, exc: RemoteProtocolError | LocalProtocolError) -> Error:
        return cls(code=str(exc.code), message=exc.message, request_id=exc.request_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    """The answer to a ``ping``, with the ping's ``id``."""

    TYPE: ClassVar[str] = "pong"
    id: str | int | None = None

    def __post_init__(self) -> None:
        _check_ping_id(self.id)


ClientMessage: TypeAlias = Hello | Chat | Cancel | Resume | Ping
GatewayMessage: TypeAlias = (
    Welcome
    | Chunk
    | Step
    | Response
    | UsageReport
    | CancelResult
    | Resumable
    | ResumeResult
    | Moved
    | Error
    | Pong
)
Message: TypeAlias = ClientMessage | GatewayMessage


# --- from wire objects --------------------------------------------------------------------------

_MISSING: Any = object()


def _field(obj: Mapping[str, JSONValue], name: str, *, required: bool = False) -> JSONValue:
    value = obj.get(name, _MISSING)
    if value is _MISSING:
        if required:
            raise _invalid(f"{name} is required")
        return None
    if value is None and required:
        raise _invalid(f"{name} is required")
    return value


def _object(name: str, value: JSONValue) -> Mapping[str, JSONValue]:
    if type(value) is not dict:
        raise _invalid(f"{name} must be an object")
    return value


def _usage(value: JSONValue) -> Usage:
    obj = _object("usage", value)
    final = obj.get("final")  # null is absent, as for every optional field (see _field)
    return Usage(
        input_tokens=_field(obj, "input_tokens", required=True),
        output_tokens=_field(obj, "output_tokens", required=True),
        saved_tokens=_field(obj, "saved_tokens", required=True),
        final=True if final is None else final,
        estimated=_field(obj, "estimated"),  # null is absent
    )


def _halt(value: JSONValue) -> Halt | None:
    if value is None:
        return None
    obj = _object("halt", value)
    step = _field(obj, "step")
    if step is not None:
        s = _object("halt.step", step)
        step = StepInfo(
            index=_field(s, "index", required=True),
            kind=_field(s, "kind", required=True),
            name=_field(s, "name", required=True),
        )
    aborted = obj.get("aborted")  # null is absent
    return Halt(
        state=_field(obj, "state", required=True),
        step=step,
        aborted=False if aborted is None else aborted,
    )


def _chat_messages(value: JSONValue) -> tuple[ChatMessage, ...] | None:
    if value is None:
        return None
    if type(value) is not list:
        raise _invalid("messages must be a list")
    if not 1 <= len(value) <= limits.MAX_MESSAGES:
        raise _invalid(f"messages must have 1-{limits.MAX_MESSAGES} entries")
    turns = []
    for item in value:
        turn = _object("messages[]", item)
        turns.append(
            ChatMessage(
                role=_field(turn, "role", required=True),
                content=_field(turn, "content", required=True),
            )
        )
    return tuple(turns)


def _limits(value: JSONValue) -> Limits:
    obj = _object("limits", value)
    # Absent or null limits take their defaults.
    known = {f.name: obj[f.name] for f in dataclasses.fields(Limits) if obj.get(f.name) is not None}
    return Limits(**known)


def _from_wire(type_: str, o: Mapping[str, JSONValue]) -> Message:
    if type_ == "chat":
        stream = o.get("stream")  # null is absent, as for every optional field (see _field)
        steps = o.get("steps")
        resumable = o.get("resumable")
        return Chat(
            request_id=_field(o, "request_id", required=True),
            message=_field(o, "message"),
            messages=_chat_messages(_field(o, "messages")),
            stream=True if stream is None else stream,
            user_id=_field(o, "user_id"),
            timeout_ms=_field(o, "timeout_ms"),
            metadata=_field(o, "metadata"),
            steps=False if steps is None else steps,
            resumable=False if resumable is None else resumable,
            grace_ms=_field(o, "grace_ms"),
        )
    if type_ == "cancel":
        return Cancel(
            request_id=_field(o, "request_id", required=True),
            user_id=_field(o, "user_id"),
            reason=_field(o, "reason"),
        )
    if type_ == "resume":
        return Resume(
            request_id=_field(o, "request_id", required=True),
            epoch=_field(o, "epoch", required=True),
            after_seq=_field(o, "after_seq"),
            user_id=_field(o, "user_id"),
        )
    if type_ == "ping":
        return Ping(id=_field(o, "id"))
    if type_ == "hello":
        return Hello(
            token=_field(o, "token"),
            client_key=_field(o, "client_key"),
            user_id=_field(o, "user_id"),
        )
    if type_ == "chunk":
        return Chunk(
            request_id=_field(o, "request_id", required=True),
            seq=_field(o, "seq", required=True),
            text=_field(o, "text", required=True),
        )
    if type_ == "response":
        error = _field(o, "error")
        if error is not None:
            err = _object("error", error)
            error = ErrorInfo(
                code=_field(err, "code", required=True),
                message=_field(err, "message", required=True),
            )
        return Response(
            request_id=_field(o, "request_id", required=True),
            status=_field(o, "status", required=True),
            content=_field(o, "content", required=True),
            reason=_field(o, "reason"),
            error=error,
            usage=_usage(_field(o, "usage", required=True)),
            halt=_halt(_field(o, "halt")),
        )
    if type_ == "usage":
        return UsageReport(
            request_id=_field(o, "request_id", required=True),
            usage=_usage(_field(o, "usage", required=True)),
            halt=_halt(_field(o, "halt")),
        )
    if type_ == "step":
        return Step(
            request_id=_field(o, "request_id", required=True),
            index=_field(o, "index", required=True),
            kind=_field(o, "kind", required=True),
            name=_field(o, "name", required=True),
            state=_field(o, "state", required=True),
        )
    if type_ == "cancel_result":
        return CancelResult(
            request_id=_field(o, "request_id", required=True),
            status=_field(o, "status", required=True),
        )
    if type_ == "resumable":
        return Resumable(
            request_id=_field(o, "request_id", required=True),
            epoch=_field(o, "epoch", required=True),
            grace_ms=_field(o, "grace_ms", required=True),
        )
    if type_ == "resume_result":
        return ResumeResult(
            request_id=_field(o, "request_id", required=True),
            status=_field(o, "status", required=True),
        )
    if type_ == "moved":
        return Moved(request_id=_field(o, "request_id", required=True))
    if type_ == "error":
        return Error(
            code=_field(o, "code", required=True),
            message=_field(o, "message", required=True),
            request_id=_field(o, "request_id"),
        )
    if type_ == "pong":
        return Pong(id=_field(o, "id"))
    if type_ == "welcome":
        limits_value = _field(o, "limits", required=True)
        return Welcome(
            connection_id=_field(o, "connection_id", required=True),
            user_id=_field(o, "user_id"),
            limits=_limits(limits_value),
        )
    raise AssertionError(f"unhandled type {type_}")  # pragma: no cover - guarded by TYPES


CLIENT_TYPES: frozenset[str] = frozenset(c.TYPE for c in (Hello, Chat, Cancel, Resume, Ping))
GATEWAY_TYPES: frozenset[str] = frozenset(
    c.TYPE
    for c in (
        Welcome,
        Chunk,
        Step,
        Response,
        UsageReport,
        CancelResult,
        Resumable,
        ResumeResult,
        Moved,
        Error,
        Pong,
    )
)
_TYPES_BY_SENDER = {Sender.CLIENT: CLIENT_TYPES, Sender.GATEWAY: GATEWAY_TYPES}


def parse_message(obj: JSONValue, sender: Sender) -> Message:
    """Validate one decoded object (a dict from JSON or msgpack) sent by ``sender``.

    Unknown fields are ignored (forward compatibility, SPEC.md §10). Raises only
    :class:`RemoteProtocolError`; its ``request_id`` is set when the object carried a valid one,
    so the reply can name the request it refuses.
    """
    if type(obj) is not dict:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "a message must be an object")
    type_ = obj.get("type")
    if type(type_) is not str:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "a message needs a string 'type'")
    if type_ not in _TYPES_BY_SENDER[sender]:
        shown = type_ if len(type_) <= 64 else type_[:64] + "..."
        raise RemoteProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown {sender.value} message type {shown!r}",
            request_id=_valid_request_id(obj),
        )
    try:
        return _from_wire(type_, obj)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(
            exc.code, exc.message, request_id=_valid_request_id(obj), message_type=type_
        ) from exc


def _valid_request_id(obj: Mapping[str, JSONValue]) -> str | None:
    """The object's request_id if it is valid, so an error reply can name the request."""
    request_id = obj.get("request_id")
    if type(request_id) is str and limits.REQUEST_ID_PATTERN.fullmatch(request_id):
        return request_id
    return None
