"""gateway.auth: dev mode, client keys, user tokens, default users and isolation rules (SPEC.md §4).

Plain synchronous tests: headers and ``hello`` messages in, principals or ``AuthError`` out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from websockets.datastructures import Headers

from gateway import auth
from gateway.auth import Authenticator, AuthError, Principal, make_token
from protocol import ErrorCode, Hello

# >= 64 bytes: no PyJWT key-length warning, even when signing HS512 test tokens.
SECRET = "test-secret-" + "0123456789abcdef" * 4
OTHER_SECRET = "other-secret-" + "0123456789abcdef" * 4
KEYS = ("key-alpha-123", "key-beta-456", "YOUR_CLIENT_KEY")


def _b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _payload(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": "user123", "iat": now, "exp": now + 600}
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def _hs256(
    payload: dict[str, Any], secret: str = SECRET, header: dict[str, Any] | None = None
) -> str:
    """A token signed with HMAC-SHA256 whatever its header says (for algorithm-confusion tests)."""
    signing_input = f"{_b64(header or {'alg': 'HS256', 'typ': 'JWT'})}.{_b64(payload)}"
    sig = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def _expect(code: ErrorCode, fn: Any, *args: Any, **kwargs: Any) -> AuthError:
    with pytest.raises(AuthError) as info:
        fn(*args, **kwargs)
    assert info.value.code is code
    return info.value


@pytest.fixture
def keys() -> Authenticator:
    return Authenticator(client_keys=KEYS)


@pytest.fixture
def tokens() -> Authenticator:
    return Authenticator(jwt_secret=SECRET)


@pytest.fixture
def both() -> Authenticator:
    return Authenticator(client_keys=KEYS, jwt_secret=SECRET)


# --- modes ---------------------------------------------------------------------------------------


def test_modes() -> None:
    assert not Authenticator().required
    assert Authenticator().mode == "dev"
    assert Authenticator(client_keys=KEYS).required
    assert Authenticator(client_keys=KEYS).mode == "client_keys"
    assert Authenticator(jwt_secret=SECRET).required
    assert Authenticator(jwt_secret=SECRET).mode == "tokens"
    assert Authenticator(client_keys=KEYS, jwt_secret=SECRET).mode == "client_keys+tokens"


def test_repr_shows_no_secret() -> None:
    text = repr(Authenticator(client_keys=KEYS, jwt_secret=SECRET))
    assert SECRET not in text
    assert all(key not in text for key in KEYS)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"client_keys": "just-one-key"}, TypeError),
        ({"client_keys": [""]}, ValueError),
        ({"client_keys": ["has space"]}, ValueError),
        ({"client_keys": ["k" * 257]}, ValueError),
        ({"jwt_secret": ""}, ValueError),
        ({"leeway_seconds": -1}, ValueError),
    ],
)
def test_bad_configuration(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Authenticator(**kwargs)


# --- dev mode ------------------------------------------------------------------------------------


def test_dev_mode_without_headers_is_anonymous_dev() -> None:
    principal = Authenticator().from_headers({})
    assert principal == Principal("dev", "")
    assert principal.user_for(None) == ""
    assert principal.user_for("anyone") == "anyone"


def test_dev_mode_user_header_is_default_user() -> None:
    principal = Authenticator().from_headers({"X-Muxi-User-Id": "user123"})
    assert principal == Principal("dev", "user123")
    assert principal.user_for(None) == "user123"
    assert principal.user_for("other") == "other"


def test_dev_mode_ignores_credentials() -> None:
    """SPEC.md §4.1: presented credentials are ignored, never treated as verified."""
    headers = {
        "X-Muxi-Client-Key": "bogus",
        "Authorization": "Bearer not.a.token",
        "X-Muxi-User-Id": "u1",
    }
    assert Authenticator().from_headers(headers) == Principal("dev", "u1")
    hello = Hello(token="whatever", client_key="bogus", user_id="u2")
    assert Authenticator().from_hello(hello, None) == Principal("dev", "u2")


def test_dev_mode_hello() -> None:
    dev = Authenticator()
    current = dev.from_headers({"x-muxi-user-id": "header-user"})
    assert dev.from_hello(Hello(), current) == Principal("dev", "header-user")
    assert dev.from_hello(Hello(user_id="u2"), current) == Principal("dev", "u2")
    assert dev.from_hello(Hello(), None) == Principal("dev", "")
    assert dev.from_hello(Hello(), None, headers={"X-Muxi-User-Id": "h"}) == Principal("dev", "h")


def test_dev_mode_still_validates_user_header() -> None:
    err = _expect(ErrorCode.INVALID_FIELD, Authenticator().from_headers, {"X-Muxi-User-Id": "a b"})
    assert err.http_status == 400


# --- client keys ---------------------------------------------------------------------------------


def test_seed_curl_headers_verbatim(keys: Authenticator) -> None:
    """The seed's cURL headers, verbatim.

    curl -X DELETE 'http://localhost:8001/v1/requests/my-request-123' \\
      -H 'X-Muxi-Client-Key: YOUR_CLIENT_KEY' -H 'X-Muxi-User-Id: user123'
    """
    headers = Headers()
    headers["X-Muxi-Client-Key"] = "YOUR_CLIENT_KEY"
    headers["X-Muxi-User-Id"] = "user123"
    principal = keys.from_http_headers(headers)
    assert principal == Principal("client_key", "user123")
    assert principal.user_for(None) == "user123"


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_is_accepted(keys: Authenticator, key: str) -> None:
    assert keys.from_headers({"X-Muxi-Client-Key": key}) == Principal("client_key", "")


@pytest.mark.parametrize(
    "presented", ["wrong", "", "key-alpha-12", "key-alpha-1234", "KEY-ALPHA-123", " x "]
)
def test_invalid_key_header_is_unauthorized(keys: Authenticator, presented: str) -> None:
    err = _expect(ErrorCode.UNAUTHORIZED, keys.from_headers, {"X-Muxi-Client-Key": presented})
    assert err.message == "invalid client key"
    assert err.http_status == 401


def test_key_presented_where_only_tokens_are_configured(tokens: Authenticator) -> None:
    _expect(ErrorCode.UNAUTHORIZED, tokens.from_headers, {"X-Muxi-Client-Key": KEYS[0]})


def test_missing_credentials(keys: Authenticator) -> None:
    assert keys.from_headers({}) is None
    assert keys.from_headers({"X-Muxi-User-Id": "user123"}) is None
    err = _expect(ErrorCode.UNAUTHORIZED, keys.from_http_headers, {"X-Muxi-User-Id": "u"})
    assert err.message == "missing credentials"


@pytest.mark.parametrize(
    "name", ["X-Muxi-Client-Key", "x-muxi-client-key", "X-MUXI-CLIENT-KEY", "x-MuXi-cLiEnT-kEy"]
)
def test_header_names_are_case_insensitive(keys: Authenticator, name: str) -> None:
    user_name = name.replace("Client-Key", "User-Id").replace("client-key", "user-id")
    user_name = user_name.replace("CLIENT-KEY", "USER-ID").replace("cLiEnT-kEy", "uSeR-iD")
    for headers in ({name: KEYS[1], user_name: "u1"}, Headers({name: KEYS[1], user_name: "u1"})):
        assert keys.from_headers(headers) == Principal("client_key", "u1")


def test_header_values_are_stripped(keys: Authenticator) -> None:
    headers = {"X-Muxi-Client-Key": f" {KEYS[0]}\t", "X-Muxi-User-Id": " u1 "}
    assert keys.from_headers(headers) == Principal("client_key", "u1")


def test_duplicate_key_header_is_refused(keys: Authenticator) -> None:
    headers = Headers()
    headers["X-Muxi-Client-Key"] = KEYS[0]
    headers["X-Muxi-Client-Key"] = "wrong"
    _expect(ErrorCode.UNAUTHORIZED, keys.from_headers, headers)


@pytest.mark.parametrize("value", ["", "a b", "user/1", "ü", "x" * 129])
def test_malformed_user_header_is_invalid_field(keys: Authenticator, value: str) -> None:
    headers = {"X-Muxi-Client-Key": KEYS[0], "X-Muxi-User-Id": value}
    err = _expect(ErrorCode.INVALID_FIELD, keys.from_headers, headers)
    assert err.http_status == 400


def test_credentials_are_checked_before_the_user_header(keys: Authenticator) -> None:
    headers = {"X-Muxi-Client-Key": "wrong", "X-Muxi-User-Id": "a b"}
    _expect(ErrorCode.UNAUTHORIZED, keys.from_headers, headers)


def test_key_in_hello(keys: Authenticator) -> None:
    principal = keys.from_hello(Hello(client_key=KEYS[2], user_id="user123"), None)
    assert principal == Principal("client_key", "user123")
    assert keys.from_hello(Hello(client_key=KEYS[0]), None) == Principal("client_key", "")


def test_invalid_key_in_hello(keys: Authenticator) -> None:
    err = _expect(ErrorCode.UNAUTHORIZED, keys.from_hello, Hello(client_key="nope"), None)
    assert err.message == "invalid client key"


def test_hello_without_credentials_and_nothing_before_is_unauthorized(keys: Authenticator) -> None:
    _expect(ErrorCode.UNAUTHORIZED, keys.from_hello, Hello(), None)
    _expect(ErrorCode.UNAUTHORIZED, keys.from_hello, Hello(user_id="u1"), None)


def test_hello_sets_default_user_of_header_key(keys: Authenticator) -> None:
    current = keys.from_headers({"X-Muxi-Client-Key": KEYS[0], "X-Muxi-User-Id": "from-header"})
    assert current is not None
    assert keys.from_hello(Hello(), current) == current
    assert keys.from_hello(Hello(user_id="from-hello"), current) == Principal(
        "client_key", "from-hello"
    )


def test_hello_credentials_replace_invalid_handshake_ones(keys: Authenticator) -> None:
    """SPEC.md §4.4: a bad handshake key does not doom a connection whose hello is valid."""
    headers = {"X-Muxi-Client-Key": "wrong", "X-Muxi-User-Id": "header-user"}
    _expect(ErrorCode.UNAUTHORIZED, keys.from_headers, headers)
    # The header's user stands when the hello names none.
    principal = keys.from_hello(Hello(client_key=KEYS[0]), None, headers=headers)
    assert principal == Principal("client_key", "header-user")
    # ... and the hello's user replaces it.
    principal = keys.from_hello(Hello(client_key=KEYS[0], user_id="u2"), None, headers=headers)
    assert principal == Principal("client_key", "u2")
    # A hello without credentials cannot rescue it.
    _expect(ErrorCode.UNAUTHORIZED, keys.from_hello, Hello(), None, headers=headers)


def test_hello_key_keeps_default_user_of_current_key(keys: Authenticator) -> None:
    current = Principal("client_key", "header-user")
    assert keys.from_hello(Hello(client_key=KEYS[1]), current) == current


# --- constant-time comparison --------------------------------------------------------------------


@pytest.mark.parametrize("presented", [*KEYS, "wrong", "", "x" * 300])
def test_key_comparison_uses_compare_digest_over_all_keys(
    keys: Authenticator, monkeypatch: pytest.MonkeyPatch, presented: str
) -> None:
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    # The very function gateway.auth calls (its ``hmac`` is the stdlib module).
    monkeypatch.setattr("gateway.auth.hmac.compare_digest", counting)
    matched = keys._key_matches(presented)
    assert matched is (presented in KEYS)
    assert len(calls) == len(KEYS)  # no early exit, whichever key matched
    assert set(calls) == {(32, 32)}  # equal-length digests: no length leaks


def test_no_key_material_is_kept_in_clear(keys: Authenticator) -> None:
    state = repr(vars(keys)) if hasattr(keys, "__dict__") else ""
    assert all(key not in state for key in KEYS)


# --- user tokens ---------------------------------------------------------------------------------


def test_valid_token_in_header(tokens: Authenticator) -> None:
    token = make_token(SECRET, "user123")
    principal = tokens.from_headers({"Authorization": f"Bearer {token}"})
    assert principal is not None
    assert (principal.kind, principal.subject, principal.default_user) == (
        "token",
        "user123",
        "user123",
    )
    assert principal.expires_at is not None
    assert principal.expires_at > time.time() + 3000


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_scheme_is_case_insensitive(tokens: Authenticator, scheme: str) -> None:
    token = make_token(SECRET, "u1")
    principal = tokens.from_headers({"authorization": f"{scheme} {token}"})
    assert principal is not None
    assert principal.subject == "u1"


@pytest.mark.parametrize("value", ["Bearer", "Bearer ", "Bearer a b", "Bearer x\ty"])
def test_malformed_bearer_header_is_unauthorized(tokens: Authenticator, value: str) -> None:
    _expect(ErrorCode.UNAUTHORIZED, tokens.from_headers, {"Authorization": value})


def test_other_authorization_scheme_is_not_a_credential(tokens: Authenticator) -> None:
    assert tokens.from_headers({"Authorization": "Basic dXNlcjpwYXNz"}) is None


def test_valid_token_in_hello(tokens: Authenticator) -> None:
    principal = tokens.from_hello(Hello(token=make_token(SECRET, "u-7")), None)
    assert principal.kind == "token"
    assert principal.subject == "u-7"


def test_spec_example_token() -> None:
    """SPEC.md §3.2's example hello token, signed with ``dev-secret`` (exp 2030-01-01)."""
    token = (
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ1c2VyMTIzIiwiZXhwIjoxODkzNDU2MDAwfQ"
        ".Ab9ueG1v8Fekr_KnYrUOFbqOBw2J6aVHfs2e-FZH5nI"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT warns about a secret shorter than 32 bytes
        principal = Authenticator(jwt_secret="dev-secret").from_hello(Hello(token=token), None)
    assert principal == Principal("token", "user123", "user123", 1893456000.0)


def test_expired_token(tokens: Authenticator) -> None:
    token = make_token(SECRET, "user123", ttl_seconds=-3600)
    err = _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=token), None)
    assert err.message == "invalid or expired token"
    _expect(ErrorCode.UNAUTHORIZED, tokens.from_headers, {"Authorization": f"Bearer {token}"})


