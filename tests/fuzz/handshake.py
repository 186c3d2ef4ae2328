"""Fuzz authentication: ``gateway.auth`` on arbitrary handshake headers, first frames and JWTs.

What a connection does (gateway/connection.py) and an HTTP call (gateway/http_api.py), with the
real :class:`~gateway.auth.Authenticator` in each configuration of ``_formats.HS_CONFIGS``:
``has_credentials`` and ``from_headers`` on the handshake's headers, ``from_http_headers``, the
first frame decoded by ``protocol.decode`` and each ``hello`` in it given to ``from_hello`` (with
the handshake's principal and without), and ``Principal.user_for`` for every ``user_id`` a
message of the frame names. A forged token (``_formats.HS_FORGE``) is a JWT built from two
sections of the input and signed with the configuration's secret, so that the claims checks are
fuzzed too, not only the signature's.

Properties (SPEC.md §4, the ``gateway.auth`` docstrings):

- nothing raises but :class:`AuthError`, whose code is ``unauthorized``, ``forbidden`` or
  ``invalid_field``, whose ``http_status`` is 401/403/400, and whose message is one of the
  module's fixed texts (no secret, claim or header value echoed: §4.4 item 7);
- dev mode yields ``dev`` principals only; in authenticated mode no ``dev`` principal exists,
  a ``client_key`` principal needs a configured key among the presented ones, and a ``token``
  principal a token signed with the secret (``HS_FORGE`` without ``HS_WRONG_SECRET``) whose
  ``sub`` is a valid user id; a principal's default user is ``""`` or a valid user id;
- a token principal acts for its ``sub`` only (``user_for`` of anyone else is ``forbidden``).

Its finding (issue 18), fixed since: a token signed with the secret whose ``exp`` is an integer
beyond a float's range made ``Authenticator._verify_token`` raise ``OverflowError`` instead of
``AuthError`` (``tests/fuzz/regressions/handshake-exp-overflow``, run by the test suite).

Run: ``python3 -m tests.fuzz.handshake [libFuzzer flags] [corpus dirs]``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
from collections.abc import Mapping

import atheris

from tests.fuzz import _formats as f

with atheris.instrument_imports(include=["gateway", "protocol", "jwt"]):
    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidHeader

    import gateway.auth as auth
    from gateway.auth import Authenticator, AuthError, Principal
    from protocol import Codec, ErrorCode, Hello, Message, RemoteProtocolError, Sender, decode
    from protocol.limits import USER_ID_PATTERN

#: (authenticator, its client keys, its token secret) per configuration.
CONFIGS: tuple[tuple[Authenticator, frozenset[str], str | None], ...] = tuple(
    (
        Authenticator(
            client_keys=config.client_keys,
            jwt_secret=config.jwt_secret,
            jwt_audience=config.jwt_audience,
            leeway_seconds=config.leeway_seconds,
            jwt_issuer=config.jwt_issuer,
        ),
        frozenset(config.client_keys),
        config.jwt_secret,
    )
    for config in f.HS_CONFIGS
)
CODES = {ErrorCode.UNAUTHORIZED: 401, ErrorCode.FORBIDDEN: 403, ErrorCode.INVALID_FIELD: 400}
#: Every text an AuthError may carry: the module's fixed messages (see gateway/auth.py).
MESSAGES = frozenset(
    [
        value
        for name, value in vars(auth).items()
        if name.startswith("_") and name.isupper() and type(value) is str
    ]
    + [
        f"duplicate {name} header"
        for name in (auth.HEADER_CLIENT_KEY, auth.HEADER_AUTHORIZATION, auth.HEADER_USER_ID)
    ]
)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _forge(header: bytes, payload: bytes, secret: str) -> bytes:
    signing_input = _b64(header or b'{"alg":"HS256","typ":"JWT"}') + b"." + _b64(payload)
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return signing_input + b"." + _b64(signature)


def _msgpack_str(data: bytes) -> bytes:
    size = len(data)
    if size < 32:
        return bytes([0xA0 | size]) + data
    if size < 1 << 8:
        return b"\xd9" + bytes([size]) + data
    if size < 1 << 16:
        return b"\xda" + size.to_bytes(2, "big") + data
    return b"\xdb" + size.to_bytes(4, "big") + data


def _headers(block: bytes, as_dict: bool) -> Mapping[str, str]:
    """Header lines as the transport hands them over: names and values decoded latin-1, values
    stripped of spaces and tabs (h11 does), in websockets' Headers (or all of them in a dict).
    A value the Headers refuse (a control byte) is left out: the transport never gets that far
    with one (known finding http-control-byte-in-header, tests/fuzz/http.py)."""
    pairs: list[tuple[str, str]] = []
    for line in block.split(b"\n"):
        raw_name, colon, raw_value = line.removesuffix(b"\r").partition(b":")
        if colon:
            pairs.append((raw_name.decode("latin-1"), raw_value.strip(b" \t").decode("latin-1")))
    if as_dict:
        return dict(pairs)
    headers = Headers()
    for name, value in pairs:
        try:
            headers[name] = value
        except InvalidHeader:
            continue
    return headers


def _presented_keys(headers: Mapping[str, str], hellos: list[Hello]) -> set[str]:
    pairs = headers.raw_items() if isinstance(headers, Headers) else headers.items()
    keys = {v.strip(" \t") for k, v in pairs if k.lower() == auth.HEADER_CLIENT_KEY}
    keys.update(hello.client_key for hello in hellos if hello.client_key is not None)
    return keys


def _check_error(exc: AuthError) -> None:
    assert type(exc) is AuthError, repr(exc)
    assert exc.code in CODES, f"AuthError code {exc.code!r}"
    assert exc.http_status == CODES[exc.code], f"{exc.code} answers HTTP {exc.http_status}"
    assert exc.message in MESSAGES, f"AuthError says {exc.message!r}"


class _Check:
    """Checks a principal against what the configuration and the presented credentials allow."""

    def __init__(
        self, authenticator: Authenticator, configured: frozenset[str], presented: set[str],
        signed: bool,
    ) -> None:  # fmt: skip
        self.required = authenticator.required
        self.key_matched = bool(configured & presented)
        self.signed = signed

    def __call__(self, principal: Principal | None) -> None:
        if principal is None:
            return
        assert type(principal) is Principal, repr(principal)
        user = principal.default_user
        assert user == "" or USER_ID_PATTERN.fullmatch(user), repr(user)
        if not self.required:
            assert principal.kind == "dev", repr(principal)
            return
        assert principal.kind != "dev", f"a dev principal in authenticated mode: {principal!r}"
        if principal.kind == "client_key":
            assert self.key_matched, "a client_key principal without a configured key presented"
        if principal.kind == "token":
            assert self.signed, "a token principal from a token not signed with the secret"
            subject = principal.subject
            assert subject is not None
            assert USER_ID_PATTERN.fullmatch(subject), repr(subject)
            assert principal.default_user == subject
            assert principal.expires_at is not None
            assert math.isfinite(principal.expires_at), principal.expires_at
            assert principal.user_for(subject) == subject
            assert principal.user_for(None) == subject
            refused = _refusal(principal, subject + "x")
            assert refused is not None, "a token principal acts for another user"
            assert refused.code is ErrorCode.FORBIDDEN, repr(refused)


def _refusal(principal: Principal, requested: str | None) -> AuthError | None:
    """``principal.user_for(requested)``'s AuthError, None if it returned a valid user."""
    try:
        user = principal.user_for(requested)
    except AuthError as exc:
        return exc
    assert user == "" or USER_ID_PATTERN.fullmatch(user), repr(user)
    return None


