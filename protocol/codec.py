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
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from operator import itemgetter
from typing import Any, Final

import msgpack
import orjson

from . import limits
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .messages import (
    ChatMessage,
    ErrorInfo,
    Halt,
    Limits,
    Message,
    Sender,
    Usage,
    parse_message,
)

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
    "encode_chunks_from",
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
    wire: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "saved_tokens": usage.saved_tokens,
        "final": usage.final,
    }
    if usage.estimated is not None:  # optional: absent when the sender does not say
        wire["estimated"] = list(usage.estimated)
    return wire


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
    if isinstance(value, Halt):  # optional step omitted; aborted always written
        halt: dict[str, Any] = {"state": value.state.value}
        if value.step is not None:
            halt["step"] = {
                "index": value.step.index,
                "kind": value.step.kind,
                "name": value.step.name,
            }
        halt["aborted"] = value.aborted
        return halt
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
    if wire.get("steps") is False:  # chat.steps: optional, written only when true (§3.3)
        del wire["steps"]
    if wire.get("resumable") is False:  # chat.resumable: likewise (§3.3)
        del wire["resumable"]
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


def encode_chunks_from(
    prefix: bytes, first_seq: int, texts: Sequence[str], codec: Codec
) -> list[bytes]:
    """``[encode_chunk_from(prefix, first_seq + i, text, codec) for i, text in ...]``, in one
    call: the gateway's hot path encodes a request's pending texts together (the per-chunk
    function call is a third of the cost of a short chunk). Same bytes, same errors."""
    seqs = range(first_seq, first_seq + len(texts))
    if codec is Codec.JSON:
        template = prefix.replace(b"%", b"%%") + b'%d,"text":%s}'
        dumps = orjson.dumps
        return [template % (seq, dumps(text)) for seq, text in zip(seqs, texts, strict=True)]
    join, pack, key = b"".join, _pack, _TEXT_KEY
    return [
        join((prefix, pack(seq), key, pack(text))) for seq, text in zip(seqs, texts, strict=True)
    ]


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


def _detached(exc: RemoteProtocolError) -> RemoteProtocolError:
    """``exc`` without the frames it was raised through (kept errors must not hold them)."""
    exc.__context__ = exc.__cause__ = None
    return exc.with_traceback(None)


def _bad_frame(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_FRAME, what)


def _too_many_messages() -> RemoteProtocolError:
    return _too_large(f"frame carries more than {limits.MAX_BATCH_MESSAGES} messages")


def _too_deep() -> RemoteProtocolError:
    return _bad_frame(f"nested deeper than {limits.MAX_NESTING_DEPTH} levels")


_CONTAINERS: Final = frozenset((dict, list))


def _nests_too_deep(value: object) -> bool:
    """Whether a decoded value has a container deeper than ``MAX_NESTING_DEPTH`` (SPEC.md §2.5;
    the value itself is level 1). Walks level by level, never recursing: this is the check that
    keeps deep values from recursive code (``json.loads``, validation, the application)."""
    if type(value) not in _CONTAINERS:
        return False
    level: list[Any] = [value]
    for _ in range(limits.MAX_NESTING_DEPTH):
        level = [
            item
            for container in level
            for item in (container.values() if type(container) is dict else container)
            if type(item) in _CONTAINERS
        ]
        if not level:
            return False
    return True  # `level` holds the containers at level MAX_NESTING_DEPTH + 1


# Before a decoded message is walked, a cheaper test on its bytes, at C speed: a container at
# level MAX_NESTING_DEPTH + 1 needs more than MAX_NESTING_DEPTH bytes that open one (JSON: "[" or
# "{"; msgpack: a map or array header). Such bytes also occur inside strings and numbers, so a
# count over the bound is only a maybe, which the walk settles.