def test_wrong_secret(tokens: Authenticator) -> None:
    token = make_token(OTHER_SECRET, "user123")
    err = _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=token), None)
    assert err.message == "invalid or expired token"


def test_token_presented_where_only_keys_are_configured(keys: Authenticator) -> None:
    token = make_token(SECRET, "user123")
    _expect(ErrorCode.UNAUTHORIZED, keys.from_hello, Hello(token=token), None)


def test_alg_none_is_refused(tokens: Authenticator) -> None:
    for header in ({"alg": "none", "typ": "JWT"}, {"alg": "none"}, {"alg": "None"}):
        token = f"{_b64(header)}.{_b64(_payload())}."
        _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=token), None)
        _expect(ErrorCode.UNAUTHORIZED, tokens.from_headers, {"Authorization": f"Bearer {token}"})


def test_missing_alg_is_refused(tokens: Authenticator) -> None:
    token = _hs256(_payload(), header={"typ": "JWT"})
    _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=token), None)


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_are_refused(tokens: Authenticator, alg: str) -> None:
    token = jwt.encode(_payload(), SECRET, algorithm=alg)
    _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=token), None)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS256", "EdDSA", "hs256"])
def test_asymmetric_algorithm_confusion_is_refused(tokens: Authenticator, alg: str) -> None:
    """A token claiming another algorithm but HMAC-signed with the secret (key confusion)."""
    token = _hs256(_payload(), header={"alg": alg, "typ": "JWT"})
    _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=token), None)


