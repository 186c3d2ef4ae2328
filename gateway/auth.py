"""Who is calling, and for which user may they act (SPEC.md §4).

Theory of operation
-------------------
Every WebSocket connection and every HTTP call to ``/v1/requests/...`` is authenticated into one
:class:`Principal`. There are three kinds:

======================  ==================================================  =====================
kind                    how                                                 may act for
======================  ==================================================  =====================
``dev``                 dev mode: no client key and no token secret         any user
                        configured; presented credentials are *ignored*
                        (never treated as verified, SPEC.md §4.1)
``client_key``          header ``X-Muxi-Client-Key`` or ``hello.client_key``  any user (a trusted
                        equal to one of the configured keys (§4.2)           server, never a
                                                                            browser)
``token``               header ``Authorization: Bearer <jwt>`` or            only the token's
                        ``hello.token``: an HS256 JWT with ``sub`` and       ``sub``
                        ``exp`` (§4.3)
======================  ==================================================  =====================

A principal also carries a *default user*: ``X-Muxi-User-Id`` (handshake or HTTP call) or
``hello.user_id``, which replaces the header's. The *effective user* of a message is
:meth:`Principal.user_for`: a token's ``sub`` (a ``user_id`` naming anyone else is ``forbidden``);
else the message's ``user_id``; else the default user; else the anonymous user ``""``, which no
``user_id`` field can name (§4.5).

Presenting a client key **and** a token in the same place (both headers, or both ``hello``
fields) is refused as ``unauthorized`` (SPEC.md §4.4 item 3, §8), whichever of them is valid:
an ambiguous caller is a misconfigured one. Credentials in a ``hello`` replace those of the
handshake entirely (§4.4 item 2).

Errors are one exception, :class:`AuthError`, whose ``code`` is ``unauthorized`` (missing, unknown
or malformed credentials), ``forbidden`` (valid credentials, wrong user) or ``invalid_field``
(a malformed ``X-Muxi-User-Id`` header: HTTP 400, SPEC.md §8). Messages name the credential kind
at most ("invalid client key", "invalid or expired token"), never which check failed, a secret,
or a claim (§4.4 item 7).

Constant-time comparison
------------------------
A presented client key is hashed with SHA-256 and compared with :func:`hmac.compare_digest`
against the SHA-256 digest of **every** configured key, with no early exit; the results are
OR-ed together. So the time taken depends neither on which key matched (or whether any did), nor
on how long the presented or the configured keys are (all digests are 32 bytes), nor on how many
leading bytes matched. It depends only on the number of configured keys, which is not secret in
any useful sense. Token signatures are verified by PyJWT, which also uses
:func:`hmac.compare_digest`. Only ``HS256`` is accepted (``algorithms=["HS256"]``): ``none``,
``HS512``, ``RS256``... are refused before any signature check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import jwt

from protocol import ErrorCode, Hello
from protocol.limits import MAX_CLIENT_KEY_CHARS, MAX_TOKEN_CHARS, USER_ID_PATTERN

__all__ = [
    "HEADER_AUTHORIZATION",
    "HEADER_CLIENT_KEY",
    "HEADER_USER_ID",
    "AuthError",
    "Authenticator",
    "Principal",
    "PrincipalKind",
    "has_credentials",
    "make_token",
]

#: Header names, lower-cased (header lookup is case-insensitive, RFC 9110 §5.1).
HEADER_CLIENT_KEY: Final = "x-muxi-client-key"
HEADER_USER_ID: Final = "x-muxi-user-id"
HEADER_AUTHORIZATION: Final = "authorization"

PrincipalKind = Literal["dev", "client_key", "token"]

_ALGORITHM: Final = "HS256"
#: JWS compact serialization: three base64url segments without padding (RFC 7515 §7.1). The
#: signature may be empty here (an ``alg: none`` token); PyJWT refuses it with the right error.
_JWT_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
#: Client keys must survive an HTTP header unchanged: visible ASCII, no whitespace.
_CLIENT_KEY_SHAPE: Final = re.compile(r"[\x21-\x7e]+")
_HTTP_STATUS: Final = {
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.INVALID_FIELD: 400,
}

# Messages: say the kind of credential at most, never which check failed (SPEC.md §4.4 item 7).
_MISSING: Final = "missing credentials"
_BAD_KEY: Final = "invalid client key"
_BAD_TOKEN: Final = "invalid or expired token"
_BOTH: Final = "present either a client key or a token, not both"
_BAD_BEARER: Final = "malformed Authorization header (expected 'Bearer <token>')"
_FORBIDDEN: Final = "the token may not act for this user_id"
_BAD_USER_HEADER: Final = "X-Muxi-User-Id must be 1-128 characters of [A-Za-z0-9._:@-]"

#: A deferred lookup of the default user, run only once the credentials are known to be valid
#: (so an unauthenticated caller learns nothing from it).
_DefaultUser = Callable[[], "str | None"]


class AuthError(Exception):
    """Authentication or authorization refused.

    ``code`` is :attr:`ErrorCode.UNAUTHORIZED` (no valid credentials: WebSocket close 4001, HTTP
    401), :attr:`ErrorCode.FORBIDDEN` (valid credentials that may not act for the ``user_id``
    asked for: HTTP 403) or :attr:`ErrorCode.INVALID_FIELD` (a malformed ``X-Muxi-User-Id``
    header: HTTP 400). ``message`` is safe to send to the peer.
    """

    code: ErrorCode
    message: str

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        """The HTTP status for this error (SPEC.md §8)."""
        return _HTTP_STATUS.get(self.code, 401)

    def __repr__(self) -> str:
        return f"AuthError({str(self.code)!r}, {self.message!r})"


def _unauthorized(message: str) -> AuthError:
    return AuthError(ErrorCode.UNAUTHORIZED, message)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. Holds no secret, so it is safe to log.

    ``default_user`` is the user of messages that name none (``""``: the anonymous user); for a
    token it is always ``subject``. ``subject`` is the token's ``sub`` (``None`` for other kinds).
    ``expires_at`` is the token's ``exp`` (Unix seconds), so a connection may be closed with 4001
    once it has passed (SPEC.md §4.3); ``None`` for other kinds.
    """

    kind: PrincipalKind
    default_user: str = ""
    subject: str | None = None
    expires_at: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("dev", "client_key", "token"):
            raise ValueError(f"unknown principal kind {self.kind!r}")
        if self.default_user and not USER_ID_PATTERN.fullmatch(self.default_user):
            raise ValueError("default_user must be '' or match USER_ID_PATTERN")
        if self.kind == "token":
            if self.subject is None or self.default_user != self.subject:
                raise ValueError("a token principal's default_user is its subject")
        elif self.subject is not None or self.expires_at is not None:
            raise ValueError("only a token principal has a subject and an expiry")

    @property
    def may_act_for_any_user(self) -> bool:
        """True for ``dev`` and ``client_key`` principals (SPEC.md §4.2)."""
        return self.kind != "token"

    def user_for(self, requested: str | None) -> str:
        """The effective user of a message whose ``user_id`` field is ``requested`` (§4.5).

        ``requested`` is an already validated ``user_id`` field (or header), ``None`` if absent.
        A token principal acts only for its ``sub``: naming anyone else raises
        :class:`AuthError` ``forbidden``. Other principals act for whoever is named, else for
        the default user, else for the anonymous user ``""``.
        """
        if self.kind == "token":
            if requested is None or requested == self.subject:
                return self.default_user  # == subject, checked at construction
            raise AuthError(ErrorCode.FORBIDDEN, _FORBIDDEN)
        if requested is not None:
            return requested
        return self.default_user


