"""Write the harnesses' seed corpus and libFuzzer dictionaries.

``python3 -m tests.fuzz.corpus [DIR]`` (default: a new temporary directory, printed) writes

- ``DIR/decoder/``: every frame of ``protocol/vectors/*.json`` (valid messages in both codecs,
  non-canonical inputs, batches, invalid frames; JSON ones also as text), as its sender;
- ``DIR/handshake/``: hand-written handshakes (headers, ``hello`` frames, forged JWT claims) for
  each authenticator configuration, and every ``hello`` of the vectors;
- ``DIR/http/``: hand-written HTTP requests (plain, pipelined, chunked, refused, WebSocket
  upgrades followed by frames), whole and split into small reads;
- ``DIR/<harness>.dict``: tokens for libFuzzer's ``-dict=``.

Seeds larger than MAX_SEED_BYTES are left out (they would raise libFuzzer's -max_len and slow
every mutation; the vectors' one large frame, 1025 pings, is rebuilt by the decoder harness's
large mode instead).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import json
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgpack

from tests.fuzz import _formats as f

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors"
MAX_SEED_BYTES = 32_768
HARNESSES = ("decoder", "handshake", "http")


# --- decoder ------------------------------------------------------------------------------------


def _vector_frames() -> Iterator[tuple[str, str, bytes]]:
    """(sender, codec, frame) of every vector."""
    messages = json.loads((VECTORS / "messages.json").read_text("utf-8"))
    for entry in messages["messages"]:
        yield entry["sender"], "json", entry["json"].encode("utf-8")
        yield entry["sender"], "msgpack", bytes.fromhex(entry["msgpack_hex"])
    entries = list(messages["decode_only"])
    for name in ("batches", "invalid"):
        entries += json.loads((VECTORS / f"{name}.json").read_text("utf-8"))[name]
    for entry in entries:
        if "input_hex" in entry:
            frame = bytes.fromhex(entry["input_hex"])
        else:
            frame = entry["input"].encode("utf-8")
        yield entry["sender"], entry["codec"], frame


def decoder_seeds() -> Iterator[bytes]:
    for sender, codec, frame in _vector_frames():
        gateway, binary = sender == "gateway", codec == "msgpack"
        yield f.decoder_seed(frame, msgpack=binary, gateway=gateway)
        if not binary:
            yield f.decoder_seed(frame, msgpack=False, gateway=gateway, text=True)
    # Large mode: pings repeated up to just under and just over MAX_FRAME_BYTES.
    for mode, unit in ((0, b'{"type":"ping"}\n'), (f.DEC_MSGPACK, b"\x81\xa4type\xa4ping")):
        for size_byte in (0, 63, 64, 255):
            yield bytes([f.DEC_LARGE | mode, size_byte]) + unit


def _message_names() -> tuple[list[str], list[str]]:
    """(field names, type names) of every message, from the protocol's own classes."""
    import protocol

    fields: set[str] = {"type"}
    types: set[str] = set()
    for name in protocol.__all__:
        cls = getattr(protocol, name)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            fields.update(field.name for field in dataclasses.fields(cls))
            message_type = getattr(cls, "TYPE", None)
            if isinstance(message_type, str):
                types.add(message_type)
        elif isinstance(cls, type) and issubclass(cls, enum.Enum) and issubclass(cls, str):
            types.update(str(member.value) for member in cls)  # the StrEnums' values
    return sorted(fields), sorted(types)


def decoder_dict() -> list[bytes]:
    fields, values = _message_names()
    tokens = [b"true", b"false", b"null", b"9007199254740991", b"-9007199254740992", b"1e400"]
    tokens += [b'"\\ud800"', b"\\u0000", b"\n", b"\r\n"]
    for word in [*fields, *values]:
        tokens += [f'"{word}"'.encode(), f'"{word}":'.encode(), msgpack.packb(word)]
    tokens += [b"\xc0", b"\xc1", b"\xc2", b"\xc3", b"\xc4\x01", b"\xcb", b"\xcf", b"\xd3"]
    tokens += [b"\xd9", b"\xda", b"\xdc", b"\xdd", b"\xde", b"\xdf", b"\xd4\x00", b"\x80", b"\x90"]
    return tokens


# --- handshake ----------------------------------------------------------------------------------

_HS256 = b'{"alg":"HS256","typ":"JWT"}'
_FAR = 4_102_444_800  # 2100-01-01


def _claims(**claims: object) -> bytes:
    return json.dumps(claims, separators=(",", ":")).encode()


