"""Credentials: a client key in the handshake header, a user token as Bearer, the same on the
HTTP fallback; refusals map to ``Unauthorized`` / ``Forbidden``."""

from __future__ import annotations

import pytest

from gateway import AsyncClient, CancelStatus, Forbidden, Unauthorized
from gateway.auth import make_token
from gateway.registry import RequestStatus

from ..gateway.conftest import running_gateway
from .conftest import ENDLESS, wait_active, wait_record

KEY = "sdk-test-key-0123456789"
SECRET = "sdk-test-secret-" + "0123456789abcdef" * 4


async def test_client_key_acts_for_any_user(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_gateway(client_keys=(KEY,), jwt_secret=SECRET) as gw:
        monkeypatch.setenv("MUXGATE_CLIENT_KEY", KEY)
        monkeypatch.setenv("MUXGATE_URL", gw.url)
        async with AsyncClient() as client:  # no arguments: both from the environment
            response = await client.chat("hi", user_id="alice", request_id="a-1")
            assert response.status == "completed"
            await wait_record(gw, "a-1", user="alice", statuses=(RequestStatus.COMPLETED,))
        async with AsyncClient(gw.url, client_key=KEY, user_id="bob") as owner:
            task = owner.chat_async("long", request_id="b-1", metadata=ENDLESS)
            await wait_active(gw, "b-1", user="bob")
            # Another process with the key cancels by id over HTTP (X-Muxi-Client-Key).
            async with AsyncClient(gw.http_url, client_key=KEY) as other:
                result = await other.cancel_request("b-1", user_id="bob")
                assert result.status is CancelStatus.CANCELLED
            assert (await task).reason == "api"


async def test_missing_or_wrong_credentials_are_unauthorized() -> None:
    async with running_gateway(client_keys=(KEY,)) as gw:
        for client in (AsyncClient(gw.url, client_key=""), AsyncClient(gw.url, client_key="no")):
            with pytest.raises(Unauthorized):
                await client.chat("hi")
            with pytest.raises(Unauthorized):  # HTTP 401 on the fallback too
                await client.cancel_request("x-1")
            assert not client.connected
            await client.aclose()


async def test_user_token_acts_only_for_its_subject() -> None:
    async with running_gateway(jwt_secret=SECRET) as gw:
        token = make_token(SECRET, "carol", 600)
        async with AsyncClient(gw.url, token=token) as client:
            await client.chat("mine", request_id="t-1")
            await wait_record(gw, "t-1", user="carol", statuses=(RequestStatus.COMPLETED,))
            with pytest.raises(Forbidden) as refused:
                await client.chat("theirs", user_id="dave", request_id="t-2")
            assert refused.value.request_id == "t-2"
            assert (await client.chat("still mine")).status == "completed"  # connection kept
            with pytest.raises(Forbidden):  # HTTP 403
                await client.cancel_request("t-1", user_id="dave")
            result = await client.cancel_request("t-1")
            assert result.status is CancelStatus.ALREADY_COMPLETED
        with pytest.raises(Unauthorized):
            await AsyncClient(gw.url, token=make_token("x" * 64, "carol", 600)).chat("x")