class Authenticator:
    """Turns handshake headers, HTTP headers and ``hello`` messages into a :class:`Principal`.

    With no ``client_keys`` and no ``jwt_secret`` the gateway is in dev mode (``required`` is
    false) and everyone is a ``dev`` principal. ``jwt_audience`` / ``jwt_issuer``, when set, are
    required in every token (claims ``aud`` / ``iss``). ``leeway_seconds`` is the clock skew
    tolerated for ``exp``, ``nbf`` and ``iat``; SPEC.md §4.3 allows "at most a few seconds".

    Note: a token carrying an ``aud`` claim is refused when no audience is configured (PyJWT's
    behaviour, kept on purpose: such a token was minted for some other service).
    """

    def __init__(
        self,
        client_keys: Sequence[str] = (),
        jwt_secret: str | None = None,
        jwt_audience: str | None = None,
        leeway_seconds: float = 5,
        *,
        jwt_issuer: str | None = None,
    ) -> None:
        if isinstance(client_keys, str):  # a lone str is a Sequence[str] of its characters
            raise TypeError("client_keys must be a sequence of keys, not a string")
        for key in client_keys:
            if type(key) is not str or not _CLIENT_KEY_SHAPE.fullmatch(key):
                raise ValueError("client keys must be non-empty visible ASCII without whitespace")
            if len(key) > MAX_CLIENT_KEY_CHARS:
                raise ValueError(f"client keys must have at most {MAX_CLIENT_KEY_CHARS} characters")
        if jwt_secret is not None and (type(jwt_secret) is not str or not jwt_secret):
            raise ValueError("jwt_secret must be a non-empty string (or None: no user tokens)")
        if not 0 <= leeway_seconds < float("inf"):
            raise ValueError("leeway_seconds must be a finite number >= 0")
        # Only digests are kept: all 32 bytes long, so comparing them leaks no length (see top).
        self._key_digests: tuple[bytes, ...] = tuple(_digest(key) for key in client_keys)
        self._jwt_secret = jwt_secret
        self._jwt_audience = jwt_audience
        self._jwt_issuer = jwt_issuer
        self._leeway = float(leeway_seconds)
        required_claims = ["exp", "sub"]
        if jwt_audience is not None:
            required_claims.append("aud")
        if jwt_issuer is not None:
            required_claims.append("iss")
        self._required_claims = required_claims

    @property
    def required(self) -> bool:
        """True when any client key or a token secret is configured (authenticated mode)."""
        return bool(self._key_digests) or self._jwt_secret is not None

    @property
    def mode(self) -> str:
        """``"dev"``, ``"client_keys"``, ``"tokens"`` or ``"client_keys+tokens"``, for logs."""
        parts = []
        if self._key_digests:
            parts.append("client_keys")
        if self._jwt_secret is not None:
            parts.append("tokens")
        return "+".join(parts) or "dev"

    def __repr__(self) -> str:  # never shows a secret
        return f"Authenticator(mode={self.mode!r}, keys={len(self._key_digests)})"

    # --- entry points ----------------------------------------------------------------------

    def from_headers(self, headers: Mapping[str, str]) -> Principal | None:
        """Authenticate a WebSocket handshake or an HTTP call by its headers.

        ``headers`` is any mapping of header names to values (websockets' ``Headers``, a dict
        in any letter case); lookup is case-insensitive and a repeated credential header is
        refused. Returns a ``dev`` principal in dev mode; ``None`` when authentication is
        required and no credentials were presented (a WebSocket then waits for ``hello``; an
        HTTP call is refused: see :meth:`from_http_headers`). Presented credentials that are
        invalid raise :class:`AuthError` (``unauthorized``); a token whose ``sub`` differs from
        ``X-Muxi-User-Id`` raises ``forbidden``; a malformed ``X-Muxi-User-Id``,
        ``invalid_field``.
        """
        if not self.required:
            return Principal("dev", self._header_user_id(headers) or "")
        key = _header(headers, HEADER_CLIENT_KEY)
        token = _bearer_token(headers)
        if key is None and token is None:
            return None
        return self._authenticate(key, token, lambda: self._header_user_id(headers))

    def from_http_headers(self, headers: Mapping[str, str]) -> Principal:
        """Like :meth:`from_headers`, for HTTP calls: no credentials is ``unauthorized`` (401)."""
        principal = self.from_headers(headers)
        if principal is None:
            raise _unauthorized(_MISSING)
        return principal

    def from_hello(
        self,
        hello: Hello,
        current: Principal | None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Principal:
        """Authenticate a connection's first message, a ``hello`` (SPEC.md §4.4).

        ``current`` is what :meth:`from_headers` returned for the handshake (``None`` if it
        returned ``None`` or raised). Credentials in the hello replace the handshake's; a hello
        without credentials keeps ``current`` and may only set its default user (for a token:
        only to its ``sub``), and is ``unauthorized`` when ``current`` is ``None`` in
        authenticated mode. ``hello.user_id`` replaces the header's default user; when the hello
        names none, the default user is the handshake's ``X-Muxi-User-Id``, read from
        ``headers`` if given (needed when the handshake carried no valid credentials), else
        taken from a non-token ``current``. A hello with both a token and a client key is
        ``unauthorized``. In dev mode credentials are ignored and the result is ``dev``.
        """
        has_credentials = hello.client_key is not None or hello.token is not None
        if not self.required:
            if hello.user_id is not None:
                return Principal("dev", hello.user_id)
            if current is not None:
                return Principal("dev", current.default_user)
            header_user = self._header_user_id(headers) if headers is not None else None
            return Principal("dev", header_user or "")

        if not has_credentials:
            if current is None:
                raise _unauthorized(_MISSING)
            if hello.user_id is None:
                return current
            if current.kind == "token":
                current.user_for(hello.user_id)  # forbidden unless it is the token's sub
                return current
            return dataclasses.replace(current, default_user=hello.user_id)

        def default_user() -> str | None:
            if hello.user_id is not None:
                return hello.user_id
            if headers is not None:
                return self._header_user_id(headers)
            if current is not None and current.kind != "token":
                return current.default_user or None
            return None

        principal = self._authenticate(hello.client_key, hello.token, default_user)
        if principal is None:  # pragma: no cover - has_credentials guarantees one was checked
            raise _unauthorized(_MISSING)
        return principal

    # --- checks ----------------------------------------------------------------------------

    def _authenticate(
        self, key: str | None, token: str | None, default_user: _DefaultUser
    ) -> Principal | None:
        """Check presented credentials; ``default_user`` is only read once they are valid."""
        if key is not None and token is not None:
            raise _unauthorized(_BOTH)
        if key is not None:
            if not self._key_matches(key):
                raise _unauthorized(_BAD_KEY)
            return Principal("client_key", default_user() or "")
        if token is not None:
            subject, expires_at = self._verify_token(token)
            requested = default_user()
            if requested is not None and requested != subject:
                raise AuthError(ErrorCode.FORBIDDEN, _FORBIDDEN)
            return Principal("token", subject, subject, expires_at)
        return None

    def _key_matches(self, presented: str) -> bool:
        """Constant-time membership test over all configured keys (see the module docstring)."""
        digest = _digest(presented)
        matched = False
        for expected in self._key_digests:  # no early exit
            matched |= hmac.compare_digest(digest, expected)
        return matched

    def _verify_token(self, token: str) -> tuple[str, float]:
        """The token's ``(sub, exp)``, or ``unauthorized`` for any defect."""
        if (
            self._jwt_secret is None
            or len(token) > MAX_TOKEN_CHARS
            or not _JWT_SHAPE.fullmatch(token)
        ):
            raise _unauthorized(_BAD_TOKEN)
        try:
            claims = jwt.decode(
                token,
                self._jwt_secret,
                algorithms=[_ALGORITHM],
                options={"require": self._required_claims},
                audience=self._jwt_audience,
                issuer=self._jwt_issuer,
                leeway=self._leeway,
            )
        except (jwt.PyJWTError, ValueError) as exc:  # ValueError: e.g. undecodable text
            raise _unauthorized(_BAD_TOKEN) from exc
        subject: object = claims.get("sub")
        expires_at: object = claims.get("exp")
        if type(subject) is not str or not USER_ID_PATTERN.fullmatch(subject):
            raise _unauthorized(_BAD_TOKEN)
        # PyJWT only checks that exp converts to int ("123" would do); insist on a JSON number.
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            raise _unauthorized(_BAD_TOKEN)
        try:
            expires = float(expires_at)
        except OverflowError:  # an integer past any date (only the secret's holder can sign it)
            raise _unauthorized(_BAD_TOKEN) from None
        return subject, expires

    def _header_user_id(self, headers: Mapping[str, str]) -> str | None:
        value = _header(headers, HEADER_USER_ID, on_duplicate=ErrorCode.INVALID_FIELD)
        if value is None:
            return None
        if not USER_ID_PATTERN.fullmatch(value):
            raise AuthError(ErrorCode.INVALID_FIELD, _BAD_USER_HEADER)
        return value


def _digest(value: str) -> bytes:
    # surrogatepass: header values decoded with surrogateescape must not raise here.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def _header(
    headers: Mapping[str, str],
    name: str,
    *,
    on_duplicate: ErrorCode = ErrorCode.UNAUTHORIZED,
) -> str | None:
    """The one value of header ``name`` (lower-case), case-insensitively, stripped of OWS.

    A header given twice is ambiguous and refused rather than guessed at.
    """
    get_all = getattr(headers, "get_all", None)  # websockets.Headers, email.message.Message
    if callable(get_all):
        values = [str(v) for v in get_all(name) or ()]
    else:
        values = [v for k, v in headers.items() if k.lower() == name]
    if not values:
        return None
    if len(values) > 1:
        raise AuthError(on_duplicate, f"duplicate {name} header")
    return values[0].strip(" \t")


