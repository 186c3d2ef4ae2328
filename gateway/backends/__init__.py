"""Backends by name: the built-in ones, entry points, or ``package.module:attribute``.

``load_backend(name, **options)`` resolves ``name`` in this order:

1. a built-in backend (:data:`BACKENDS`): ``"simulated"`` (the default, a simulated agent
   pipeline, see :mod:`gateway.backends.simulated`), ``"echo"`` (streams the prompt back word
   by word) or ``"openai"`` (a real model behind an OpenAI-compatible server, see
   :mod:`gateway.backends.openai`; imported only when used: it needs httpx, the ``upstream``
   extra) or ``"llama"`` (a tiny real model served by a llama-server the backend starts and
   supervises, see :mod:`gateway.backends.llama`; imported only when used: it needs the
   ``llama`` extra) or ``"flow"`` (steps described in the settings file: LLM calls, MCP tools,
   A2A agents, see :mod:`gateway.backends.flow`);
2. an entry point of that name in the group ``"muxgate.backends"`` (:data:`ENTRY_POINT_GROUP`),
   which a package declares in its ``pyproject.toml``::

       [project.entry-points."muxgate.backends"]
       mybackend = "mypackage.backend:MyBackend"

3. a ``"package.module:attribute"`` reference (the attribute may be dotted).

What is found is a Backend class or a factory: it is called with ``**options`` and must return an
object with ``async def run(self, ctx: RequestContext) -> None``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Final

from ..config import ConfigError
from ..pipeline import Backend
from .echo import EchoBackend
from .simulated import SimulatedBackend

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "ENTRY_POINT_GROUP",
    "OPTIONAL_BACKENDS",
    "EchoBackend",
    "SimulatedBackend",
    "available_backends",
    "load_backend",
]

ENTRY_POINT_GROUP: Final = "muxgate.backends"
DEFAULT_BACKEND: Final = "simulated"


def _openai(**options: Any) -> Backend:
    """Backend ``openai``, imported on first use: the others never load httpx."""
    try:
        from .openai import OpenAIBackend
    except ModuleNotFoundError as exc:
        if exc.name != "httpx":
            raise
        raise ConfigError(str(exc)) from exc
    return OpenAIBackend(**options)


def _llama(**options: Any) -> Backend:
    """Backend ``llama``, imported on first use (it imports the ``openai`` backend)."""
    try:
        from .llama import LlamaBackend
    except ModuleNotFoundError as exc:
        if exc.name != "httpx":
            raise
        raise ConfigError(
            "muxgate backend 'llama' needs muxgate's 'llama' extra: make deps-llama"
        ) from exc
    return LlamaBackend(**options)


def _flow(**options: Any) -> Backend:
    """Backend ``flow``: steps from the settings file (see :mod:`gateway.backends.flow`)."""
    from .flow import FlowBackend

    return FlowBackend(**options)


_BUILTINS: Final[dict[str, Callable[..., Backend]]] = {
    "simulated": SimulatedBackend,
    "echo": EchoBackend,
}
#: Built in too, but they need an optional extra (and options without defaults).
_OPTIONAL_BUILTINS: Final[dict[str, Callable[..., Backend]]] = {
    "openai": _openai,
    "llama": _llama,
    "flow": _flow,
}

#: The names of the built-in backends that run on the default install with no options; the
#: first is the default.
BACKENDS: Final[list[str]] = list(_BUILTINS)
#: The names of the built-in backends that need an optional extra or options: ``openai``
#: (``upstream``), ``llama`` (``llama``), ``flow`` (its steps; ``tools``/``agents`` when used).
OPTIONAL_BACKENDS: Final[list[str]] = list(_OPTIONAL_BUILTINS)


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(point.name, point)
    return found


def available_backends() -> list[str]:
    """Built-in names, then the names of installed entry points."""
    return BACKENDS + sorted(set(_entry_points()) - set(BACKENDS))


def _unknown(name: str, why: str = "") -> ValueError:
    names = ", ".join(repr(n) for n in [*available_backends(), *OPTIONAL_BACKENDS])
    return ValueError(
        f"unknown backend {name!r}{why}; available: {names}, or an entry point in the group "
        f"{ENTRY_POINT_GROUP!r}, or 'package.module:attribute'"
    )


def _import_reference(name: str) -> object:
    module_name, _, attribute = name.partition(":")
    module_name, attribute = module_name.strip(), attribute.strip()
    if not module_name or not attribute:
        raise _unknown(name, " (expected 'package.module:attribute')")
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing module *named in the reference* is an unknown name; a module that
        # fails to import one of its own dependencies is a real error and propagates.
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise
        raise _unknown(name, f" (no module {exc.name!r})") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _unknown(name, f" (module {module_name!r} has no {attribute!r})") from None
    return obj


def _instantiate(name: str, factory: object, options: dict[str, Any]) -> Backend:
    backend: object
    if isinstance(factory, type):  # a class (which itself "has" run: test it first)
        backend = factory(**options)
    elif isinstance(factory, Backend):  # a ready-made instance
        if options:
            raise TypeError(f"backend {name!r} is an instance: it takes no options")
        backend = factory
    elif callable(factory):
        backend = factory(**options)
    else:
        raise TypeError(f"backend {name!r} is neither a Backend class nor a factory: {factory!r}")
    if not isinstance(backend, Backend):
        raise TypeError(
            f"backend {name!r} gave {backend!r}, which has no 'async def run(self, ctx)' method"
        )
    return backend


def load_backend(name: str = DEFAULT_BACKEND, **options: Any) -> Backend:
    """The backend called ``name``, constructed with ``options``.

    Raises ValueError for a name that is neither built in, an installed entry point, nor an
    importable ``package.module:attribute``; TypeError if what it names is not a backend (or
    rejects the options).
    """
    name = name.strip()
    if not name:
        raise _unknown(name)
    builtin = _BUILTINS.get(name) or _OPTIONAL_BUILTINS.get(name)
    if builtin is not None:
        return builtin(**options)
    point = _entry_points().get(name)
    if point is not None:
        return _instantiate(name, point.load(), options)
    if ":" in name:
        return _instantiate(name, _import_reference(name), options)
    raise _unknown(name)
