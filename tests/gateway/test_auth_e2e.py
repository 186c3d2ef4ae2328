"""End-to-end: authentication of WebSocket connections and user isolation (SPEC.md §4, G9).

Real gateway on an ephemeral port, real sockets. ``tests/gateway/test_auth.py`` checks the
:class:`Authenticator` alone; here the whole path is exercised: handshake headers, ``hello``,
``welcome`` timing, ``error`` ``unauthorized`` then close 4001, the effective user of each
message, and that one user can neither cancel, read nor detect another user's request, in-band
or over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

import protocol
from gateway.auth import make_token
from gateway.server import Gateway
from protocol import (
    Cancel,
    CancelStatus,
    Chat,
    CloseCode,
    Codec,
    ErrorCode,
    Hello,
    Ping,
    Pong,
    ResponseStatus,
    Sender,
    Welcome,
)

from .conftest import running_gateway, settled
from .http_client import HttpAnswer, http
from .wire import WireClient

KEY = "server-key-0123456789"
SECRET = "auth-e2e-secret-" + "0123456789abcdef" * 4
#: Long enough that a request is surely still running while another user pokes at it, short
#: enough to complete quickly (about 0.3 s).
RUNNING = {"tokens": 100, "token_delay_ms": 3}
#: Runs for seconds unless cancelled.
SLOW = {"tokens": 2000, "token_delay_ms": 5}

_ping_ids = itertools.count(1)


def token(sub: str, ttl: float = 600) -> str:
    return make_token(SECRET, sub, ttl)


def bearer(sub: str, ttl: float = 600) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, ttl)}"}


def as_user(user: str) -> dict[str, str]:
    """Headers of a trusted server acting for ``user`` with the client key."""
    return {"X-Muxi-Client-Key": KEY, "X-Muxi-User-Id": user}


@contextlib.asynccontextmanager
async def keyed_gateway(**settings: Any) -> AsyncIterator[Gateway]:
    """Authenticated mode with a client key and user tokens."""
    async with running_gateway(client_keys=(KEY,), jwt_secret=SECRET, **settings) as gw:
        yield gw


async def roundtrip(client: WireClient) -> None:
    """Ping and wait for the pong: the connection is open and everything before it arrived."""
    ping_id = f"rt-{next(_ping_ids)}"
    await client.send(Ping(id=ping_id))
    await client.wait_for(
        lambda: any(isinstance(m, Pong) and m.id == ping_id for m in client.others)
    )


async def closed(client: WireClient) -> int | None:
    """Wait until the gateway closed the connection; its close code.

    The strict reader records a close with an error code (4001) as a violation; here that
    close is the expected outcome, so it is taken off the list (any other violation stays).
    """
    await asyncio.wait_for(asyncio.shield(client._reader), 5.0)
    client.violations[:] = [
        v for v in client.violations if not isinstance(v, ConnectionClosedError)
    ]
    return client.ws.close_code


async def expect_refused(client: WireClient, code: ErrorCode = ErrorCode.UNAUTHORIZED) -> None:
    """SPEC.md §4.4: exactly one ``error`` (no welcome, nothing else), then close 4001."""
    assert await closed(client) == CloseCode.UNAUTHORIZED
    assert client.welcome is None
    assert [e.code for e in client.errors] == [code.value]
    assert client.errors[0].request_id is None
    assert not client.others
    for track in client.tracks.values():
        assert not track.log  # the first message was not processed


async def get(gw: Gateway, request_id: str, headers: Mapping[str, str]) -> HttpAnswer:
    return await http("GET", f"{gw.http_url}/v1/requests/{request_id}", headers)


async def delete(gw: Gateway, request_id: str, headers: Mapping[str, str]) -> HttpAnswer:
    return await http("DELETE", f"{gw.http_url}/v1/requests/{request_id}", headers)


# --- welcome timing (SPEC.md §3.5) -----------------------------------------------------------


async def _first_frame_after(url: str, first: protocol.Message, **kwargs: Any) -> list[Any]:
    """Connect, send ``first``, and decode the first frame the gateway sends."""
    async with connect(url, subprotocols=["muxgate.v1.json"], **kwargs) as ws:  # type: ignore[list-item]
        await ws.send(protocol.encode(first, Codec.JSON).decode())
        frame = await ws.recv()
        return list(protocol.decode(frame, Codec.JSON, Sender.GATEWAY))


async def test_dev_mode_welcome_is_sent_with_the_first_answer(gateway: Gateway) -> None:
    # The welcome is produced when the first message is processed, just before its answer, so
    # both leave in the gateway's first frame; a welcome sent at connect time would go alone.
    messages = await _first_frame_after(gateway.url, Ping(id="p1"))
    assert [type(m) for m in messages] == [Welcome, Pong]
    welcome = messages[0]
    assert welcome.user_id is None  # no default user: the anonymous user
    assert welcome.limits.max_streams == gateway.config.max_streams


async def test_dev_mode_default_user_and_ignored_credentials(gateway: Gateway) -> None:
    headers = {"X-Muxi-User-Id": "user123", "X-Muxi-Client-Key": "anything-at-all"}
    async with WireClient.open(gateway.url, headers=headers) as client:
        await client.chat("r1")
        assert (await client.response("r1")).status is ResponseStatus.COMPLETED
        assert client.welcome is not None
        assert client.welcome.user_id == "user123"
    # The request belongs to user123 (credentials are ignored in dev mode, §4.1).
    assert (await get(gateway, "r1", {"X-Muxi-User-Id": "user123"})).status == 200
    assert (await get(gateway, "r1", {})).status == 404


async def test_dev_mode_hello_credentials_are_ignored(gateway: Gateway) -> None:
    async with WireClient.open(gateway.url) as client:
        await client.send(Hello(client_key="not-a-configured-key", user_id="dave"))
        await client.wait_for(lambda: client.welcome is not None)
        assert client.welcome is not None
        assert client.welcome.user_id == "dave"
        await client.chat("r1")
        assert (await client.response("r1")).status is ResponseStatus.COMPLETED
    assert (await get(gateway, "r1", {"X-Muxi-User-Id": "dave"})).status == 200


@pytest.mark.parametrize("mode", ["dev", "client-key-header"])
async def test_invalid_first_hello_is_refused_4001(mode: str) -> None:
    settings: dict[str, Any] = {} if mode == "dev" else {"client_keys": (KEY,)}
    headers = {} if mode == "dev" else {"X-Muxi-Client-Key": KEY}
    async with (
        running_gateway(**settings) as gw,
        WireClient.open(gw.url, headers=headers) as client,
    ):
        # One frame: the bad hello, then a ping that only an open connection would answer.
        await client.send_raw(
            '{"type":"hello","user_id":"not a valid user"}\n{"type":"ping","id":"after"}'
        )
        with contextlib.suppress(ConnectionClosedError):
            await client.wait_for(lambda: client._reader.done() or bool(client.others))
        assert client.welcome is None
        await expect_refused(client, ErrorCode.INVALID_FIELD)  # and the ping went unanswered


async def test_authenticated_welcome_is_sent_with_the_first_answer() -> None:
    async with keyed_gateway() as gw:
        messages = await _first_frame_after(
            gw.url, Ping(id="p1"), additional_headers=as_user("user123")
        )
        assert [type(m) for m in messages] == [Welcome, Pong]
        assert messages[0].user_id == "user123"
        messages = await _first_frame_after(gw.url, Hello(client_key=KEY, user_id="erin"))
        assert [type(m) for m in messages] == [Welcome]
        assert messages[0].user_id == "erin"


# --- client keys (SPEC.md §4.2) --------------------------------------------------------------


async def test_client_key_header_acts_for_any_user() -> None:
    async with keyed_gateway() as gw, WireClient.open(gw.url, headers=as_user("user123")) as client:
        await client.chat("r-default")  # default user: X-Muxi-User-Id
        await client.chat("r-carol", user_id="carol")  # any user, named per message
        for rid in ("r-default", "r-carol"):
            assert (await client.response(rid)).status is ResponseStatus.COMPLETED
        assert client.welcome is not None
        assert client.welcome.user_id == "user123"
        await settled(gw)
        assert (await get(gw, "r-default", as_user("user123"))).status == 200
        assert (await get(gw, "r-carol", as_user("carol"))).status == 200
        assert (await get(gw, "r-carol", as_user("user123"))).status == 404
        assert (await get(gw, "r-default", {"X-Muxi-Client-Key": KEY})).status == 404  # anonymous


async def test_client_key_without_user_acts_for_the_anonymous_user() -> None:
    async with keyed_gateway() as gw:
        async with WireClient.open(gw.url, headers={"X-Muxi-Client-Key": KEY}) as client:
            await client.chat("r1")
            await client.response("r1")
            assert client.welcome is not None
            assert client.welcome.user_id is None
        assert (await get(gw, "r1", {"X-Muxi-Client-Key": KEY})).status == 200


async def test_hello_with_client_key() -> None:
    async with keyed_gateway() as gw, WireClient.open(gw.url) as client:
        await client.send(Hello(client_key=KEY, user_id="user123"))
        await client.wait_for(lambda: client.welcome is not None)
        assert client.welcome is not None
        assert client.welcome.user_id == "user123"
        await client.chat("r1")
        assert (await client.response("r1")).status is ResponseStatus.COMPLETED
        await settled(gw)
        assert (await get(gw, "r1", as_user("user123"))).status == 200


async def test_hello_user_replaces_the_header_user() -> None:
    async with keyed_gateway() as gw, WireClient.open(gw.url, headers=as_user("hdr")) as client:
        await client.send(Hello(user_id="from-hello"))  # no credentials: the header key stands
        await client.wait_for(lambda: client.welcome is not None)
        assert client.welcome is not None
        assert client.welcome.user_id == "from-hello"


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(Chat(request_id="r1", message="hi"), id="chat"),
        pytest.param(Ping(id=1), id="ping"),
        pytest.param(Cancel(request_id="r1"), id="cancel"),
        pytest.param(Hello(user_id="user123"), id="hello-without-credentials"),
    ],
)
async def test_no_credentials_first_message_is_refused_4001(first: protocol.Message) -> None:
    async with keyed_gateway() as gw:
        async with WireClient.open(gw.url, headers={"X-Muxi-User-Id": "user123"}) as client:
            if isinstance(first, Chat):
                client.track("r1")
            await client.send(first)
            await expect_refused(client)
        await settled(gw)
        assert not gw.registry.active()
        # Nothing was started, for anyone.
        assert (await get(gw, "r1", as_user("user123"))).status == 404


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-Muxi-Client-Key": "wrong-key"}, id="wrong-key"),
        pytest.param({"X-Muxi-Client-Key": KEY + "x"}, id="key-prefix-match"),
        pytest.param({"X-Muxi-Client-Key": KEY[:-1]}, id="key-truncated"),
        pytest.param({"Authorization": "Bearer not.a.jwt"}, id="garbage-token"),
        pytest.param({"Authorization": "Bearer"}, id="bearer-without-token"),
        pytest.param({"X-Muxi-Client-Key": KEY, **bearer("alice")}, id="key-and-token"),
        pytest.param(bearer("alice", ttl=-60), id="expired-token"),
        pytest.param(
            {"Authorization": f"Bearer {make_token('other-secret-' + 'x' * 64, 'alice')}"},
            id="token-other-secret",
        ),
    ],
)
async def test_invalid_handshake_credentials_are_refused_4001(headers: dict[str, str]) -> None:
    async with keyed_gateway() as gw, WireClient.open(gw.url, headers=headers) as client:
        client.track("r1")
        await client.send(Chat(request_id="r1", message="hi"))
        await expect_refused(client)


@pytest.mark.parametrize(
    "hello",
    [
        pytest.param(Hello(client_key="wrong-key"), id="wrong-key"),
        pytest.param(Hello(client_key="wrong-key", user_id="user123"), id="wrong-key-with-user"),
        pytest.param(Hello(token="not.a.jwt"), id="garbage-token"),
        pytest.param(Hello(token=token("alice", ttl=-60)), id="expired-token"),
        pytest.param(Hello(client_key=KEY, token=token("alice")), id="key-and-token"),
    ],
)
async def test_refused_hello_closes_4001(hello: Hello) -> None:
    # Valid handshake credentials do not rescue a bad hello: its credentials replace them.
    async with keyed_gateway() as gw, WireClient.open(gw.url, headers=as_user("u")) as client:
        await client.send(hello)
        await expect_refused(client)


async def test_hello_after_another_message_is_a_protocol_violation() -> None:
    async with keyed_gateway() as gw, WireClient.open(gw.url, headers=as_user("user123")) as client:
        await roundtrip(client)
        assert client.welcome is not None
        await client.send(Hello(client_key="wrong-key", user_id="mallory"))
        await roundtrip(client)  # still open
        assert [e.code for e in client.errors] == [ErrorCode.PROTOCOL_VIOLATION.value]
        # The earlier authentication stands: same default user, requests still work.
        await client.chat("r1")
        assert (await client.response("r1")).status is ResponseStatus.COMPLETED
        await settled(gw)
        assert (await get(gw, "r1", as_user("user123"))).status == 200
        assert (await get(gw, "r1", as_user("mallory"))).status == 404
        assert client.ws.close_code is None


async def test_hello_timeout_closes_4001_only_without_credentials() -> None:
    async with (
        keyed_gateway(hello_timeout=0.2) as gw,
        WireClient.open(gw.url, headers=as_user("idle")) as authenticated,
        WireClient.open(gw.url) as anonymous,
    ):
        # Nothing is sent on either connection.
        await expect_refused(anonymous)
        # The connection with valid handshake credentials outlived the timeout and works.
        assert authenticated.ws.close_code is None
        await roundtrip(authenticated)
        assert authenticated.welcome is not None


# --- user tokens (SPEC.md §4.3) --------------------------------------------------------------


async def test_bearer_header_token_user_is_sub() -> None:
    async with keyed_gateway() as gw, WireClient.open(gw.url, headers=bearer("alice")) as client:
        await client.chat("r1")
        await client.chat("r2", user_id="alice")  # naming sub is redundant and allowed
        for rid in ("r1", "r2"):
            assert (await client.response(rid)).status is ResponseStatus.COMPLETED
        assert client.welcome is not None
        assert client.welcome.user_id == "alice"
        await settled(gw)
        assert (await get(gw, "r1", bearer("alice"))).status == 200
        assert (await get(gw, "r2", as_user("alice"))).status == 200


async def test_hello_token_user_is_sub() -> None:
    async with keyed_gateway() as gw, WireClient.open(gw.url) as client:
        await client.send(Hello(token=token("alice")))
        await client.wait_for(lambda: client.welcome is not None)
        assert client.welcome is not None
        assert client.welcome.user_id == "alice"
        await client.chat("r1")
        assert (await client.response("r1")).status is ResponseStatus.COMPLETED
        await settled(gw)
        assert (await get(gw, "r1", bearer("alice"))).status == 200


async def test_token_may_not_act_for_another_user() -> None:
    async with keyed_gateway() as gw, WireClient.open(gw.url, headers=bearer("alice")) as client:
        track = await client.chat("r1", user_id="bob")
        await client.wait_for(lambda: bool(track.errors))
        assert [(e.code, e.request_id) for e in track.errors] == [("forbidden", "r1")]
        # Not started: no response, nothing registered for bob or alice.
        await roundtrip(client)
        assert track.response is None
        assert track.chunks == []
        assert not gw.registry.active()
        assert (await get(gw, "r1", as_user("bob"))).status == 404
        assert (await get(gw, "r1", bearer("alice"))).status == 404
        # A cancel naming bob is refused likewise; the connection stays usable.
        await client.send(Cancel(request_id="r1", user_id="bob"))
        await client.wait_for(lambda: len(track.errors) == 2)
        assert (track.errors[1].code, track.errors[1].request_id) == ("forbidden", "r1")
        assert not track.cancel_results
        await client.chat("r3")
        assert (await client.response("r3")).status is ResponseStatus.COMPLETED


async def test_token_default_user_must_be_sub() -> None:
    async with keyed_gateway() as gw:
        # A handshake X-Muxi-User-Id contradicting the token: forbidden, then 4001 (§4.4).
        headers = {**bearer("alice"), "X-Muxi-User-Id": "bob"}
        async with WireClient.open(gw.url, headers=headers) as client:
            await client.send(Ping(id=1))
            await expect_refused(client, ErrorCode.FORBIDDEN)
        async with WireClient.open(gw.url) as client:
            await client.send(Hello(token=token("alice"), user_id="bob"))
            await expect_refused(client, ErrorCode.FORBIDDEN)


# --- isolation (SPEC.md §4.5, G9) ------------------------------------------------------------


async def test_another_user_cannot_cancel_read_or_detect_a_request() -> None:
    async with keyed_gateway() as gw:
        # Bob, three ways: a token, the client key acting for bob by header, and the key on
        # alice's own connection naming bob per message.
        bob_token, bob_key = bearer("bob"), as_user("bob")

        async def http_views() -> list[tuple[int, list[tuple[str, str]], bytes]]:
            return [
                (await call(gw, "r1", headers)).comparable()
                for call in (get, delete)
                for headers in (bob_token, bob_key)
            ]

        async with (
            WireClient.open(gw.url, headers=as_user("alice")) as alice,
            WireClient.open(gw.url, headers=bob_token) as bob_by_token,
            WireClient.open(gw.url, headers=bob_key) as bob_by_key,
        ):
            bobs = (bob_by_token, bob_by_key)

            async def alice_cancels_for_bob() -> Any:
                """The client key on alice's connection cancels r1 naming bob."""
                track = alice.tracks.get("r1")
                if track is None:  # alice never chatted r1 (yet): an unknown id to her client
                    n = len(alice.others)
                    await alice.send(Cancel(request_id="r1", user_id="bob"))
                    await alice.wait_for(lambda: len(alice.others) > n)
                    return alice.others[n]
                n = len(track.cancel_results)
                await alice.cancel("r1", user_id="bob")
                await alice.wait_for(lambda: len(track.cancel_results) > n)
                return track.cancel_results[n]

            async def bob_cancels() -> list[Any]:
                """Each of bob's ways cancels r1 in-band; the results, in order."""
                results = []
                for c in bobs:
                    n = len(c.others)
                    await c.send(Cancel(request_id="r1"))
                    await c.wait_for(lambda c=c, n=n: len(c.others) > n)
                    results.append(c.others[n])
                return [*results, await alice_cancels_for_bob()]

            # Reference answers: r1 has never existed for anyone.
            unknown_http = await http_views()
            unknown_ws = await bob_cancels()
            assert [(r.request_id, r.status) for r in unknown_ws] == [
                ("r1", CancelStatus.NOT_FOUND)
            ] * 3
            assert unknown_http[0][0] == 404
            assert unknown_http[2][0] == 404

            track = await alice.chat("r1", "alice's secret plan", metadata=RUNNING)
            await alice.chunks("r1", 1)
            assert track.response is None

            # While it runs: every answer to bob is identical to the never-existing id's.
            assert await http_views() == unknown_http
            assert await bob_cancels() == unknown_ws

            # Alice's stream was not touched and runs to completion.
            response = await alice.response("r1")
            assert response.status is ResponseStatus.COMPLETED
            assert "".join(c.text for c in track.chunks) == response.content
            assert {r.status for r in track.cancel_results} == {CancelStatus.NOT_FOUND}
            await settled(gw)

            # Finished and retained: still nothing for bob.
            assert await http_views() == unknown_http
            assert await bob_cancels() == unknown_ws
            assert (await get(gw, "r1", as_user("alice"))).status == 200
            assert not any(c.errors for c in (alice, *bobs))