def test_hand_signed_hs256_is_accepted(tokens: Authenticator) -> None:
    """Control for the two tests above: the same construction with alg HS256 verifies."""
    principal = tokens.from_hello(Hello(token=_hs256(_payload())), None)
    assert principal.subject == "user123"


@pytest.mark.parametrize("missing", ["sub", "exp"])
def test_missing_required_claim(tokens: Authenticator, missing: str) -> None:
    token = jwt.encode(_payload(**{missing: None}), SECRET, algorithm="HS256")
    _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=token), None)


@pytest.mark.parametrize("sub", ["", "a b", "user/1", "x" * 129, "ü", "<script>"])
def test_sub_must_match_user_id_pattern(tokens: Authenticator, sub: str) -> None:
    token = make_token(SECRET, sub)
    _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=token), None)


@pytest.mark.parametrize("sub", [123, None, ["u"], True])
def test_sub_must_be_a_string(tokens: Authenticator, sub: object) -> None:
    payload = _payload()
    payload["sub"] = sub
    token = _hs256(payload)
    _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=token), None)


@pytest.mark.parametrize("exp", ["9999999999", True, None, [1]])
def test_exp_must_be_a_number(tokens: Authenticator, exp: object) -> None:
    payload = _payload()
    payload["exp"] = exp
    _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=_hs256(payload)), None)