# JSON text is translated by this table into a scan of its UTF-8 bytes, with the same lines: ASCII
# digits become "0", container openers "[", anything else but LF " ". The scan gives both the
# count above and runs of 20 digits, numbers that orjson may not read exactly (beyond 64 bits).
_JSON_SCAN: Final = bytes(
    0x30 if 0x30 <= byte <= 0x39 else 0x5B if byte in b"[{" else byte if byte == 0x0A else 0x20
    for byte in range(256)
)
_LONG_DIGITS: Final = b"0" * 20
# The shortest JSON text nested too deeply: MAX_NESTING_DEPTH + 1 openers and as many closers.
_DEEP_JSON_MIN_BYTES: Final = 2 * (limits.MAX_NESTING_DEPTH + 1)
# The bytes that start a msgpack map or array: fixmap, fixarray, array 16/32, map 16/32.
_MSGPACK_CONTAINER_HEADS: Final = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_MSGPACK_CONTAINER_HEAD_SET: Final = frozenset(_MSGPACK_CONTAINER_HEADS)
# The same bytes marked 1 in a translation, any other 0.
_MSGPACK_HEAD_MARKS: Final = bytes(int(byte in _MSGPACK_CONTAINER_HEAD_SET) for byte in range(256))
# A run of this many objects of a batch that fails the count is looked at object by object.
_MSGPACK_SHORT_RUN: Final = 4
# msgpack objects of up to this many bytes (on average in a batch) have their bytes counted first;
# larger ones are walked at once: a walk costs per container, a count per byte (of a long text).
_MSGPACK_COUNT_MAX_BYTES: Final = 1024


def _msgpack_heads(encoded: bytes) -> int:
    """How many bytes of ``encoded`` could start a map or an array (at least as many as do)."""
    return len(encoded) - len(encoded.translate(None, _MSGPACK_CONTAINER_HEADS))


def _msgpack_nests_too_deep(obj: object, encoded: bytes) -> bool:
    """Whether ``obj``, decoded from ``encoded``, nests deeper than ``MAX_NESTING_DEPTH``."""
    if len(encoded) <= limits.MAX_NESTING_DEPTH or type(obj) not in _CONTAINERS:
        return False
    if (
        len(encoded) <= _MSGPACK_COUNT_MAX_BYTES
        and _msgpack_heads(encoded) <= limits.MAX_NESTING_DEPTH
    ):
        return False
    return _nests_too_deep(obj)


def _msgpack_first_too_deep(objects: list[object], data: bytes, ends: list[int]) -> int | None:
    """The index of the first of a batch's ``objects`` that nests deeper than MAX_NESTING_DEPTH,
    or ``None``; object i was decoded from ``data`` up to ``ends[i]``.

    Counts heads in runs of objects rather than object by object: a run that holds an object
    nested too deeply has more than MAX_NESTING_DEPTH heads in that object and one more in each
    other container (its first byte), so a whole batch usually passes at once (one of chunks,
    say). A run that fails the count is halved; a short one is looked at object by object.
    """
    if len(objects) == 1:  # what follows it in `data` did not decode
        return 0 if _msgpack_nests_too_deep(objects[0], data[: ends[0]]) else None
    if len(data) > _MSGPACK_COUNT_MAX_BYTES * len(objects):
        return next((i for i, obj in enumerate(objects) if _nests_too_deep(obj)), None)
    heads = _msgpack_heads(data)
    if heads <= limits.MAX_NESTING_DEPTH:
        return None  # few containers in all
    starts = [0, *ends[:-1]]
    containers = list(map(_MSGPACK_CONTAINER_HEAD_SET.__contains__, itemgetter(*starts)(data)))
    if heads < sum(containers) + limits.MAX_NESTING_DEPTH:
        return None  # the usual batch
    marks = data.translate(_MSGPACK_HEAD_MARKS)
    middle = len(objects) // 2
    runs = [(middle, len(objects)), (0, middle)]  # [first, stop); the last one is looked at next
    while runs:
        first, stop = runs.pop()
        heads = marks.count(1, starts[first], ends[stop - 1])
        if heads < sum(containers[first:stop]) + limits.MAX_NESTING_DEPTH:
            continue
        if stop - first > _MSGPACK_SHORT_RUN:
            middle = (first + stop) // 2
            runs += ((middle, stop), (first, middle))
            continue
        for i in range(first, stop):
            if (
                containers[i]
                and marks.count(1, starts[i], ends[i]) > limits.MAX_NESTING_DEPTH
                and _nests_too_deep(objects[i])
            ):
                return i
    return None


