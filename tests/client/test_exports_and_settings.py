"""The SDK's public names (what the README documents) and how a client finds its gateway."""

from __future__ import annotations

import pytest

import gateway
import gateway.client
from gateway import (
    AsyncClient,
    Client,
    ConnectError,
    ConnectionLost,
    Forbidden,
    GatewayShuttingDown,
    InvalidRequest,
    MuxgateError,
    ProtocolViolation,
    RequestFailed,
    RequestMoved,
    RequestRefused,
    ResumeFailed,
    ResumeNotFound,
    TransportError,
    Unauthorized,
)
from gateway.client._config import Settings
from protocol import Codec

EXPORTED = {
    # clients and what they return
    "AsyncClient",
    "Client",
    "AsyncChatStream",
    "ChatStream",
    "ChatFuture",
    "Response",
    "Chunk",
    "Usage",
    "CancelResult",
    "RequestInfo",
    "ErrorInfo",
    # status words (StrEnums)
    "ResponseStatus",
    "CancelStatus",
    "CancelReason",
    # pipeline steps (SPEC.md §3.12)
    "Step",
    "StepInfo",
    "StepState",
    "Halt",
    "HaltState",
    # errors
    "MuxgateError",
    "InvalidRequest",
    "TransportError",
    "ConnectError",
    "ConnectionLost",
    "GatewayShuttingDown",
    "ProtocolViolation",
    "Unauthorized",
    "RequestRefused",
    "Forbidden",
    "RequestFailed",
    # resumable requests (SPEC.md §5.8)
    "ResumeFailed",
    "ResumeNotFound",
    "RequestMoved",
}


@pytest.mark.parametrize("module", [gateway, gateway.client], ids=["gateway", "gateway.client"])
def test_exported_names(module: object) -> None:
    assert set(module.__all__) == EXPORTED  # type: ignore[attr-defined]
    for name in module.__all__:  # type: ignore[attr-defined]
        assert getattr(module, name) is getattr(gateway.client, name)


def test_exception_tree() -> None:
    assert issubclass(InvalidRequest, MuxgateError)
    assert issubclass(InvalidRequest, ValueError)
    assert issubclass(ConnectError, TransportError)
    assert issubclass(ConnectionLost, TransportError)
    assert issubclass(GatewayShuttingDown, ConnectionLost)
    assert issubclass(Forbidden, RequestRefused)
    # A request lost with its connection is a ConnectionLost, resumable or not.
    assert issubclass(ResumeFailed, ConnectionLost)
    assert issubclass(ResumeNotFound, ResumeFailed)
    assert not issubclass(RequestMoved, TransportError)  # it goes on, elsewhere
    for error in (
        TransportError,
        ProtocolViolation,
        Unauthorized,
        RequestRefused,
        RequestFailed,
        RequestMoved,
    ):
        assert issubclass(error, MuxgateError)


@pytest.mark.parametrize(
    ("url", "ws_url", "http_url"),
    [
        (None, "ws://localhost:8001/v1/ws", "http://localhost:8001"),
        ("ws://gw:9000", "ws://gw:9000/v1/ws", "http://gw:9000"),
        ("ws://gw:9000/v1/ws", "ws://gw:9000/v1/ws", "http://gw:9000"),
        ("http://gw:9000/", "ws://gw:9000/v1/ws", "http://gw:9000"),
        ("https://gw.example", "wss://gw.example/v1/ws", "https://gw.example"),
        ("wss://gw.example/muxgate/v1/ws", "wss://gw.example/muxgate/v1/ws", "https://gw.example/muxgate"),
    ],
)  # fmt: skip
def test_urls(url: str | None, ws_url: str, http_url: str) -> None:
    settings = Settings.resolve(
        url,
        client_key=None,
        token=None,
        user_id=None,
        codec="json",
        connect_timeout=1,
        environ={},
    )
    assert (settings.ws_url, settings.http_url) == (ws_url, http_url)


def test_no_argument_constructors_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MUXGATE_URL", "MUXGATE_CLIENT_KEY", "MUXGATE_TOKEN", "MUXGATE_USER_ID"):
        monkeypatch.delenv(name, raising=False)
    assert AsyncClient().url == "ws://localhost:8001/v1/ws"
    monkeypatch.setenv("MUXGATE_URL", "http://127.0.0.1:8123")
    monkeypatch.setenv("MUXGATE_CLIENT_KEY", "k-123")
    monkeypatch.setenv("MUXGATE_USER_ID", "user123")
    client = AsyncClient(codec="msgpack")
    assert client.url == "ws://127.0.0.1:8123/v1/ws"
    assert client.http_url == "http://127.0.0.1:8123"
    assert client.user_id == "user123"
    assert client.codec is Codec.MSGPACK
    assert client._settings.credentials() == {"X-Muxi-Client-Key": "k-123"}
    with Client() as sync:
        assert sync.url == client.url
        assert sync.user_id == "user123"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"url": "ftp://gw"},
        {"url": "gw:8001"},
        {"codec": "xml"},
        {"client_key": "k", "token": "t"},
        {"user_id": "no spaces"},
        {"connect_timeout": 0},
    ],
)
def test_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        AsyncClient(**kwargs)  # type: ignore[arg-type]
