"""The protocol package is sans-I/O and documented: importing it pulls in no event loop, socket,
TLS or thread machinery, and every public name says what it is."""

from __future__ import annotations

import enum
import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import protocol

FORBIDDEN = ("asyncio", "socket", "websockets", "ssl", "selectors", "threading")
REPO = Path(protocol.__file__).resolve().parent.parent

_PROBE = f"""
import json, sys
before = set(sys.modules)
import protocol
import protocol.codec, protocol.errors, protocol.limits, protocol.messages, protocol.state
print(json.dumps({{
    "file": protocol.__file__,
    "loaded": sorted(m for m in {FORBIDDEN!r} if m in sys.modules),
    "new": sorted(m for m in {FORBIDDEN!r} if m in sys.modules and m not in before),
}}))
"""


def _probe(*flags: str, env: dict[str, str] | None = None) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, *flags, "-c", _PROBE],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    return json.loads(out.stdout)


def test_import_adds_no_io_modules():
    """A normal interpreter: whatever site startup loaded, ``import protocol`` adds none."""
    report = _probe()
    assert Path(str(report["file"])).resolve().parent == REPO / "protocol"
    assert report["new"] == []


def test_import_loads_no_io_modules_in_a_bare_interpreter():
    """Without ``site`` (which may load threading for .pth files), nothing forbidden is loaded
    at all: neither by protocol nor by orjson or msgpack."""
    path = [str(REPO), *(p for p in sys.path if p and Path(p).is_dir())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    report = _probe("-S", env=env)
    assert Path(str(report["file"])).resolve().parent == REPO / "protocol"
    assert report["loaded"] == []


def _own_doc(obj: object) -> str | None:
    """The docstring the object's author wrote (not an inherited or generated one)."""
    if isinstance(obj, type):
        doc = obj.__dict__.get("__doc__")
        if doc and dataclass_signature_doc(obj) == doc:
            return None  # dataclasses generate "Name(field, ...)" when there is none
        return doc
    return getattr(obj, "__doc__", None)


def dataclass_signature_doc(cls: type) -> str | None:
    if not hasattr(cls, "__dataclass_fields__"):
        return None
    try:
        return cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
    except (TypeError, ValueError):
        return None


def _is_constant(obj: object) -> bool:
    # Constants and type aliases (unions of message classes) are documented at their definition.
    return isinstance(obj, str | int | tuple | frozenset | types.UnionType)


@pytest.mark.parametrize("name", protocol.__all__)
def test_public_name_exists_and_is_documented(name):
    obj = getattr(protocol, name)
    if _is_constant(obj):
        return
    doc = _own_doc(obj)
    assert doc, f"protocol.{name} has no docstring"
    assert doc.strip()


def test_all_is_complete_and_sorted_without_duplicates():
    assert len(set(protocol.__all__)) == len(protocol.__all__)
    public = {
        name
        for name, obj in vars(protocol).items()
        if not name.startswith("_") and not isinstance(obj, types.ModuleType)
        and name not in {"annotations"}
    }  # fmt: skip
    assert public == set(protocol.__all__)


@pytest.mark.parametrize(
    "module",
    [protocol.codec, protocol.errors, protocol.messages, protocol.state],
    ids=lambda m: m.__name__,
)
def test_submodule_all_names_exist_and_enums_are_documented(module):
    assert module.__doc__
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            assert _own_doc(obj), f"{module.__name__}.{name} has no docstring"


def test_constants():
    assert protocol.PROTOCOL_VERSION == "muxgate.v1"
    assert protocol.DEFAULT_PORT == 8001
    assert protocol.WS_PATH == "/v1/ws"
    assert all(name.startswith(protocol.PROTOCOL_VERSION + ".") for name in protocol.SUBPROTOCOLS)
