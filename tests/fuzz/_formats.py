"""The harnesses' input layouts (shared with the seed corpus writer) and their entry point.

Pure Python: imports neither ``protocol`` nor ``gateway``, so that a harness importing this
module first still instruments the code under test when it imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# --- decoder: byte 0 is the mode, the rest is the frame -------------------------------------
#: The frame is msgpack (else JSON).
DEC_MSGPACK = 0x01
#: The frame is from the gateway (else from a client).
DEC_GATEWAY = 0x02
#: The frame is handed to the decoder as ``str`` (a text frame; for JSON, decoded from UTF-8
#: with lone surrogates for bad bytes; for msgpack, latin-1: refused as a text frame).
DEC_TEXT = 0x04
#: All of these bits: the frame is repeated up to MAX_FRAME_BYTES - 128 + 2 * (byte 1), so a
#: few inputs straddle the frame size limit (the rest of the input after byte 1 is the unit).
DEC_LARGE = 0xF8


def decoder_seed(frame: bytes, *, msgpack: bool, gateway: bool, text: bool = False) -> bytes:
    mode = (DEC_MSGPACK if msgpack else 0) | (DEC_GATEWAY if gateway else 0)
    return bytes([mode | (DEC_TEXT if text else 0)]) + frame


# --- handshake: config byte, flags byte, then sections separated by HS_SEP -------------------
#: Sections: header lines ("Name: value", LF or CRLF), the connection's first WebSocket frame,
#: the forged JWT's header JSON, its payload JSON.
HS_SEP = b"\x00\x00"
#: Headers as a plain dict (later keys win; else websockets' Headers, as the transport has them).
HS_HEADERS_DICT = 0x01
#: Bits 1-2: the first frame's codec (0: no frame).
HS_FRAME_SHIFT = 1
HS_FRAME_NONE, HS_FRAME_JSON, HS_FRAME_MSGPACK, HS_FRAME_JSON_TEXT = 0, 1, 2, 3
#: Replace TOKEN_PLACEHOLDER in the headers and the frame with a JWT made of the last two
#: sections and signed (HS256) with the configuration's secret: the fuzzer gets past the
#: signature to the claims checks.
HS_FORGE = 0x08
#: Sign the forged token with another secret (must be refused).
HS_WRONG_SECRET = 0x10
TOKEN_PLACEHOLDER = b"$T"
#: msgpack frames carry the placeholder as a fixstr (b"\xa2$T"), replaced by the token's str.
MSGPACK_TOKEN_PLACEHOLDER = b"\xa2" + TOKEN_PLACEHOLDER

CLIENT_KEYS = ("ck_live_0123456789", "ck_test_Zm9vYmFy")
# 32 bytes and more: PyJWT warns about shorter HS256 keys.
JWT_SECRET = "muxgate-fuzzing-secret-0123456789abcdef"
OTHER_SECRET = "not-the-secret-but-as-long-as-it-0123456"
JWT_AUDIENCE = "muxgate"
JWT_ISSUER = "https://issuer.example"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """One configuration of ``gateway.auth.Authenticator`` (its arguments)."""

    client_keys: tuple[str, ...] = ()
    jwt_secret: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    leeway_seconds: float = 5


#: The handshake harness's configurations, picked by byte 0 modulo their number.
HS_CONFIGS: tuple[AuthConfig, ...] = (
    AuthConfig(),  # dev mode
    AuthConfig(client_keys=CLIENT_KEYS),
    AuthConfig(jwt_secret=JWT_SECRET),
    AuthConfig(client_keys=CLIENT_KEYS, jwt_secret=JWT_SECRET),
    AuthConfig(jwt_secret=JWT_SECRET, jwt_audience=JWT_AUDIENCE, jwt_issuer=JWT_ISSUER),
    AuthConfig(client_keys=CLIENT_KEYS[:1], jwt_secret=JWT_SECRET, leeway_seconds=0),
)


def handshake_seed(
    config: int,
    *,
    headers: Sequence[tuple[str, str]] = (),
    frame: bytes = b"",
    frame_codec: int = HS_FRAME_NONE,
    jwt_header: bytes = b"",
    jwt_payload: bytes = b"",
    forge: bool = False,
    headers_dict: bool = False,
) -> bytes:
    flags = frame_codec << HS_FRAME_SHIFT
    flags |= (HS_FORGE if forge else 0) | (HS_HEADERS_DICT if headers_dict else 0)
    lines = b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in headers)
    return bytes([config, flags]) + HS_SEP.join((lines, frame, jwt_header, jwt_payload))


# --- http: flags byte, split byte, then the bytes the client sends -----------------------------
#: The client half-closes after its last byte (eof_received).
HTTP_EOF = 0x01
#: The application answers plain requests asynchronously (an awaitable, not a response).
HTTP_ASYNC = 0x02
#: A tiny write buffer limit: answers pause writing and the client drains only when the
#: connection has stopped reading (pipelining against backpressure).
HTTP_STALL = 0x04
#: The application refuses WebSocket upgrades (503) before the handshake.
HTTP_REFUSE_UPGRADE = 0x08
#: The transport cannot half-close (no write_eof: a refusal closes at once).
HTTP_NO_WRITE_EOF = 0x10
#: The WebSocket handler limits the input before its first message, as an unauthenticated
#: connection does (gateway.connection.PREAUTH_MAX_FRAME_BYTES).
HTTP_LIMIT_INPUT = 0x20
#: The WebSocket handler echoes each message back.
HTTP_ECHO = 0x40


def http_seed(stream: bytes, *, flags: int = HTTP_EOF, split: int = 0) -> bytes:
    """``split`` 0: the stream arrives in one read; else cut at ``split`` points."""
    return bytes([flags, split]) + stream


# --- running ------------------------------------------------------------------------------------
#: Seconds one input may take before libFuzzer reports it as a hang (-timeout).
TIMEOUT_SECONDS = 10


def fuzz(test_one_input: Callable[[bytes], None], *, max_len: int) -> None:
    """Run libFuzzer over ``test_one_input`` with the command line's flags and corpus dirs;
    ``-timeout`` and ``-max_len`` default to this module's bound and ``max_len``."""
    import atheris

    argv = list(sys.argv)
    given = {arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("-")}
    for flag, value in (("-timeout", TIMEOUT_SECONDS), ("-max_len", max_len)):
        if flag not in given:
            argv.append(f"{flag}={value}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
