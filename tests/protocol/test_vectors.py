"""Run the shared test vectors in ``protocol/vectors/`` (format: ``protocol/vectors/README.md``).

The TypeScript and Go SDKs run the same files; this is the Python runner. The vectors were written
independently of :mod:`protocol`'s encoder (canonical JSON from the object with compact
separators, msgpack from ``msgpack.packb`` on an ordered map), so these tests check the encoder
against them rather than against itself.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import msgpack
import pytest

import protocol
from protocol import (
    CancelReason,
    CancelStatus,
    Codec,
    Error,
    ErrorCode,
    RemoteProtocolError,
    ResponseStatus,
    Role,
    Sender,
    decode,
    encode,
    encode_chunk,
    parse_message,
    to_wire,
)
from protocol import limits as protocol_limits

VECTORS = Path(protocol.__file__).parent / "vectors"
CODECS = {"json": Codec.JSON, "msgpack": Codec.MSGPACK}
#: The error codes that decoding a frame can produce; every one must be pinned by a vector.
DECODE_ERROR_CODES = {
    ErrorCode.BAD_FRAME,
    ErrorCode.UNKNOWN_TYPE,
    ErrorCode.INVALID_FIELD,
    ErrorCode.FRAME_TOO_LARGE,
}


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    assert data["version"] == 1
    return data


MESSAGES_FILE = _load("messages.json")
MESSAGES = MESSAGES_FILE["messages"]
DECODE_ONLY = MESSAGES_FILE["decode_only"]
BATCHES = _load("batches.json")["batches"]
INVALID = _load("invalid.json")["invalid"]


def _params(file: str, cases: list[dict[str, Any]]) -> list[Any]:
    return [pytest.param(case, id=f"{file}:{case['name']}") for case in cases]


def _canon(value: Any) -> str:
    """Order- and type-exact form for comparisons (``True == 1`` and ``1 == 1.0`` in Python)."""
    return json.dumps(value, ensure_ascii=False)


def _frames(case: dict[str, Any]) -> list[str | bytes]:
    """A case's frame payload(s): JSON text is fed both as a text frame and as its UTF-8 bytes."""
    if "input" in case:
        assert case["codec"] == "json"
        return [case["input"], case["input"].encode("utf-8")]
    return [bytes.fromhex(case["input_hex"])]


def _outcome(result: object) -> dict[str, Any]:
    if isinstance(result, RemoteProtocolError):
        outcome: dict[str, Any] = {"error": str(result.code)}
        if result.request_id is not None:
            outcome["request_id"] = result.request_id
        return outcome
    return {"message": to_wire(result)}  # type: ignore[arg-type]


def _decode_single(data: str | bytes, codec: Codec, sender: Sender) -> Any:
    results = decode(data, codec, sender)
    assert len(results) == 1, results
    (result,) = results
    assert not isinstance(result, RemoteProtocolError), result
    return result


# --- messages.json: canonical messages ----------------------------------------------------------


@pytest.mark.parametrize("case", _params("messages.json", MESSAGES))
def test_message_decodes_in_both_codecs(case: dict[str, Any]) -> None:
    sender = Sender(case["sender"])
    from_json = _decode_single(case["json"], Codec.JSON, sender)
    from_json_bytes = _decode_single(case["json"].encode("utf-8"), Codec.JSON, sender)
    from_msgpack = _decode_single(bytes.fromhex(case["msgpack_hex"]), Codec.MSGPACK, sender)
    assert from_json == from_json_bytes == from_msgpack
    assert _canon(to_wire(from_json)) == _canon(case["message"])


@pytest.mark.parametrize("case", _params("messages.json", MESSAGES))
def test_message_encodes_canonically(case: dict[str, Any]) -> None:
    sender = Sender(case["sender"])
    message = parse_message(case["message"], sender)
    assert message == _decode_single(case["json"], Codec.JSON, sender)
    assert _canon(to_wire(message)) == _canon(case["message"])
    assert encode(message, Codec.JSON) == case["json"].encode("utf-8")
    assert encode(message, Codec.MSGPACK).hex() == case["msgpack_hex"]


@pytest.mark.parametrize(
    "case", _params("messages.json", [c for c in MESSAGES if c["message"]["type"] == "chunk"])
)
def test_chunk_fast_path_matches_vectors(case: dict[str, Any]) -> None:
    m = case["message"]
    args = (m["request_id"], m["seq"], m["text"])
    assert encode_chunk(*args, Codec.JSON) == case["json"].encode("utf-8")
    assert encode_chunk(*args, Codec.MSGPACK).hex() == case["msgpack_hex"]


