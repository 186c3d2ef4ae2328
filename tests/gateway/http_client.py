"""A tiny HTTP client for end-to-end tests: the stdlib's urllib, run in a worker thread.

No proxy is ever used (a ``http_proxy`` in the environment must not reroute calls to the gateway
under test), every status is returned rather than raised, and the raw body bytes are kept so
tests can compare answers byte for byte (SPEC.md §4.5: another user's request is answered
exactly as an unknown id).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_types(self) -> list[str]:
        """Every Content-Type header sent (a correct answer sends exactly one)."""
        return list(self.headers.get_all("Content-Type") or [])

    def comparable(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers without ``Date``, body: what must not differ between two answers."""
        headers = [(k.lower(), v) for k, v in self.headers.items() if k.lower() != "date"]
        return self.status, sorted(headers), self.body


def _call(method: str, url: str, headers: Mapping[str, str]) -> HttpAnswer:
    request = urllib.request.Request(url, method=method, headers=dict(headers))
    try:
        with _OPENER.open(request, timeout=10) as answer:
            return HttpAnswer(answer.status, answer.headers, answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return HttpAnswer(error.code, error.headers, error.read())


async def http(method: str, url: str, headers: Mapping[str, str] | None = None) -> HttpAnswer:
    """``method url`` with ``headers`` and no body; any status is returned, never raised."""
    return await asyncio.to_thread(_call, method, url, headers or {})
