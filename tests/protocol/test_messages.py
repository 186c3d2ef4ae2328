"""Message layer: every field rule, at construction (LocalProtocolError) and on the wire through
``parse_message``/``decode`` (RemoteProtocolError, same code, ``request_id`` when valid); and the
codec's frame rules (blank lines, empty and oversized frames, batch limits, G6)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import orjson
import pytest

from protocol import (
    SUBPROTOCOLS,
    Cancel,
    CancelReason,
    CancelResult,
    CancelStatus,
    Chat,
    ChatMessage,
    Chunk,
    Codec,
    Error,
    ErrorCode,
    ErrorInfo,
    Hello,
    Limits,
    LocalProtocolError,
    Moved,
    Ping,
    Pong,
    ProtocolError,
    RemoteProtocolError,
    Response,
    ResponseStatus,
    Resumable,
    Resume,
    ResumeResult,
    Role,
    Sender,
    Step,
    Usage,
    UsageReport,
    Welcome,
    decode,
    decode_one,
    encode,
    encode_batch,
    limits,
    parse_message,
    to_wire,
)
from protocol.messages import CLIENT_TYPES, GATEWAY_TYPES

CODECS = pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
SAFE = limits.MAX_SAFE_INTEGER
DELETE = object()  # marks a wire field to remove

#: A valid instance of every message type; each case below changes one field of it.
BASE: dict[type, dict[str, Any]] = {
    Hello: {},
    Chat: {"request_id": "r1", "message": "hi"},
    Cancel: {"request_id": "r1"},
    Ping: {},
    Welcome: {"connection_id": "c1"},
    Chunk: {"request_id": "r1", "seq": 0, "text": "x"},
    Step: {"request_id": "r1", "index": 0, "kind": "tool", "name": "search", "state": "started"},
    Response: {"request_id": "r1", "status": "completed", "content": "hi"},
    UsageReport: {"request_id": "r1", "usage": Usage()},
    CancelResult: {"request_id": "r1", "status": "cancelled"},
    Error: {"code": "bad_frame", "message": "m"},
    Pong: {},
    Resume: {"request_id": "r1", "epoch": "e1.7"},
    Resumable: {"request_id": "r1", "epoch": "e1.7", "grace_ms": 30000},
    ResumeResult: {"request_id": "r1", "status": "resumed"},
    Moved: {"request_id": "r1"},
}
SENDER = {cls: Sender.CLIENT if cls.TYPE in CLIENT_TYPES else Sender.GATEWAY for cls in BASE}
CANCELLED = {"status": "cancelled", "content": "", "reason": "client"}
FAILED = {"status": "failed", "content": "", "error": ErrorInfo(code="backend_error", message="b")}


def nest(depth: int, leaf: object, *, key: str = "k") -> dict[str, Any]:
    """``depth`` nested objects (the outermost is the metadata itself) around ``leaf``."""
    value = leaf
    for _ in range(depth - 1):
        value = {key: value}
    return {key: value}


def nest_lists(depth: int, leaf: object) -> dict[str, Any]:
    """The metadata object holding ``depth - 1`` nested lists around ``leaf``."""
    value = leaf
    for _ in range(depth - 1):
        value = [value]
    return {"l": value}


_META_OVERHEAD = len(b'{"a":""}')


# --- field rules: (class, overrides) that must be refused -----------------------------------


def bad(cls: type, name: str, **fields: Any) -> Any:
    return pytest.param(cls, fields, id=f"{cls.__name__}-{name}")


BAD_REQUEST_IDS = {
    "empty": "",
    "too-long": "a" * 129,
    "space": "a b",
    "slash": "a/b",
    "at": "a@b",
    "non-ascii": "é",
    "newline": "r1\n",
    "int": 5,
    "bytes": b"r1",
    "bool": True,
}
BAD_USER_IDS = {
    "empty": "",
    "too-long": "u" * 129,
    "space": "a b",
    "slash": "a/b",
    "non-ascii": "ü",
    "int": 7,
    "bool": False,
}
WITH_REQUEST_ID = [
    Chat,
    Cancel,
    Chunk,
    Response,
    UsageReport,
    CancelResult,
    Resume,
    Resumable,
    ResumeResult,
    Moved,
]
WITH_USER_ID = [Hello, Chat, Cancel, Welcome, Resume]
BAD_EPOCHS = {
    "empty": "",
    "too-long": "e" * 65,
    "space": "e 1",
    "slash": "e/1",
    "int": 7,
    "none": None,
}

INVALID = [
    *(
        bad(cls, f"request_id-{name}", request_id=value)
        for cls in [*WITH_REQUEST_ID, Error]
        for name, value in BAD_REQUEST_IDS.items()
    ),
    *(bad(cls, "request_id-none", request_id=None) for cls in WITH_REQUEST_ID),
    *(
        bad(cls, f"user_id-{name}", user_id=value)
        for cls in WITH_USER_ID
        for name, value in BAD_USER_IDS.items()
    ),
    # hello
    bad(Hello, "token-int", token=1),
    bad(Hello, "token-too-long", token="t" * (limits.MAX_TOKEN_CHARS + 1)),
    bad(Hello, "client_key-bytes", client_key=b"k"),
    bad(Hello, "client_key-too-long", client_key="k" * (limits.MAX_CLIENT_KEY_CHARS + 1)),
    # chat: exactly one of message / messages
    bad(Chat, "neither", message=None),
    bad(Chat, "both", messages=(ChatMessage(role="user", content="x"),)),
    bad(Chat, "message-int", message=5),
    bad(Chat, "message-list", message=["hi"]),
    bad(Chat, "message-too-long", message="m" * (limits.MAX_MESSAGE_CHARS + 1)),
    bad(Chat, "messages-empty", message=None, messages=()),
    bad(Chat, "messages-str", message=None, messages="hi"),
    bad(Chat, "messages-dict", message=None, messages={"role": "user", "content": "x"}),
    bad(
        Chat,
        "messages-too-many",
        message=None,
        messages=(ChatMessage(role="user", content="x"),) * (limits.MAX_MESSAGES + 1),
    ),
    bad(Chat, "messages-entry-dict", message=None, messages=({"role": "user", "content": "x"},)),
    bad(Chat, "messages-entry-str", message=None, messages=("x",)),
    # chat.stream: a boolean, not an integer or a string
    *(
        bad(Chat, f"stream-{name}", stream=value)
        for name, value in {"one": 1, "zero": 0, "str": "true", "none": None}.items()
    ),
    # chat.timeout_ms: integer 1..MAX_TIMEOUT_MS, bool is not int
    *(
        bad(Chat, f"timeout_ms-{name}", timeout_ms=value)
        for name, value in {
            "zero": 0,
            "negative": -1,
            "too-big": limits.MAX_TIMEOUT_MS + 1,
            "bool": True,
            "float": 1.5,
            "integral-float": 100.0,
            "str": "100",
        }.items()
    ),
    # chat.metadata: plain, bounded JSON
    *(
        bad(Chat, f"metadata-{name}", metadata=value)
        for name, value in {
            "list": [1],
            "str": "x",
            "int": 1,
            "nan": {"a": math.nan},
            "inf": {"a": math.inf},
            "-inf": {"a": [-math.inf]},
            "int-key": {1: "x"},
            "none-key": {None: "x"},
            "nested-int-key": {"a": {2: "x"}},
            "int-too-big": {"a": SAFE + 1},
            "int-too-small": {"a": -SAFE - 1},
            "huge-int": {"a": 2**64},
            "bytes": {"a": b"x"},
            "tuple": {"a": (1, 2)},
            "set": {"a": {1}},
            "object": {"a": object()},
            "too-deep": nest(limits.MAX_METADATA_DEPTH + 1, 1),
            "too-deep-empty": nest(limits.MAX_METADATA_DEPTH, {}),
            "too-deep-lists": nest_lists(limits.MAX_METADATA_DEPTH, []),
            "too-large": {"a": "x" * (limits.MAX_METADATA_BYTES - _META_OVERHEAD + 1)},
            "too-large-in-bytes": {
                "a": "é" * ((limits.MAX_METADATA_BYTES - _META_OVERHEAD) // 2 + 1)
            },
            "lone-surrogate-key": {"\ud800": 1},
            "lone-surrogate-value": {"a": ["\udfff"]},
        }.items()
    ),
    # chat.resumable / grace_ms (SPEC §5.8)
    *(
        bad(Chat, f"resumable-{name}", resumable=value)
        for name, value in {"one": 1, "str": "true", "none": None}.items()
    ),
    bad(Chat, "grace_ms-without-resumable", grace_ms=1000),
    *(
        bad(Chat, f"grace_ms-{name}", resumable=True, grace_ms=value)
        for name, value in {
            "zero": 0,
            "too-big": limits.MAX_GRACE_MS + 1,
            "bool": True,
            "float": 10.0,
            "str": "10",
        }.items()
    ),
    # resume / resumable: epoch; after_seq; grace_ms
    *(
        bad(cls, f"epoch-{name}", epoch=value)
        for cls in (Resume, Resumable)
        for name, value in BAD_EPOCHS.items()
    ),
    *(
        bad(Resume, f"after_seq-{name}", after_seq=value)
        for name, value in {"negative": -1, "too-big": SAFE + 1, "bool": True, "str": "1"}.items()
    ),
    *(
        bad(Resumable, f"grace_ms-{name}", grace_ms=value)
        for name, value in {"zero": 0, "too-big": limits.MAX_GRACE_MS + 1, "none": None}.items()
    ),
    bad(ResumeResult, "status-unknown", status="gone"),
    bad(ResumeResult, "status-cancel-status", status=CancelStatus.NOT_FOUND),
    bad(ResumeResult, "status-none", status=None),
    # cancel
    bad(Cancel, "reason-int", reason=1),
    bad(Cancel, "reason-too-long", reason="r" * (limits.MAX_REASON_CHARS + 1)),
    # ping / pong id: str of 0..128 chars or int within +-(2**53-1)
    *(
        bad(cls, f"id-{name}", id=value)
        for cls in (Ping, Pong)
        for name, value in {
            "too-long": "i" * (limits.MAX_PING_ID_CHARS + 1),
            "too-big": SAFE + 1,
            "too-small": -SAFE - 1,
            "bool": True,
            "float": 1.0,
            "list": [1],
            "bytes": b"1",
        }.items()
    ),
    # welcome
    bad(Welcome, "connection_id-empty", connection_id=""),
    bad(Welcome, "connection_id-too-long", connection_id="c" * 129),
    bad(Welcome, "connection_id-int", connection_id=1),
    bad(Welcome, "connection_id-none", connection_id=None),
    bad(Welcome, "limits-dict", limits={"max_streams": 1}),
    bad(Welcome, "limits-none", limits=None),
    # chunk
    bad(Chunk, "seq-negative", seq=-1),
    bad(Chunk, "seq-too-big", seq=SAFE + 1),
    bad(Chunk, "seq-bool", seq=True),
    bad(Chunk, "seq-float", seq=1.0),
    bad(Chunk, "seq-str", seq="0"),
    bad(Chunk, "seq-none", seq=None),
    bad(Chunk, "text-empty", text=""),
    bad(Chunk, "text-int", text=1),
    bad(Chunk, "text-none", text=None),
    # response: status, content only when completed, reason iff cancelled, error iff failed
    bad(Response, "status-unknown", status="done"),
    bad(Response, "status-upper", status="COMPLETED"),
    bad(Response, "status-none", status=None),
    bad(Response, "status-other-enum", status=CancelStatus.CANCELLED),
    bad(Response, "content-int", content=1),
    bad(Response, "content-none", content=None),
    bad(Response, "cancelled-with-content", **(CANCELLED | {"content": "partial"})),
    bad(Response, "failed-with-content", **(FAILED | {"content": "partial"})),
    bad(Response, "cancelled-without-reason", **(CANCELLED | {"reason": None})),
    bad(Response, "cancelled-unknown-reason", **(CANCELLED | {"reason": "bored"})),
    bad(Response, "completed-with-reason", reason="client"),
    bad(Response, "failed-with-reason", **(FAILED | {"reason": "client"})),
    bad(Response, "failed-without-error", **(FAILED | {"error": None})),
    bad(Response, "failed-error-dict", **(FAILED | {"error": {"code": "x", "message": "y"}})),
    bad(Response, "completed-with-error", error=ErrorInfo(code="x", message="y")),
    bad(Response, "cancelled-with-error", **(CANCELLED | {"error": FAILED["error"]})),
    bad(Response, "usage-dict", usage={"input_tokens": 0}),
    bad(Response, "usage-none", usage=None),
    bad(Response, "completed-usage-not-final", usage=Usage(final=False)),
    bad(Response, "failed-usage-not-final", **(FAILED | {"usage": Usage(final=False)})),
    # usage report: final figures only
    bad(UsageReport, "usage-not-final", usage=Usage(final=False)),
    bad(UsageReport, "usage-dict", usage={"input_tokens": 1}),
    bad(UsageReport, "usage-none", usage=None),
    # cancel_result
    bad(CancelResult, "status-unknown", status="gone"),
    bad(CancelResult, "status-response-status", status=ResponseStatus.COMPLETED),
    bad(CancelResult, "status-none", status=None),
    # error: code is a snake_case word of at most 64 characters
    *(
        bad(Error, f"code-{name}", code=value)
        for name, value in {
            "empty": "",
            "upper": "Bad_frame",
            "digit-first": "1bad",
            "underscore-first": "_bad",
            "dash": "bad-frame",
            "space": "bad frame",
            "too-long": "a" * 65,
            "int": 400,
            "none": None,
        }.items()
    ),
    bad(Error, "message-int", message=1),
    bad(Error, "message-too-long", message="m" * (limits.MAX_ERROR_MESSAGE_CHARS + 1)),
    bad(Error, "message-none", message=None),
]

#: Nested values refused at their own construction.
INVALID_NESTED = [
    *(
        pytest.param(Usage, {name: value}, id=f"Usage-{name}-{label}")
        for name in ("input_tokens", "output_tokens", "saved_tokens")
        for label, value in {
            "negative": -1,
            "too-big": SAFE + 1,
            "bool": True,
            "float": 1.0,
            "none": None,
        }.items()
    ),
    pytest.param(Usage, {"final": 1}, id="Usage-final-int"),
    pytest.param(Usage, {"final": None}, id="Usage-final-none"),
    *(
        pytest.param(Usage, {"estimated": value}, id=f"Usage-estimated-{label}")
        for label, value in {
            "str": "output_tokens",
            "set": {"output_tokens"},
            "dict": {"output_tokens": True},
            "unknown-name": ("input_tokens", "cached_tokens"),
            "final": ("final",),
            "upper": ("Output_tokens",),
            "duplicate": ("output_tokens", "output_tokens"),
            "int-entry": (1,),
            "none-entry": (None,),
            "bytes-entry": (b"output_tokens",),
        }.items()
    ),
    *(
        pytest.param(Limits, {name: value}, id=f"Limits-{name}-{value!r}")
        for name, values in {
            "max_streams": (0, 1_000_001, True, 8.0),
            "max_frame_bytes": (1023, limits.MAX_FRAME_BYTES + 1, "2048"),
            "max_batch_messages": (0, limits.MAX_BATCH_MESSAGES + 1, False),
            "max_timeout_ms": (0, limits.MAX_TIMEOUT_MS + 1, None),
        }.items()
        for value in values
    ),
    pytest.param(ChatMessage, {"role": "robot", "content": "x"}, id="ChatMessage-role-unknown"),
    pytest.param(ChatMessage, {"role": "User", "content": "x"}, id="ChatMessage-role-case"),
    pytest.param(ChatMessage, {"role": 1, "content": "x"}, id="ChatMessage-role-int"),
    pytest.param(ChatMessage, {"role": "user", "content": 1}, id="ChatMessage-content-int"),
    pytest.param(
        ChatMessage,
        {"role": "user", "content": "c" * (limits.MAX_MESSAGE_CHARS + 1)},
        id="ChatMessage-content-too-long",
    ),
    pytest.param(ErrorInfo, {"code": "Bad", "message": "x"}, id="ErrorInfo-code-upper"),
    pytest.param(ErrorInfo, {"code": "a" * 65, "message": "x"}, id="ErrorInfo-code-too-long"),
    pytest.param(ErrorInfo, {"code": 1, "message": "x"}, id="ErrorInfo-code-int"),
    pytest.param(ErrorInfo, {"code": "x", "message": None}, id="ErrorInfo-message-none"),
    pytest.param(
        ErrorInfo,
        {"code": "x", "message": "m" * (limits.MAX_ERROR_MESSAGE_CHARS + 1)},
        id="ErrorInfo-message-too-long",
    ),
]

#: Edge values that must be accepted.
VALID = [
    pytest.param(cls, {"request_id": rid}, id=f"{cls.__name__}-request_id-{label}")
    for cls in WITH_REQUEST_ID
    for label, rid in {"max-length": "a" * 128, "charset": "AZaz09._:-", "one": "-"}.items()
] + [
    pytest.param(Hello, {"user_id": "alice@example.com"}, id="Hello-user_id-at"),
    pytest.param(Chat, {"user_id": "U" * 128}, id="Chat-user_id-max-length"),
    pytest.param(Chat, {"message": ""}, id="Chat-message-empty"),
    pytest.param(Chat, {"message": "m" * limits.MAX_MESSAGE_CHARS}, id="Chat-message-max"),
    pytest.param(
        Chat,
        {"message": None, "messages": [ChatMessage(role=r, content="") for r in Role]},
        id="Chat-messages-list-every-role",
    ),
    pytest.param(
        Chat,
        {"message": None, "messages": (ChatMessage(role="tool", content="x"),) * 512},
        id="Chat-messages-max",
    ),
    pytest.param(Chat, {"stream": False}, id="Chat-stream-false"),
    pytest.param(Chat, {"timeout_ms": 1}, id="Chat-timeout_ms-min"),
    pytest.param(Chat, {"timeout_ms": limits.MAX_TIMEOUT_MS}, id="Chat-timeout_ms-max"),
    pytest.param(Chat, {"metadata": {}}, id="Chat-metadata-empty"),
    pytest.param(Chat, {"metadata": {"a": SAFE, "b": -SAFE}}, id="Chat-metadata-safe-ints"),
    pytest.param(Chat, {"metadata": {"f": -0.0, "g": 1e308}}, id="Chat-metadata-floats"),
    pytest.param(Chat, {"metadata": nest(8, 1)}, id="Chat-metadata-max-depth"),
    pytest.param(Chat, {"metadata": nest(7, [])}, id="Chat-metadata-max-depth-empty-list"),
    pytest.param(Chat, {"metadata": nest_lists(8, "x")}, id="Chat-metadata-max-depth-lists"),
    pytest.param(
        Chat,
        {"metadata": {"a": "x" * (limits.MAX_METADATA_BYTES - _META_OVERHEAD)}},
        id="Chat-metadata-max-bytes",
    ),
    pytest.param(
        Chat,
        {"metadata": {"a": "é" * ((limits.MAX_METADATA_BYTES - _META_OVERHEAD) // 2)}},
        id="Chat-metadata-max-bytes-multibyte",
    ),
    pytest.param(Cancel, {"reason": "r" * 256}, id="Cancel-reason-max"),
    pytest.param(Cancel, {"reason": ""}, id="Cancel-reason-empty"),
    *(
        pytest.param(cls, {"id": value}, id=f"{cls.__name__}-id-{value!r:.12}")
        for cls in (Ping, Pong)
        for value in ("", "i" * 128, 0, SAFE, -SAFE)
    ),
    pytest.param(Welcome, {"connection_id": "c" * 128}, id="Welcome-connection_id-max"),
    pytest.param(
        Welcome,
        {
            "limits": Limits(
                max_streams=1, max_frame_bytes=1024, max_batch_messages=1, max_timeout_ms=1
            )
        },
        id="Welcome-limits-min",
    ),
    pytest.param(
        Welcome,
        {
            "limits": Limits(
                max_streams=1_000_000,
                max_frame_bytes=limits.MAX_FRAME_BYTES,
                max_batch_messages=limits.MAX_BATCH_MESSAGES,
                max_timeout_ms=limits.MAX_TIMEOUT_MS,
            )
        },
        id="Welcome-limits-max",
    ),
    pytest.param(Chunk, {"seq": SAFE}, id="Chunk-seq-max"),
    pytest.param(Response, CANCELLED | {"usage": Usage(final=False)}, id="Response-cancelled"),
    *(
        pytest.param(Response, CANCELLED | {"reason": reason}, id=f"Response-reason-{reason}")
        for reason in CancelReason
    ),
    pytest.param(Response, FAILED, id="Response-failed"),
    pytest.param(Response, {"content": ""}, id="Response-completed-empty"),
    pytest.param(
        Response,
        {"usage": Usage(input_tokens=SAFE, output_tokens=0, saved_tokens=SAFE)},
        id="Response-usage-max",
    ),
    *(
        pytest.param(CancelResult, {"status": status}, id=f"CancelResult-{status}")
        for status in CancelStatus
    ),
    pytest.param(Error, {"code": "a" * 64}, id="Error-code-max"),
    pytest.param(Error, {"code": "future_code_2"}, id="Error-code-unknown"),
    pytest.param(Error, {"message": ""}, id="Error-message-empty"),
    pytest.param(Error, {"request_id": "r1"}, id="Error-request_id"),
]


@pytest.mark.parametrize(("cls", "fields"), INVALID)
def test_construction_refuses_invalid_field(cls, fields):
    with pytest.raises(LocalProtocolError) as info:
        cls(**(BASE[cls] | fields))
    assert type(info.value) is LocalProtocolError
    assert info.value.code is ErrorCode.INVALID_FIELD


@pytest.mark.parametrize(("cls", "fields"), INVALID_NESTED)
def test_nested_construction_refuses_invalid_field(cls, fields):
    base = {"role": "user", "content": "x"} if cls is ChatMessage else {}
    if cls is ErrorInfo:
        base = {"code": "x", "message": "y"}
    with pytest.raises(LocalProtocolError) as info:
        cls(**(base | fields))
    assert info.value.code is ErrorCode.INVALID_FIELD


@pytest.mark.parametrize(("cls", "fields"), VALID)
@CODECS
def test_construction_accepts_edge_values(cls, fields, codec):
    message = cls(**(BASE[cls] | fields))
    assert decode_one(encode(message, codec), codec, SENDER[cls]) == message


def test_enums_are_coerced_from_wire_strings():
    assert Response(request_id="r", status="completed").status is ResponseStatus.COMPLETED
    cancelled = Response(request_id="r", status="cancelled", reason="timeout")
    assert cancelled.reason is CancelReason.TIMEOUT
    assert CancelResult(request_id="r", status="not_found").status is CancelStatus.NOT_FOUND
    assert ChatMessage(role="assistant", content="").role is Role.ASSISTANT
    assert Chat(request_id="r", messages=[ChatMessage(role="user", content="x")]).messages == (
        ChatMessage(role="user", content="x"),
    )


def test_error_code_accepts_error_code_and_normalizes_to_str():
    error = Error(code=ErrorCode.TOO_MANY_STREAMS, message="m")
    assert type(error.code) is str
    assert error.code == "too_many_streams"
    assert error == Error(code="too_many_streams", message="m")
    info = ErrorInfo(code=ErrorCode.BACKEND_ERROR, message="m")
    assert info == ErrorInfo(code="backend_error", message="m")
    for codec in Codec:
        assert encode(error, codec) == encode(Error(code="too_many_streams", message="m"), codec)


def test_error_from_exception():
    exc = RemoteProtocolError(ErrorCode.INVALID_FIELD, "seq must be an integer", request_id="r9")
    assert Error.from_exception(exc) == Error(
        code="invalid_field", message="seq must be an integer", request_id="r9"
    )
    local = LocalProtocolError(ErrorCode.PROTOCOL_VIOLATION, "x")
    assert Error.from_exception(local).request_id is None


def test_messages_are_frozen():
    chunk = Chunk(request_id="r1", seq=0, text="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        chunk.seq = 1  # type: ignore[misc]


# --- the same rules on the wire -----------------------------------------------------------------


def base_wire(cls: type) -> dict[str, Any]:
    return to_wire(cls(**BASE[cls]))


def expected_request_id(wire: dict[str, Any]) -> str | None:
    rid = wire.get("request_id")
    if type(rid) is str and limits.REQUEST_ID_PATTERN.fullmatch(rid):
        return rid
    return None


def wire_of(value: object) -> object:
    if isinstance(value, Usage | Limits | ChatMessage | ErrorInfo):
        return {
            f.name: (v.value if isinstance(v := getattr(value, f.name), Role) else v)
            for f in dataclasses.fields(value)
        }
    if isinstance(value, tuple):
        return [wire_of(v) for v in value]
    return value


def _representable(value: object) -> bool:
    """Whether a value can be written with both codecs (so a peer could send it)."""
    try:
        orjson.dumps(value)
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return False
    return not (isinstance(value, float) and not math.isfinite(value))


def wire_case(cls: type, fields: dict[str, Any]) -> dict[str, Any]:
    wire = base_wire(cls)
    for name, value in fields.items():
        if value is DELETE:
            wire.pop(name, None)
        else:
            wire[name] = wire_of(value)
    return wire


#: Refusals only a wire object can express: missing fields, nested maps, null where required.
INVALID_WIRE = [
    *(
        pytest.param(cls, {name: DELETE}, id=f"{cls.__name__}-missing-{name}")
        for cls, names in {
            Chat: ("request_id", "message"),
            Cancel: ("request_id",),
            Welcome: ("connection_id", "limits"),
            Chunk: ("request_id", "seq", "text"),
            Response: ("request_id", "status", "content", "usage"),
            UsageReport: ("request_id", "usage"),
            CancelResult: ("request_id", "status"),
            Error: ("code", "message"),
        }.items()
        for name in names
    ),
    pytest.param(Chat, {"request_id": None}, id="Chat-null-request_id"),
    pytest.param(Chunk, {"seq": None}, id="Chunk-null-seq"),
    pytest.param(Response, {"content": None}, id="Response-null-content"),
    pytest.param(Welcome, {"limits": None}, id="Welcome-null-limits"),
    pytest.param(Chat, {"messages": [{"role": "user"}]}, id="Chat-messages-missing-content"),
    pytest.param(Chat, {"message": DELETE, "messages": [{"content": "x"}]}, id="Chat-no-role"),
    pytest.param(Chat, {"message": DELETE, "messages": ["x"]}, id="Chat-messages-entry-str"),
    pytest.param(Chat, {"message": DELETE, "messages": [None]}, id="Chat-messages-entry-null"),
    pytest.param(Chat, {"message": DELETE, "messages": []}, id="Chat-messages-empty"),
    pytest.param(
        Chat,
        {"message": DELETE, "messages": [{"role": "user", "content": "x"}] * 513},
        id="Chat-messages-too-many",
    ),
    pytest.param(
        Chat,
        {"message": DELETE, "messages": [{"role": "bot", "content": "x"}]},
        id="Chat-messages-role-unknown",
    ),
    pytest.param(
        Chat,
        {"message": DELETE, "messages": [{"role": "user", "content": 5}]},
        id="Chat-messages-content-int",
    ),
    pytest.param(Chat, {"messages": [{"role": "user", "content": "x"}]}, id="Chat-both"),
    pytest.param(Chat, {"message": DELETE, "messages": {"x": 1}}, id="Chat-messages-object"),
    pytest.param(Welcome, {"limits": []}, id="Welcome-limits-list"),
    pytest.param(Welcome, {"limits": {"max_streams": 0}}, id="Welcome-limits-max_streams-0"),
    pytest.param(Welcome, {"limits": {"max_streams": True}}, id="Welcome-limits-bool"),
    pytest.param(Welcome, {"limits": {"max_frame_bytes": 2**21}}, id="Welcome-limits-frame"),
    pytest.param(Response, {"usage": []}, id="Response-usage-list"),
    pytest.param(Response, {"usage": {}}, id="Response-usage-empty"),
    *(
        pytest.param(
            Response,
            {"usage": {"input_tokens": 0, "output_tokens": 0, "saved_tokens": 0} | {name: value}},
            id=f"Response-usage-{name}-{value!r}",
        )
        for name, value in [
            ("input_tokens", DELETE),
            ("input_tokens", -1),
            ("output_tokens", True),
            ("saved_tokens", 1.0),
            ("saved_tokens", SAFE + 1),
            ("final", 0),
            ("final", False),  # not final, but the response is completed
        ]
    ),
    pytest.param(Response, FAILED | {"error": "boom"}, id="Response-error-str"),
    pytest.param(Response, FAILED | {"error": {"code": "x"}}, id="Response-error-no-message"),
    pytest.param(Response, FAILED | {"error": {"message": "m"}}, id="Response-error-no-code"),
    pytest.param(
        Response, FAILED | {"error": {"code": "X", "message": "m"}}, id="Response-error-code-upper"
    ),
    pytest.param(Response, CANCELLED | {"reason": None}, id="Response-cancelled-null-reason"),
    pytest.param(
        UsageReport,
        {"usage": {"input_tokens": 1, "output_tokens": 1, "saved_tokens": 0, "final": False}},
        id="UsageReport-not-final",
    ),
]


def _fix_wire(fields: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, value in fields.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not DELETE}
        out[name] = value
    return out


#: Refused objects whose wire form is valid (a dict is what a nested object looks like there).
CONSTRUCTION_ONLY = {
    "Chat-messages-entry-dict",
    "Chat-metadata-tuple",  # a tuple is written as an array
    "Welcome-limits-dict",
    "Response-failed-error-dict",
    "Response-status-other-enum",  # the StrEnum is written as its string
    "Chat-stream-none",  # null on the wire is absent: the default
    "Chat-resumable-none",  # likewise
}
WIRE_CASES = [
    pytest.param(p.values[0], p.values[1], id=p.id)
    for p in INVALID
    if p.id not in CONSTRUCTION_ONLY
    and all(_representable(wire_of(v)) for v in p.values[1].values())
] + [pytest.param(p.values[0], _fix_wire(p.values[1]), id="wire-" + p.id) for p in INVALID_WIRE]


@pytest.mark.parametrize(("cls", "fields"), WIRE_CASES)
def test_parse_message_refuses_invalid_field(cls, fields):
    wire = wire_case(cls, fields)
    with pytest.raises(RemoteProtocolError) as info:
        parse_message(wire, SENDER[cls])
    assert type(info.value) is RemoteProtocolError
    assert info.value.code is ErrorCode.INVALID_FIELD
    assert info.value.request_id == expected_request_id(wire)


def _dump(wire: dict[str, Any], codec: Codec) -> bytes | None:
    """The wire object as a peer would send it, or None if the codec cannot carry it exactly
    (orjson writes NaN as null; msgpack has no integers beyond 64 bits)."""
    try:
        if codec is Codec.JSON:
            data = orjson.dumps(wire)
            same = orjson.loads(data) == wire
        else:
            data = msgpack.packb(wire, use_bin_type=True)
            same = msgpack.unpackb(data, raw=False) == wire
    except (TypeError, ValueError, OverflowError):
        return None
    return data if same else None


@pytest.mark.parametrize(
    ("cls", "fields", "codec"),
    [  # a sample (decode only adds framing), each case with the codecs that can carry it
        pytest.param(*p.values, codec, id=f"{codec.name.lower()}-{p.id}")
        for p in WIRE_CASES[::5]
        for codec in Codec
        if _dump(wire_case(*p.values), codec) is not None
    ],
)
def test_decode_reports_invalid_field_in_place(cls, fields, codec):
    wire = wire_case(cls, fields)
    data = _dump(wire, codec)
    good = Ping() if SENDER[cls] is Sender.CLIENT else Pong()
    frame = encode_batch([good], codec) + (b"\n" if codec is Codec.JSON else b"") + data
    results = decode(frame, codec, SENDER[cls])
    assert results[0] == good
    (error,) = results[1:]
    assert isinstance(error, RemoteProtocolError)
    assert (error.code, error.request_id) == (ErrorCode.INVALID_FIELD, expected_request_id(wire))


@pytest.mark.parametrize(
    "wire",
    [
        {"type": "chat", "request_id": "r1", "message": "hi", "priority": 9, "x": {"y": [1]}},
        {"type": "chat", "request_id": "r1", "message": "hi", "messages": None},
        {"type": "chat", "request_id": "r1", "message": "hi", "user_id": None, "metadata": None},
        {"type": "chat", "request_id": "r1", "message": "hi", "stream": None, "timeout_ms": None},
    ],
    ids=["unknown-fields", "null-messages", "null-optionals", "null-defaulted"],
)
def test_unknown_fields_and_nulls_of_optional_fields_are_ignored(wire):
    """SPEC: null in a field that may be absent is absent (optional unset, defaulted default)."""
    assert parse_message(wire, Sender.CLIENT) == Chat(request_id="r1", message="hi")


def test_null_in_nested_defaulted_fields_takes_the_default():
    usage = {"input_tokens": 1, "output_tokens": 2, "saved_tokens": 0, "final": None}
    report = parse_message({"type": "usage", "request_id": "r", "usage": usage}, Sender.GATEWAY)
    assert report == UsageReport(request_id="r", usage=Usage(input_tokens=1, output_tokens=2))
    limits_wire = {"max_streams": 4, "max_batch_messages": None}
    welcome = {"type": "welcome", "connection_id": "c", "limits": limits_wire, "user_id": None}
    assert parse_message(welcome, Sender.GATEWAY) == Welcome(
        connection_id="c", limits=Limits(max_streams=4)
    )


def test_unknown_nested_fields_are_ignored():
    wire = {
        "type": "response",
        "request_id": "r1",
        "status": "failed",
        "content": "",
        "error": {"code": "backend_error", "message": "b", "retry_after": 3},
        "usage": {"input_tokens": 1, "output_tokens": 2, "saved_tokens": 0, "cached": 7},
        "trace": "abc",
    }
    assert parse_message(wire, Sender.GATEWAY) == Response(
        request_id="r1",
        status="failed",
        error=ErrorInfo(code="backend_error", message="b"),
        usage=Usage(input_tokens=1, output_tokens=2),
    )
    chat = {
        "type": "chat",
        "request_id": "r1",
        "messages": [{"role": "user", "content": "x", "name": "bob"}],
        "stream": False,
    }
    assert parse_message(chat, Sender.CLIENT) == Chat(
        request_id="r1", messages=(ChatMessage(role="user", content="x"),), stream=False
    )


def test_wire_defaults():
    assert parse_message({"type": "chat", "request_id": "r1", "message": ""}, Sender.CLIENT) == (
        Chat(request_id="r1", message="", stream=True)
    )
    usage = {"input_tokens": 1, "output_tokens": 2, "saved_tokens": 3}  # final defaults to true
    report = parse_message({"type": "usage", "request_id": "r", "usage": usage}, Sender.GATEWAY)
    assert report == UsageReport(request_id="r", usage=Usage(**usage, final=True))
    assert parse_message({"type": "ping"}, Sender.CLIENT) == Ping()
    assert parse_message({"type": "hello"}, Sender.CLIENT) == Hello()


def test_welcome_limits_unknown_keys_ignored_and_missing_defaulted():
    wire = {
        "type": "welcome",
        "connection_id": "c1",
        "limits": {"max_streams": 8, "max_widgets": 3, "max_frame_bytes": 4096},
    }
    welcome = parse_message(wire, Sender.GATEWAY)
    assert welcome == Welcome(
        connection_id="c1", limits=Limits(max_streams=8, max_frame_bytes=4096)
    )
    assert welcome.limits.max_batch_messages == limits.MAX_BATCH_MESSAGES
    empty = parse_message({"type": "welcome", "connection_id": "c", "limits": {}}, Sender.GATEWAY)
    assert empty.limits == Limits()


# --- type and shape ------------------------------------------------------------------------------


@pytest.mark.parametrize("sender", list(Sender), ids=lambda x: x.value)
@pytest.mark.parametrize(
    "obj",
    [None, [], [{"type": "ping"}], "ping", 1, 1.5, True, b"{}"],
    ids=lambda o: type(o).__name__,
)
def test_non_object_is_bad_frame(obj, sender):
    with pytest.raises(RemoteProtocolError) as info:
        parse_message(obj, sender)
    assert info.value.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("sender", list(Sender), ids=lambda x: x.value)
@pytest.mark.parametrize(
    "obj",
    [{}, {"request_id": "r1"}, {"type": None}, {"type": 1}, {"type": ["chat"]}, {"type": b"ping"}],
    ids=["empty", "no-type", "null", "int", "list", "bytes"],
)
def test_missing_or_non_string_type_is_bad_frame(obj, sender):
    with pytest.raises(RemoteProtocolError) as info:
        parse_message(obj, sender)
    assert info.value.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("sender", list(Sender), ids=lambda x: x.value)
@pytest.mark.parametrize("type_", ["", "Chat", "chat ", "subscribe", "x" * 10_000])
def test_unknown_type(type_, sender):
    with pytest.raises(RemoteProtocolError) as info:
        parse_message({"type": type_, "request_id": "r7"}, sender)
    assert info.value.code is ErrorCode.UNKNOWN_TYPE
    assert info.value.request_id == "r7"
    assert len(info.value.message) < 200  # a huge type is not echoed back in full


@pytest.mark.parametrize(
    ("type_", "sender"),
    [(t, Sender.GATEWAY) for t in sorted(CLIENT_TYPES)]
    + [(t, Sender.CLIENT) for t in sorted(GATEWAY_TYPES)],
)
def test_type_of_the_other_direction_is_unknown_type(type_, sender):
    cls = next(c for c in BASE if type_ == c.TYPE)
    wire = base_wire(cls)
    with pytest.raises(RemoteProtocolError) as info:
        parse_message(wire, sender)
    assert info.value.code is ErrorCode.UNKNOWN_TYPE
    assert info.value.request_id == wire.get("request_id")
    # ... while the right direction accepts the same object.
    assert parse_message(wire, SENDER[cls]) == cls(**BASE[cls])


def test_request_id_is_reported_only_when_valid():
    with pytest.raises(RemoteProtocolError) as info:
        parse_message({"type": "chunk", "request_id": "bad id", "seq": 0}, Sender.GATEWAY)
    assert info.value.request_id is None
    with pytest.raises(RemoteProtocolError) as info:
        parse_message({"type": "chunk", "request_id": "ok", "seq": -1, "text": "x"}, Sender.GATEWAY)
    assert (info.value.code, info.value.request_id) == (ErrorCode.INVALID_FIELD, "ok")


# --- codec: frames -------------------------------------------------------------------------------

PINGS = [Ping(id=1), Ping(id="two"), Ping()]


def test_json_blank_lines_are_ignored():
    lines = [encode(p, Codec.JSON) for p in PINGS]
    frame = b"\n" + lines[0] + b"\n\n  \n" + lines[1] + b"\n\t\n" + lines[2] + b"\n"
    assert decode(frame, Codec.JSON, Sender.CLIENT) == PINGS
    assert decode(frame.decode(), Codec.JSON, Sender.CLIENT) == PINGS


@pytest.mark.parametrize(
    ("codec", "frame"),
    [
        (Codec.JSON, b""),
        (Codec.JSON, ""),
        (Codec.JSON, b"\n"),
        (Codec.JSON, "\n\n"),
        (Codec.JSON, b" \t\r\n  "),
        (Codec.MSGPACK, b""),
    ],
    ids=repr,
)
def test_empty_frame_is_bad_frame(codec, frame):
    (error,) = decode(frame, codec, Sender.CLIENT)
    assert isinstance(error, RemoteProtocolError)
    assert error.code is ErrorCode.BAD_FRAME


def _chunk_frame_of_size(size: int, codec: Codec) -> bytes:
    """A valid chunk frame of exactly ``size`` bytes."""
    overhead = len(encode(Chunk(request_id="r", seq=0, text="x" * 70_000), codec)) - 70_000
    text_len = size - overhead
    frame = encode(Chunk(request_id="r", seq=0, text="x" * text_len), codec)
    assert len(frame) == size
    return frame


@CODECS
def test_frame_at_max_size_is_decoded(codec):
    frame = _chunk_frame_of_size(limits.MAX_FRAME_BYTES, codec)
    (chunk,) = decode(frame, codec, Sender.GATEWAY)
    assert isinstance(chunk, Chunk)


@CODECS
def test_frame_over_max_size_is_frame_too_large(codec):
    frame = _chunk_frame_of_size(limits.MAX_FRAME_BYTES + 1, codec)
    assert [e.code for e in decode(frame, codec, Sender.GATEWAY)] == [ErrorCode.FRAME_TOO_LARGE]


def test_text_frame_size_counts_utf8_bytes():
    # Fewer characters than MAX_FRAME_BYTES, more bytes: too large.
    text = encode(Ping(id=1), Codec.JSON).decode() + "\n" + " é" * (limits.MAX_FRAME_BYTES // 3)
    assert len(text) < limits.MAX_FRAME_BYTES < len(text.encode())
    (error,) = decode(text, Codec.JSON, Sender.CLIENT)
    assert error.code is ErrorCode.FRAME_TOO_LARGE


@CODECS
def test_batch_message_count_limit(codec):
    batch = [Ping(id=i) for i in range(limits.MAX_BATCH_MESSAGES)]
    assert decode(encode_batch(batch, codec), codec, Sender.CLIENT) == batch
    over = encode_batch([*batch, Ping()], codec)
    assert [e.code for e in decode(over, codec, Sender.CLIENT)] == [ErrorCode.FRAME_TOO_LARGE]


def test_msgpack_needs_binary_frames():
    text = encode(Ping(), Codec.JSON).decode()
    (error,) = decode(text, Codec.MSGPACK, Sender.CLIENT)
    assert error.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_truncated_msgpack_keeps_the_good_maps(cut):
    good = [Ping(id=1), Ping(id="x")]
    frame = (
        encode_batch(good, Codec.MSGPACK) + encode(Cancel(request_id="r1"), Codec.MSGPACK)[:-cut]
    )
    results = decode(frame, Codec.MSGPACK, Sender.CLIENT)
    assert results[:2] == good
    (error,) = results[2:]
    assert isinstance(error, RemoteProtocolError)
    assert error.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "tail",
    [b"\xc1", b"\x81\x01\xa1x", b"\x81\xc0\xa1x", b"\xa2\xff\xfe"],
    ids=["never-used-byte", "int-key", "nil-key", "bad-utf8"],
)
def test_undecodable_msgpack_keeps_the_maps_before_it(tail):
    good = [Ping(id=1), Ping(id=2)]
    frame = encode_batch(good, Codec.MSGPACK) + tail + encode(Ping(id=3), Codec.MSGPACK)
    results = decode(frame, Codec.MSGPACK, Sender.CLIENT)
    assert results[:2] == good
    # No resync point in msgpack: the rest of the frame is one error.
    (error,) = results[2:]
    assert error.code is ErrorCode.BAD_FRAME


def test_json_bad_line_hides_no_other_message():
    """G6 at the codec: each line is decoded on its own; errors stand in place."""
    lines = [
        encode(Cancel(request_id="a"), Codec.JSON),
        b"{not json",
        encode(Chat(request_id="b", message="hi"), Codec.JSON),
        b'{"type":"subscribe","request_id":"c"}',
        b"\xff\xfe",  # not UTF-8
        b'{"type":"chat","request_id":"d","message":5}',
        b"[1,2]",
        b'{"type":"chat","request_id":"e","message":"x"} trailing',
        encode(Ping(id=9), Codec.JSON),
    ]
    results = decode(b"\n".join(lines), Codec.JSON, Sender.CLIENT)
    assert results[0] == Cancel(request_id="a")
    assert results[2] == Chat(request_id="b", message="hi")
    assert results[8] == Ping(id=9)
    errors = [(r.code, r.request_id) for r in results if isinstance(r, RemoteProtocolError)]
    assert errors == [
        (ErrorCode.BAD_FRAME, None),
        (ErrorCode.UNKNOWN_TYPE, "c"),
        (ErrorCode.BAD_FRAME, None),
        (ErrorCode.INVALID_FIELD, "d"),
        (ErrorCode.BAD_FRAME, None),
        (ErrorCode.BAD_FRAME, None),
    ]


@CODECS
def test_decode_one(codec):
    assert decode_one(encode(Ping(id=1), codec), codec, Sender.CLIENT) == Ping(id=1)
    with pytest.raises(RemoteProtocolError) as info:
        decode_one(encode_batch([Ping(), Ping()], codec), codec, Sender.CLIENT)
    assert info.value.code is ErrorCode.BAD_FRAME
    with pytest.raises(RemoteProtocolError) as info:
        decode_one(encode(Pong(), codec), codec, Sender.CLIENT)
    assert info.value.code is ErrorCode.UNKNOWN_TYPE


def test_codec_subprotocols():
    assert Codec.from_subprotocol(None) is Codec.JSON
    assert Codec.from_subprotocol("muxgate.v1.json") is Codec.JSON
    assert Codec.from_subprotocol("muxgate.v1.msgpack") is Codec.MSGPACK
    for name in ("muxgate.v2.json", "json", "", "MUXGATE.V1.JSON"):
        with pytest.raises(ValueError, match="is not a valid Codec"):
            Codec.from_subprotocol(name)
    assert Codec.JSON.is_text
    assert not Codec.MSGPACK.is_text
    assert Codec.MSGPACK.subprotocol == "muxgate.v1.msgpack"
    assert SUBPROTOCOLS == ("muxgate.v1.msgpack", "muxgate.v1.json")  # preference order
    assert {Codec.from_subprotocol(name) for name in SUBPROTOCOLS} == set(Codec)


# --- encoding what cannot be encoded -------------------------------------------------------------


@CODECS
@pytest.mark.parametrize(
    "message",
    [
        Chat(request_id="r", message="a\ud800b"),
        Chat(request_id="r", messages=(ChatMessage(role="user", content="\udc00"),)),
        Chunk(request_id="r", seq=0, text="\ud83d"),
        Hello(token="\udfff"),
        Cancel(request_id="r", reason="\ud800"),
        Ping(id="\ud800"),
        Welcome(connection_id="\ud800"),
        Response(request_id="r", status="completed", content="\ud800"),
        Error(code="x", message="\ud800"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_encoding_a_lone_surrogate_raises_local_protocol_error(codec, message):
    with pytest.raises(LocalProtocolError) as info:
        encode(message, codec)
    assert info.value.code is ErrorCode.INVALID_FIELD
    with pytest.raises(LocalProtocolError):
        encode_batch([Ping(), message], codec)


# --- errors --------------------------------------------------------------------------------------


def test_error_classes():
    remote = RemoteProtocolError(ErrorCode.BAD_FRAME, "m", request_id="r")
    assert isinstance(remote, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert remote == RemoteProtocolError("bad_frame", "m", request_id="r")
    assert remote != LocalProtocolError("bad_frame", "m", request_id="r")
    assert remote != RemoteProtocolError("bad_frame", "m")
    assert "bad_frame" in str(remote)
    assert "request_id='r'" in repr(remote)
    assert {remote}  # hashable
    assert all(limits.ERROR_CODE_PATTERN.fullmatch(code) for code in ErrorCode)


@pytest.mark.parametrize(
    "literal",
    ["9007199254740992", "18446744073709551615", "100000000000000000000", "-100000000000000000000"],
)
@pytest.mark.parametrize("as_bytes", [True, False])
def test_json_integer_beyond_safe_range_is_refused_even_beyond_64_bits(
    literal: str, as_bytes: bool
) -> None:
    # orjson reads an integer literal beyond 64 bits as a float; it must not pass as one.
    text = f'{{"type":"chat","request_id":"r1","message":"hi","metadata":{{"n":{literal}}}}}'
    (result,) = decode(text.encode() if as_bytes else text, Codec.JSON, Sender.CLIENT)
    assert isinstance(result, RemoteProtocolError)
    assert result.code == ErrorCode.INVALID_FIELD
    assert result.request_id == "r1"


def test_long_digit_runs_that_are_not_big_integers_decode_as_before() -> None:
    text = (
        '{"type":"chat","request_id":"r1","message":"100000000000000000000",'
        '"metadata":{"f":1e20,"g":0.100000000000000000000}}'
    )
    (chat,) = decode(text, Codec.JSON, Sender.CLIENT)
    assert isinstance(chat, Chat)
    assert chat.message == "100000000000000000000"
    assert chat.metadata == {"f": 1e20, "g": 0.1}


# --- usage.estimated (SPEC.md §3.8) -------------------------------------------------------------


def test_usage_estimated_defaults_to_absent_and_is_omitted_on_the_wire():
    usage = Usage(input_tokens=1, output_tokens=2)
    assert usage.estimated is None
    wire = to_wire(UsageReport(request_id="r1", usage=usage))
    assert "estimated" not in wire["usage"]


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ((), ()),
        ([], ()),
        (("saved_tokens", "input_tokens"), ("input_tokens", "saved_tokens")),
        (["output_tokens"], ("output_tokens",)),
        (
            ("saved_tokens", "output_tokens", "input_tokens"),
            ("input_tokens", "output_tokens", "saved_tokens"),
        ),
    ],
)
def test_usage_estimated_is_stored_in_canonical_order(given, stored):
    usage = Usage(estimated=given)
    assert usage.estimated == stored
    assert type(usage.estimated) is tuple
    assert usage == Usage(estimated=stored)
    assert hash(usage) == hash(Usage(estimated=stored))


@pytest.mark.parametrize("codec", list(Codec))
def test_usage_estimated_is_written_after_final(codec):
    usage = Usage(input_tokens=3, output_tokens=4, saved_tokens=5, estimated=("saved_tokens",))
    message = Response(
        request_id="r1", status=ResponseStatus.CANCELLED, content="", reason="client", usage=usage
    )
    assert list(to_wire(message)["usage"]) == [
        "input_tokens",
        "output_tokens",
        "saved_tokens",
        "final",
        "estimated",
    ]
    assert decode_one(encode(message, codec), codec, Sender.GATEWAY) == message


@pytest.mark.parametrize(
    "estimated",
    ['"output_tokens"', '["cached_tokens"]', '["input_tokens","input_tokens"]', "[1]", "{}"],
)
def test_usage_estimated_invalid_on_the_wire_is_invalid_field(estimated):
    frame = (
        '{"type":"usage","request_id":"r1","usage":{"input_tokens":1,"output_tokens":2,'
        f'"saved_tokens":0,"estimated":{estimated}}}}}'
    )
    [result] = decode(frame, Codec.JSON, Sender.GATEWAY)
    assert isinstance(result, RemoteProtocolError)
    assert result.code is ErrorCode.INVALID_FIELD
    assert result.request_id == "r1"


def test_usage_estimated_null_is_absent():
    frame = (
        '{"type":"usage","request_id":"r1","usage":{"input_tokens":1,"output_tokens":2,'
        '"saved_tokens":0,"estimated":null}}'
    )
    message = decode_one(frame, Codec.JSON, Sender.GATEWAY)
    assert isinstance(message, UsageReport)
    assert message.usage.estimated is None
