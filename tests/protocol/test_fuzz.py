"""Decoder fuzzing: whatever a peer sends, ``decode`` raises nothing and ``parse_message`` raises
only :class:`RemoteProtocolError`, always with an :class:`ErrorCode`.

Inputs: arbitrary bytes and text; arbitrary JSON-ish values (huge ints, NaN/inf, bytes, non-str
keys, deep nesting) serialized with msgpack, orjson and the stdlib json; objects shaped like
messages with fields replaced by arbitrary values; and mutations of valid frames (bit flips,
truncation, splicing, insertion, duplication).
"""

from __future__ import annotations

import json
import math

import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocol import (
    Codec,
    ErrorCode,
    Message,
    RemoteProtocolError,
    Response,
    Sender,
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
from tests.protocol import strategies as s

FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Recursive values and mutated frames are slower to generate; fewer of them keep the file fast.
FUZZ_VALUES = settings(FUZZ, max_examples=300)
FUZZ_LISTS = settings(FUZZ, max_examples=150)
CODECS = pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
SENDERS = pytest.mark.parametrize("sender", list(Sender), ids=lambda x: x.value)
TYPES_BY_SENDER = {Sender.CLIENT: CLIENT_TYPES, Sender.GATEWAY: GATEWAY_TYPES}
ALL_TYPES = sorted(CLIENT_TYPES | GATEWAY_TYPES)
FIELD_NAMES = sorted(
    {
        "type", "request_id", "user_id", "message", "messages", "stream", "timeout_ms",
        "metadata", "token", "client_key", "reason", "id", "connection_id", "limits", "seq",
        "text", "status", "content", "error", "usage", "code", "role", "final",
        "input_tokens", "output_tokens", "saved_tokens", "max_streams", "max_frame_bytes",
    }
)  # fmt: skip

# --- arbitrary values ---------------------------------------------------------------------------

#: Text that may hold lone surrogates (not encodable as UTF-8).
any_text = st.text(st.characters(exclude_categories=()) | st.characters(categories=["Cs"]))
#: Text every serializer accepts.
utf8_text = st.text(s.characters, max_size=20)

any_ints = st.integers() | st.sampled_from(
    [-(2**53), 2**53, 2**63 - 1, -(2**63), 2**64 - 1, 10**30, -(10**30), 10**400]
)
any_floats = st.floats() | st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308])
scalars = st.none() | st.booleans() | any_ints | any_floats | any_text | st.binary(max_size=8)
hashable = st.none() | st.booleans() | any_ints | any_floats | any_text | st.binary(max_size=8)

#: Anything parse_message might be handed: huge ints, NaN, bytes, tuples, non-str keys.
any_values = st.recursive(
    scalars | st.sampled_from(list(s.REQUEST_ID_ALPHABET)) | st.sampled_from(FIELD_NAMES),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(hashable | st.sampled_from(FIELD_NAMES), inner, max_size=4)
    ),
    max_leaves=12,
)

#: Values msgpack can pack: ints in its range, any float, bytes, non-str keys, ext types.
msgpack_ints = st.integers(-(2**63), 2**64 - 1)
msgpack_scalars = (
    st.none()
    | st.booleans()
    | msgpack_ints
    | any_floats
    | utf8_text
    | st.binary(max_size=8)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**33), st.integers(0, 999_999_999))
)
msgpack_values = st.recursive(
    msgpack_scalars | st.sampled_from(FIELD_NAMES),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.none()
            | st.booleans()
            | msgpack_ints
            | utf8_text
            | st.binary(max_size=4)
            | st.sampled_from(FIELD_NAMES),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)

#: Values the stdlib json dumps (allow_nan: NaN, Infinity; unbounded ints; keys coerced to str).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | any_floats
    | utf8_text
    | st.sampled_from(FIELD_NAMES),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(utf8_text | st.sampled_from(FIELD_NAMES), inner, max_size=4)
    ),
    max_leaves=12,
)


#: Field values that pass some checks, so fuzzing gets past the first one.
plausible = st.one_of(
    s.request_ids,
    s.user_ids,
    st.sampled_from(["completed", "cancelled", "failed", "client", "user", "not_found", "x", ""]),
    st.integers(-1, 3),
    st.booleans(),
    s.usages.map(
        lambda u: to_wire(Response(request_id="r", status="cancelled", reason="api", usage=u))[
            "usage"
        ]
    ),
    s.limits_values.map(lambda lim: to_wire(Welcome(connection_id="c", limits=lim))["limits"]),
    st.lists(s.chat_messages.map(lambda m: {"role": m.role.value, "content": m.content})),
    s.error_infos.map(lambda e: {"code": str(e.code), "message": e.message}),
    s.metadata,
)