@pytest.mark.parametrize(
    "token", ["", "abc", "a.b", "a.b.c.d", "a.b.c", "é.b.c", "a.b.c=", "\udcff.b.c"]
)
def test_garbage_tokens(tokens: Authenticator, token: str) -> None:
    _expect(ErrorCode.UNAUTHORIZED, tokens._verify_token, token)


def test_error_messages_reveal_no_secret(both: Authenticator) -> None:
    token = make_token(OTHER_SECRET, "user123")
    calls: list[Callable[[], object]] = [
        lambda: both.from_headers({"X-Muxi-Client-Key": "guess-" + KEYS[0]}),
        lambda: both.from_hello(Hello(token=token), None),
    ]
    for call in calls:
        with pytest.raises(AuthError) as info:
            call()
        text = f"{info.value} {info.value!r} {info.value.message}"
        assert SECRET not in text
        assert OTHER_SECRET not in text
        assert token not in text
        assert all(key not in text for key in KEYS)


# --- token and user_id ---------------------------------------------------------------------------


def test_token_with_mismatching_user_header_is_forbidden(tokens: Authenticator) -> None:
    headers = {"Authorization": f"Bearer {make_token(SECRET, 'alice')}", "X-Muxi-User-Id": "bob"}
    err = _expect(ErrorCode.FORBIDDEN, tokens.from_headers, headers)
    assert err.http_status == 403