async def test_users_have_their_own_request_ids() -> None:
    async with (
        keyed_gateway() as gw,
        WireClient.open(gw.url, headers=as_user("alice")) as alice,
        WireClient.open(gw.url, headers=bearer("bob")) as bob,
        WireClient.open(gw.url, headers=as_user("carol")) as carol,
    ):
        a = await alice.chat("r1", "alice asks about gateways", metadata=RUNNING)
        b = await bob.chat("r1", "bob asks about cancellation", metadata=RUNNING)
        c = await carol.chat("r1", "carol asks too", metadata=SLOW)
        await alice.chunks("r1", 1)
        await bob.chunks("r1", 1)
        await carol.chunks("r1", 1)
        # Three requests r1 run at once, one per user.
        assert len(gw.registry.active()) == 3

        # Carol cancels her r1: only hers ends.
        await carol.cancel("r1")
        assert (await carol.cancel_result("r1")).status is CancelStatus.CANCELLED
        assert (await carol.response("r1")).status is ResponseStatus.CANCELLED

        ra, rb = await alice.response("r1"), await bob.response("r1")
        assert ra.status is ResponseStatus.COMPLETED
        assert rb.status is ResponseStatus.COMPLETED
        assert ra.content != rb.content  # different prompts, different answers
        assert not a.cancel_results
        assert not b.cancel_results
        await carol.final_usage("r1")
        await settled(gw)

        def usage(answer: HttpAnswer) -> Any:
            assert answer.status == 200
            return answer.json()

        got_a = usage(await get(gw, "r1", as_user("alice")))
        got_b = usage(await get(gw, "r1", bearer("bob")))
        got_c = usage(await get(gw, "r1", as_user("carol")))
        assert got_a["status"] == got_b["status"] == "completed"
        assert got_c["status"] == "cancelled"
        assert got_a["usage"]["output_tokens"] == ra.usage.output_tokens
        assert got_b["usage"]["output_tokens"] == rb.usage.output_tokens
        assert len(c.chunks) < 2000