@st.composite
def message_shaped(draw: st.DrawFn, values: st.SearchStrategy[object]) -> dict[object, object]:
    """An object with (mostly) a real ``type`` and a mix of plausible and arbitrary fields."""
    real_type = draw(st.integers(0, 7)) > 0
    obj: dict[object, object] = {"type": draw(st.sampled_from(ALL_TYPES) if real_type else values)}
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=8, unique=True)):
        if name != "type":
            obj[name] = draw(plausible if draw(st.booleans()) else values)
    return obj


@st.composite
def near_valid(draw: st.DrawFn, values: st.SearchStrategy[object]) -> dict[object, object]:
    """A valid message's wire map with one field removed, replaced or added."""
    sender = draw(st.sampled_from(list(Sender)))
    wire: dict[object, object] = dict(to_wire(draw(s.MESSAGES_BY_SENDER[sender])))
    keys = list(wire)
    action = draw(st.sampled_from(["delete", "replace", "add", "replace-nested"]))
    if action == "delete":
        del wire[draw(st.sampled_from(keys))]
    elif action == "replace":
        wire[draw(st.sampled_from(keys))] = draw(values)
    elif action == "add":
        wire[draw(st.sampled_from(FIELD_NAMES) | values.filter(_hashable))] = draw(values)
    else:
        nested = [k for k in keys if isinstance(wire[k], dict | list) and wire[k]]
        assume(nested)
        key = draw(st.sampled_from(nested))
        inner = wire[key]
        if isinstance(inner, dict):
            inner = dict(inner)
            inner[draw(st.sampled_from(list(inner)))] = draw(values)
        else:
            inner = list(inner)
            inner[draw(st.integers(0, len(inner) - 1))] = draw(values)
        wire[key] = inner
    return wire


def _hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


# --- mutations of valid frames ------------------------------------------------------------------