def _hello(**fields: object) -> bytes:
    return json.dumps({"type": "hello", **fields}, separators=(",", ":")).encode()


def _hello_msgpack(**fields: object) -> bytes:
    """A token "$T" packs as the fixstr placeholder the harness replaces."""
    packed: bytes = msgpack.packb({"type": "hello", **fields})
    return packed


def handshake_seeds() -> Iterator[bytes]:
    key, other_key = f.CLIENT_KEYS
    bearer = ("Authorization", "Bearer $T")
    good = _claims(sub="alice", exp=_FAR)
    for config in range(len(f.HS_CONFIGS)):
        seed = f.handshake_seed
        yield seed(config)
        yield seed(config, frame=_hello(), frame_codec=f.HS_FRAME_JSON)
        yield seed(config, headers=[("X-Muxi-Client-Key", key), ("X-Muxi-User-Id", "bob")])
        yield seed(config, headers=[("x-muxi-client-key", "wrong"), ("X-Muxi-User-Id", "b o b")])
        yield seed(config, headers=[("X-Muxi-Client-Key", key), ("X-MUXI-CLIENT-KEY", key)])
        yield seed(
            config, headers=[("X-Muxi-Client-Key", key), bearer], jwt_payload=good, forge=True
        )
        yield seed(config, headers=[bearer], jwt_header=_HS256, jwt_payload=good, forge=True)
        yield seed(
            config,
            headers=[bearer, ("X-Muxi-User-Id", "mallory")],
            jwt_header=_HS256,
            jwt_payload=good,
            forge=True,
            headers_dict=True,
        )
        yield seed(config, headers=[("Authorization", "Bearer a.b.c d")])
        yield seed(config, headers=[("Authorization", "Basic dXNlcjpwYXNz")])
        yield seed(config, headers=[("Authorization", "bearer   ")])
        yield seed(
            config,
            frame=_hello(client_key=key, user_id="alice"),
            frame_codec=f.HS_FRAME_JSON,
            headers=[("X-Muxi-User-Id", "carol")],
        )
        yield seed(config, frame=_hello(client_key=other_key), frame_codec=f.HS_FRAME_JSON_TEXT)
        yield seed(config, frame=_hello(client_key=key, token="$T"), frame_codec=f.HS_FRAME_JSON)
        yield seed(
            config,
            frame=_hello(token="$T", user_id="alice"),
            frame_codec=f.HS_FRAME_JSON,
            jwt_header=_HS256,
            jwt_payload=good,
            forge=True,
        )
        yield seed(
            config,
            frame=_hello_msgpack(token="$T"),
            frame_codec=f.HS_FRAME_MSGPACK,
            jwt_header=_HS256,
            jwt_payload=good,
            forge=True,
        )
        yield seed(
            config,
            frame=_hello_msgpack(client_key=key, user_id="dave"),
            frame_codec=f.HS_FRAME_MSGPACK,
        )
        # A hello followed by requests naming users (Principal.user_for).
        batch = b"\n".join(
            (
                _hello(token="$T"),
                b'{"type":"chat","request_id":"r1","message":"hi","user_id":"alice"}',
                b'{"type":"cancel","request_id":"r1","user_id":"mallory"}',
                b'{"type":"resume","request_id":"r1","epoch":"e1","user_id":"alice"}',
            )
        )
        yield seed(config, frame=batch, frame_codec=f.HS_FRAME_JSON, jwt_payload=good, forge=True)
        yield seed(
            config,
            headers=[("X-Muxi-Client-Key", key)],
            frame=b'{"type":"chat","request_id":"r2","message":"hi","user_id":"erin"}',
            frame_codec=f.HS_FRAME_JSON,
        )
    # Claims: each check of gateway/auth.py and PyJWT (config 2: a secret; 4: aud and iss).
    payloads = [
        _claims(sub="alice", exp=_FAR, iat=1_700_000_000, nbf=1_700_000_000),
        _claims(sub="alice", exp=1_000),  # expired
        _claims(sub="alice", exp=_FAR, nbf=_FAR),  # not yet valid
        _claims(sub="alice", exp=_FAR, iat=_FAR),
        _claims(sub="alice"),  # no exp
        _claims(exp=_FAR),  # no sub
        _claims(sub="", exp=_FAR),
        _claims(sub="a b", exp=_FAR),
        _claims(sub=42, exp=_FAR),
        _claims(sub="alice", exp="4102444800"),
        _claims(sub="alice", exp=4102444800.5),
        _claims(sub="alice", exp=True),
        _claims(sub="alice", exp=[1]),
        _claims(sub="alice", exp=_FAR, aud="muxgate", iss="https://issuer.example"),
        _claims(sub="alice", exp=_FAR, aud=["other", "muxgate"], iss="https://issuer.example"),
        _claims(sub="alice", exp=_FAR, aud="other"),
        b'{"sub":"alice","exp":1e400}',
        b'{"sub":"alice","exp":NaN}',
        b'{"sub":"alice","exp":4102444800,"sub":"bob"}',
        b"[]",
        b"not json",
    ]
    headers = [
        _HS256,
        b'{"alg":"none"}',
        b'{"alg":"HS512"}',
        b'{"alg":"RS256","typ":"JWT"}',
        b'{"alg":"HS256","crit":["exp"]}',
        b'{"alg":"HS256","kid":"k1","jku":"http://x"}',
        b'{"typ":"JWT"}',
        b"[]",
    ]
    for payload in payloads:
        for config in (2, 4):
            yield f.handshake_seed(
                config, headers=[bearer], jwt_header=_HS256, jwt_payload=payload, forge=True
            )
    for header in headers:
        yield f.handshake_seed(2, headers=[bearer], jwt_header=header, jwt_payload=good, forge=True)
    # Every hello of the vectors, in each configuration that has credentials to check.
    for sender, codec, frame in _vector_frames():
        if sender == "client" and b"hello" in frame:
            frame_codec = f.HS_FRAME_MSGPACK if codec == "msgpack" else f.HS_FRAME_JSON
            for config in (1, 3):
                yield f.handshake_seed(config, frame=frame, frame_codec=frame_codec)


