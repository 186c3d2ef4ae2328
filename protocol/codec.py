"""Codecs: messages to bytes and WebSocket frames back to messages (SPEC.md §2, §9).

Two codecs, chosen per connection by WebSocket subprotocol:

- ``muxgate.v1.json``: text frames; each message one compact JSON object; a batch joins them
  with ``\\n``.
- ``muxgate.v1.msgpack``: binary frames; each message one msgpack map; a batch concatenates them.

Encoding is canonical (SPEC.md §9) so that every SDK produces the same bytes for the same
message; the shared vectors in ``protocol/vectors/`` pin it. :func:`encode_chunk` is the hot path
of a gateway and builds the chunk's map directly, without a :class:`Chunk` object.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Final

import msgpack
import orjson

from . import limits
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .messages import ChatMessage, ErrorInfo, Limits, Message, Sender, Usage, parse_message

__all__ = [
    "SUBPROTOCOLS",
    "Codec",
    "chunk_prefix",
    "decode",
    "decode_one",
    "encode",
    "encode_batch",
    "encode_chunk",
    "encode_chunk_from",
    "join_batch",
    "to_wire",
]


class Codec(enum.Enum):
    """A wire encoding; the value is its WebSocket subprotocol name."""

    JSON = "muxgate.v1.json"
    MSGPACK = "muxgate.v1.msgpack"

    @property
    def subprotocol(self) -> str:
        return self.value

    @property
    def is_text(self) -> bool:
        """Whether frames of this codec are WebSocket text frames."""
        return self is Codec.JSON

    @classmethod
    def from_subprotocol(cls, name: str | None) -> Codec:
        """The codec of a negotiated subprotocol; none negotiated means JSON (SPEC.md §2.2)."""
        if name is None:
            return cls.JSON
        return cls(name)


#: Subprotocols in the gateway's order of preference.
SUBPROTOCOLS: tuple[str, ...] = (Codec.MSGPACK.value, Codec.JSON.value)

_SEPARATOR = {Codec.JSON: b"\n", Codec.MSGPACK: b""}

# One Packer, reused: half the cost of msgpack.packb(), which builds a Packer per call. pack()
# runs in C without releasing the GIL or calling back into Python for the types we pass (str,
# int, float, bool, None, list, dict), so sharing it between threads is safe.
_pack = msgpack.Packer(use_bin_type=True).pack


# --- encoding -----------------------------------------------------------------------------------


def _usage_wire(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "saved_tokens": usage.saved_tokens,
        "final": usage.final,
    }


def _value_wire(value: object) -> object:
    if isinstance(value, Usage):
        return _usage_wire(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, ChatMessage):
        return {"role": value.role.value, "content": value.content}
    if isinstance(value, ErrorInfo):
        return {"code": value.code, "message": value.message}
    if isinstance(value, Limits):
        return {name: getattr(value, name) for name in _field_names(Limits)}
    if isinstance(value, tuple):
        return [_value_wire(item) for item in value]
    return value


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    # dataclasses.fields() skips the ClassVar TYPE; cached because to_wire() runs per message.
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def to_wire(message: Message) -> dict[str, Any]:
    """The message as a plain map in canonical field order, ``None`` fields omitted."""
    wire: dict[str, Any] = {"type": message.TYPE}
    for name in _field_names(type(message)):
        value = getattr(message, name)
        if value is not None:
            wire[name] = _value_wire(value)
    return wire


def _dump(wire: dict[str, Any], codec: Codec) -> bytes:
    try:
        if codec is Codec.JSON:
            return orjson.dumps(wire)
        return _pack(wire)
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. a lone surrogate in a string
        raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"not encodable: {exc}") from exc


def encode(message: Message, codec: Codec) -> bytes:
    """One message as the payload of one frame (JSON: UTF-8 for a *text* frame)."""
    return _dump(to_wire(message), codec)


def encode_chunk(request_id: str, seq: int, text: str, codec: Codec) -> bytes:
    """Hot path: a chunk's bytes without building a :class:`Chunk`.

    The caller vouches for the fields (the gateway validated ``request_id`` when the chat
    arrived and counts ``seq`` itself); the bytes equal ``encode(Chunk(...), codec)``.
    """
    return encode_chunk_from(chunk_prefix(request_id, codec), seq, text, codec)


def chunk_prefix(request_id: str, codec: Codec) -> bytes:
    """The bytes every chunk of ``request_id`` starts with: encode them once per request."""
    if codec is Codec.JSON:
        return b'{"type":"chunk","request_id":' + orjson.dumps(request_id) + b',"seq":'
    return _CHUNK_MAP_HEAD + _pack(request_id) + _SEQ_KEY


def encode_chunk_from(prefix: bytes, seq: int, text: str, codec: Codec) -> bytes:
    """:func:`encode_chunk` given the request's :func:`chunk_prefix`: only ``seq`` and
    ``text`` are encoded (about half the time of encoding the whole map). Raises TypeError or
    ValueError for a text the codec cannot encode (a lone surrogate), as ``encode`` does."""
    if codec is Codec.JSON:
        return b'%s%d,"text":%s}' % (prefix, seq, orjson.dumps(text))
    return b"".join((prefix, _pack(seq), _TEXT_KEY, _pack(text)))


# A chunk's msgpack map: 4 entries, keys in the canonical order (see to_wire).
_CHUNK_MAP_HEAD = b"\x84" + _pack("type") + _pack("chunk") + _pack("request_id")
_SEQ_KEY = _pack("seq")
_TEXT_KEY = _pack("text")


def join_batch(encoded: Sequence[bytes], codec: Codec) -> bytes:
    """Join already-encoded messages into one frame payload (SPEC.md §2.4)."""
    return _SEPARATOR[codec].join(encoded)


def encode_batch(messages: Iterable[Message], codec: Codec) -> bytes:
    """Several messages as one frame payload."""
    return join_batch([encode(m, codec) for m in messages], codec)


# --- decoding -----------------------------------------------------------------------------------


def _too_large(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.FRAME_TOO_LARGE, what)


# 20 digits in a row: a number orjson may not read exactly (beyond 64 bits).
_LONG_DIGITS_B: Final = re.compile(rb"[0-9]{20}")
_LONG_DIGITS_S: Final = re.compile(r"[0-9]{20}")


def _json_objects(data: bytes | str) -> list[object]:
    """Split a JSON frame into decoded objects; a bad line becomes an error in its place."""
    lines: list[bytes] | list[str] = (
        data.split(b"\n") if isinstance(data, bytes) else data.split("\n")
    )
    out: list[object] = []
    for line in lines:
        # A line of JSON whitespace only (e.g. after a trailing newline) carries no message. Only
        # JSON's own whitespace counts: str.strip() would also drop e.g. U+00A0 in a text frame but
        # not in the same frame as bytes, and other languages' trim() differ again (vectors pin it).
        if not (line.strip(b" \t\r") if isinstance(line, bytes) else line.strip(" \t\r")):
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            out.append(RemoteProtocolError(ErrorCode.BAD_FRAME, "invalid JSON"))
            continue
        long_digits = (
            _LONG_DIGITS_B.search(line) if isinstance(line, bytes) else _LONG_DIGITS_S.search(line)
        )
        if long_digits:
            # orjson reads an integer literal beyond 64 bits as a float (1e+20), which would
            # then pass as a float where SPEC.md §2.3 refuses an out-of-range integer. Such
            # literals are rare: re-read the line with the exact (slower) parser.
            obj = json.loads(line)
        out.append(obj)
    return out


def _msgpack_objects(data: bytes) -> list[object]:
    """Split a msgpack frame into decoded maps. Unlike JSON lines there is no resync point:
    after a malformed map nothing further in the frame can be trusted."""
    try:  # fast path: most frames hold one message
        return [msgpack.unpackb(data, raw=False, strict_map_key=True)]
    except msgpack.ExtraData:
        pass  # a batch: walk it below
    except Exception:  # any failure (truncation, bad bytes, bad keys) is the peer's bad input
        return [RemoteProtocolError(ErrorCode.BAD_FRAME, "invalid msgpack")]
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=max(len(data), 1),
    )
    out: list[object] = []
    try:
        unpacker.feed(data)
        # Unpack one object at a time: iteration would hide a truncated tail.
        while len(out) <= limits.MAX_BATCH_MESSAGES and unpacker.tell() < len(data):
            out.append(unpacker.unpack())
    except msgpack.OutOfData:
        out.append(RemoteProtocolError(ErrorCode.BAD_FRAME, "truncated msgpack"))
    except Exception:  # any other msgpack failure is the peer's bad input
        out.append(RemoteProtocolError(ErrorCode.BAD_FRAME, "invalid msgpack"))
    return out


def decode(data: bytes | str, codec: Codec, sender: Sender) -> list[Message | RemoteProtocolError]:
    """Decode one WebSocket frame from ``sender`` into its messages, in order.

    A message that fails is replaced by its :class:`RemoteProtocolError` (G6: one bad message
    never hides the good ones around it). Raises nothing. ``data`` is ``str`` for a text frame,
    ``bytes`` for a binary one; JSON accepts both, msgpack only bytes.
    """
    if not data:
        return [RemoteProtocolError(ErrorCode.BAD_FRAME, "empty frame")]
    if isinstance(data, bytes):
        size = len(data)
    else:  # a character is at most 4 UTF-8 bytes: only long texts need encoding to measure
        size = len(data)
        if size * 4 > limits.MAX_FRAME_BYTES:
            size = len(data.encode("utf-8", "surrogatepass"))
    if size > limits.MAX_FRAME_BYTES:
        return [_too_large(f"frame exceeds {limits.MAX_FRAME_BYTES} bytes")]
    if codec is Codec.JSON:
        objects = _json_objects(data)
    elif isinstance(data, str):
        return [RemoteProtocolError(ErrorCode.BAD_FRAME, "msgpack needs binary frames")]
    else:
        objects = _msgpack_objects(data)
    if not objects:
        return [RemoteProtocolError(ErrorCode.BAD_FRAME, "empty frame")]
    if len(objects) > limits.MAX_BATCH_MESSAGES:
        return [_too_large(f"frame carries more than {limits.MAX_BATCH_MESSAGES} messages")]
    results: list[Message | RemoteProtocolError] = []
    for obj in objects:
        if isinstance(obj, RemoteProtocolError):
            results.append(obj)
            continue
        try:
            results.append(parse_message(obj, sender))
        except RemoteProtocolError as exc:
            results.append(exc)
    return results


def decode_one(data: bytes | str, codec: Codec, sender: Sender) -> Message:
    """Decode a frame that must hold exactly one valid message; raise its error otherwise."""
    results = decode(data, codec, sender)
    if len(results) != 1:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "expected exactly one message")
    (result,) = results
    if isinstance(result, RemoteProtocolError):
        raise result
    return result