def test_token_with_matching_user_header(tokens: Authenticator) -> None:
    headers = {"Authorization": f"Bearer {make_token(SECRET, 'alice')}", "X-Muxi-User-Id": "alice"}
    principal = tokens.from_headers(headers)
    assert principal is not None
    assert principal.subject == "alice"


def test_token_with_mismatching_hello_user_is_forbidden(tokens: Authenticator) -> None:
    token = make_token(SECRET, "alice")
    _expect(ErrorCode.FORBIDDEN, tokens.from_hello, Hello(token=token, user_id="bob"), None)
    assert tokens.from_hello(Hello(token=token, user_id="alice"), None).subject == "alice"


def test_hello_user_for_header_token(tokens: Authenticator) -> None:
    current = tokens.from_headers({"Authorization": f"Bearer {make_token(SECRET, 'alice')}"})
    assert current is not None
    assert tokens.from_hello(Hello(), current) == current
    assert tokens.from_hello(Hello(user_id="alice"), current) == current
    _expect(ErrorCode.FORBIDDEN, tokens.from_hello, Hello(user_id="bob"), current)


def test_hello_token_with_header_user_naming_another(tokens: Authenticator) -> None:
    headers = {"X-Muxi-User-Id": "bob"}
    assert tokens.from_headers(headers) is None
    token = make_token(SECRET, "alice")
    _expect(ErrorCode.FORBIDDEN, tokens.from_hello, Hello(token=token), None, headers=headers)
    # The hello's own user_id replaces the header's.
    principal = tokens.from_hello(Hello(token=token, user_id="alice"), None, headers=headers)
    assert principal.subject == "alice"


def test_hello_token_replaces_header_token(tokens: Authenticator) -> None:
    current = tokens.from_headers({"Authorization": f"Bearer {make_token(SECRET, 'alice')}"})
    principal = tokens.from_hello(Hello(token=make_token(SECRET, "bob")), current)
    assert principal.subject == "bob"


def test_hello_key_replaces_header_token(both: Authenticator) -> None:
    current = both.from_headers({"Authorization": f"Bearer {make_token(SECRET, 'alice')}"})
    principal = both.from_hello(Hello(client_key=KEYS[0]), current)
    assert principal == Principal("client_key", "")  # the token's sub is no header user


# --- both kinds presented ------------------------------------------------------------------------


def test_key_and_token_headers_together_are_unauthorized(both: Authenticator) -> None:
    """SPEC.md §4.4 item 3 and §8: refused even when both are valid."""
    headers = {"X-Muxi-Client-Key": KEYS[0], "Authorization": f"Bearer {make_token(SECRET, 'u')}"}
    err = _expect(ErrorCode.UNAUTHORIZED, both.from_headers, headers)
    assert err.http_status == 401


def test_key_and_token_in_hello_together_are_unauthorized(both: Authenticator) -> None:
    hello = Hello(client_key=KEYS[0], token=make_token(SECRET, "u"))
    _expect(ErrorCode.UNAUTHORIZED, both.from_hello, hello, None)


def test_key_header_then_token_hello(both: Authenticator) -> None:
    """Different places: the hello's credentials replace the handshake's."""
    current = both.from_headers({"X-Muxi-Client-Key": KEYS[0]})
    principal = both.from_hello(Hello(token=make_token(SECRET, "u9")), current)
    assert principal.kind == "token"
    assert principal.subject == "u9"


