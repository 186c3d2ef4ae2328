"""Every example in protocol/SPEC.md is a valid, canonical message (SPEC.md §9).

The spec's ```` ```json ```` blocks hold one message per line (a multi-line block is one batched
JSON frame). Each line must decode without error as a message of the sender its ``type`` implies,
re-encode to exactly the same bytes, and survive a msgpack round trip. ```` ```json http ````
blocks are HTTP bodies: JSON objects with the documented keys. The spec must also name every error
code, close code, message type and limit the package defines.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

import protocol
from protocol import CloseCode, Codec, ErrorCode, RemoteProtocolError, Sender, limits
from protocol.messages import CLIENT_TYPES, GATEWAY_TYPES

SPEC_PATH = Path(protocol.__file__).with_name("SPEC.md")
# Split on LF only: str.splitlines() would also split at U+2028, which an example holds (§9).
SPEC_LINES = SPEC_PATH.read_text(encoding="utf-8").split("\n")
SPEC_TEXT = "\n".join(SPEC_LINES)

_FENCE = re.compile(r"^```(?P<info>.*)$")
_HEADING = re.compile(r"^#{1,6} (?P<title>.+)$")


@dataclasses.dataclass(frozen=True)
class Block:
    info: str  # the fence's info string
    section: str  # the nearest heading above the block
    start: int  # 1-based line number of the first content line
    lines: tuple[str, ...]


def _blocks(lines: list[str]) -> list[Block]:
    blocks: list[Block] = []
    section = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        heading = _HEADING.match(line)
        fence = _FENCE.match(line)
        if heading:
            section = heading.group("title")
        elif fence:
            info = fence.group("info").strip()
            end = index + 1
            while end < len(lines) and lines[end].rstrip() != "```":
                end += 1
            if end == len(lines):
                raise AssertionError(f"SPEC.md:{index + 1}: unclosed code block")
            blocks.append(Block(info, section, index + 2, tuple(lines[index + 1 : end])))
            index = end
        index += 1
    return blocks


BLOCKS = _blocks(SPEC_LINES)


def _section_id(section: str) -> str:
    """A readable ASCII id: ``3.7 `response` (gateway → client)`` -> ``3.7-response-gateway``."""
    number, _, title = section.partition(" ")
    words = re.findall(r"[A-Za-z_]+", title)[:2]
    return "-".join([number.rstrip("."), *words])


def _lines_of(info: str) -> list[Any]:
    params = []
    for block in BLOCKS:
        if block.info != info:
            continue
        for offset, line in enumerate(block.lines):
            lineno = block.start + offset
            params.append(pytest.param(line, id=f"{_section_id(block.section)}-L{lineno}"))
    return params


JSON_LINES = _lines_of("json")
HTTP_LINES = _lines_of("json http")


def sender_of(line: str) -> Sender:
    """The sender a message's ``type`` implies (the spec mixes both directions)."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise AssertionError(f"not one JSON value: {line}") from exc
    assert isinstance(obj, dict), f"not a JSON object: {line}"
    type_ = obj.get("type")
    if type_ in CLIENT_TYPES:
        return Sender.CLIENT
    if type_ in GATEWAY_TYPES:
        return Sender.GATEWAY
    raise AssertionError(f"example of unknown type {type_!r}: {line}")


def check_example(line: str) -> protocol.Message:
    """Decode, validate and re-encode one example line; raise AssertionError on any defect."""
    assert line.strip(), "blank line inside a json example block"
    sender = sender_of(line)
    results = protocol.decode(line, Codec.JSON, sender)
    assert len(results) == 1, f"one line must hold one message, got {results!r}"
    (message,) = results
    assert not isinstance(message, RemoteProtocolError), f"invalid example: {message!r}"
    canonical = protocol.encode(message, Codec.JSON)
    assert canonical == line.encode("utf-8"), (
        f"not canonical (SPEC.md §9):\n  spec:      {line}\n  canonical: {canonical.decode()}"
    )
    packed = protocol.encode(message, Codec.MSGPACK)
    assert protocol.decode_one(packed, Codec.MSGPACK, sender) == message
    return message


@pytest.mark.parametrize("line", JSON_LINES)
def test_example_is_valid_and_canonical(line: str) -> None:
    check_example(line)


def test_checker_accepts_a_canonical_line() -> None:
    assert check_example('{"type":"ping","id":1}') == protocol.Ping(id=1)