def handshake_dict() -> list[bytes]:
    tokens = [f.HS_SEP, f.TOKEN_PLACEHOLDER, f.MSGPACK_TOKEN_PLACEHOLDER, b"\r\n", b": "]
    tokens += [b"X-Muxi-Client-Key", b"X-Muxi-User-Id", b"Authorization", b"Bearer ", b"Basic "]
    tokens += [key.encode() for key in f.CLIENT_KEYS]
    tokens += [f.JWT_AUDIENCE.encode(), f.JWT_ISSUER.encode(), b"HS256", b"none", b"JWT"]
    for word in ("sub", "exp", "nbf", "iat", "aud", "iss", "alg", "typ", "kid", "crit"):
        tokens += [f'"{word}":'.encode()]
    for word in ("hello", "token", "client_key", "user_id", "chat", "cancel", "type"):
        tokens += [f'"{word}"'.encode(), msgpack.packb(word)]
    tokens += [b"4102444800", b"1e400", b"NaN", b"Infinity", b"9" * 40]
    return tokens


# --- http ---------------------------------------------------------------------------------------

_KEY = base64.b64encode(b"0123456789abcdef")  # a Sec-WebSocket-Key: 16 bytes, base64


def _frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client's WebSocket frame (masked, RFC 6455 §5.2)."""
    mask = b"\x37\xfa\x21\x3d"
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _request(
    method: str, target: str, *headers: str, body: bytes = b"", version: str = "1.1"
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: gw", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _upgrade(*headers: str, target: str = "/v1/ws") -> bytes:
    return _request(
        "GET",
        target,
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {_KEY.decode()}",
        "Sec-WebSocket-Version: 13",
        *headers,
    )


def http_streams() -> Iterator[bytes]:
    yield _request("GET", "/healthz")
    yield _request("HEAD", "/healthz")
    yield _request("GET", "/v1/requests/r1", "X-Muxi-Client-Key: ck_live_0123456789")
    yield _request("DELETE", "/v1/requests/r1", "Authorization: Bearer a.b.c")
    yield _request("POST", "/v1/requests", "Content-Length: 5", body=b"hello")
    yield _request("POST", "/x", "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n")
    yield _request("POST", "/x", "Content-Length: 70000", body=b"x" * 100)
    yield _request("GET", "/status/204") + _request("GET", "/status/404")
    yield b"".join(_request("GET", f"/{i}") for i in range(4))
    yield _request("GET", "/a/slow") + _request("GET", "/b")
    yield _request("GET", "/", version="1.0")
    yield _request("GET", "/", "Connection: close") + _request("GET", "/after-close")
    yield _request("GET", "/", "Expect: 100-continue", "Content-Length: 3", body=b"abc")
    yield _request("GET", "/", "Transfer-Encoding: gzip, chunked")
    yield _request("GET", "/", "Content-Length: 1", "Content-Length: 2")
    yield b"GET / HTTP/1.1\r\nHost: gw\r\nX-Long: " + b"a" * 17_000 + b"\r\n\r\n"
    yield b"GET /\r\n\r\n"
    yield b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a TLS ClientHello on a plain port
    yield b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    yield _upgrade()
    yield _upgrade("Sec-WebSocket-Protocol: muxgate.v1.json")
    yield _upgrade("Sec-WebSocket-Protocol: muxgate.v1.msgpack, muxgate.v1.json")
    yield _upgrade("Sec-WebSocket-Protocol: chat")
    yield _upgrade(target="/v1/ws?x=1") + _frame(1, b'{"type":"hello"}')
    yield (
        _upgrade("Origin: http://localhost")
        + _frame(1, b'{"type":"ping","id":1}')
        + _frame(8, b"\x03\xe8bye")
    )
    yield (
        _upgrade("Sec-WebSocket-Protocol: muxgate.v1.msgpack")
        + _frame(2, msgpack.packb({"type": "ping"}))
        + _frame(9, b"hi")
        + _frame(10, b"")
    )
    yield _upgrade() + _frame(1, b'{"type":', fin=False) + _frame(0, b'"ping"}')
    yield _upgrade() + _frame(1, b"\xff\xfe")  # not UTF-8: 1007
    yield _upgrade() + _frame(1, b"x" * 20_000)  # over the pre-authentication bound
    yield _upgrade() + _frame(8, b"")
    yield _upgrade("Sec-WebSocket-Version: 8")
    yield _request("GET", "/v1/ws", "Upgrade: websocket", "Connection: Upgrade")  # no key
    yield _request("POST", "/v1/ws", "Upgrade: websocket", "Connection: Upgrade")
    yield _upgrade(*["Origin: http://a"] * 130)  # more headers than websockets takes


def http_seeds() -> Iterator[bytes]:
    for stream in http_streams():
        yield f.http_seed(stream)
        yield f.http_seed(stream, flags=f.HTTP_EOF | f.HTTP_ASYNC | f.HTTP_ECHO, split=7)
        yield f.http_seed(stream, flags=f.HTTP_STALL | f.HTTP_LIMIT_INPUT, split=64)
    yield f.http_seed(_upgrade(), flags=f.HTTP_REFUSE_UPGRADE)
    yield f.http_seed(_request("POST", "/x", "Content-Length: 1"), flags=f.HTTP_NO_WRITE_EOF)


def http_dict() -> list[bytes]:
    tokens = [b"\r\n", b"\r\n\r\n", b": ", b"HTTP/1.1", b"HTTP/1.0", b" / ", b"/v1/ws", b"/healthz"]
    tokens += [
        b"GET ",
        b"HEAD ",
        b"POST ",
        b"DELETE ",
        b"OPTIONS ",
        b"CONNECT ",
        b"/a/",
        b"/status/",
    ]
    for name in (
        "Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "Expect",
        "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Extensions", "Origin",
    ):  # fmt: skip
        tokens.append(f"{name}: ".encode())
    tokens += [b"chunked", b"close", b"keep-alive", b"websocket", b"100-continue", b"13"]
    tokens += [_KEY, b"muxgate.v1.json", b"muxgate.v1.msgpack", b"permessage-deflate"]
    tokens += [b"\x81\x80", b"\x82\x80", b"\x88\x80", b"\x89\x80", b"\x01\x80", b"\x81\xfe"]
    return tokens


# --- writing ------------------------------------------------------------------------------------


def _dict_line(token: bytes) -> str:
    escaped = "".join(
        chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token
    )
    return f'"{escaped}"\n'


def _write_seeds(directory: Path, seeds: Iterable[bytes]) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for seed in seeds:
        if len(seed) > MAX_SEED_BYTES:
            continue
        (directory / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
        count += 1
    return count


def write_corpus(out: Path) -> dict[str, int]:
    """Write every harness's seeds under ``out/<harness>/`` and ``out/<harness>.dict``; the
    number of seeds per harness (duplicates counted once per write)."""
    seeds = {"decoder": decoder_seeds(), "handshake": handshake_seeds(), "http": http_seeds()}
    dicts = {"decoder": decoder_dict(), "handshake": handshake_dict(), "http": http_dict()}
    counts = {}
    for name in HARNESSES:
        counts[name] = _write_seeds(out / name, seeds[name])
        tokens = dict.fromkeys(dicts[name])  # unique, in order
        (out / f"{name}.dict").write_text("".join(map(_dict_line, tokens)), "ascii")
    return counts


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="muxgate-fuzz-seeds-"))
    counts = write_corpus(out)
    summary = ", ".join(f"{name} {count}" for name, count in counts.items())
    print(f"{out}: {summary} seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
