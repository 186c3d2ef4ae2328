"""Codec layer, property-based: messages -> bytes -> the same messages, for both codecs."""

from __future__ import annotations

import dataclasses

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    Chunk,
    Codec,
    Message,
    Sender,
    chunk_prefix,
    decode,
    decode_one,
    encode,
    encode_batch,
    encode_chunk,
    encode_chunk_from,
    encode_chunks_from,
    join_batch,
    to_wire,
)
from tests.protocol import strategies as s

CODECS = pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
MESSAGE_TYPES = pytest.mark.parametrize(
    "cls", list(s.MESSAGE_STRATEGIES), ids=lambda cls: cls.__name__
)
SENDERS = pytest.mark.parametrize("sender", list(Sender), ids=lambda x: x.value)


def _load(data: bytes, codec: Codec) -> object:
    return orjson.loads(data) if codec is Codec.JSON else msgpack.unpackb(data, raw=False)


@CODECS
@MESSAGE_TYPES
@settings(max_examples=60)
@given(data=st.data())
def test_every_message_round_trips(cls, codec, data):
    strategy, sender = s.MESSAGE_STRATEGIES[cls]
    message = data.draw(strategy)
    wire = encode(message, codec)
    assert isinstance(wire, bytes)
    decoded = decode_one(wire, codec, sender)
    assert type(decoded) is cls
    assert decoded == message
    # Canonical: encoding is deterministic and the decoded message re-encodes to the same bytes.
    assert encode(message, codec) == wire
    assert encode(decoded, codec) == wire


@CODECS
@MESSAGE_TYPES
@settings(max_examples=30)
@given(data=st.data())
def test_json_text_frame_decodes_like_bytes(cls, codec, data):
    """A JSON frame arrives as ``str`` (text frame); a msgpack one must be bytes."""
    strategy, sender = s.MESSAGE_STRATEGIES[cls]
    message = data.draw(strategy)
    wire = encode(message, codec)
    if codec is Codec.JSON:
        assert decode_one(wire.decode("utf-8"), codec, sender) == message
    else:
        (error,) = decode(wire.decode("latin-1"), codec, sender)
        assert error.code == "bad_frame"


@CODECS
@SENDERS
@settings(max_examples=80)
@given(data=st.data())
def test_batches_round_trip_in_order(codec, sender, data):
    messages = data.draw(st.lists(s.MESSAGES_BY_SENDER[sender], min_size=1, max_size=12))
    frame = encode_batch(messages, codec)
    assert decode(frame, codec, sender) == messages
    assert frame == join_batch([encode(m, codec) for m in messages], codec)


@SENDERS
@settings(max_examples=40)
@given(data=st.data())
def test_json_batch_tolerates_blank_lines_and_trailing_newline(sender, data):
    messages = data.draw(st.lists(s.MESSAGES_BY_SENDER[sender], min_size=1, max_size=6))
    frame = b"\n\n".join(encode(m, Codec.JSON) for m in messages) + b"\n"
    assert decode(frame, Codec.JSON, sender) == messages


@CODECS
@settings(max_examples=200)
@given(rid=s.request_ids, seq=s.non_negative_safe_ints, text=s.texts(min_size=1, max_size=300))
def test_encode_chunk_equals_encode_of_chunk(codec, rid, seq, text):
    wire = encode_chunk(rid, seq, text, codec)
    assert wire == encode(Chunk(request_id=rid, seq=seq, text=text), codec)
    assert decode_one(wire, codec, Sender.GATEWAY) == Chunk(request_id=rid, seq=seq, text=text)


@CODECS
@MESSAGE_TYPES
@settings(max_examples=30)
@given(data=st.data())
def test_to_wire_is_canonical(cls, codec, data):
    """``type`` first, then the fields in declared order, ``None`` fields omitted; the bytes
    are exactly the codec's dump of that map."""
    strategy, _ = s.MESSAGE_STRATEGIES[cls]
    message = data.draw(strategy)
    wire = to_wire(message)
    keys = list(wire)
    assert keys[0] == "type"
    assert wire["type"] == cls.TYPE
    declared = [f.name for f in dataclasses.fields(cls)]
    present = [name for name in declared if getattr(message, name) is not None]
    if getattr(message, "steps", None) is False:  # chat.steps: written only when true
        present.remove("steps")
    if getattr(message, "resumable", None) is False:  # chat.resumable: likewise
        present.remove("resumable")
    assert keys[1:] == present
    assert None not in wire.values()
    assert _load(encode(message, codec), codec) == wire
    # The order survives the codec too (canonical bytes, SPEC.md §9).
    assert list(_load(encode(message, codec), codec)) == keys


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            Chunk(request_id="r1", seq=0, text="Hi"),
            {"type": "chunk", "request_id": "r1", "seq": 0, "text": "Hi"},
        ),
    ],
)
@CODECS
def test_chunk_wire_literal(codec, message: Message, expected):
    assert to_wire(message) == expected
    assert list(to_wire(message)) == list(expected)
    if codec is Codec.JSON:
        assert encode(message, codec) == b'{"type":"chunk","request_id":"r1","seq":0,"text":"Hi"}'
    else:
        assert encode(message, codec) == msgpack.packb(expected, use_bin_type=True)


@CODECS
@settings(max_examples=100)
@given(rid=s.request_ids, seq=s.non_negative_safe_ints, text=s.texts(min_size=1, max_size=300))
def test_encode_chunk_from_a_prefix_equals_encode_of_chunk(codec, rid, seq, text):
    """The gateway encodes a request's chunk prefix once and then only seq and text."""
    prefix = chunk_prefix(rid, codec)
    assert encode_chunk_from(prefix, seq, text, codec) == encode(
        Chunk(request_id=rid, seq=seq, text=text), codec
    )


@CODECS
@settings(max_examples=100)
@given(
    rid=s.request_ids,
    seq=st.integers(0, 2**53 - 13),  # the last chunk's seq still a safe integer
    texts=st.lists(s.texts(min_size=1, max_size=40), max_size=12),
)
def test_encode_chunks_from_equals_one_encode_per_chunk(codec, rid, seq, texts):
    """The hot path's batch encoder: the same bytes as one ``encode`` per chunk, in order."""
    prefix = chunk_prefix(rid, codec)
    assert encode_chunks_from(prefix, seq, texts, codec) == [
        encode(Chunk(request_id=rid, seq=seq + i, text=text), codec) for i, text in enumerate(texts)
    ]


@CODECS
def test_encode_chunks_from_takes_the_prefix_as_bytes_not_a_format(codec):
    """A ``%`` in the prefix (no valid id has one; the function does not rely on that)."""
    prefix = chunk_prefix("r%d%s%%", codec)
    assert encode_chunks_from(prefix, 7, ["a", "%s"], codec) == [
        encode_chunk_from(prefix, 7, "a", codec),
        encode_chunk_from(prefix, 8, "%s", codec),
    ]


@CODECS
def test_encode_chunks_from_refuses_a_lone_surrogate(codec):
    with pytest.raises((TypeError, ValueError)):
        encode_chunks_from(chunk_prefix("r1", codec), 0, ["ok", "a\ud800b"], codec)


@CODECS
def test_encode_chunk_from_refuses_a_lone_surrogate(codec):
    with pytest.raises((TypeError, ValueError)):
        encode_chunk_from(chunk_prefix("r1", codec), 0, "a\ud800b", codec)