@pytest.mark.parametrize("case", _params("messages.json", MESSAGES + DECODE_ONLY))
def test_vector_file_is_self_consistent(case: dict[str, Any]) -> None:
    """The data agree with themselves, without :mod:`protocol` (catches a hand-edited vector)."""
    canonical = "json" in case
    json_text: str = case["json"] if canonical else case["canonical_json"]
    msgpack_hex: str = case["msgpack_hex"] if canonical else case["canonical_msgpack_hex"]
    message = case["message"]
    assert next(iter(message)) == "type", "type comes first"
    assert json_text == json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    assert _canon(json.loads(json_text)) == _canon(message)
    assert _canon(msgpack.unpackb(bytes.fromhex(msgpack_hex), raw=False)) == _canon(message)
    assert msgpack.packb(message, use_bin_type=True).hex() == msgpack_hex
    # Go's encoding/json always escapes U+2028/U+2029: canonical JSON never contains them.
    assert "\u2028" not in json_text
    assert "\u2029" not in json_text


# --- messages.json: decode_only -----------------------------------------------------------------


@pytest.mark.parametrize("case", _params("messages.json", DECODE_ONLY))
def test_decode_only(case: dict[str, Any]) -> None:
    sender = Sender(case["sender"])
    codec = CODECS[case["codec"]]
    for frame in _frames(case):
        message = _decode_single(frame, codec, sender)
        assert _canon(to_wire(message)) == _canon(case["message"])
        assert message == parse_message(case["message"], sender)
        assert encode(message, Codec.JSON) == case["canonical_json"].encode("utf-8")
        assert encode(message, Codec.MSGPACK).hex() == case["canonical_msgpack_hex"]


def test_decode_only_inputs_are_not_canonical() -> None:
    for case in DECODE_ONLY:
        if case["codec"] == "json":
            assert case["input"] != case["canonical_json"], case["name"]
        else:
            assert case["input_hex"] != case["canonical_msgpack_hex"], case["name"]


# --- batches.json and invalid.json --------------------------------------------------------------


def _check_expected(case: dict[str, Any]) -> None:
    sender = Sender(case["sender"])
    codec = CODECS[case["codec"]]
    for frame in _frames(case):
        results = decode(frame, codec, sender)
        assert _canon([_outcome(r) for r in results]) == _canon(case["expected"]), type(frame)
        for result in results:
            if isinstance(result, RemoteProtocolError):
                # The gateway answers each refused message with an error message: it must exist.
                encode(Error.from_exception(result), codec)


@pytest.mark.parametrize("case", _params("batches.json", BATCHES))
def test_batch(case: dict[str, Any]) -> None:
    _check_expected(case)


@pytest.mark.parametrize("case", _params("invalid.json", INVALID))
def test_invalid(case: dict[str, Any]) -> None:
    assert any("error" in outcome for outcome in case["expected"])
    _check_expected(case)


# --- coverage of the vectors --------------------------------------------------------------------


def _types(alias: Any) -> set[str]:
    return {cls.TYPE for cls in typing.get_args(alias)}


@pytest.mark.parametrize(
    ("sender", "alias"),
    [("client", protocol.ClientMessage), ("gateway", protocol.GatewayMessage)],
)
def test_every_message_type_has_vectors(sender: str, alias: Any) -> None:
    covered = {c["message"]["type"] for c in MESSAGES if c["sender"] == sender}
    assert covered == _types(alias)


def test_every_enum_value_has_a_vector() -> None:
    messages = [c["message"] for c in MESSAGES]
    responses = [m for m in messages if m["type"] == "response"]
    assert {m["status"] for m in responses} == {s.value for s in ResponseStatus}
    assert {m.get("reason") for m in responses} - {None} == {r.value for r in CancelReason}
    assert {m["usage"]["final"] for m in responses if m["status"] == "cancelled"} == {True, False}
    results = [m for m in messages if m["type"] == "cancel_result"]
    assert {m["status"] for m in results} == {s.value for s in CancelStatus}
    roles = {t["role"] for m in messages if m["type"] == "chat" for t in m.get("messages", [])}
    assert roles == {r.value for r in Role}
    error_codes = {m["code"] for m in messages if m["type"] == "error"}
    assert {c.value for c in ErrorCode} <= error_codes
    assert {type(m.get("id")) for m in messages if m["type"] in ("ping", "pong")} == {
        type(None),
        str,
        int,
    }


