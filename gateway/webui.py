"""The browser demo and dashboard (``web-demo/``, built by Vite into ``gateway/webui/``), served
on the gateway's own port so that ``muxgate serve`` alone gives a working page.

Only files found under ``webui/`` when the gateway starts can be served: a request path is looked
up in that index, never joined to a directory, so no path can reach outside it. The files are a
few hundred KiB at most and are read once, on first use.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from http import HTTPStatus
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Final

from .transport import HttpResponse

__all__ = ["WebUI"]

#: Page routes without a file extension.
_ROUTES: Final = {"/": "index.html", "/dashboard": "dashboard.html"}

_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".map": "application/json",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str
    cache_control: str


class WebUI:
    """Serves the built web demo; ``respond`` answers ``None`` for paths it does not own."""

    def __init__(self, root: Traversable | None = None) -> None:
        self._root = root if root is not None else files("gateway").joinpath("webui")
        self._index: dict[str, Traversable] = {}
        if self._root.is_dir():
            self._walk(self._root, "")
        self._cache: dict[str, _File] = {}

    def _walk(self, folder: Traversable, prefix: str) -> None:
        for entry in folder.iterdir():
            name = f"{prefix}/{entry.name}"
            if entry.is_dir():
                self._walk(entry, name)
            elif entry.is_file():
                self._index[name] = entry

    @property
    def built(self) -> bool:
        return "/index.html" in self._index

    def owns(self, path: str) -> bool:
        return path in _ROUTES or path in self._index

    def respond(self, path: str) -> HttpResponse | None:
        name = "/" + _ROUTES[path] if path in _ROUTES else path
        entry = self._index.get(name)
        if entry is None:
            return None
        cached = self._cache.get(name)
        if cached is None:
            suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
            content_type = _TYPES.get(suffix) or (
                mimetypes.guess_type(name)[0] or "application/octet-stream"
            )
            # Vite puts a content hash in every asset's name: those never change.
            cache = (
                "public, max-age=31536000, immutable" if name.startswith("/assets/") else "no-cache"
            )
            cached = self._cache[name] = _File(entry.read_bytes(), content_type, cache)
        return HttpResponse(
            HTTPStatus.OK,
            [
                ("Content-Type", cached.content_type),
                ("Cache-Control", cached.cache_control),
                ("X-Content-Type-Options", "nosniff"),
            ],
            cached.body,
        )