@pytest.mark.parametrize(
    "line",
    [
        pytest.param('{"id":1,"type":"ping"}', id="key-order"),
        pytest.param('{"type": "ping", "id": 1}', id="whitespace"),
        pytest.param('{"type":"chat","request_id":"a","message":"x"}', id="default-omitted"),
        pytest.param('{"type":"pong","id":null}', id="null-field"),
        pytest.param('{"type":"pong","id":"\\u00e9"}', id="needless-escape"),
        pytest.param('{"type":"chunk","request_id":"a","seq":-1,"text":"x"}', id="invalid-field"),
        pytest.param('{"type":"hello_world"}', id="unknown-type"),
        pytest.param('{"type":"ping"}{"type":"ping"}', id="two-objects"),
    ],
)
def test_checker_rejects_bad_examples(line: str) -> None:
    """The example check can fail: a non-canonical or invalid line is refused."""
    with pytest.raises(AssertionError):
        check_example(line)


def test_spec_has_examples() -> None:
    assert len(JSON_LINES) >= 20
    assert HTTP_LINES


def test_every_message_type_has_an_example() -> None:
    shown = {json.loads(p.values[0])["type"] for p in JSON_LINES}
    assert (CLIENT_TYPES | GATEWAY_TYPES) - shown == set()


_HTTP_KEYS = {"request_id", "status", "reason", "error", "usage"}
_HTTP_STATUSES = {
    "cancelled",
    "already_cancelled",
    "already_completed",
    "not_found",
    "active",
    "cancelling",
    "completed",
    "failed",
    "ok",
    "draining",
}


@pytest.mark.parametrize("line", HTTP_LINES)
def test_http_body_example(line: str) -> None:
    body = json.loads(line)
    assert isinstance(body, dict)
    if body.get("type") == "stats":  # its shape is checked against the gateway's own snapshot
        return  # in tests/gateway/test_stats_webui.py
    if "error" in body and "status" not in body:  # an error body {"error": {"code", "message"}}
        assert set(body) == {"error"}
        assert set(body["error"]) == {"code", "message"}
        assert limits.ERROR_CODE_PATTERN.fullmatch(body["error"]["code"])
        return
    assert set(body) <= _HTTP_KEYS, f"undocumented keys: {set(body) - _HTTP_KEYS}"
    assert body["status"] in _HTTP_STATUSES
    if "usage" in body:
        assert list(body["usage"]) == ["input_tokens", "output_tokens", "saved_tokens", "final"]
    if "request_id" in body:
        assert limits.REQUEST_ID_PATTERN.fullmatch(body["request_id"])


def _mentioned(word: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(word)}(?![\w])", SPEC_TEXT) is not None


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_spec_names_error_code(code: ErrorCode) -> None:
    assert _mentioned(f"`{code.value}`")


@pytest.mark.parametrize("code", list(CloseCode), ids=lambda c: f"{c.value}-{c.name}")
def test_spec_names_close_code(code: CloseCode) -> None:
    assert _mentioned(str(code.value))
    assert _mentioned(code.name)


@pytest.mark.parametrize("type_", sorted(CLIENT_TYPES | GATEWAY_TYPES))
def test_spec_has_section_for_message_type(type_: str) -> None:
    assert re.search(rf"^### 3\.\d+ .*`{type_}`", SPEC_TEXT, re.MULTILINE), type_


_LIMIT_NAMES = [name for name in vars(limits) if name.isupper() and not name.startswith("_")]


@pytest.mark.parametrize("name", _LIMIT_NAMES)
def test_spec_names_limit(name: str) -> None:
    value = getattr(limits, name)
    assert _mentioned(f"`{name}`"), name
    # The table gives the value too: a number, or a pattern's source (``\-`` and ``-`` are the
    # same at the end of a character class; the spec writes the plainer form).
    shown = value.pattern.replace("\\-]", "-]") if isinstance(value, re.Pattern) else str(value)
    assert shown in SPEC_TEXT, f"{name} = {shown} not in SPEC.md"


def test_spec_names_subprotocols_endpoint_and_port() -> None:
    for word in (*protocol.SUBPROTOCOLS, protocol.WS_PATH, str(protocol.DEFAULT_PORT)):
        assert word in SPEC_TEXT


def test_spec_has_the_cited_sections() -> None:
    """Code cites these section numbers; their headings must mean what the code expects."""
    expected = {
        "2.2": "Subprotocols",
        "2.4": "Batching",
        "2.5": "Limits",
        "2.6": "Close codes",
        "3.5": "`welcome`",
        "5.3": "Cancellation",
        "5.4": "Usage",
        "6.": "Guarantees",
        "7.": "Errors",
        "9.": "Canonical encoding",
        "10.": "Versioning",
    }
    for number, title in expected.items():
        assert re.search(rf"^##+ {re.escape(number)}\S* .*{re.escape(title)}", SPEC_TEXT, re.M), (
            number
        )


def test_guarantees_numbered_g1_to_g7() -> None:
    for n in range(1, 8):
        assert re.search(rf"^\*\*G{n} — ", SPEC_TEXT, re.MULTILINE), f"G{n}"