@st.composite
def mutated_frames(draw: st.DrawFn, codec: Codec) -> bytes:
    sender = draw(st.sampled_from(list(Sender)))
    frame = bytearray(
        encode_batch(draw(st.lists(s.MESSAGES_BY_SENDER[sender], min_size=1, max_size=4)), codec)
    )
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "truncate", "splice", "insert", "delete", "dup"]))
        size = len(frame)
        if size == 0:
            frame += draw(st.binary(min_size=1, max_size=8))
            continue
        at = draw(st.integers(0, size - 1))
        if action == "flip":
            frame[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "truncate":
            del frame[at:]
        elif action == "splice":
            other = encode_batch([draw(s.MESSAGES_BY_SENDER[sender])], codec)
            frame = frame[:at] + other[draw(st.integers(0, len(other) - 1)) :]
        elif action == "insert":
            frame[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del frame[at : at + draw(st.integers(1, 8))]
        else:
            end = draw(st.integers(at, size))
            frame[end:end] = frame[at:end]
    return bytes(frame)


# --- the property -------------------------------------------------------------------------------


def check_decode(data: bytes | str, codec: Codec, sender: Sender) -> list[object]:
    """``decode`` raises nothing; returns messages of ``sender`` or coded remote errors."""
    results = decode(data, codec, sender)
    assert isinstance(results, list)
    assert 1 <= len(results) <= limits.MAX_BATCH_MESSAGES
    for item in results:
        if isinstance(item, RemoteProtocolError):
            assert isinstance(item.code, ErrorCode), item
            assert type(item) is RemoteProtocolError
            assert item.request_id is None or limits.REQUEST_ID_PATTERN.fullmatch(item.request_id)
        else:
            assert isinstance(item, Message), item
            assert item.TYPE in TYPES_BY_SENDER[sender]
            # Whatever was accepted is a valid message: it re-encodes and round-trips.
            assert decode_one(encode(item, codec), codec, sender) == item
    return results


def check_parse(obj: object, sender: Sender) -> None:
    error: RemoteProtocolError | None = None
    try:
        message = parse_message(obj, sender)
    except RemoteProtocolError as exc:  # anything else propagates and fails the test
        error = exc
    if error is not None:
        assert isinstance(error.code, ErrorCode), error
        assert type(error) is RemoteProtocolError
        return
    assert isinstance(message, Message)
    assert message.TYPE in TYPES_BY_SENDER[sender]
    for codec in Codec:
        assert decode_one(encode(message, codec), codec, sender) == message


def _packb(value: object) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        assume(False)
        raise AssertionError("unreachable") from None


# --- decode -------------------------------------------------------------------------------------


@CODECS
@SENDERS
@FUZZ
@given(data=st.binary(max_size=300))
def test_decode_arbitrary_bytes(codec, sender, data):
    check_decode(data, codec, sender)


@CODECS
@SENDERS
@FUZZ
@given(data=any_text)
def test_decode_arbitrary_text(codec, sender, data):
    results = check_decode(data, codec, sender)
    if codec is Codec.MSGPACK:
        assert [r.code for r in results] == [ErrorCode.BAD_FRAME]


@SENDERS
@FUZZ_VALUES
@given(value=msgpack_values | message_shaped(msgpack_values) | near_valid(msgpack_values))
def test_decode_arbitrary_msgpack_values(sender, value):
    check_decode(_packb(value), Codec.MSGPACK, sender)


@SENDERS
@FUZZ_LISTS
@given(values=st.lists(msgpack_values | message_shaped(msgpack_values), min_size=2, max_size=4))
def test_decode_concatenated_msgpack_values(sender, values):
    results = check_decode(b"".join(_packb(v) for v in values), Codec.MSGPACK, sender)
    # Concatenated values are split exactly; only an undecodable one (a map key that is not a
    # string) ends the frame early, as msgpack has no resync point.
    if any(isinstance(r, RemoteProtocolError) and r.code == ErrorCode.BAD_FRAME for r in results):
        assert len(results) <= len(values)
    else:
        assert len(results) == len(values)


@SENDERS
@FUZZ_VALUES
@given(value=json_values | message_shaped(json_values) | near_valid(json_values))
def test_decode_arbitrary_json_values(sender, value):
    # The stdlib writes NaN/Infinity and ints of any size; orjson refuses or rounds them.
    check_decode(json.dumps(value, allow_nan=True), Codec.JSON, sender)
    check_decode(json.dumps(value, allow_nan=True, ensure_ascii=False).encode(), Codec.JSON, sender)
    try:
        dumped = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return
    assert len(check_decode(dumped, Codec.JSON, sender)) == 1


@SENDERS
@FUZZ_LISTS
@given(values=st.lists(json_values | message_shaped(json_values), min_size=1, max_size=5))
def test_decode_json_lines(sender, values):
    lines = [json.dumps(v, allow_nan=True) for v in values]
    results = check_decode("\n".join(lines), Codec.JSON, sender)
    assert len(results) == len(values)  # G6: one result per line, none hidden


@CODECS
@SENDERS
@FUZZ_VALUES
@given(data=st.data())
def test_decode_mutated_frames(codec, sender, data):
    frame = data.draw(mutated_frames(codec))
    check_decode(frame, codec, sender)
    if codec is Codec.JSON:
        try:
            text = frame.decode("utf-8")
        except UnicodeDecodeError:
            return
        assert decode(text, codec, sender) == decode(frame, codec, sender)


# --- parse_message ------------------------------------------------------------------------------


@SENDERS
@FUZZ_VALUES
@given(obj=any_values | message_shaped(any_values) | near_valid(any_values))
def test_parse_message_raises_only_remote_protocol_error(sender, obj):
    check_parse(obj, sender)


@pytest.mark.parametrize(
    "obj",
    [
        None, 0, 1.5, "chat", b"chat", [], (), {}, {"type": None}, {"type": b"chat"},
        {b"type": "chat"}, {1: "chat"}, {"type": "chat", "request_id": 10**400},
        {"type": "chunk", "request_id": "r", "seq": math.nan, "text": "x"},
        {"type": "chat", "request_id": "r", "message": "x", "metadata": {"a": math.inf}},
        {"type": "chat", "request_id": "r", "message": "x", "metadata": {(1, 2): 1}},
        {"type": "chat", "request_id": "r", "message": "x", "metadata": {"a": {1, 2}}},
        {"type": "chat", "request_id": "r", "message": "x", "metadata": {"\ud800": 1}},
        {"type": "chat", "request_id": "r", "message": "x", "metadata": {"a": b"x"}},
        {"type": "chat", "request_id": "r", "message": "x", "metadata": {"a": 2**64}},
        {"type": "welcome", "connection_id": "c", "limits": {"max_streams": True}},
        {"type": "response", "request_id": "r", "status": ["completed"], "content": "",
         "usage": {}},
    ],
)  # fmt: skip
@SENDERS
def test_parse_message_odd_values(sender, obj):
    check_parse(obj, sender)


@SENDERS
def test_parse_message_deeply_nested_metadata_is_refused_not_a_recursion_error(sender):
    deep: object = 1
    for _ in range(100_000):
        deep = {"a": deep}
    obj = {"type": "chat", "request_id": "r", "message": "x", "metadata": deep}
    check_parse(obj, sender)


@CODECS
@SENDERS
def test_decode_deeply_nested_frame(codec, sender):
    depth = 200_000
    frame = b"[" * depth + b"]" * depth if codec is Codec.JSON else b"\x91" * depth + b"\x90"
    check_decode(frame, codec, sender)