def _call(check: _Check, fn: object, *args: object, **kwargs: object) -> Principal | None:
    """``fn(*args)``: a principal (checked), None, or an AuthError (checked) as None."""
    try:
        principal = fn(*args, **kwargs)  # type: ignore[operator]
    except AuthError as exc:
        _check_error(exc)
        return None
    check(principal)
    return principal  # type: ignore[no-any-return]


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    authenticator, configured, secret = CONFIGS[data[0] % len(CONFIGS)]
    flags = data[1]
    sections = data[2:].split(f.HS_SEP, 3)
    sections += [b""] * (4 - len(sections))
    header_block, frame, jwt_header, jwt_payload = sections

    signed = False
    if flags & f.HS_FORGE:
        wrong = bool(flags & f.HS_WRONG_SECRET) or secret is None
        token = _forge(jwt_header, jwt_payload, secret if secret and not wrong else f.OTHER_SECRET)
        signed = not wrong
        header_block = header_block.replace(f.TOKEN_PLACEHOLDER, token)
        if (flags >> f.HS_FRAME_SHIFT) & 3 == f.HS_FRAME_MSGPACK:
            frame = frame.replace(f.MSGPACK_TOKEN_PLACEHOLDER, _msgpack_str(token))
        else:
            frame = frame.replace(f.TOKEN_PLACEHOLDER, token)

    headers = _headers(header_block, bool(flags & f.HS_HEADERS_DICT))
    messages: list[Message | RemoteProtocolError] = []
    frame_codec = (flags >> f.HS_FRAME_SHIFT) & 3
    if frame_codec != f.HS_FRAME_NONE and frame:
        codec = Codec.MSGPACK if frame_codec == f.HS_FRAME_MSGPACK else Codec.JSON
        payload: bytes | str = frame
        if frame_codec == f.HS_FRAME_JSON_TEXT:
            payload = frame.decode("utf-8", "surrogateescape")
        messages = decode(payload, codec, Sender.CLIENT)
    hellos = [m for m in messages if isinstance(m, Hello)]
    check = _Check(authenticator, configured, _presented_keys(headers, hellos), signed)

    assert type(auth.has_credentials(headers)) is bool
    current = _call(check, authenticator.from_headers, headers)
    http = _call(check, authenticator.from_http_headers, headers)
    if http is not None:  # an HTTP call names no user: the principal's default (http_api.py)
        assert _refusal(http, None) is None
    principals = [current]
    for hello in hellos:
        principals.append(_call(check, authenticator.from_hello, hello, current, headers=headers))
        _call(check, authenticator.from_hello, hello, None, headers=headers)
        _call(check, authenticator.from_hello, hello, None)
    for message in messages:
        if isinstance(message, RemoteProtocolError):
            continue
        requested = getattr(message, "user_id", None)
        for principal in principals:
            if principal is None:
                continue
            refused = _refusal(principal, requested)
            if refused is not None:
                _check_error(refused)
                assert principal.kind == "token", repr(refused)
                assert refused.code is ErrorCode.FORBIDDEN, repr(refused)


def main() -> None:
    f.fuzz(test_one_input, max_len=16_384)


if __name__ == "__main__":
    main()