# A line that is not blank, from its first character other than JSON whitespace to its end (the
# whitespace left out is JSON's own: the line decodes the same).
_NON_BLANK_LINE_B: Final = re.compile(rb"[^ \t\r\n][^\n]*")
_NON_BLANK_LINE_S: Final = re.compile(r"[^ \t\r\n][^\n]*")


def _first(count: int, matches: Iterator[re.Match[Any]]) -> list[Any]:
    """The text of the first ``count`` matches: the rest of the subject is not even scanned."""
    return [m.group() for m in islice(matches, count)]


def _json_scan(text: bytes | str) -> bytes:
    """``text`` translated by ``_JSON_SCAN`` (lone surrogates in a ``str`` pass as 3 bytes)."""
    encoded = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    return encoded.translate(_JSON_SCAN)


def _json_objects(data: bytes | str) -> list[object] | None:
    """Split a JSON frame into decoded objects; a bad line becomes an error in its place.

    ``None`` if more than ``MAX_BATCH_MESSAGES`` lines are not blank. They are counted before any
    line is decoded, at C speed: a frame of half a million one-character lines costs a newline
    count and a thousand regex matches, not half a million parser calls.
    """
    # A line of JSON whitespace only (e.g. after a trailing newline) carries no message. Only
    # JSON's own whitespace counts: str.strip() would also drop e.g. U+00A0 in a text frame but
    # not in the same frame as bytes, and other languages' trim() differ again (vectors pin it).
    cap = limits.MAX_BATCH_MESSAGES
    blank: Any  # bytes or str, as data and its lines
    newline: Any
    if isinstance(data, bytes):
        blank, newline = b" \t\r", b"\n"
    else:
        blank, newline = " \t\r", "\n"
    lines: list[Any]
    if len(data) < cap or data.count(newline) < cap:  # at most `cap` lines: nothing to count
        lines = data.split(newline)
        # What the frame may hold decides what each line is checked for.
        scan = _json_scan(data)
        maybe_long = scan.find(_LONG_DIGITS) >= 0  # (`in` is slower on bytes)
        maybe_deep = (
            len(scan) >= _DEEP_JSON_MIN_BYTES and scan.count(b"[") > limits.MAX_NESTING_DEPTH
        )
    else:
        non_blank: Any = _NON_BLANK_LINE_B if isinstance(data, bytes) else _NON_BLANK_LINE_S
        lines = _first(cap + 1, non_blank.finditer(data))
        if len(lines) > cap:
            return None
        maybe_long = maybe_deep = True
    out: list[object] = []
    for line in lines:
        if not line.strip(blank):
            continue
        obj: object
        try:
            obj = orjson.loads(line)
            if maybe_deep or maybe_long:
                line_scan = _json_scan(line)
                if (
                    maybe_deep
                    and line_scan.count(b"[") > limits.MAX_NESTING_DEPTH
                    and _nests_too_deep(obj)
                ):
                    obj = _too_deep()
                elif maybe_long and line_scan.find(_LONG_DIGITS) >= 0:
                    # orjson reads an integer literal beyond 64 bits as a float (1e+20), which
                    # would then pass as a float where SPEC.md §2.3 refuses an out-of-range
                    # integer. Such literals are rare: re-read the line with the exact (slower)
                    # parser. It recurses, but only as deep as the check above allows.
                    obj = json.loads(line)
        except orjson.JSONDecodeError as exc:
            # orjson stops at its own depth limit (1024), far above MAX_NESTING_DEPTH.
            obj = _too_deep() if "depth" in str(exc) else _bad_frame("invalid JSON")
        except Exception:  # a safety net, not a check: whatever else fails fails this line only
            obj = _bad_frame("undecodable JSON")
        out.append(obj)
    return out