def test_every_decode_error_code_has_a_vector() -> None:
    codes = {
        outcome["error"]
        for case in BATCHES + INVALID
        for outcome in case["expected"]
        if "error" in outcome
    }
    assert codes == {c.value for c in DECODE_ERROR_CODES}
    for codec in CODECS:
        per_codec = {
            o["error"]
            for c in INVALID
            if c["codec"] == codec
            for o in c["expected"]
            if "error" in o
        }
        assert per_codec == codes, codec


def _metadata_objects(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, list):
        return [obj for item in value for obj in _metadata_objects(item)]
    if isinstance(value, dict):
        return [value, *(obj for item in value.values() for obj in _metadata_objects(item))]
    return []


def test_metadata_key_order_is_portable() -> None:
    """README: metadata keys in the vectors are sorted and none looks like an array index, so
    insertion-ordered maps (JavaScript) and key-sorted maps (Go) both reproduce the bytes."""
    messages = [c["message"] for c in MESSAGES + DECODE_ONLY]
    messages += [o["message"] for c in BATCHES + INVALID for o in c["expected"] if "message" in o]
    checked = 0
    for message in messages:
        for obj in _metadata_objects(message.get("metadata")):
            keys = list(obj)
            assert keys == sorted(keys), message
            assert not any(k.isdigit() for k in keys), message
            checked += 1
    assert checked > 10


@pytest.mark.parametrize(
    ("file", "cases"),
    [
        ("messages.json", MESSAGES),
        ("messages.json", DECODE_ONLY),
        ("batches.json", BATCHES),
        ("invalid.json", INVALID),
    ],
)
def test_vector_names_are_unique(file: str, cases: list[dict[str, Any]]) -> None:
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), file


# --- limits too large for a data file -----------------------------------------------------------

MAX = protocol_limits.MAX_FRAME_BYTES


def _chunk_frame_of_size(size: int, codec: Codec) -> bytes:
    """A single valid-looking chunk frame of exactly ``size`` bytes."""
    probe = 100_000  # long enough that msgpack uses str32 here and below
    overhead = len(encode_chunk("r1", 0, "x" * probe, codec)) - probe
    frame = encode_chunk("r1", 0, "x" * (size - overhead), codec)
    assert len(frame) == size
    return frame


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
def test_frame_of_max_frame_bytes_is_accepted(codec: Codec) -> None:
    frame = _chunk_frame_of_size(MAX, codec)
    frames: list[str | bytes] = [frame, frame.decode()] if codec is Codec.JSON else [frame]
    for data in frames:
        (message,) = decode(data, codec, Sender.GATEWAY)
        assert isinstance(message, protocol.Chunk)


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
def test_frame_over_max_frame_bytes_is_frame_too_large(codec: Codec) -> None:
    frame = _chunk_frame_of_size(MAX + 1, codec)
    frames: list[str | bytes] = [frame, frame.decode()] if codec is Codec.JSON else [frame]
    for data in frames:
        results = decode(data, codec, Sender.GATEWAY)
        assert [_outcome(r) for r in results] == [{"error": "frame_too_large"}]


def test_text_frame_size_is_counted_in_utf8_bytes() -> None:
    # 3 bytes per character: under the limit in characters, over it in bytes.
    text = "日" * (MAX // 3 + 1)
    frame = '{"type":"chunk","request_id":"r1","seq":0,"text":"' + text + '"}'
    assert len(frame) < MAX < len(frame.encode())
    results = decode(frame, Codec.JSON, Sender.GATEWAY)
    assert [_outcome(r) for r in results] == [{"error": "frame_too_large"}]


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.name.lower())
@pytest.mark.parametrize(
    ("count", "too_large"),
    [(protocol_limits.MAX_BATCH_MESSAGES, False), (protocol_limits.MAX_BATCH_MESSAGES + 1, True)],
    ids=["max", "max_plus_1"],
)
def test_batch_message_count_limit(codec: Codec, count: int, too_large: bool) -> None:
    pings = [protocol.Ping(id=i) for i in range(count)]
    frame = protocol.encode_batch(pings, codec)
    results = decode(frame, codec, Sender.CLIENT)
    if too_large:
        assert [_outcome(r) for r in results] == [{"error": "frame_too_large"}]
    else:
        assert results == pings
