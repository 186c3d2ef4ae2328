"""Fuzz ``protocol.decode`` and ``decode_one`` on arbitrary frames.

Input: byte 0 picks codec, sender and bytes/text (``_formats.DEC_*``); the rest is the frame.
Properties (SPEC.md §2.3-§2.4, §3; ``protocol/errors.py``: "decoding arbitrary bytes raises (or
returns) only RemoteProtocolError"):

- ``decode`` raises nothing and returns 1..MAX_BATCH_MESSAGES results, each a message the sender
  may send or a ``RemoteProtocolError`` with a decoding code; ``frame_too_large`` comes alone;
  ``bad_frame`` and ``frame_too_large`` carry no request id, other errors a valid one or none;
  every error becomes the ``error`` message the gateway answers with (``Error.from_exception``),
  encodable in both codecs.
- No result is decode's safety net ("undecodable ..."): that one hides an exception raised by
  validation or a parser, which is reported instead, with its traceback.
- A JSON frame decodes the same as bytes and as text (vectors/README.md asks runners for it).
- ``decode_one`` returns the one message, or raises ``RemoteProtocolError`` (the error itself
  when the frame held one error).
- Every decoded message encodes in both codecs, and that frame decodes back to an equal message
  whose encoding is the same bytes (canonical), unless it is larger than MAX_FRAME_BYTES (then it
  decodes to ``frame_too_large``).

Run: ``python3 -m tests.fuzz.decoder [libFuzzer flags] [corpus dirs]``.
"""

from __future__ import annotations

import sys

import atheris

from tests.fuzz import _formats

with atheris.instrument_imports(include=["protocol"]):
    import protocol
    import protocol.codec as codec_module
    from protocol import (
        Codec,
        Error,
        ErrorCode,
        LocalProtocolError,
        Message,
        RemoteProtocolError,
        Sender,
        decode,
        decode_one,
        encode,
        limits,
    )
    from protocol.messages import CLIENT_TYPES, GATEWAY_TYPES

TYPES = {Sender.CLIENT: CLIENT_TYPES, Sender.GATEWAY: GATEWAY_TYPES}
DECODE_CODES = frozenset(
    (
        ErrorCode.BAD_FRAME,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.INVALID_FIELD,
        ErrorCode.FRAME_TOO_LARGE,
    )
)
NO_REQUEST_ID = frozenset((ErrorCode.BAD_FRAME, ErrorCode.FRAME_TOO_LARGE))
#: decode()'s `except Exception` fallbacks (protocol/codec.py): an exception nobody expected.
SAFETY_NETS = frozenset(("undecodable JSON", "undecodable message"))
MESSAGE_CLASSES = frozenset(
    cls
    for name in protocol.__all__
    if isinstance(cls := getattr(protocol, name), type)
    and isinstance(getattr(cls, "TYPE", None), str)
)