# --- user_for ------------------------------------------------------------------------------------


def test_user_for_token() -> None:
    principal = Principal("token", "alice", "alice")
    assert principal.user_for(None) == "alice"
    assert principal.user_for("alice") == "alice"
    for other in ("bob", "Alice", ""):
        _expect(ErrorCode.FORBIDDEN, principal.user_for, other)
    assert not principal.may_act_for_any_user


@pytest.mark.parametrize("kind", ["client_key", "dev"])
def test_user_for_any_user_kinds(kind: auth.PrincipalKind) -> None:
    anonymous = Principal(kind)
    assert anonymous.user_for(None) == ""  # the anonymous user
    assert anonymous.user_for("bob") == "bob"
    defaulted = Principal(kind, "alice")
    assert defaulted.user_for(None) == "alice"
    assert defaulted.user_for("bob") == "bob"
    assert defaulted.may_act_for_any_user


@pytest.mark.parametrize(
    "args",
    [
        ("token", "alice", None),
        ("token", "alice", "bob"),
        ("client_key", "", "alice"),
        ("dev", "bad user", None),
        ("root", "", None),
    ],
)
def test_principal_invariants(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match=r"principal|default_user"):
        Principal(*args)


def test_principal_is_frozen() -> None:
    principal = Principal("dev")
    with pytest.raises(AttributeError):
        principal.default_user = "x"  # type: ignore[misc]


# --- audience, issuer, leeway, nbf ---------------------------------------------------------------


def test_audience() -> None:
    authn = Authenticator(jwt_secret=SECRET, jwt_audience="muxgate")
    ok = make_token(SECRET, "u", aud="muxgate")
    assert authn.from_hello(Hello(token=ok), None).subject == "u"
    listed = make_token(SECRET, "u", aud=["other", "muxgate"])
    assert authn.from_hello(Hello(token=listed), None).subject == "u"
    for bad in (make_token(SECRET, "u", aud="other"), make_token(SECRET, "u")):
        _expect(ErrorCode.UNAUTHORIZED, authn.from_hello, Hello(token=bad), None)


def test_token_with_audience_when_none_configured_is_refused(tokens: Authenticator) -> None:
    token = make_token(SECRET, "u", aud="someone-else")
    _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=token), None)


def test_issuer() -> None:
    authn = Authenticator(jwt_secret=SECRET, jwt_issuer="https://issuer.example")
    ok = make_token(SECRET, "u", iss="https://issuer.example")
    assert authn.from_hello(Hello(token=ok), None).subject == "u"
    for bad in (make_token(SECRET, "u", iss="https://evil.example"), make_token(SECRET, "u")):
        _expect(ErrorCode.UNAUTHORIZED, authn.from_hello, Hello(token=bad), None)


def test_leeway() -> None:
    token = make_token(SECRET, "u", ttl_seconds=-3)  # expired three seconds ago
    lenient = Authenticator(jwt_secret=SECRET, leeway_seconds=10)
    assert lenient.from_hello(Hello(token=token), None).subject == "u"
    strict = Authenticator(jwt_secret=SECRET, leeway_seconds=0)
    _expect(ErrorCode.UNAUTHORIZED, strict.from_hello, Hello(token=token), None)
    default = Authenticator(jwt_secret=SECRET)
    long_expired = make_token(SECRET, "u", ttl_seconds=-60)
    _expect(ErrorCode.UNAUTHORIZED, default.from_hello, Hello(token=long_expired), None)


def test_not_before_and_issued_at_are_honoured(tokens: Authenticator) -> None:
    future = int(time.time()) + 600
    for claims in ({"nbf": future}, {"iat": future}):
        token = make_token(SECRET, "u", **claims)
        _expect(ErrorCode.UNAUTHORIZED, tokens.from_hello, Hello(token=token), None)
    past = make_token(SECRET, "u", nbf=int(time.time()) - 5)
    assert tokens.from_hello(Hello(token=past), None).subject == "u"


def test_make_token_claims() -> None:
    token = make_token(SECRET, "user123", ttl_seconds=120, aud="a", role="admin")
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="a")
    assert claims["sub"] == "user123"
    assert claims["role"] == "admin"
    assert claims["exp"] - claims["iat"] == 120
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
