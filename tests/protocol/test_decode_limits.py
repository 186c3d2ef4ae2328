"""Hostile frames (issue 12): nesting depth and the per-frame message cap are enforced by the
decoder itself, cheaply, and nothing it meets escapes :func:`protocol.decode` as an exception.

- A JSON line or msgpack object nested deeper than ``MAX_NESTING_DEPTH`` is one ``bad_frame`` in
  its place (JSON: the other lines still decode; msgpack: it ends the frame, SPEC.md §2.4).
- A frame with more than ``MAX_BATCH_MESSAGES`` messages is refused before any line is decoded.
"""

from __future__ import annotations

import contextlib
import json
import random
from typing import Any

import msgpack
import orjson
import pytest

import protocol
import protocol.codec as codec_module
from protocol import (
    Chat,
    Chunk,
    Codec,
    ErrorCode,
    Ping,
    RemoteProtocolError,
    Sender,
    decode,
    encode,
    join_batch,
    limits,
    parse_message,
)

CODECS = pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
DEPTH = limits.MAX_NESTING_DEPTH
CAP = limits.MAX_BATCH_MESSAGES


def _nested_list(depth: int, leaf: object = 0) -> object:
    """``depth`` nested lists around ``leaf``, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _ping_with(extra: object) -> dict[str, Any]:
    """A valid ping carrying ``extra`` in an unknown field (ignored unless too deep)."""
    return {"type": "ping", "id": 1, "x": extra}


def _frame(obj: object, codec: Codec) -> bytes:
    return orjson.dumps(obj) if codec is Codec.JSON else msgpack.packb(obj, use_bin_type=True)


def _both_kinds(frame: bytes, codec: Codec) -> list[bytes | str]:
    """A JSON frame as text and as bytes; a msgpack frame as bytes."""
    return [frame, frame.decode()] if codec is Codec.JSON else [frame]


def _codes(results: list[Any]) -> list[object]:
    return [r.code if isinstance(r, RemoteProtocolError) else type(r) for r in results]


def _is_too_deep(result: object) -> bool:
    return (
        isinstance(result, RemoteProtocolError)
        and result.code is ErrorCode.BAD_FRAME
        and result.request_id is None
        and "nested" in result.message
    )


# --- the bound ----------------------------------------------------------------------------------


def test_valid_messages_fit_well_within_the_bound() -> None:
    # The message is level 1, chat.metadata level 2, its deepest container level 9.
    assert limits.MAX_METADATA_DEPTH + 1 < DEPTH


@CODECS
def test_deepest_allowed_metadata_decodes(codec: Codec) -> None:
    metadata = {"a": _nested_list(limits.MAX_METADATA_DEPTH - 1)}
    chat = Chat(request_id="r1", message="hi", metadata=metadata)  # type: ignore[arg-type]
    for frame in _both_kinds(encode(chat, codec), codec):
        assert decode(frame, codec, Sender.CLIENT) == [chat]


@CODECS
def test_nesting_at_the_bound_decodes_and_one_more_level_is_bad_frame(codec: Codec) -> None:
    # The ping map is level 1: the deepest list is level DEPTH, then DEPTH + 1.
    at_bound = _frame(_ping_with(_nested_list(DEPTH - 1)), codec)
    over = _frame(_ping_with(_nested_list(DEPTH)), codec)
    for frame in _both_kinds(at_bound, codec):
        assert decode(frame, codec, Sender.CLIENT) == [Ping(id=1)]
    for frame in _both_kinds(over, codec):
        (result,) = decode(frame, codec, Sender.CLIENT)
        assert _is_too_deep(result), result


@CODECS
@pytest.mark.parametrize("depth", [DEPTH + 1, 200, 1000, 1100, 100_000])
def test_deep_nesting_is_bad_frame_at_any_depth(codec: Codec, depth: int) -> None:
    # 1100 and more pass both parsers' own limits (1024): the same error all the same.
    frame = b"[" * depth + b"]" * depth if codec is Codec.JSON else b"\x91" * depth + b"\x90"
    for data in _both_kinds(frame, codec):
        (result,) = decode(data, codec, Sender.CLIENT)
        assert _is_too_deep(result), result


# The probe's finding: orjson accepts these; the 20 digits send the line to json.loads, which
# recursed into them and raised RecursionError out of decode().
DEEP_WITH_LONG_INTEGER = [
    pytest.param(b"[" * 1000 + b"12345678901234567890" + b"]" * 1000, id="bare-array"),
    pytest.param(
        b'{"type":"chat","request_id":"a","message":"x","metadata":{"a":'
        + b"[" * 1000
        + b"12345678901234567890"
        + b"]" * 1000
        + b"}}",
        id="chat-metadata",
    ),
    pytest.param(
        b'{"type":"ping","x":' + b"[" * DEPTH + b"-12345678901234567890123" + b"]" * DEPTH + b"}",
        id="just-over-the-bound",
    ),
]


@pytest.mark.parametrize("frame", DEEP_WITH_LONG_INTEGER)
def test_deep_json_with_a_long_integer_is_bad_frame_not_an_exception(frame: bytes) -> None:
    for data in (frame, frame.decode()):
        (result,) = decode(data, Codec.JSON, Sender.CLIENT)
        assert _is_too_deep(result), result


@pytest.mark.parametrize("frame", DEEP_WITH_LONG_INTEGER)
def test_json_loads_never_sees_a_deep_line(frame: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("json.loads called on a line nested too deeply")

    monkeypatch.setattr(codec_module.json, "loads", refuse)
    (result,) = decode(frame, Codec.JSON, Sender.CLIENT)
    assert _is_too_deep(result), result


def test_long_integers_are_still_read_exactly() -> None:
    # Within the bound the exact parser still runs: 2**64 is an integer out of range, not 1.8e19.
    line = b'{"type":"ping","x":[[["a"]]],"id":18446744073709551616}'
    (result,) = decode(line, Codec.JSON, Sender.CLIENT)
    assert isinstance(result, RemoteProtocolError)
    assert result.code is ErrorCode.INVALID_FIELD
    # Twenty digits inside a string are text, whatever parser read the line.
    text = b'{"type":"ping","id":"12345678901234567890"}'
    assert decode(text, Codec.JSON, Sender.CLIENT) == [Ping(id="12345678901234567890")]


@CODECS
def test_brackets_and_heads_inside_strings_are_not_nesting(codec: Codec) -> None:
    # Openers in strings (JSON "[" and "{", msgpack header bytes in UTF-8 text) pass the cheap
    # byte count; the walk of the decoded value clears them.
    text = "[{" * 200 + "éà" * 200 + "日本語" * 200
    frame = _frame({"type": "ping", "id": "p", "x": [text, {"y": [text]}]}, codec)
    for data in _both_kinds(frame, codec):
        assert decode(data, codec, Sender.CLIENT) == [Ping(id="p")]


@CODECS
def test_wide_but_shallow_values_decode(codec: Codec) -> None:
    frame = _frame(_ping_with([[[]] * 3] * 20_000), codec)
    for data in _both_kinds(frame, codec):
        assert decode(data, codec, Sender.CLIENT) == [Ping(id=1)]


# --- one bad message never hides the good ones (G6) ---------------------------------------------


def test_json_deep_line_between_good_lines_is_refused_alone() -> None:
    good = b'{"type":"ping","id":1}'
    deep = b'{"type":"ping","id":2,"x":' + b"[" * 1000 + b"12345678901234567890" + b"]" * 1000
    deep += b"}"
    shallow = b'{"type":"ping","id":3}'
    frame = b"\n".join([good, deep, shallow])
    for data in (frame, frame.decode()):
        first, middle, last = decode(data, Codec.JSON, Sender.CLIENT)
        assert first == Ping(id=1)
        assert _is_too_deep(middle), middle
        assert last == Ping(id=3)


@pytest.mark.parametrize(
    "deep",
    [msgpack.packb(_ping_with(_nested_list(DEPTH))), b"\x91" * 5000 + b"\x90"],
    ids=["over-the-bound", "over-msgpack-own-limit"],
)
def test_msgpack_deep_object_ends_the_frame_after_the_good_ones(deep: bytes) -> None:
    frame = encode(Ping(id=1), Codec.MSGPACK) + deep + encode(Ping(id=3), Codec.MSGPACK)
    first, last = decode(frame, Codec.MSGPACK, Sender.CLIENT)
    assert first == Ping(id=1)
    assert _is_too_deep(last), last


def test_msgpack_deep_object_first_in_a_batch() -> None:
    frame = msgpack.packb(_ping_with(_nested_list(DEPTH))) + encode(Ping(id=2), Codec.MSGPACK)
    (result,) = decode(frame, Codec.MSGPACK, Sender.CLIENT)
    assert _is_too_deep(result), result


@pytest.mark.parametrize(
    "tail", [b"\x85", b"\xc1", b"\x91" * 100], ids=["truncated", "c1", "headers"]
)
def test_msgpack_deep_object_before_a_broken_tail(tail: bytes) -> None:
    # Whatever follows a too deep object is not read, not even to report it.
    frame = (
        encode(Ping(id=1), Codec.MSGPACK)
        + msgpack.packb(_ping_with(_nested_list(DEPTH + 8)))
        + tail
    )
    first, last = decode(frame, Codec.MSGPACK, Sender.CLIENT)
    assert first == Ping(id=1)
    assert _is_too_deep(last), last


def test_msgpack_one_object_then_garbage_full_of_header_bytes() -> None:
    frame = encode(Ping(id=1), Codec.MSGPACK) + b"\x91" * 100  # truncated, not too deep
    first, last = decode(frame, Codec.MSGPACK, Sender.CLIENT)
    assert first == Ping(id=1)
    assert isinstance(last, RemoteProtocolError)
    assert last.code is ErrorCode.BAD_FRAME
    assert "nested" not in last.message


def _naive_msgpack(frame: bytes) -> list[object]:
    """The expected outcomes of a msgpack batch, object by object, with a plain recursive walk."""

    def depth(value: object) -> int:
        if isinstance(value, dict):
            return 1 + max(map(depth, value.values()), default=0)
        if isinstance(value, list):
            return 1 + max(map(depth, value), default=0)
        return 0

    out: list[object] = []
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
    unpacker.feed(frame)
    for obj in unpacker:
        if depth(obj) > DEPTH:
            out.append("too deep")
            break
        out.append(obj)
    return out


def _random_value(rng: random.Random, depth: int) -> object:
    text = rng.choice(["a", "é", "日本", "\x80\x9f", "x" * 40])
    value: object = rng.choice([text, rng.randrange(128, 160), rng.randrange(2**16), 1.5])
    for _ in range(depth):
        value = rng.choice([[value, text], {"k": value, "seq": rng.randrange(128, 160)}])
    return value


@pytest.mark.parametrize("seed", range(40))
def test_msgpack_batches_match_an_object_by_object_walk(seed: int) -> None:
    """The batch check counts header bytes over runs of objects; it must find exactly the first
    object a naive walk finds, whatever header-like bytes strings and integers add."""
    rng = random.Random(seed)
    count = rng.choice([2, 3, 9, 40, 300])
    deep_at = rng.randrange(count) if rng.random() < 0.7 else None
    objects = []
    for i in range(count):
        # The chunk map is level 1; its field x adds `depth` levels.
        depth = DEPTH + rng.randrange(0, 3) if i == deep_at else rng.choice([0, 1, 4, DEPTH - 1])
        x = _random_value(rng, depth)
        objects.append({"type": "chunk", "request_id": "r", "seq": i, "text": "t", "x": x})
    frame = b"".join(msgpack.packb(o, use_bin_type=True) for o in objects)
    expected = _naive_msgpack(frame)
    results = decode(frame, Codec.MSGPACK, Sender.GATEWAY)
    assert len(results) == len(expected)
    for result, want in zip(results, expected, strict=True):
        if want == "too deep":
            assert _is_too_deep(result), result
        else:
            assert not isinstance(result, RemoteProtocolError) or "nested" not in result.message


def test_msgpack_many_chunks_with_header_like_bytes_all_decode() -> None:
    # seq 128..159 is encoded 0xcc 0x80..0x9f; CJK text is full of 0x80..0x9f bytes.
    chunks = [Chunk(request_id="r", seq=i, text="日本語のテキスト" * 3) for i in range(600)]
    frame = join_batch([encode(c, Codec.MSGPACK) for c in chunks], Codec.MSGPACK)
    assert decode(frame, Codec.MSGPACK, Sender.GATEWAY) == chunks


# --- the per-frame message cap, before any decoding ---------------------------------------------

MANY_LINES = [
    pytest.param(b"x\n" * 524_287, id="bytes-invalid-lines"),
    pytest.param("x\n" * 524_287, id="str-invalid-lines"),
    pytest.param(b"1\n" * 500_000, id="bytes-valid-lines"),
    pytest.param("1\n" * 500_000, id="str-valid-lines"),
    pytest.param(b"\n" * 600_000 + b"1\n" * (CAP + 1), id="bytes-blank-then-over-cap"),
    pytest.param(" \r\n" * 300_000 + "1\n" * (CAP + 1), id="str-blank-then-over-cap"),
]


@pytest.fixture
def line_parsers(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every call to the per-line parsers the codec uses (orjson.loads, json.loads)."""
    calls: list[object] = []

    def spy(real: Any) -> Any:
        def loads(data: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(data)
            return real(data, *args, **kwargs)

        return loads

    monkeypatch.setattr(codec_module.orjson, "loads", spy(orjson.loads))
    monkeypatch.setattr(codec_module.json, "loads", spy(json.loads))
    return calls


@pytest.mark.parametrize("frame", MANY_LINES)
def test_frame_over_the_message_cap_is_refused_before_decoding(
    frame: bytes | str, line_parsers: list[object]
) -> None:
    assert len(frame.encode() if isinstance(frame, str) else frame) <= limits.MAX_FRAME_BYTES
    results = decode(frame, Codec.JSON, Sender.CLIENT)
    assert _codes(results) == [ErrorCode.FRAME_TOO_LARGE]
    assert line_parsers == []  # not a single line was parsed


@pytest.mark.parametrize("kind", [bytes, str])
def test_blank_lines_do_not_count_towards_the_cap(kind: type, line_parsers: list[object]) -> None:
    blanks = "\n" * 2000 + " \t\r\n" * 2000
    text = blanks + '{"type":"ping","id":1}\n \t{"type":"ping","id":2}\r\n' + blanks
    text += '{"type":"ping","id":3}' + blanks
    frame = text.encode() if kind is bytes else text
    assert decode(frame, Codec.JSON, Sender.CLIENT) == [Ping(id=1), Ping(id=2), Ping(id=3)]
    assert len(line_parsers) == 3


@pytest.mark.parametrize("kind", [bytes, str])
@pytest.mark.parametrize(("count", "too_many"), [(CAP, False), (CAP + 1, True)])
def test_message_cap_among_many_blank_lines(kind: type, count: int, too_many: bool) -> None:
    text = "\n\n \n".join(['{"type":"ping","id":1}'] * count) + "\n" * 5000
    frame = text.encode() if kind is bytes else text
    results = decode(frame, Codec.JSON, Sender.CLIENT)
    if too_many:
        assert _codes(results) == [ErrorCode.FRAME_TOO_LARGE]
    else:
        assert results == [Ping(id=1)] * count


def test_only_blank_lines_is_an_empty_frame() -> None:
    for frame in (b"\n" * 1_000_000, " \t\r\n" * 200_000):
        assert _codes(decode(frame, Codec.JSON, Sender.CLIENT)) == [ErrorCode.BAD_FRAME]


class _CountingUnpacker(msgpack.Unpacker):  # type: ignore[misc]
    objects = 0

    def __next__(self) -> object:
        _CountingUnpacker.objects += 1
        return super().__next__()


@pytest.mark.parametrize("frame", [b"\x00" * 1_000_000, b"\x80" * limits.MAX_FRAME_BYTES])
def test_msgpack_frame_of_tiny_objects_stops_at_the_cap(
    frame: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(codec_module.msgpack, "Unpacker", _CountingUnpacker)
    _CountingUnpacker.objects = 0
    assert _codes(decode(frame, Codec.MSGPACK, Sender.CLIENT)) == [ErrorCode.FRAME_TOO_LARGE]
    assert _CountingUnpacker.objects <= CAP + 1


# --- nothing escapes decode() -------------------------------------------------------------------


def test_an_unexpected_failure_in_a_line_fails_that_line_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = orjson.loads

    def flaky(data: Any) -> Any:
        if b"boom" in (data if isinstance(data, bytes) else data.encode()):
            raise RuntimeError("unexpected")
        return real(data)

    monkeypatch.setattr(codec_module.orjson, "loads", flaky)
    frame = '{"type":"ping","id":1}\n{"type":"ping","id":"boom"}\n{"type":"ping","id":3}'
    for data in (frame, frame.encode()):
        first, middle, last = decode(data, Codec.JSON, Sender.CLIENT)
        assert (first, last) == (Ping(id=1), Ping(id=3))
        assert isinstance(middle, RemoteProtocolError)
        assert middle.code is ErrorCode.BAD_FRAME


def test_a_recursion_error_in_the_exact_parser_fails_that_line_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def recursing(*args: object, **kwargs: object) -> object:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(codec_module.json, "loads", recursing)
    frame = b'{"type":"ping","id":12345678901234567890}\n{"type":"ping","id":2}'
    first, last = decode(frame, Codec.JSON, Sender.CLIENT)
    assert isinstance(first, RemoteProtocolError)
    assert first.code is ErrorCode.BAD_FRAME
    assert last == Ping(id=2)


@CODECS
def test_an_unexpected_failure_in_validation_fails_that_message_only(
    codec: Codec, monkeypatch: pytest.MonkeyPatch
) -> None:
    def flaky(obj: Any, sender: Sender) -> Any:
        if obj.get("id") == 2:
            raise KeyError("a bug")
        return parse_message(obj, sender)

    monkeypatch.setattr(codec_module, "parse_message", flaky)
    frame = protocol.encode_batch([Ping(id=1), Ping(id=2), Ping(id=3)], codec)
    first, middle, last = decode(frame, codec, Sender.CLIENT)
    assert (first, last) == (Ping(id=1), Ping(id=3))
    assert isinstance(middle, RemoteProtocolError)
    assert middle.code is ErrorCode.BAD_FRAME


# --- validation never recurses without bound ----------------------------------------------------


@pytest.mark.parametrize("field", ["metadata", "messages", "usage", "limits", "error", "x"])
@pytest.mark.parametrize("sender", list(Sender), ids=lambda s: s.value)
def test_parse_message_on_deep_values_raises_only_protocol_errors(
    field: str, sender: Sender
) -> None:
    deep: object = 1
    for i in range(100_000):
        deep = {"a": deep} if i % 2 else [deep]
    for type_ in ("chat", "response", "welcome", "usage"):
        obj = {"type": type_, "request_id": "r1", "message": "x", field: deep}
        with contextlib.suppress(RemoteProtocolError):  # anything else fails the test
            parse_message(obj, sender)