async def test_duplicate_request_id_leaves_the_running_request_untouched() -> None:
    async with (
        keyed_gateway() as gw,
        WireClient.open(gw.url, headers=as_user("alice")) as alice,
        WireClient.open(gw.url, headers=bearer("alice")) as alice_again,
    ):
        track = await alice.chat("r1", "the original", metadata=RUNNING)
        await alice.chunks("r1", 1)

        # Same connection, same user.
        await alice.send(Chat(request_id="r1", message="a duplicate"))
        await alice.wait_for(lambda: bool(track.errors))
        # Another connection of the same user (ids are unique per user, §5.6).
        await alice_again.send(Chat(request_id="r1", message="another duplicate"))
        await alice_again.wait_for(lambda: bool(alice_again.errors))

        for error in (track.errors[0], alice_again.errors[0]):
            assert error.code == ErrorCode.DUPLICATE_REQUEST_ID.value
            assert error.request_id == "r1"
        assert track.response is None

        response = await alice.response("r1")
        assert response.status is ResponseStatus.COMPLETED
        assert "".join(c.text for c in track.chunks) == response.content
        assert [c.seq for c in track.chunks] == list(range(len(track.chunks)))
        assert len(track.errors) == 1
        await settled(gw)
        assert len(gw.registry.active()) == 0

        # Finished: the id is free again for alice (a new request replaces the record).
        again = await alice_again.chat("r1", "a new request")
        assert (await alice_again.response("r1")).status is ResponseStatus.COMPLETED
        assert again.response is not None
