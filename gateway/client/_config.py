"""Client settings: where the gateway is, which credentials, which codec.

Constructor arguments win over the environment, which wins over the defaults:

========================  ===========================  ===================================
argument                  environment                  default
========================  ===========================  ===================================
``url``                   ``MUXGATE_URL``              ``ws://localhost:8001``
``client_key``            ``MUXGATE_CLIENT_KEY``       none
``token``                 ``MUXGATE_TOKEN``            none
``user_id``               ``MUXGATE_USER_ID``          none (the anonymous user)
``codec``                                              ``"json"``
========================  ===========================  ===================================

The URL may be a WebSocket URL (``ws://``, ``wss://``) or the gateway's HTTP base
(``http://``, ``https://``); without a path the WebSocket endpoint is ``/v1/ws`` (SPEC.md
§2.1), and the HTTP API (§8) is on the same host, port and path prefix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import protocol
from protocol import Codec, limits

from ._errors import InvalidRequest

__all__ = ["DEFAULT_URL", "CodecName", "Settings"]

DEFAULT_URL = f"ws://localhost:{protocol.DEFAULT_PORT}"

CodecName = Literal["json", "msgpack"]

_SCHEMES = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


def _urls(url: str) -> tuple[str, str]:
    """(WebSocket URL, HTTP base URL without trailing slash) for a gateway URL."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES or not parts.netloc:
        raise InvalidRequest(f"gateway URL must be ws(s):// or http(s)://host[:port]: {url!r}")
    path = parts.path.rstrip("/")
    if path.endswith(protocol.WS_PATH):
        path = path[: -len(protocol.WS_PATH)]
    http_scheme = _SCHEMES[scheme]
    ws_scheme = "wss" if http_scheme == "https" else "ws"
    ws_url = urlunsplit((ws_scheme, parts.netloc, path + protocol.WS_PATH, parts.query, ""))
    http_url = urlunsplit((http_scheme, parts.netloc, path, "", ""))
    return ws_url, http_url


def _codec(codec: Codec | str) -> Codec:
    if isinstance(codec, Codec):
        return codec
    names = {"json": Codec.JSON, "msgpack": Codec.MSGPACK}
    try:
        return names[codec.lower()]
    except (KeyError, AttributeError):
        raise InvalidRequest(f"codec must be 'json' or 'msgpack', not {codec!r}") from None


def check_user_id(user_id: str | None) -> None:
    if user_id is not None and (
        type(user_id) is not str or not limits.USER_ID_PATTERN.fullmatch(user_id)
    ):
        raise InvalidRequest(f"user_id must be 1-128 characters of [A-Za-z0-9._:@-]: {user_id!r}")


def check_request_id(request_id: str) -> None:
    if type(request_id) is not str or not limits.REQUEST_ID_PATTERN.fullmatch(request_id):
        raise InvalidRequest(
            f"request_id must be 1-128 characters of [A-Za-z0-9._:-]: {request_id!r}"
        )


@dataclass(frozen=True, slots=True)
class Settings:
    ws_url: str
    http_url: str
    codec: Codec
    client_key: str | None
    token: str | None
    user_id: str | None
    #: Seconds to open the connection and receive ``welcome``; also the HTTP timeout.
    connect_timeout: float

    @classmethod
    def resolve(
        cls,
        url: str | None,
        *,
        client_key: str | None,
        token: str | None,
        user_id: str | None,
        codec: Codec | str,
        connect_timeout: float,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        env = os.environ if environ is None else environ
        ws_url, http_url = _urls(url or env.get("MUXGATE_URL") or DEFAULT_URL)
        client_key = client_key if client_key is not None else env.get("MUXGATE_CLIENT_KEY")
        token = token if token is not None else env.get("MUXGATE_TOKEN")
        user_id = user_id if user_id is not None else (env.get("MUXGATE_USER_ID") or None)
        if client_key and token:
            # SPEC.md §4.4 (3): presenting both is refused as unauthorized; say so up front.
            raise InvalidRequest("give a client key or a token, not both")
        check_user_id(user_id)
        if connect_timeout <= 0:
            raise InvalidRequest("connect_timeout must be positive")
        return cls(
            ws_url=ws_url,
            http_url=http_url,
            codec=_codec(codec),
            client_key=client_key or None,
            token=token or None,
            user_id=user_id,
            connect_timeout=connect_timeout,
        )

    def credentials(self) -> dict[str, str]:
        """Credential headers of the handshake and of every HTTP call (SPEC.md §4, §8)."""
        headers: dict[str, str] = {}
        if self.client_key:
            headers["X-Muxi-Client-Key"] = self.client_key
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def http_headers(self, user_id: str | None) -> dict[str, str]:
        headers = self.credentials()
        user = user_id if user_id is not None else self.user_id
        if user is not None:
            headers["X-Muxi-User-Id"] = user
        return headers

    def request_url(self, request_id: str) -> str:
        # REQUEST_ID_PATTERN holds only characters that are safe in a path segment.
        return f"{self.http_url}/v1/requests/{request_id}"