def _bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer <token>``; ``None`` without a Bearer header.

    Another scheme (say ``Basic`` added by a proxy) is not ours and is ignored. The scheme name
    is case-insensitive (RFC 9110 §11.1).
    """
    value = _header(headers, HEADER_AUTHORIZATION)
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip(" \t")
    if not token or " " in token or "\t" in token:
        raise _unauthorized(_BAD_BEARER)
    return token


def has_credentials(headers: Mapping[str, str]) -> bool:
    """Whether a handshake presents credentials at all (valid or not): a client key header or
    an ``Authorization`` header. Cheap: nothing is verified."""
    return any(name.lower() in _CREDENTIAL_HEADERS for name in headers)


_CREDENTIAL_HEADERS: Final = frozenset((HEADER_CLIENT_KEY, HEADER_AUTHORIZATION))


def make_token(secret: str, sub: str, ttl_seconds: float = 3600, **claims: object) -> str:
    """An HS256 user token for ``sub`` valid for ``ttl_seconds`` (for tests and development).

    ``iat`` is now and ``exp`` is now + ``ttl_seconds`` (negative: already expired); extra
    ``claims`` (``aud``, ``iss``, ``nbf``, ...) are added and may override ``iat``/``exp``.
    """
    now = int(time.time())
    payload: dict[str, object] = {"sub": sub, "iat": now, "exp": now + int(ttl_seconds)}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm=_ALGORITHM)