def _frame(data: bytes) -> tuple[bytes | str, Codec, Sender]:
    mode, frame = data[0], data[1:]
    codec = Codec.MSGPACK if mode & _formats.DEC_MSGPACK else Codec.JSON
    sender = Sender.GATEWAY if mode & _formats.DEC_GATEWAY else Sender.CLIENT
    if mode & _formats.DEC_LARGE == _formats.DEC_LARGE and len(frame) >= 2:
        size = limits.MAX_FRAME_BYTES - 128 + 2 * frame[0]
        unit = frame[1:]
        frame = (unit * (size // len(unit) + 1))[:size]
    payload: bytes | str = frame
    if mode & _formats.DEC_TEXT:
        payload = frame.decode("utf-8" if codec is Codec.JSON else "latin-1", "surrogateescape")
    return payload, codec, sender


def _outcome(result: Message | RemoteProtocolError) -> object:
    """What must agree between two decodings of one frame (error texts need not)."""
    if isinstance(result, RemoteProtocolError):
        return ("error", result.code, result.request_id)
    return result


def _explain(payload: bytes | str, codec: Codec, sender: Sender) -> None:
    """Decode the frame again with decode's safety nets re-raising what they catch, so that the
    exception they swallowed surfaces with its traceback. Called only after a safety net was
    seen on the real path; the patch is undone before returning."""
    original = codec_module._bad_frame

    def reraise(what: str) -> RemoteProtocolError:
        caught = sys.exception()
        if what in SAFETY_NETS and caught is not None:
            raise caught
        return original(what)

    codec_module._bad_frame = reraise
    try:
        decode(payload, codec, sender)
    finally:
        codec_module._bad_frame = original


def _check_error(error: RemoteProtocolError, alone: bool) -> None:
    assert type(error) is RemoteProtocolError, repr(error)
    assert error.code in DECODE_CODES, f"decode produced code {error.code!r}"
    if error.code is ErrorCode.FRAME_TOO_LARGE:
        assert alone, "frame_too_large must be the frame's only result"
    if error.code in NO_REQUEST_ID:
        assert error.request_id is None, f"{error.code} carries request_id {error.request_id!r}"
    elif error.request_id is not None:
        assert limits.REQUEST_ID_PATTERN.fullmatch(error.request_id), repr(error.request_id)
    # What the gateway sends back for it (gateway/connection.py: Error(code, message, id)).
    reply = Error.from_exception(error)
    for codec in Codec:
        encode(reply, codec)


def _check_round_trip(message: Message, sender: Sender) -> None:
    assert type(message) in MESSAGE_CLASSES, repr(message)
    assert message.TYPE in TYPES[sender], f"{sender.value} may not send {message.TYPE!r}"
    for codec in Codec:
        try:
            encoded = encode(message, codec)
        except LocalProtocolError as exc:
            raise AssertionError(f"a decoded message does not encode ({codec.name})") from exc
        if len(encoded) > limits.MAX_FRAME_BYTES:  # e.g. control characters escaped in JSON
            (result,) = decode(encoded, codec, sender)
            assert isinstance(result, RemoteProtocolError), repr(result)
            assert result.code is ErrorCode.FRAME_TOO_LARGE
            continue
        again = decode_one(encoded, codec, sender)
        assert again == message, f"{codec.name} round trip: {message!r} became {again!r}"
        assert encode(again, codec) == encoded, f"{codec.name} encoding is not canonical"
        if codec is Codec.JSON:
            assert decode_one(encoded.decode("utf-8"), codec, sender) == message


def test_one_input(data: bytes) -> None:
    if not data:
        return
    payload, codec, sender = _frame(data)
    results = decode(payload, codec, sender)
    assert isinstance(results, list), type(results)
    assert 1 <= len(results) <= limits.MAX_BATCH_MESSAGES, len(results)
    checked: set[object] = set()  # a batch of 1000 equal pings is checked once
    for result in results:
        key = repr(result) + (result.message if isinstance(result, RemoteProtocolError) else "")
        if key in checked:
            continue
        checked.add(key)
        if isinstance(result, RemoteProtocolError):
            if result.message in SAFETY_NETS:
                _explain(payload, codec, sender)
                raise AssertionError(f"decode's safety net caught an exception: {result!r}")
            _check_error(result, len(results) == 1)
        else:
            _check_round_trip(result, sender)

    if codec is Codec.JSON:
        if isinstance(payload, bytes):
            try:
                other: bytes | str | None = payload.decode("utf-8")
            except UnicodeDecodeError:
                other = None
        else:
            other = payload.encode("utf-8", "surrogatepass")
        if other is not None:
            again = decode(other, codec, sender)
            assert list(map(_outcome, again)) == list(map(_outcome, results)), (
                "a JSON frame decodes differently as bytes and as text"
            )

    raised: RemoteProtocolError | None = None
    try:
        one = decode_one(payload, codec, sender)
    except RemoteProtocolError as exc:
        raised = exc
    if raised is None:
        assert len(results) == 1, f"decode_one returned {one!r} from {len(results)} results"
        assert one == results[0], f"decode_one returned {one!r}, decode said {results[0]!r}"
    elif len(results) == 1:
        assert raised == results[0], f"decode_one raised {raised!r}, decode said {results[0]!r}"


def main() -> None:
    _formats.fuzz(test_one_input, max_len=65_536)


if __name__ == "__main__":
    main()