def _msgpack_objects(data: bytes) -> list[object]:
    """Split a msgpack frame into decoded maps. Unlike JSON lines there is no resync point:
    after a malformed map, or one nested too deeply, nothing further in the frame is read."""
    try:  # fast path: most frames hold one message
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except msgpack.ExtraData as batch:  # a batch: its first object is decoded, the rest below
        obj = batch.unpacked  # type: ignore[attr-defined]  # the stubs lack it and `extra`
        offset = len(data) - len(batch.extra)  # type: ignore[attr-defined]  # where the rest starts
    except msgpack.StackError:  # deeper than msgpack's own limit (1024)
        return [_too_deep()]
    except Exception:  # any failure (truncation, bad bytes, bad keys) is the peer's bad input
        return [_bad_frame("invalid msgpack")]
    else:
        if len(data) > limits.MAX_NESTING_DEPTH and _msgpack_nests_too_deep(obj, data):
            return [_too_deep()]
        return [obj]
    out: list[object] = [obj]
    ends = [offset]
    failure: RemoteProtocolError | None = None
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(data) - offset)
    # From `data` itself: the exception's copy of the rest is freed, not held (fresh megabytes
    # cost page faults).
    unpacker.feed(memoryview(data)[offset:])
    try:
        for obj in unpacker:
            out.append(obj)
            ends.append(offset + unpacker.tell())
            if len(out) > limits.MAX_BATCH_MESSAGES:
                return out  # over the cap already: a million one-byte objects cost no more
    except msgpack.StackError:  # deeper than msgpack's own limit (1024)
        failure = _too_deep()
    except Exception:  # any other msgpack failure is the peer's bad input
        failure = _bad_frame("invalid msgpack")
    else:  # iteration stops quietly at a truncated tail
        if ends[-1] < len(data):
            failure = _bad_frame("truncated msgpack")
    deep = _msgpack_first_too_deep(out, data, ends)
    if deep is not None:
        return [*out[:deep], _too_deep()]
    if failure is not None:
        out.append(failure)
    return out


def decode(data: bytes | str, codec: Codec, sender: Sender) -> list[Message | RemoteProtocolError]:
    """Decode one WebSocket frame from ``sender`` into its messages, in order.

    A message that fails is replaced by its :class:`RemoteProtocolError` (G6: one bad message
    never hides the good ones around it). Raises nothing. ``data`` is ``str`` for a text frame,
    ``bytes`` for a binary one; JSON accepts both, msgpack only bytes.
    """
    if not data:
        return [_bad_frame("empty frame")]
    if isinstance(data, bytes):
        size = len(data)
    else:  # a character is at most 4 UTF-8 bytes: only long texts need encoding to measure
        size = len(data)
        if size * 4 > limits.MAX_FRAME_BYTES:
            size = len(data.encode("utf-8", "surrogatepass"))
    if size > limits.MAX_FRAME_BYTES:
        return [_too_large(f"frame exceeds {limits.MAX_FRAME_BYTES} bytes")]
    objects: list[object] | None
    if codec is Codec.JSON:
        objects = _json_objects(data)
        if objects is None:  # refused before any line was decoded
            return [_too_many_messages()]
    elif isinstance(data, str):
        return [_bad_frame("msgpack needs binary frames")]
    else:
        objects = _msgpack_objects(data)
    if not objects:
        return [_bad_frame("empty frame")]
    if len(objects) > limits.MAX_BATCH_MESSAGES:
        return [_too_many_messages()]
    results: list[Message | RemoteProtocolError] = []
    for obj in objects:
        if isinstance(obj, RemoteProtocolError):
            results.append(obj)
            continue
        try:
            results.append(parse_message(obj, sender))
        except RemoteProtocolError as exc:
            # Without its traceback: that holds this frame, whose ``results`` holds the error —
            # a cycle that only the cyclic collector would free (a frame of 1,024 refused
            # messages would wait for it, ~1 MB each; bench/frame_fuzz.py found it).
            results.append(_detached(exc))
        except Exception:  # a safety net for a bug in validation: this message fails alone
            results.append(_bad_frame("undecodable message"))
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
