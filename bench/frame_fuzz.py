"""A socket-level fuzzer (issue 18, item 1): random and mutated frames over many connections while
other connections run normal streams, every message of which is checked.

    python3 bench/frame_fuzz.py --spawn --frames 1000000 --seed 7
    python3 bench/frame_fuzz.py --url ws://127.0.0.1:8001/v1/ws --server-pid PID \\
        --log-file gateway.log --client-key KEY --jwt-secret SECRET

Prints one JSON line of figures (what was sent, what the gateway did, what the normal streams
got, the gateway's log and memory) with ``ok`` and the list of ``failures``; exits 0 whenever it
ran to the end (whatever it found), 2 when it could not run.

Processes. This one orchestrates; ``--role normal`` (the normal side) and ``--role hostile``
(the attacker, at ``--hostile-nice``) are children of its own, so that the attacker's CPU does
not delay the normal side's reads (latency is the gateway's, not this script's event loop's);
with ``--spawn`` it also starts the gateway (``python3 -m gateway.cli serve --port 0
--log-format json`` with :data:`GATEWAY_FLAGS`, stderr to a log file).

Phases. The normal side connects and runs; the attacker warms the gateway up (``--warmup-frames``
of the same mix, counted apart); a calm phase (``--calm`` s) measures the normal streams without
an attack and ends with the RSS baseline (after warm-up); the attack (``--frames`` frames) with
the RSS sampled for its peak; the attacker's connections close, ``--settle`` s pass, the RSS
"after" is sampled; the normal side stops (every stream it started must have ended); the
gateway's log is scanned (with ``--spawn``: after a SIGTERM drain, so that shutdown is checked
too).

Hostile side: ``--conns`` raw-socket WebSocket connections (its own framing: any bit of a frame
can be wrong), reopened whenever the gateway (or the plan) ends one, send ``--frames`` frames in
all, drawn from a weighted mix of generators (:data:`KINDS`): valid messages of
``protocol/vectors`` (both codecs; text and binary frames, right and wrong for the negotiated
subprotocol), byte mutations of them (bit flips, insertions, deletions, truncation,
duplication, splices), structured mutations (fields set to wrong types, huge numbers, deep
nesting, long strings, unicode edge cases, unknown types and fields), batches (up to more than
1024 messages), random bytes, oversized and large frames, WebSocket framing abuse (reserved
bits and opcodes, unmasked frames, bad continuations and close frames; and valid fragmented
messages), and valid but hostile sequences (chats, cancels and resumes of random ids, other
users' ids, pings, a late hello, too many streams, chat/cancel races). Connections authenticate
in every way (client key or user token, header or hello) or wrongly (none, bad, wrong order);
two side tasks open connections that never say anything, and send garbage HTTP upgrade requests
on raw TCP. Each connection is paced under the gateway's rate limit (``--conn-rate`` messages/s)
or, for ``--flood-share`` of them, sends flat out. Everything the gateway sends them is read:
frame kind checked, decoded (every ``--check-every``-th frame) with ``protocol``; an undecodable
frame, a frame of the wrong kind and an error saying a message hit the decoder's safety net are
gateway faults. The generator's memory is bounded (vectors loaded once, a fixed buffer for
oversized frames, counters, a ring of the last frames per connection for ``--dump-dir``).

Normal side: ``--normal`` connections (client key, a user of their own; JSON and msgpack
alternately), each running ``--normal-streams`` streams one after the other (small chats,
``--cancel-share`` of them cancelled), every frame decoded and fed to a
:class:`protocol.RequestStateMachine` per request (G1 one terminal response, G2 nothing after
it, G3 contiguous seq and content), plus: a welcome first and once, no error, no message for an
unknown request, no cancelled response it did not ask for (another user reaching its requests,
G9), no failed response, no close by the gateway, every request ended within ``--hang-timeout``.
Chat -> first chunk latency is reported per phase (calm, attack, after). A client key may act for
any user by design: the attacker's key connections only ever name users of their own, its token
connections (users ``fz-u*``) aim at the normal users' ids (``n<conn>-<k>``, a short cycle, so
that they hit running requests): whatever they send must not reach them. The normal side skips
an id for a while after a cancel of its own found nothing (it came after the request had ended
and been forgotten): that cancel's tombstone would rightly end the id's next chat (SPEC.md §5.3).

Memory. Caches the gateway keeps by design (finished requests for late cancels and ``GET``,
cancel tombstones, resumable requests' text and grace) are bounded by counts and times;
:data:`GATEWAY_FLAGS` makes them small, so that they are full at the baseline already. A
process's RSS stays near the high-water mark of its live memory (allocators keep what was freed
for reuse): glibc's share the gateway gives back every ``--memory-trim-seconds`` (2 s here;
gateway/memory.py), and each RSS sample (baseline, after) waits for the next trim;
pymalloc keeps arenas that are not wholly empty. So the baseline follows a warm-up of the same
mix, and the tolerance (the larger of 10 MiB and 15% of the baseline) covers that mark moving
a little further during the attack, whereas a leak grows with the frames sent (ten times the
warm-up's by default).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import queue
import random
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `protocol` from this checkout, also when not installed
    sys.path.insert(1, str(ROOT))

import msgpack  # noqa: E402
import orjson  # noqa: E402
from procstat import cpu_seconds, rss_bytes  # noqa: E402

import protocol  # noqa: E402
from protocol import (  # noqa: E402
    Cancel,
    CancelResult,
    CancelStatus,
    Chat,
    Chunk,
    Codec,
    Error,
    RemoteProtocolError,
    RequestStateMachine,
    Response,
    ResponseStatus,
    Sender,
    Step,
    UsageReport,
    Welcome,
)

try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - built on every platform websockets has wheels for
    from websockets.utils import apply_mask as _apply_mask

T = TypeVar("T")
MIB = 1 << 20
VECTORS = ROOT / "protocol" / "vectors"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFAULT_CLIENT_KEY = "fuzz-key"
DEFAULT_JWT_SECRET = "fuzz-jwt-secret-of-32-bytes-or-more"  # shorter: PyJWT warns
#: ``muxgate serve`` flags of a spawned gateway besides the port, log format and credentials:
#: the caches kept by design bounded small (see the module's doc), so that they fill during the
#: warm-up and "after" compares like with like; every other setting is the default.
GATEWAY_FLAGS: tuple[str, ...] = (
    "--retention-count", "1000",
    "--tombstone-count", "1000",
    "--resume-retention-count", "100",
    "--resume-grace-seconds", "1",
    "--resume-max-grace-seconds", "1",
    "--memory-trim-seconds", "2",  # freed memory back to the system soon (see _after_a_trim)
)  # fmt: skip
#: Generator kinds and their weights (shares of the frames' draws).
KINDS: dict[str, float] = {
    "vector": 18.0,
    "mutate_bytes": 20.0,
    "mutate_fields": 16.0,
    "batch": 7.0,
    "random": 6.0,
    "sequence": 24.0,
    "ws_protocol": 1.5,
    "fragmented": 1.0,
    "large": 0.02,
    "oversized": 0.01,
}
#: How connections authenticate, and their weights.
AUTH_MODES: dict[str, float] = {
    "key_header": 34.0,
    "key_hello": 10.0,
    "token_header": 16.0,
    "token_hello": 10.0,
    "none": 10.0,
    "bad": 10.0,
    "wrong_order": 10.0,
}
#: Subprotocol offers: what the handshake says -> the codec expected (None: refused, HTTP 400).
OFFERS: dict[str, tuple[float, str | None, Codec | None]] = {
    "json": (40.0, "muxgate.v1.json", Codec.JSON),
    "msgpack": (36.0, "muxgate.v1.msgpack", Codec.MSGPACK),
    "none": (10.0, None, Codec.JSON),
    "both": (8.0, "muxgate.v1.json, muxgate.v1.msgpack", Codec.MSGPACK),
    "junk_and_json": (4.0, "x-junk, muxgate.v1.json", Codec.JSON),
    "unknown": (2.0, "muxgate.v2.json", None),
}
#: Close codes the gateway may use on a hostile connection, and why (for the report).
EXPECTED_CLOSES = {
    "1000": "normal",
    "1001": "going away",
    "1002": "WebSocket protocol error",
    "1007": "text frame not UTF-8",
    "1009": "frame too big",
    "1013": "connection limits",
    "4001": "unauthorized",
    "4008": "slow consumer",
    "4029": "rate limited",
}
_TYPE_RE = re.compile(rb'"type":"([a-z_]{1,20})"')
_CODE_RE = re.compile(rb'"code":"([a-z_]{1,64})"')
_MP_TYPE_RE = re.compile(rb"\xa4type[\xa1-\xbf]([a-z_]{1,20})")
_MP_CODE_RE = re.compile(rb"\xa4code[\xa1-\xbf]([a-z_]{1,31})")
_SAFETY_NET = b"undecodable message"
#: The gateway's tombstone window (``tombstone_seconds``, default 10) and a margin.
TOMBSTONE_S = 15.0


# -- small helpers -------------------------------------------------------------------------------


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _bump(counts: dict[str, int], key: str, n: int = 1, cap: int = 200) -> None:
    """``counts[key] += n``; past ``cap`` keys, new keys go to ``other`` (bounded memory)."""
    if key not in counts and len(counts) >= cap:
        key = "other"
    counts[key] = counts.get(key, 0) + n


def _runner() -> Callable[[Coroutine[Any, Any, T]], T]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 2)


def _max_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Reservoir:
    """A uniform sample of at most ``size`` values (bounded memory, exact below ``size``)."""

    def __init__(self, rng: random.Random, size: int = 50_000) -> None:
        self.rng = rng
        self.size = size
        self.values: list[float] = []
        self.count = 0

    def add(self, value: float) -> None:
        self.count += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            k = self.rng.randrange(self.count)
            if k < self.size:
                self.values[k] = value

    def summary_ms(self) -> dict[str, Any]:
        if not self.values:
            return {"count": 0}
        ms = sorted(v * 1000 for v in self.values)

        def pct(q: float) -> float:
            return round(ms[min(len(ms) - 1, int(q * len(ms)))], 3)

        return {
            "count": self.count,
            "p50_ms": pct(0.5),
            "p90_ms": pct(0.9),
            "p99_ms": pct(0.99),
            "max_ms": round(ms[-1], 3),
        }


# -- vectors -------------------------------------------------------------------------------------


@dataclass
class Pool:
    """Payloads from ``protocol/vectors``, loaded once."""

    #: Valid client messages (canonical and decode-only inputs, batches), per codec.
    valid: dict[Codec, list[bytes]] = field(default_factory=dict)
    #: Everything else the vectors hold (gateway messages, invalid inputs), per codec.
    other: dict[Codec, list[bytes]] = field(default_factory=dict)
    #: Client messages as objects, for structured mutations; gateway messages likewise.
    objects: list[dict[str, Any]] = field(default_factory=list)
    gateway_objects: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls) -> Pool:
        pool = cls({Codec.JSON: [], Codec.MSGPACK: []}, {Codec.JSON: [], Codec.MSGPACK: []})
        messages = json.loads((VECTORS / "messages.json").read_text(encoding="utf-8"))
        for m in messages["messages"]:
            client = m["sender"] == "client"
            bucket = pool.valid if client else pool.other
            bucket[Codec.JSON].append(m["json"].encode())
            bucket[Codec.MSGPACK].append(bytes.fromhex(m["msgpack_hex"]))
            (pool.objects if client else pool.gateway_objects).append(m["message"])
        entries = list(messages["decode_only"])
        for name in ("batches", "invalid"):
            entries += json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))[name]
        for e in entries:
            codec = Codec.JSON if e["codec"] == "json" else Codec.MSGPACK
            data = e["input"].encode() if "input" in e else bytes.fromhex(e["input_hex"])
            valid = e["sender"] == "client" and all("message" in x for x in e.get("expected", [{}]))
            (pool.valid if valid else pool.other)[codec].append(data)
        return pool


# -- values for structured mutations --------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A value written as these exact bytes (``json``: JSON text; ``mp``: msgpack); None: the
    codec cannot carry it, ``alt`` is written instead."""

    json: bytes | None
    mp: bytes | None
    alt: Any = None


_UNICODE = [
    "\u0000", "\u001f", "\u007f", "\u0085", "\u00a0", "\u00ad", "\u200b", "\u200e", "\u2028",
    "\u2029", "\u202e", "\u2060", "\ufeff", "\ufffd", "\uffff", "\U0010ffff", "e\u0301\u0301",
    "👩\u200d💻", "🏳️\u200d🌈", "\ufdfa", "\U0001d54f", "\u0130", "ß", "Ω", "日本語",
    "\r\n", "\t", "\\", '"',
]  # fmt: skip
_RAW_UNICODE = [
    Raw(b'"\\ud800"', b"\xa3\xed\xa0\x80"),  # a lone surrogate (escaped; CESU bytes in msgpack)
    Raw(b'"\\udfff\\ud800"', None, "x"),
    Raw(b'"\xc0\xaf"', b"\xa2\xc0\xaf"),  # overlong UTF-8
    Raw(b'"\xed\xa0\x80"', b"\xa3\xed\xa0\x80"),
    Raw(b'"\xf4\x90\x80\x80"', b"\xa4\xf4\x90\x80\x80"),  # beyond U+10FFFF
    Raw(b'"\xff\xfe"', b"\xa2\xff\xfe"),
    Raw(b'"\\u0000"', b"\xa1\x00"),
    Raw(b'"a\\/b"', b"\xa3a/b"),
    Raw(b'"\\x41"', None, "x"),  # not a JSON escape
]
_HUGE: list[Any] = [
    2**53 - 1, 2**53, -(2**53), -(2**53 - 1), 2**63 - 1, -(2**63), 2**64 - 1,
    1.7976931348623157e308, 5e-324, -0.0, 0.1, 1e-7, 2.5, -1, 0, 1, 3600001, 3600000,
    Raw(b"1" + b"0" * 30, b"\xcf" + b"\xff" * 8),
    Raw(b"-" + b"9" * 25, b"\xd3\x80" + b"\x00" * 7),
    Raw(b"1e400", b"\xcb" + struct.pack(">d", math.inf)),
    Raw(b"-1e400", b"\xcb" + struct.pack(">d", -math.inf)),
    Raw(b"NaN", b"\xcb" + struct.pack(">d", math.nan)),
    Raw(b"Infinity", b"\xca" + struct.pack(">f", math.inf)),
    Raw(b"-0", b"\xd0\x00"),
    Raw(b"1.0", b"\xcb" + struct.pack(">d", 1.0)),
    Raw(b"1E3", b"\xca" + struct.pack(">f", 1000.0)),
    Raw(b"0x10", b"\xcc\x10"),
    Raw(b"01", b"\xd1\x00\x01"),
    Raw(b"1e-400", b"\xcb" + struct.pack(">d", 0.0)),
]  # fmt: skip
_MSGPACK_ONLY = [
    Raw(None, b"\xc4\x02\x00\x01", "bin"),  # bin 8
    Raw(None, b"\xd4\x01\x00", "ext"),  # fixext 1
    Raw(None, b"\xc7\x00\xff", "ext"),  # ext 8, timestamp type, empty
    Raw(None, b"\xc1", "never used"),
    Raw(None, b"\x81\x01\x02", "int key"),
    Raw(None, b"\x81\xc0\x02", "nil key"),
    Raw(None, b"\x81\xc4\x01k\x02", "bin key"),
    Raw(None, b"\xde\x00\x00", "map16 empty"),
    Raw(None, b"\xdf\x00\x00\x00\x01\xa1a\x01", "map32"),
    Raw(None, b"\xdc\x00\x01\x01", "array16"),
    Raw(None, b"\xda\xff\xffa", "truncated str16"),
    Raw(None, b"\xdb\xff\xff\xff\xff", "str32 4 GiB"),
    Raw(None, b"\xdd\x7f\xff\xff\xff", "array32 2^31"),
    Raw(None, b"\xc0", None),
]


def _nest(depth: int, as_object: bool) -> Raw:
    if as_object:
        return Raw(b'{"a":' * depth + b"1" + b"}" * depth, b"\x81\xa1a" * depth + b"\x01")
    return Raw(b"[" * depth + b"1" + b"]" * depth, b"\x91" * depth + b"\x01")


def _placeholders(value: Any, raws: list[Raw]) -> Any:
    """``value`` with every :class:`Raw` replaced by a unique placeholder string."""
    if isinstance(value, Raw):
        raws.append(value)
        return f"\x00R{len(raws) - 1}\x00"
    if isinstance(value, dict):
        return {k: _placeholders(v, raws) for k, v in value.items()}
    if isinstance(value, list):
        return [_placeholders(v, raws) for v in value]
    return value


def encode_value(obj: Any, codec: Codec) -> bytes:
    """``obj`` (which may hold :class:`Raw` values) in ``codec``; never raises."""
    raws: list[Raw] = []
    plain = _placeholders(obj, raws)
    try:
        if codec is Codec.JSON:
            out = orjson.dumps(plain, default=repr)
        else:
            out = msgpack.packb(plain, use_bin_type=True, default=repr)
    except (TypeError, ValueError, OverflowError, orjson.JSONEncodeError):
        return b'{"type":"ping","id":"unencodable"}'
    for i, raw in enumerate(raws):
        if codec is Codec.JSON:
            mark = orjson.dumps(f"\x00R{i}\x00")
            sub = raw.json if raw.json is not None else orjson.dumps(raw.alt, default=repr)
        else:
            mark = msgpack.packb(f"\x00R{i}\x00")
            sub = raw.mp if raw.mp is not None else msgpack.packb(raw.alt, default=repr)
        out = out.replace(mark, sub, 1)
    return bytes(out)


# -- WebSocket frames ------------------------------------------------------------------------------

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def ws_frame(
    payload: bytes,
    opcode: int,
    mask_key: bytes | None,
    *,
    fin: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """A client frame: masked with ``mask_key`` (None: unmasked, a protocol error); ``length``:
    a declared payload length other than the real one."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
    m = 0x80 if mask_key is not None else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if mask_key is None:
        return head + payload
    return head + mask_key + _apply_mask(payload, mask_key)


# -- the generators --------------------------------------------------------------------------------


@dataclass
class Shot:
    """What one generator draw sends: WebSocket frames (serialized) and messages they carry."""

    kind: str
    frames: list[bytes]
    messages: int = 1


@dataclass
class ConnCtx:
    """One hostile connection, as the generators see it."""

    wid: int
    codec: Codec
    auth: str
    #: A user token's user (the connection may act only for it), or None (a client key, or none).
    token_user: str | None
    #: Not authenticated by the handshake: frames over 16 KiB close before the first message.
    preauth: bool
    #: That user's token.
    token: str | None = None
    own_ids: deque[str] = field(default_factory=lambda: deque(maxlen=64))
    serial: int = 0
    #: The last frames sent (for ``--dump-dir``).
    recent: deque[tuple[str, bytes]] = field(default_factory=lambda: deque(maxlen=12))


class Generator:
    """Draws frames. Every draw is bounded in size and memory (see ``oversized``)."""

    def __init__(self, rng: random.Random, pool: Pool, cfg: HostileConfig) -> None:
        self.rng = rng
        self.pool = pool
        self.cfg = cfg
        kinds = {**KINDS, **cfg.kind_weights}
        self.kinds = list(kinds)
        self.weights = list(kinds.values())
        # One buffer for every oversized frame: at most 2 MiB, allocated once.
        self.big = b"x" * (2 * MIB + 65536)

    # -- helpers ---------------------------------------------------------------------------------

    def mask(self) -> bytes:
        r = self.rng.random()
        if r < 0.05:
            return b"\x00\x00\x00\x00"
        return self.rng.randbytes(4)

    def data(self, ctx: ConnCtx, payload: bytes, wrong: float | None = None) -> bytes:
        """``payload`` in one data frame of the connection's kind (of the other kind with
        probability ``wrong``)."""
        text = ctx.codec is Codec.JSON
        if self.rng.random() < (self.cfg.wrong_frame_share if wrong is None else wrong):
            text = not text
        return ws_frame(payload, OP_TEXT if text else OP_BINARY, self.mask())

    def codec_for(self, ctx: ConnCtx) -> Codec:
        """Mostly the connection's codec; sometimes the other one."""
        if self.rng.random() < 0.06:
            return Codec.MSGPACK if ctx.codec is Codec.JSON else Codec.JSON
        return ctx.codec

    def payload(self, codec: Codec, valid_share: float = 0.75) -> bytes:
        bucket = self.pool.valid if self.rng.random() < valid_share else self.pool.other
        return self.rng.choice(bucket[codec])

    def rid(self, ctx: ConnCtx) -> str:
        ctx.serial += 1
        return f"fz{ctx.wid}-{ctx.serial}"

    def user(self, ctx: ConnCtx) -> str:
        """A user this connection may name: its token's, or (client key) one of the fuzzer's."""
        if ctx.token_user is not None:
            return ctx.token_user
        return f"fz-k{self.rng.randrange(16)}"

    def normal_target(self) -> tuple[str, str]:
        """A normal client's user and a request id it uses (or will use)."""
        i = self.rng.randrange(max(1, self.cfg.normal_conns))
        return f"normal-{i}", f"n{i}-{self.rng.randrange(self.cfg.normal_ids)}"

    # -- a draw ----------------------------------------------------------------------------------

    def shot(self, ctx: ConnCtx) -> Shot:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        shot: Shot = getattr(self, "gen_" + kind)(ctx)
        return shot

    def gen_vector(self, ctx: ConnCtx) -> Shot:
        codec = self.codec_for(ctx)
        data = self.payload(codec)
        return Shot("vector", [self.data(ctx, data)], data.count(b"\n") + 1)

    def gen_mutate_bytes(self, ctx: ConnCtx) -> Shot:
        codec = self.codec_for(ctx)
        data = bytearray(self.payload(codec, 0.8))
        for _ in range(1 + int(self.rng.expovariate(1.0))):
            data = self.mutate_bytes(data, codec)
        out = bytes(data[: 64 * 1024])
        return Shot("mutate_bytes", [self.data(ctx, out)], out.count(b"\n") + 1)

    def gen_mutate_fields(self, ctx: ConnCtx) -> Shot:
        codec = self.codec_for(ctx)
        rng = self.rng
        source = self.pool.objects if rng.random() < 0.9 else self.pool.gateway_objects
        obj = orjson.loads(orjson.dumps(rng.choice(source)))  # a deep copy of plain JSON data
        for _ in range(1 + int(rng.expovariate(1.2))):
            self.mutate_object(obj, ctx)
        out = encode_value(obj, codec)[: self.cfg.max_frame_bytes]  # a frame of the limit at most
        if codec is Codec.JSON and rng.random() < 0.08 and out.endswith(b"}"):  # duplicate keys
            dup = rng.choice([b',"type":"ping"', b',"request_id":1', b',"type":"chat"'])
            out = out[:-1] + dup + b"}"
        return Shot("mutate_fields", [self.data(ctx, out)], 1)

    def gen_batch(self, ctx: ConnCtx) -> Shot:
        rng = self.rng
        if rng.random() < 0.02:  # many messages: at the cap (1024), over it, far over it
            n = rng.choice([100, 255, 1023, 1024, 1025, 1500])
        else:
            n = rng.choice([2, 2, 3, 4, 5, 8, 8, 16, 32])
        codec = ctx.codec
        parts: list[bytes] = []
        for _ in range(n):
            r = rng.random()
            if r < 0.55:
                item = self.payload(codec, 0.9)
            elif r < 0.75:
                item = encode_value(self.sequence_messages(ctx)[0], codec)
            else:
                item = bytes(self.mutate_bytes(bytearray(self.payload(codec)), codec))
            if codec is Codec.JSON:
                item = item.replace(b"\n", b" ")  # one line each (a batch vector is one line)
            parts.append(item)
        if codec is Codec.JSON:
            sep = rng.choice([b"\n", b"\n", b"\r\n", b"\n\n", b"\n \t\n"])
            data = sep.join(parts) + (sep if rng.random() < 0.3 else b"")
        else:
            data = b"".join(parts)
        return Shot("batch", [self.data(ctx, data, wrong=0.02)], n)

    def gen_random(self, ctx: ConnCtx) -> Shot:
        rng = self.rng
        size = min(8192, int(rng.expovariate(1 / 200)))
        r = rng.random()
        if r < 0.25:
            data = rng.randbytes(size)  # mostly invalid UTF-8: on a JSON text frame, 1007
        elif r < 0.6:
            data = "".join(chr(rng.randrange(32, 127)) for _ in range(min(size, 2000))).encode()
        elif r < 0.8:
            chars = [chr(rng.randrange(0x20, 0x2FFF)) for _ in range(min(size, 500))]
            data = "".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF).encode()
        else:  # looks like msgpack: a map header, then anything
            data = bytes((0x80 | rng.randrange(16),)) + rng.randbytes(size)
        return Shot("random", [self.data(ctx, data, wrong=0.15)], 1)

    def gen_ws_protocol(self, ctx: ConnCtx) -> Shot:
        """Framing abuse; most of it closes the connection (1002, 1007, 1009)."""
        rng = self.rng
        good = self.payload(ctx.codec)
        op = OP_TEXT if ctx.codec is Codec.JSON else OP_BINARY
        variant = rng.randrange(16)
        frames: list[bytes]
        if variant == 0:
            frames = [ws_frame(good, op, self.mask(), rsv=rng.randrange(1, 8))]
        elif variant == 1:
            frames = [ws_frame(good, rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), self.mask())]
        elif variant == 2:
            frames = [ws_frame(good, op, None)]  # unmasked
        elif variant == 3:
            frames = [ws_frame(good, OP_CONT, self.mask())]  # a continuation of nothing
        elif variant == 4:
            frames = [ws_frame(b"p" * rng.randrange(126, 300), OP_PING, self.mask())]
        elif variant == 5:
            frames = [ws_frame(b"p", OP_PING, self.mask(), fin=False)]  # a fragmented control
        elif variant == 6:
            frames = [ws_frame(b"\x03", OP_CLOSE, self.mask())]  # a 1-byte close payload
        elif variant == 7:
            code = rng.choice([0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
            frames = [ws_frame(struct.pack("!H", code) + b"bye", OP_CLOSE, self.mask())]
        elif variant == 8:
            frames = [ws_frame(b"\x03\xe8\xff\xfe", OP_CLOSE, self.mask())]  # reason not UTF-8
        elif variant == 9:
            frames = [ws_frame(rng.randbytes(rng.randrange(126)), OP_PING, self.mask())]  # valid
        elif variant == 10:
            frames = [ws_frame(rng.randbytes(rng.randrange(126)), OP_PONG, self.mask())]  # valid
        elif variant == 11:  # a data frame in the middle of a fragmented message
            half = max(1, len(good) // 2)
            frames = [
                ws_frame(good[:half], op, self.mask(), fin=False),
                ws_frame(good, op, self.mask()),
            ]
        elif variant == 12:  # a 64-bit length with its top bit set
            frames = [bytes((0x80 | op, 0xFF)) + b"\x80" + b"\x00" * 7 + self.mask()]
        elif variant == 13:  # a 16-bit length for a short payload (non-minimal: a 1002)
            head = struct.pack("!BBH", 0x80 | op, 0xFE, len(good))
            key = self.mask()
            frames = [head + key + _apply_mask(good, key)]
        elif variant == 14:  # declared longer than sent; the next frame's bytes become its tail
            frames = [ws_frame(good, op, self.mask(), length=len(good) + rng.randrange(1, 64))]
        else:  # a close from the client: the gateway answers it and the connection ends
            frames = [ws_frame(struct.pack("!H", 1000), OP_CLOSE, self.mask())]
        return Shot("ws_protocol", frames, 1)

    def gen_fragmented(self, ctx: ConnCtx) -> Shot:
        """A valid message in 2-6 fragments, sometimes with a ping between them."""
        rng = self.rng
        data = self.payload(ctx.codec, 0.9)
        op = OP_TEXT if ctx.codec is Codec.JSON else OP_BINARY
        if rng.random() < 0.05:
            op = OP_BINARY if op == OP_TEXT else OP_TEXT
        k = rng.randrange(2, 7)
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(k - 1))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        frames = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            frames.append(ws_frame(piece, op if i == 0 else OP_CONT, self.mask(), fin=last))
            if not last and rng.random() < 0.2:
                frames.append(ws_frame(b"mid", OP_PING, self.mask()))
        return Shot("fragmented", frames, 1)

    def gen_large(self, ctx: ConnCtx) -> Shot:
        """Large frames within the limit (before auth above 16 KiB: a 1009)."""
        rng = self.rng
        codec = ctx.codec
        r = rng.randrange(5)
        if r == 0:
            n = rng.choice([262_144, 262_145, 300_000])
            obj: dict[str, Any] = {"type": "chat", "request_id": self.rid(ctx), "message": "a" * n}
            data, messages = encode_value(obj, codec), 1
        elif r == 1:
            one = encode_value({"type": "ping", "id": 1}, codec)
            n = rng.choice([1024, 1025])
            data = (b"\n" if codec is Codec.JSON else b"").join([one] * n)
            messages = n
        elif r == 2:
            data, messages = b"1\n" * 500_000, 500_000  # lines: refused before any decode
        elif r == 3:
            pad = "p" * rng.choice([16_000, 16_385, 100_000, 1_000_000])
            data, messages = encode_value({"type": "hello", "token": pad}, codec), 1
        else:
            n = rng.choice([15_000, 16_300, 40_000])
            meta = {"pad": "x" * n}
            obj = {"type": "chat", "request_id": self.rid(ctx), "message": "m", "metadata": meta}
            data, messages = encode_value(obj, codec), 1
        data = data[: self.cfg.max_frame_bytes]
        return Shot("large", [self.data(ctx, data, wrong=0.05)], messages)

    def gen_oversized(self, ctx: ConnCtx) -> Shot:
        """A frame over the limit (1009 from its header): from one fixed buffer."""
        limit = 16_384 if ctx.preauth else self.cfg.max_frame_bytes
        size = limit + 1 + int(self.rng.random() * min(limit, 1 << 20))
        return Shot("oversized", [self.data(ctx, self.big[:size], wrong=0.0)], 1)

    def gen_sequence(self, ctx: ConnCtx) -> Shot:
        messages = self.sequence_messages(ctx)
        codec = self.codec_for(ctx) if self.rng.random() < 0.3 else ctx.codec
        if len(messages) > 1 and self.rng.random() < 0.4:  # one frame per message
            frames = [self.data(ctx, encode_value(m, codec), wrong=0.02) for m in messages]
        else:
            sep = b"\n" if codec is Codec.JSON else b""
            data = sep.join(encode_value(m, codec) for m in messages)
            frames = [self.data(ctx, data, wrong=0.02)]
        return Shot("sequence", frames, len(messages))

    # -- valid but hostile messages ----------------------------------------------------------------

    def chat(self, ctx: ConnCtx, rid: str | None = None) -> dict[str, Any]:
        rng = self.rng
        rid = rid or self.rid(ctx)
        chat: dict[str, Any] = {"type": "chat", "request_id": rid, "message": "fuzz"}
        r = rng.random()
        if r < 0.85:
            chat["metadata"] = {
                "tokens": rng.randrange(0, 12),
                "token_delay_ms": rng.randrange(0, 4),
                "plan_ms": 0,
                "tool_ms": 0,
            }
            if rng.random() < 0.05:
                chat["metadata"]["fail_at_token"] = rng.randrange(0, 10)
        elif r < 0.9:
            chat["metadata"] = {"tokens": rng.choice([True, -1, "9", 1.5, None, 10**6])}
        if rng.random() < 0.1:
            chat["stream"] = False
        if rng.random() < 0.1:
            chat["steps"] = True
        if rng.random() < 0.08:
            chat["resumable"] = True
            if rng.random() < 0.5:
                chat["grace_ms"] = rng.choice([1, 1000, 3_600_000])
        if rng.random() < 0.06:
            chat["timeout_ms"] = rng.randrange(1, 30)
        if rng.random() < 0.1:
            chat["user_id"] = self.user(ctx)
        ctx.own_ids.append(rid)
        return chat

    def sequence_messages(self, ctx: ConnCtx) -> list[dict[str, Any]]:
        rng = self.rng
        r = rng.randrange(14)
        own = rng.choice(ctx.own_ids) if ctx.own_ids else self.rid(ctx)
        if r <= 2:
            return [self.chat(ctx)]
        if r == 3:  # cancel one of its own (running, finished or never accepted)
            return [{"type": "cancel", "request_id": own, "reason": "fuzz"}]
        if r == 4:  # another user's request: forbidden or not_found, never cancelled (G9)
            user, rid = self.normal_target()
            if ctx.token_user is None:  # a client key may act for anyone: its own users only
                user = self.user(ctx)
            cancel = {"type": "cancel", "request_id": rid}
            if rng.random() < 0.5:
                cancel["user_id"] = user
            return [cancel]
        if r == 5:
            user, rid = self.normal_target()
            if ctx.token_user is None or rng.random() < 0.5:
                rid = rng.choice([own, rid])
                user = self.user(ctx) if ctx.token_user is None else user
            resume: dict[str, Any] = {
                "type": "resume",
                "request_id": rid,
                "epoch": rng.choice(["0.1", "abc.7", "x" * 64, f"{rng.getrandbits(32):x}.1"]),
            }
            if rng.random() < 0.7:
                resume["after_seq"] = rng.choice([-1, 0, 1, 5, 2**53 - 1])
            if rng.random() < 0.3:
                resume["user_id"] = user
            return [resume]
        if r == 6:
            ident: Any = rng.choice([rng.randrange(-(2**53) + 1, 2**53), "p", "x" * 128])
            return [{"type": "ping", "id": ident}] * rng.choices([1, 10, 50], [94, 5, 1])[0]
        if r == 7:  # a chat for another user (token: forbidden)
            user, _ = self.normal_target()
            if ctx.token_user is None:
                user = self.user(ctx)
            chat = self.chat(ctx)
            chat["user_id"] = user
            return [chat]
        if r == 8:  # the same id twice: duplicate_request_id
            rid = self.rid(ctx)
            return [self.chat(ctx, rid), self.chat(ctx, rid)]
        if r == 9:  # more streams than allowed
            n = self.cfg.max_streams + rng.randrange(1, 6) if rng.random() < 0.1 else 3
            return [self.chat(ctx) for _ in range(n)]
        if r == 10:  # a hello that is not the first message: protocol_violation
            # With the connection's own credentials: a first message may be this hello (a
            # hello replaces the handshake's credentials), and a token connection must never
            # become a client key's, which may act for the normal users.
            if ctx.token is not None:
                return [{"type": "hello", "token": ctx.token}]
            return [{"type": "hello", "client_key": self.cfg.client_key}]
        if r == 11:  # chat and cancel race; cancel before chat (a tombstone)
            rid = self.rid(ctx)
            cancel = {"type": "cancel", "request_id": rid}
            pair = [self.chat(ctx, rid), cancel]
            return pair if rng.random() < 0.5 else pair[::-1]
        if r == 12:  # cancel many random ids
            return [
                {"type": "cancel", "request_id": f"nope-{rng.getrandbits(40):x}"}
                for _ in range(rng.choices([1, 5, 50], [90, 9, 1])[0])
            ]
        return [self.chat(ctx, own)]  # an id it used before: running or finished

    # -- mutations ---------------------------------------------------------------------------------

    _INTERESTING: ClassVar[list[bytes]] = [
        b"\n", b"\r\n", b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"\x00", b"\xff",
        b"\xc1", b"\xc0\xaf", b"\xed\xa0\x80", b"9" * 20, b"\xa0", b"\xef\xbb\xbf", b"\\u",
        b"\\ud800", b"null", b"true", b"-", b"e999", b"\xdc\xff\xff", b"\xdf\xff\xff\xff\xff",
        b"\x9f", b"\x8f", b"\xcf", b"\xd3", b"\xc4", b"\xd9\xff",
    ]  # fmt: skip

    def mutate_bytes(self, data: bytearray, codec: Codec) -> bytearray:
        rng = self.rng
        n = len(data)
        op = rng.randrange(10)
        if n == 0:
            return bytearray(rng.choice(self._INTERESTING))
        if op == 0:  # bit flips
            for _ in range(rng.randrange(1, 9)):
                data[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            pos = rng.randrange(n + 1)
            data[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        elif op == 2:  # insert an interesting token
            pos = rng.randrange(n + 1)
            data[pos:pos] = rng.choice(self._INTERESTING)
        elif op == 3:  # delete a range
            a = rng.randrange(n)
            del data[a : a + rng.randrange(1, max(2, n // 4))]
        elif op == 4:  # truncate
            del data[rng.randrange(n) :]
        elif op == 5:  # duplicate a slice in place
            a = rng.randrange(n)
            b = min(n, a + rng.randrange(1, 64))
            data[b:b] = data[a:b]
        elif op == 6:  # the whole payload twice (a batch, or two objects on one line)
            sep = rng.choice([b"", b"\n", b" "]) if codec is Codec.JSON else b""
            data = bytearray(bytes(data) + sep + bytes(data))
        elif op == 7:  # splice with another payload
            other = self.payload(codec, 0.5)
            data = bytearray(data[: rng.randrange(n + 1)] + other[rng.randrange(len(other) + 1) :])
        elif op == 8:  # overwrite a byte with an interesting one
            data[rng.randrange(n)] = rng.choice(b'\x00\xff"\\{}[],:\n\xc1\x80\xa0\xde\xdf')
        else:  # a digit run made huge
            m = re.search(rb"\d+", data)
            if m:
                data[m.start() : m.end()] = rng.choice([b"9" * 30, b"18446744073709551616", b"-0"])
            else:
                data[rng.randrange(n)] ^= 0x20
        return data

    def evil(self, ctx: ConnCtx) -> Any:
        """A value that is wrong somewhere: a type, a size, a depth, a character."""
        rng = self.rng
        r = rng.randrange(9)
        if r == 0:
            wrong: list[Any] = [0, -1, 1, 2.5, True, False, None, "", "x", [], {}, [1], {"a": {}}]
            return rng.choice(wrong)
        if r == 1:
            return rng.choice(_HUGE)
        if r == 2:  # around the bounds (8 for metadata, 64 for a message), and far beyond
            depth = rng.choices([8, 9, 10, 62, 63, 64, 65, 100, 1000, 50_000], [4] * 9 + [1])[0]
            return _nest(depth, rng.random() < 0.5)
        if r == 3:  # around the limits in characters; rarely far beyond them
            if rng.random() < 0.9:
                n = rng.choice([1, 64, 65, 128, 129, 256, 257, 1024])
            else:
                n = rng.choice([8192, 8193, 16_385, 65_536, 262_145])
            unit = rng.choice(["a", "é", "😀", "\u0000", "\n", '"', "\\", "\u2028"])
            return unit * n
        if r == 4:
            return rng.choice(_UNICODE) * rng.choice([1, 1, 3, 200])
        if r == 5:
            return rng.choice(_RAW_UNICODE)
        if r == 6:
            return rng.choice(_MSGPACK_ONLY)
        if r == 7:
            return {str(i): i for i in range(rng.choices([2, 100, 2000], [90, 9, 1])[0])}
        return [rng.random() for _ in range(rng.choices([1, 20, 600], [80, 18, 2])[0])]

    _FIELDS: ClassVar[list[str]] = [
        "type", "request_id", "message", "messages", "stream", "user_id", "timeout_ms",
        "metadata", "steps", "resumable", "grace_ms", "epoch", "after_seq", "id", "token",
        "client_key", "reason", "unknown_field", "",
    ]  # fmt: skip

    def mutate_object(self, obj: dict[str, Any], ctx: ConnCtx) -> None:
        rng = self.rng
        r = rng.randrange(8)
        if r <= 2 and obj:  # a field set to an evil value
            obj[rng.choice(list(obj))] = self.evil(ctx)
        elif r == 3:  # a field added (known or not)
            obj[rng.choice(self._FIELDS)] = self.evil(ctx)
        elif r == 4 and obj:
            del obj[rng.choice(list(obj))]
        elif r == 5:
            obj["type"] = rng.choice(
                ["nope", "", "CHAT", "chat ", "chunk", "welcome", "response", "pong", "hello",
                 "cancel", "resume", "ping", "chat\u0000", "x" * 300, 7, None]
            )  # fmt: skip
        elif r == 6:
            key = rng.choice(["request_id", "user_id", "epoch"])
            obj[key] = rng.choice(
                ["", "a" * 128, "a" * 129, "r 1", "r/1", "ü", "r1\n", "../x", "%00", "a@b",
                 "normal 0", self.rid(ctx), "x" * 65]
            )  # fmt: skip
        else:
            meta = obj.setdefault("metadata", {})
            if isinstance(meta, dict):
                name = rng.choice(["tokens", "token_delay_ms", "plan_ms", "tool_ms", "seed", "k"])
                meta[name] = self.evil(ctx)
            msgs = [{"role": rng.choice(["user", "system", "tool", "x"]), "content": "c"}]
            p = rng.random()
            if p < 0.25:
                msgs[0][rng.choice(["role", "content", "z"])] = self.evil(ctx)
                obj["messages"] = msgs
            elif p < 0.3:  # around the count limit (512), each entry small
                obj["messages"] = msgs * rng.choice([512, 513])


# -- the hostile side: raw WebSocket client connections -----------------------------------------


@dataclass
class HostileConfig:
    url: str
    host: str
    port: int
    path: str
    frames: int
    conns: int
    seed: int
    client_key: str
    jwt_secret: str
    conn_rate: float
    flood_share: float
    wrong_frame_share: float
    check_every: int
    max_frame_bytes: int
    max_streams: int
    normal_conns: int
    normal_ids: int
    http_garbage: bool
    idle_conns: int
    dump_dir: Path | None
    frames_per_conn: int
    kind_weights: dict[str, float]
    #: Stop sending after this long, whatever is left of ``frames`` (the report says so).
    max_seconds: float


@dataclass
class HostileStats:
    frames_by_kind: dict[str, int] = field(default_factory=dict)
    draws_by_kind: dict[str, int] = field(default_factory=dict)
    frames: int = 0
    messages: int = 0
    bytes_sent: int = 0
    connects: int = 0
    opened: int = 0
    auth_modes: dict[str, int] = field(default_factory=dict)
    offers: dict[str, int] = field(default_factory=dict)
    paced: dict[str, int] = field(default_factory=dict)
    handshake_refused: dict[str, int] = field(default_factory=dict)
    connect_failed: dict[str, int] = field(default_factory=dict)
    #: Close frames the gateway sent first, by code.
    closed_by_gateway: dict[str, int] = field(default_factory=dict)
    #: The gateway's close codes answering a close frame of ours (``ws_protocol`` sends some,
    #: valid or not; the plan's "close" end sends 1000).
    close_answers: dict[str, int] = field(default_factory=dict)
    #: Connections this side ended, by how (close frame, FIN, abort, RST).
    closed_by_fuzzer: dict[str, int] = field(default_factory=dict)
    #: TCP ended by the gateway without a close frame read: mostly a connection the gateway
    #: failed (1002, 1007, 1009) while frames of ours were in flight, which its kernel answers
    #: with a RST that discards the close frame before this side reads it.
    dropped_by_gateway: int = 0
    frames_received: int = 0
    bytes_received: int = 0
    received_types: dict[str, int] = field(default_factory=dict)
    error_codes: dict[str, int] = field(default_factory=dict)
    decoded_checked: int = 0
    #: Gateway faults seen on hostile connections: undecodable frames, wrong frame kinds,
    #: masked frames, safety-net errors, bad Sec-WebSocket-Accept.
    gateway_faults: dict[str, int] = field(default_factory=dict)
    fault_samples: list[str] = field(default_factory=list)
    write_stalls: int = 0
    http_garbage: dict[str, int] = field(default_factory=dict)
    http_status: dict[str, int] = field(default_factory=dict)
    #: "variant: status" -> count (which garbage got which answer).
    http_answers: dict[str, int] = field(default_factory=dict)
    idle: int = 0
    idle_closes: dict[str, int] = field(default_factory=dict)
    dumps: int = 0

    def fault(self, what: str, detail: str) -> None:
        _bump(self.gateway_faults, what)
        if len(self.fault_samples) < 20:
            self.fault_samples.append(f"{what}: {detail[:300]}")


class RawConn(asyncio.Protocol):
    """One hostile connection: our own framing out, the gateway's frames parsed and checked."""

    def __init__(self, hostile: Hostile, key: bytes) -> None:
        self.h = hostile
        self.stats = hostile.stats
        self.accept = base64.b64encode(hashlib.sha1(base64.b64encode(key) + GUID).digest())
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head_done = False
        self.status: asyncio.Future[int] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.codec: Codec = Codec.JSON
        self.close_received: int | None = None
        self.close_sent = False
        self.by_us = False  # this side aborted or closed the TCP connection
        self.eof_sent = False  # this side half-closed it (FIN): nothing more may be written
        self.fragments: list[bytes] = []
        self.fragment_op = 0
        self.seen = 0
        self.ctx: ConnCtx | None = None
        self.opened_at = time.monotonic()
        self.last_sent = self.last_received = 0.0

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        self.stats.bytes_received += len(data)
        buf = self.buf
        buf += data
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self.abort()
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            self.head_done = True
            self._on_head(head)
            if not self.status.done() or self.status.result() != 101:
                buf.clear()
                return
        elif self.status.done() and self.status.result() != 101:
            buf.clear()
            return
        self._frames()

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        if not self.status.done():
            self.status.set_result(0)
        if not self.ended.done():
            self.ended.set_result(None)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # the handshake ----------------------------------------------------------------------------

    def _on_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            status = -1
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if status == 101:
            if headers.get(b"sec-websocket-accept") != self.accept:
                self.stats.fault("bad_accept", repr(head[:200]))
            proto = headers.get(b"sec-websocket-protocol")
            self.codec = Codec.MSGPACK if proto == b"muxgate.v1.msgpack" else Codec.JSON
        self.status.set_result(status)

    # the gateway's frames ---------------------------------------------------------------------

    def _frames(self) -> None:
        buf = self.buf
        n = len(buf)
        off = 0
        while n - off >= 2:
            b0 = buf[off]
            b1 = buf[off + 1]
            length = b1 & 0x7F
            h = 2
            if length == 126:
                if n - off < 4:
                    break
                length = int.from_bytes(buf[off + 2 : off + 4], "big")
                h = 4
            elif length == 127:
                if n - off < 10:
                    break
                length = int.from_bytes(buf[off + 2 : off + 10], "big")
                h = 10
            if b1 & 0x80:
                self.stats.fault("masked_frame", f"b0={b0:#x}")
                h += 4
            if length > 4 * MIB:
                self.stats.fault("huge_frame", f"{length} bytes")
                self.abort()
                return
            if n - off < h + length:
                break
            payload = bytes(buf[off + h : off + h + length])
            off += h + length
            self._on_frame(b0, payload)
            if self.transport is None or self.transport.is_closing():
                break
        if off:
            del buf[:off]

    def _on_frame(self, b0: int, payload: bytes) -> None:
        stats = self.stats
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        if b0 & 0x70:
            stats.fault("rsv_bits", f"b0={b0:#x}")
        if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
            if opcode != OP_CONT:
                self.fragment_op = opcode
                self.fragments = []
            self.fragments.append(payload)
            if not fin:
                return
            data = b"".join(self.fragments)
            self.fragments = []
            self._on_data(self.fragment_op, data)
        elif opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if self.close_received is None:
                self.close_received = code
                if code == 1011:
                    self.h.dump(self, f"close {code}")
                if self.close_sent:  # the answer to a close frame of ours (valid or not)
                    _bump(stats.close_answers, str(code))
                else:
                    _bump(stats.closed_by_gateway, str(code))
                    self.send(ws_frame(payload[:2], OP_CLOSE, b"\x00\x00\x00\x00"))
                    self.close_sent = True
            if self.transport is not None:
                self.by_us = True
                self.transport.close()
        elif opcode == OP_PING:
            self.send(ws_frame(payload, OP_PONG, b"\x00\x00\x00\x00"))
        elif opcode != OP_PONG:
            stats.fault("unknown_opcode", f"opcode {opcode}")

    def _on_data(self, opcode: int, data: bytes) -> None:
        stats = self.stats
        stats.frames_received += 1
        text = opcode == OP_TEXT
        if text != (self.codec is Codec.JSON):
            stats.fault("frame_kind", f"opcode {opcode} on a {self.codec.name} connection")
        if self.codec is Codec.JSON:
            types, codes = _TYPE_RE.findall(data), _CODE_RE.findall(data)
        else:
            types, codes = _MP_TYPE_RE.findall(data), _MP_CODE_RE.findall(data)
        for t in types:
            _bump(stats.received_types, t.decode())
        for c in codes:
            _bump(stats.error_codes, c.decode())
        if _SAFETY_NET in data:
            stats.fault("safety_net", "a message failed validation with an exception")
            self.h.dump(self, "safety net")
        self.seen += 1
        if self.seen % self.h.cfg.check_every == 0:
            stats.decoded_checked += 1
            payload: bytes | str = data
            if text:
                try:
                    payload = data.decode("utf-8")
                except UnicodeDecodeError:
                    stats.fault("undecodable", "text frame not UTF-8")
                    return
            for item in protocol.decode(payload, self.codec, Sender.GATEWAY):
                if isinstance(item, RemoteProtocolError):
                    stats.fault("undecodable", f"{item.code}: {item.message}; {data[:200]!r}")

    # writing ----------------------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        t = self.transport
        if t is None or t.is_closing() or self.eof_sent:
            return False
        t.write(data)
        self.last_sent = time.monotonic()
        return True

    def abort(self, rst: bool = False) -> None:
        t = self.transport
        if t is None:
            return
        self.by_us = True
        if rst:
            sock = t.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t.abort()

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing() or self.ended.done()


class Hostile:
    """The attacker: ``cfg.conns`` workers, each one connection at a time, until the frames are
    sent; plus the side tasks (idle connections, garbage HTTP)."""

    def __init__(self, cfg: HostileConfig) -> None:
        self.cfg = cfg
        self.pool = Pool.load()
        self.stats = HostileStats()
        self.done = False
        self.t0 = 0.0
        seeded = random.Random(cfg.seed)
        now = int(time.time())
        import jwt  # PyJWT, a dependency of the gateway

        def token(sub: str, **claims: Any) -> str:
            payload = {"sub": sub, "iat": now, "exp": now + 7200, **claims}
            return str(jwt.encode(payload, cfg.jwt_secret, algorithm="HS256"))

        self.tokens = {f"fz-u{i}": token(f"fz-u{i}") for i in range(8)}
        self.bad_tokens = [
            token("fz-u0", exp=now - 3600),
            token("fz-u0")[:-4] + "AAAA",
            str(
                jwt.encode(
                    {"sub": "fz-u0", "exp": now + 60},
                    "another-secret-of-32-bytes-or-more",
                    algorithm="HS256",
                )
            ),
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiJmei11MCJ9.",
            "not a token",
            "x" * 9000,
        ]
        self.key_seed = seeded.getrandbits(32)

    def dump(self, conn: RawConn, why: str) -> None:
        """The connection's last frames to ``--dump-dir`` (at most 50 files)."""
        ctx = conn.ctx
        if self.cfg.dump_dir is None or ctx is None or self.stats.dumps >= 50:
            return
        self.stats.dumps += 1
        self.cfg.dump_dir.mkdir(parents=True, exist_ok=True)
        path = self.cfg.dump_dir / f"dump-{self.stats.dumps:02d}.json"
        frames = [{"kind": k, "hex": f.hex()} for k, f in ctx.recent]
        now = time.monotonic()
        t = conn.transport
        info = {
            "why": why,
            "codec": conn.codec.name,
            "auth": ctx.auth,
            "open_s": round(now - conn.opened_at, 3),
            "since_last_sent_s": round(now - conn.last_sent, 3),
            "since_last_received_s": round(now - conn.last_received, 3),
            "write_buffer": t.get_write_buffer_size() if t is not None else None,
            "writable": conn.writable.is_set(),
            "frames": frames,
        }
        path.write_text(json.dumps(info, indent=1))

    def left(self) -> int:
        if self.t0 and time.monotonic() - self.t0 > self.cfg.max_seconds:
            return 0
        return self.cfg.frames - self.stats.frames

    async def run(self) -> dict[str, Any]:
        self.t0 = time.monotonic()
        side: list[asyncio.Task[None]] = []
        if self.cfg.http_garbage:
            side.append(asyncio.create_task(self.http_garbage_loop()))
        if self.cfg.idle_conns:
            side += [asyncio.create_task(self.idle_loop(i)) for i in range(self.cfg.idle_conns)]
        await asyncio.gather(*(self.worker(i) for i in range(self.cfg.conns)))
        elapsed = time.monotonic() - self.t0
        self.done = True
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        return self.report(elapsed)

    def report(self, elapsed: float) -> dict[str, Any]:
        s = self.stats
        out = {k: v for k, v in vars(s).items()}
        out["seconds"] = round(elapsed, 2)
        out["frames_per_s"] = round(s.frames / elapsed, 1) if elapsed > 0 else None
        out["mib_sent"] = round(s.bytes_sent / MIB, 1)
        out["mib_received"] = round(s.bytes_received / MIB, 1)
        out["gateway_fault_count"] = sum(s.gateway_faults.values())
        out["generator_max_rss_mib"] = _max_rss_mib()
        out["generator_cpu_s"] = _cpu_self()
        return out

    # connections -------------------------------------------------------------------------------

    async def open(
        self, rng: random.Random, headers: dict[str, str], offer: str | None
    ) -> RawConn | None:
        cfg = self.cfg
        key = rng.randbytes(16)
        loop = asyncio.get_running_loop()
        self.stats.connects += 1
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: RawConn(self, key), cfg.host, cfg.port), 10
            )
        except (OSError, TimeoutError) as exc:
            _bump(self.stats.connect_failed, type(exc).__name__)
            await asyncio.sleep(0.05)
            return None
        lines = [
            f"GET {cfg.path} HTTP/1.1",
            f"Host: {cfg.host}:{cfg.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(key).decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if offer is not None:
            lines.append(f"Sec-WebSocket-Protocol: {offer}")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        conn.send(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            status = await asyncio.wait_for(asyncio.shield(conn.status), 10)
        except TimeoutError:
            status = -2
        if status != 101:
            _bump(self.stats.handshake_refused, str(status))
            conn.abort()
            return None
        self.stats.opened += 1
        return conn

    def plan(self, rng: random.Random) -> tuple[str, str, dict[str, str], str | None]:
        """(auth mode, offer name, handshake headers, token user)."""
        cfg = self.cfg
        auth = rng.choices(list(AUTH_MODES), list(AUTH_MODES.values()))[0]
        offer = rng.choices(list(OFFERS), [w for w, _, _ in OFFERS.values()])[0]
        headers: dict[str, str] = {}
        user: str | None = None
        if auth in ("key_header", "wrong_order"):
            headers["X-Muxi-Client-Key"] = cfg.client_key
            if rng.random() < 0.3:
                headers["X-Muxi-User-Id"] = f"fz-k{rng.randrange(16)}"
        elif auth == "token_header":
            user = rng.choice(list(self.tokens))
            headers["Authorization"] = f"Bearer {self.tokens[user]}"
            if rng.random() < 0.1:  # a default user contradicting the token: 4001
                headers["X-Muxi-User-Id"] = "normal-0"
        elif auth == "token_hello":
            user = rng.choice(list(self.tokens))
        elif auth == "bad":
            r = rng.randrange(4)
            if r == 0:
                headers["X-Muxi-Client-Key"] = "wrong-" + cfg.client_key
            elif r == 1:
                headers["Authorization"] = "Bearer " + rng.choice(self.bad_tokens)
            elif r == 2:  # a key and a token at once: refused, whichever is valid
                headers["X-Muxi-Client-Key"] = cfg.client_key
                headers["Authorization"] = f"Bearer {self.tokens['fz-u0']}"
            else:
                headers["X-Muxi-User-Id"] = "bad user id!"
        return auth, offer, headers, user

    async def worker(self, wid: int) -> None:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}-{wid}")
        gen = Generator(rng, self.pool, cfg)
        while self.left() > 0:
            auth, offer, headers, user = self.plan(rng)
            _bump(self.stats.auth_modes, auth)
            _bump(self.stats.offers, offer)
            conn = await self.open(rng, headers, OFFERS[offer][1])
            if conn is None:
                continue
            preauth = auth not in ("key_header", "token_header", "wrong_order")
            ctx = ConnCtx(wid, conn.codec, auth, user, preauth, self.tokens.get(user or ""))
            conn.ctx = ctx
            try:
                await self.drive(conn, ctx, gen, rng)
            finally:
                if not conn.ended.done():
                    conn.abort()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(conn.ended), 2)
                if conn.close_received is None and not conn.by_us:
                    self.stats.dropped_by_gateway += 1

    async def drive(self, conn: RawConn, ctx: ConnCtx, gen: Generator, rng: random.Random) -> None:
        cfg = self.cfg
        stats = self.stats
        flood = rng.random() < cfg.flood_share
        _bump(stats.paced, "flood" if flood else "paced")
        rate = cfg.conn_rate * rng.uniform(0.7, 1.0)
        quota = max(1, int(rng.expovariate(1 / cfg.frames_per_conn)))
        # The first message decides authentication (SPEC.md §4.4).
        first: list[dict[str, Any]] = []
        if ctx.auth == "key_hello":
            first = [{"type": "hello", "client_key": cfg.client_key}]
            if rng.random() < 0.3:
                first[0]["user_id"] = f"fz-k{rng.randrange(16)}"
        elif ctx.auth == "token_hello":
            assert ctx.token_user is not None
            first = [{"type": "hello", "token": self.tokens[ctx.token_user]}]
        elif ctx.auth == "wrong_order":  # a ping, then the hello: protocol_violation
            first = [{"type": "ping", "id": 1}, {"type": "hello", "client_key": cfg.client_key}]
        elif ctx.auth == "none" and rng.random() < 0.5:
            first = [
                rng.choice(
                    [
                        {"type": "hello", "client_key": "wrong"},
                        {"type": "hello", "token": rng.choice(self.bad_tokens)},
                        {"type": "hello"},
                        {"type": "hello", "client_key": cfg.client_key, "token": "x"},
                        {"type": "chat", "request_id": "early", "message": "hi"},
                    ]
                )
            ]
        for message in first:
            frame = gen.data(ctx, encode_value(message, ctx.codec), wrong=0.0)
            ctx.recent.append(("auth", frame[:4096]))
            conn.send(frame)
            stats.frames += 1
            stats.bytes_sent += len(frame)
            _bump(stats.frames_by_kind, "auth")
        next_t = time.monotonic()
        sent = 0
        while sent < quota and self.left() > 0 and not conn.closed:
            shot = gen.shot(ctx)
            _bump(stats.draws_by_kind, shot.kind)
            for frame in shot.frames:
                if not conn.send(frame):
                    break
                if frame[0] & 0x0F == OP_CLOSE:
                    conn.close_sent = True
                ctx.recent.append((shot.kind, frame[:4096]))
                stats.frames += 1
                stats.bytes_sent += len(frame)
                _bump(stats.frames_by_kind, shot.kind)
            stats.messages += shot.messages
            sent += len(shot.frames)
            if shot.kind == "oversized":
                # Closed from the frame's header (1009); the rest of it is never read.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(conn.ended), 5)
                break
            if not conn.writable.is_set():
                try:
                    await asyncio.wait_for(conn.writable.wait(), 30)
                except TimeoutError:
                    stats.write_stalls += 1
                    self.dump(conn, "write stalled for 30 s")
                    break
            if flood:
                if sent % 8 == 0:
                    await asyncio.sleep(0)
                continue
            # A many-message frame may overdraw the gateway's bucket: that is part of the test.
            next_t += min(shot.messages, 64) / rate
            delay = next_t - time.monotonic()
            if delay > 0.002:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                next_t = time.monotonic()  # behind (backpressure): no burst to catch up
            if sent % 16 == 0:
                await asyncio.sleep(0)
        if conn.closed:
            return
        how = rng.choices(["close", "fin", "abort", "rst"], [60, 10, 20, 10])[0]
        _bump(stats.closed_by_fuzzer, how)
        if how == "close":
            conn.close_sent = True
            conn.send(ws_frame(struct.pack("!H", 1000), OP_CLOSE, gen.mask()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.ended), 2)
            conn.by_us = True  # whoever ends the TCP connection now, the close was ours
        elif how == "fin":
            conn.by_us = True
            if conn.transport is not None and conn.transport.can_write_eof():
                conn.transport.write_eof()
                conn.eof_sent = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.ended), 2)
        else:
            conn.abort(rst=how == "rst")

    # side tasks --------------------------------------------------------------------------------

    async def idle_loop(self, k: int) -> None:
        """Connections without credentials that send nothing: closed 4001 at hello_timeout."""
        rng = random.Random(f"{self.cfg.seed}-idle-{k}")
        while not self.done:
            conn = await self.open(rng, {}, rng.choice(["muxgate.v1.json", None]))
            if conn is None:
                continue
            self.stats.idle += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.ended), 15)
            code = conn.close_received
            _bump(self.stats.idle_closes, str(code) if code is not None else "open at 15 s")
            conn.abort()

    def http_request(self, rng: random.Random) -> tuple[str, bytes]:
        """A garbage or odd HTTP upgrade request: (variant, bytes)."""
        cfg = self.cfg
        host = f"Host: {cfg.host}:{cfg.port}\r\n".encode()
        key = base64.b64encode(rng.randbytes(16))
        up = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        good = b"GET /v1/ws HTTP/1.1\r\n" + host + up + b"Sec-WebSocket-Key: " + key + b"\r\n"
        variants: dict[str, bytes] = {
            "random_bytes": rng.randbytes(rng.randrange(1, 2048)),
            "no_upgrade": b"GET /v1/ws HTTP/1.1\r\n" + host + b"\r\n",
            "bad_version": good.replace(b"Version: 13", b"Version: 8") + b"\r\n",
            "bad_key": good.replace(key, b"!!notbase64!!") + b"\r\n",
            "no_key": b"GET /v1/ws HTTP/1.1\r\n" + host + up + b"\r\n",
            "unknown_subprotocol": good + b"Sec-WebSocket-Protocol: muxgate.v9\r\n\r\n",
            "no_colon": good + b"NoColonHere\r\n\r\n",
            "nul_header": good + b"X-A: a\x00b\r\n\r\n",
            "long_header": good + b"X-Long: " + b"a" * 20_000 + b"\r\n\r\n",
            "many_headers": good + b"".join(b"X-%d: v\r\n" % i for i in range(500)) + b"\r\n",
            "post_upgrade": good.replace(b"GET", b"POST") + b"Content-Length: 5\r\n\r\nhello",
            "chunked": good + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "http10": good.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\n",
            "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "tls_hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),
            "bad_path": good.replace(b"/v1/ws", b"/../../etc/passwd") + b"\r\n",
            "absolute_uri": good.replace(b"/v1/ws", f"http://{cfg.host}/v1/ws".encode()) + b"\r\n",
            "h2c": good.replace(b"Upgrade: websocket", b"Upgrade: h2c") + b"\r\n",
            "two_upgrades": good + b"Upgrade: websocket\r\n\r\n",
            "pipelined": b"GET /healthz HTTP/1.1\r\n" + host + b"\r\n" + good + b"\r\n",
            "partial_head": good[: rng.randrange(1, len(good))],
            "upgrade_then_garbage": good + b"\r\n" + rng.randbytes(64),
            "stats_no_key": good.replace(b"/v1/ws", b"/v1/stats") + b"\r\n",
            "lf_only": good.replace(b"\r\n", b"\n") + b"\n",
            "space_in_key": good.replace(b"Sec-WebSocket-Key:", b"Sec-WebSocket-Key :") + b"\r\n",
        }
        name = rng.choice(list(variants))
        return name, variants[name]

    async def http_garbage_loop(self) -> None:
        rng = random.Random(f"{self.cfg.seed}-http")
        while not self.done:
            name, data = self.http_request(rng)
            _bump(self.stats.http_garbage, name)
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.cfg.host, self.cfg.port), 5
                )
            except (OSError, TimeoutError) as exc:
                _bump(self.stats.connect_failed, "http:" + type(exc).__name__)
                await asyncio.sleep(0.05)
                continue
            status = "no answer"
            try:
                writer.write(data)
                async with asyncio.timeout(0.3 if name == "partial_head" else 2.0):
                    line = await reader.readline()
                    if line.startswith(b"HTTP/"):
                        status = line.split(b" ", 2)[1].decode(errors="replace")[:5]
                    elif not line:
                        status = "closed"
                    else:
                        status = "garbage answer"
            except (TimeoutError, OSError, ValueError):
                pass
            finally:
                writer.transport.abort()
            _bump(self.stats.http_status, status)
            _bump(self.stats.http_answers, f"{name}: {status}")
            await asyncio.sleep(0.03)


def _weights(spec: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        if name not in KINDS:
            raise SystemExit(f"--kind-weights: unknown kind {name!r} (kinds: {', '.join(KINDS)})")
        out[name] = float(value)
    return out


def hostile_main(a: argparse.Namespace) -> int:
    url = a.url
    m = re.match(r"ws://([^:/]+):(\d+)(/.*)?$", url)
    if not m:
        raise SystemExit(f"--url must be ws://HOST:PORT/PATH, not {url!r}")
    cfg = HostileConfig(
        url=url,
        host=m.group(1),
        port=int(m.group(2)),
        path=m.group(3) or "/v1/ws",
        frames=a.frames,
        conns=a.conns,
        seed=a.seed,
        client_key=a.client_key,
        jwt_secret=a.jwt_secret,
        conn_rate=a.conn_rate,
        flood_share=a.flood_share,
        wrong_frame_share=a.wrong_frame_share,
        check_every=max(1, a.check_every),
        max_frame_bytes=a.max_frame_bytes,
        max_streams=a.max_streams,
        normal_conns=a.normal,
        normal_ids=a.normal_ids,
        http_garbage=not a.no_http_garbage,
        idle_conns=a.idle_conns,
        dump_dir=a.dump_dir,
        frames_per_conn=a.frames_per_conn,
        kind_weights=_weights(a.kind_weights),
        max_seconds=a.max_seconds,
    )
    result = _runner()(Hostile(cfg).run())
    _emit({"role": "hostile", **result})
    return 0


# -- the normal side ---------------------------------------------------------------------------


@dataclass(eq=False)
class Req:
    rid: str
    machine: RequestStateMachine
    phase: str
    sent_at: float
    cancel_after: int | None
    chunks: int = 0
    cancels: int = 0
    results: int = 0
    cancel_at: float | None = None
    response: Response | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    progressed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class PhaseFigures:
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    first_chunk: Reservoir | None = None
    cancel_to_response: Reservoir | None = None
    chat_to_response: Reservoir | None = None


class Normal:
    """Well-behaved clients, strictly checked (see the module's doc)."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.rng = random.Random(a.seed + 1)
        self.phase = "warmup"
        self.phases: dict[str, PhaseFigures] = {}
        self.violations: list[str] = []
        self.violation_count = 0
        self.errors: dict[str, int] = {}
        self.closes: dict[str, int] = {}
        self.stopping = False
        self.ready_conns = 0
        self.failed_responses = 0
        self.hangs = 0
        self.totals = {"started": 0, "completed": 0, "cancelled": 0}
        #: Our cancels' results by status (``not_found``: it came after the request had ended
        #: and been forgotten; its tombstone would cancel the id's next chat, SPEC.md §5.3).
        self.cancel_results: dict[str, int] = {}
        #: Ids skipped for a while because a cancel of ours left a tombstone on them.
        self.ids_skipped = 0

    def figures(self, phase: str) -> PhaseFigures:
        f = self.phases.get(phase)
        if f is None:
            f = self.phases[phase] = PhaseFigures(
                first_chunk=Reservoir(self.rng),
                cancel_to_response=Reservoir(self.rng),
                chat_to_response=Reservoir(self.rng),
            )
        return f

    def violation(self, what: str) -> None:
        self.violation_count += 1
        if len(self.violations) < 30:
            self.violations.append(f"{self.phase}: {what}"[:500])

    def command(self, line: str) -> None:
        words = line.split()
        if not words:
            return
        if words[0] == "phase" and len(words) == 2:
            self.phase = words[1]
        elif words[0] == "stop":
            self.stopping = True

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(self.command, line)
            loop.call_soon_threadsafe(self.command, "stop")

        threading.Thread(target=read_stdin, daemon=True).start()
        t0 = time.monotonic()
        await asyncio.gather(*(self.conn(i) for i in range(self.a.normal)))
        return self.report(time.monotonic() - t0)

    def report(self, elapsed: float) -> dict[str, Any]:
        phases: dict[str, Any] = {}
        for name, f in self.phases.items():
            assert f.first_chunk is not None
            assert f.cancel_to_response is not None
            assert f.chat_to_response is not None
            phases[name] = {
                "started": f.started,
                "completed": f.completed,
                "cancelled": f.cancelled,
                "first_chunk": f.first_chunk.summary_ms(),
                "chat_to_response": f.chat_to_response.summary_ms(),
                "cancel_to_response": f.cancel_to_response.summary_ms(),
            }
        return {
            "role": "normal",
            "seconds": round(elapsed, 2),
            "connections": self.a.normal,
            "streams_per_connection": self.a.normal_streams,
            **self.totals,
            "failed": self.failed_responses,
            "hangs": self.hangs,
            "cancel_results": self.cancel_results,
            "ids_skipped_for_a_tombstone": self.ids_skipped,
            "errors": self.errors,
            "closed_by_gateway": self.closes,
            "violations": self.violation_count,
            "violation_samples": self.violations,
            "phases": phases,
            "generator_max_rss_mib": _max_rss_mib(),
            "generator_cpu_s": _cpu_self(),
        }

    async def conn(self, i: int) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        a = self.a
        codec = Codec.JSON if i % 2 == 0 else Codec.MSGPACK
        headers = {"X-Muxi-Client-Key": a.client_key, "X-Muxi-User-Id": f"normal-{i}"}
        try:
            ws = await connect(
                a.url,
                subprotocols=[codec.subprotocol],  # type: ignore[list-item]
                additional_headers=headers,
                compression=None,
                max_size=2 * MIB,
                ping_interval=None,
                open_timeout=20,
            )
        except Exception as exc:
            self.violation(f"normal connection {i} could not open: {exc!r}")
            return
        reqs: dict[str, Req] = {}
        state: dict[str, Any] = {"welcome": False, "closed": False, "serial": 0, "ready": False}
        #: id -> when a cancel of ours for it found nothing (a tombstone for TOMBSTONE_S).
        buried: dict[str, float] = {}

        def on_message(m: object) -> None:
            if isinstance(m, Welcome):
                if state["welcome"]:
                    self.violation(f"conn {i}: a second welcome")
                state["welcome"] = True
                return
            if not state["welcome"]:
                self.violation(f"conn {i}: {type(m).__name__} before the welcome")
            rid = getattr(m, "request_id", None)
            if isinstance(m, Error):
                _bump(self.errors, str(m.code))
                self.violation(f"conn {i}: error {m.code} {m.message!r} (request {rid})")
                req = reqs.get(rid) if rid is not None else None
                if req is not None:  # the chat was refused: no response will come
                    req.done.set()
                return
            if rid is None:
                return  # a pong: none asked for, but harmless
            req = reqs.get(rid)
            if req is None:
                self.violation(f"conn {i}: {type(m).__name__} about unknown or ended {rid}")
                return
            now = time.monotonic()
            if isinstance(m, Chunk):
                req.machine.on_chunk(m.seq, m.text)
                req.chunks += 1
                if req.chunks == 1:
                    fig = self.figures(req.phase)
                    assert fig.first_chunk is not None
                    fig.first_chunk.add(now - req.sent_at)
                req.progressed.set()
            elif isinstance(m, Step):
                req.machine.on_step(m)
            elif isinstance(m, Response):
                req.machine.on_response(m)
                req.response = m
                fig = self.figures(req.phase)
                assert fig.chat_to_response is not None
                assert fig.cancel_to_response is not None
                fig.chat_to_response.add(now - req.sent_at)
                if m.status is ResponseStatus.CANCELLED:
                    if req.cancels == 0:
                        self.violation(
                            f"{rid}: cancelled ({m.reason}) without a cancel of ours"
                            + (" (its id was buried)" if rid in buried else "")
                        )
                    elif req.cancel_at is not None:
                        fig.cancel_to_response.add(now - req.cancel_at)
                elif m.status is ResponseStatus.FAILED:
                    self.failed_responses += 1
                    self.violation(f"{rid}: failed: {m.error}")
                req.progressed.set()
            elif isinstance(m, UsageReport):
                req.machine.on_usage(m)
            elif isinstance(m, CancelResult):
                req.machine.on_cancel_result(m)
                _bump(self.cancel_results, m.status.value)
                if m.status is CancelStatus.NOT_FOUND:
                    buried[rid] = now
                req.results += 1
            else:
                self.violation(f"{rid}: unexpected {type(m).__name__}")
            if (
                req.response is not None
                and not req.machine.usage_pending
                and req.results == req.cancels
            ):
                del reqs[rid]
                req.done.set()

        async def read() -> None:
            try:
                async for data in ws:
                    if isinstance(data, str) != codec.is_text:
                        self.violation(f"conn {i}: a frame of the wrong kind")
                        continue
                    for item in protocol.decode(data, codec, Sender.GATEWAY):
                        if isinstance(item, RemoteProtocolError):
                            self.violation(f"conn {i}: undecodable: {item}")
                            continue
                        try:
                            on_message(item)
                        except RemoteProtocolError as exc:  # the state machine refused it
                            self.violation(f"conn {i}: {exc}")
                            rid = exc.request_id
                            if rid in reqs:
                                reqs.pop(rid).done.set()
            except ConnectionClosed:
                pass
            finally:
                state["closed"] = True
                if not self.stopping or ws.close_code not in (1000, None):
                    code = ws.close_code
                    _bump(self.closes, str(code))
                    self.violation(f"conn {i}: closed by the gateway ({code})")
                for req in list(reqs.values()):
                    req.done.set()

        async def lane(k: int) -> None:
            rng = self.rng
            while not self.stopping and not state["closed"]:
                # Ids are reused, a cycle of --normal-ids (a finished request's id is free
                # again): the attacker aims at this small range, so it hits running requests.
                # Not an id a cancel of ours left a tombstone on: its chat would end cancelled.
                while True:
                    state["serial"] += 1
                    rid = f"n{i}-{state['serial'] % a.normal_ids}"
                    at = buried.get(rid)
                    if at is None or time.monotonic() - at > TOMBSTONE_S:
                        buried.pop(rid, None)
                        break
                    self.ids_skipped += 1
                stream = rng.random() >= 0.1
                cancel_after: int | None = None
                if rng.random() < a.cancel_share:
                    cancel_after = rng.choice([0, 1, 1, 2, 5])
                machine = RequestStateMachine(rid, Sender.CLIENT, stream=stream)
                req = Req(rid, machine, self.phase, time.monotonic(), cancel_after)
                reqs[rid] = req
                meta = {
                    "tokens": rng.randrange(4, 25),
                    "token_delay_ms": a.normal_token_delay_ms,
                    "plan_ms": 0,
                    "tool_ms": 0,
                }
                chat = Chat(request_id=rid, message="hello", stream=stream, metadata=meta)
                fig = self.figures(req.phase)
                fig.started += 1
                self.totals["started"] += 1
                req.sent_at = time.monotonic()
                try:
                    await self.send(ws, protocol.encode(chat, codec), codec)
                    if cancel_after is not None:
                        await self.cancel_at(ws, codec, req, cancel_after)
                    async with asyncio.timeout(a.hang_timeout):
                        await req.done.wait()
                except TimeoutError:
                    self.hangs += 1
                    self.violation(f"{rid}: no end within {a.hang_timeout} s: {machine!r}")
                    reqs.pop(rid, None)
                    continue
                except ConnectionClosed:
                    break
                if req.response is not None:
                    status = req.response.status
                    if status is ResponseStatus.COMPLETED:
                        fig.completed += 1
                        self.totals["completed"] += 1
                    elif status is ResponseStatus.CANCELLED:
                        fig.cancelled += 1
                        self.totals["cancelled"] += 1
                if not state["ready"]:
                    state["ready"] = True
                    self.ready_conns += 1
                    if self.ready_conns == a.normal:
                        _emit({"event": "ready"})
                if a.normal_gap_ms:
                    await asyncio.sleep(rng.uniform(0, 2 * a.normal_gap_ms) / 1000)

        reader = asyncio.create_task(read())
        await asyncio.gather(*(lane(k) for k in range(a.normal_streams)))
        await ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader, 10)

    async def send(self, ws: Any, frame: bytes, codec: Codec) -> None:
        await ws.send(frame, text=codec.is_text)

    async def cancel_at(self, ws: Any, codec: Codec, req: Req, after_chunks: int) -> None:
        """Cancel once ``after_chunks`` chunks came (0: at once); sometimes twice."""
        while req.chunks < after_chunks and req.response is None:
            req.progressed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.a.hang_timeout):
                    await req.progressed.wait()
            if req.done.is_set():
                return
        if req.done.is_set() or (req.response is not None and self.rng.random() < 0.5):
            return  # ended (nothing may be sent about it any more), or too late anyway
        times = 2 if self.rng.random() < 0.1 else 1
        for _ in range(times):
            req.machine.on_cancel()
            req.cancels += 1
            if req.cancel_at is None:
                req.cancel_at = time.monotonic()
            await self.send(ws, protocol.encode(Cancel(request_id=req.rid), codec), codec)


def normal_main(a: argparse.Namespace) -> int:
    result = _runner()(Normal(a).run())
    _emit(result)
    return 0


# -- the orchestrator ------------------------------------------------------------------------------


class Child:
    """A child process whose stdout JSON lines a thread collects (every wait has a timeout)."""

    def __init__(self, argv: list[str], stderr_path: Path, nice: int = 0) -> None:
        def prepare() -> None:
            if nice:
                os.nice(nice)

        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                preexec_fn=prepare if nice else None,
            )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(dict(json.loads(raw)))
        self.lines.put(None)

    def line(self, timeout: float) -> dict[str, Any] | None:
        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            self.lines.put(None)
        return item

    def tell(self, command: str) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write(command.encode() + b"\n")
                self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any] | None:
        """The last JSON line once the process has ended (killed after ``timeout``)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        last = None
        while (item := self.line(timeout=2)) is not None:
            last = item
        return last

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stderr_tail(self, n: int = 3000) -> str:
        return self.stderr_path.read_bytes()[-n:].decode(errors="replace")


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def spawn_gateway(
    log_path: Path, client_key: str, jwt_secret: str, extra: list[str]
) -> tuple[subprocess.Popen[bytes], str]:
    """``muxgate serve --port 0`` with its stderr to ``log_path``: (process, WebSocket URL)."""
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", "0",
            "--log-format", "json", "--client-key", client_key, "--jwt-secret", jwt_secret,
            *GATEWAY_FLAGS, *extra]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=_child_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(log_path, "rb") as f:
            for line in f:
                if b'"gateway.started"' in line:
                    return proc, str(orjson.loads(line)["url"])
        if proc.poll() is not None:
            break
        time.sleep(0.05)  # a process's start: polled, nothing to await across processes
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the gateway did not start: {log_path.read_text(errors='replace')[-3000:]}")


def scan_log(path: Path, offset: int = 0) -> dict[str, Any]:
    """The gateway's log from ``offset``: lines by level; lines at error or critical; lines with a
    traceback (``Traceback (most recent call last)`` in plain text, or a JSON line carrying
    ``exception``/``exc_info``/``stack``); lines that are not JSON."""
    levels: dict[str, int] = {}
    events: dict[str, int] = {}
    errors = tracebacks = plain = lines = stalls = 0
    worst_lag = 0.0
    samples: list[str] = []
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            lines += 1
            line = raw.rstrip(b"\n")
            record: Any = None
            if line.startswith(b"{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    record = orjson.loads(line)
            bad = False
            if isinstance(record, dict):
                level = str(record.get("level", "?"))
                _bump(levels, level, cap=20)
                _bump(events, f"{level}: {str(record.get('event'))[:60]}", cap=100)
                if level in ("error", "critical", "exception", "fatal"):
                    errors += 1
                    bad = True
                if any(k in record for k in ("exception", "exc_info", "stack")):
                    tracebacks += 1
                    bad = True
                if record.get("event") == "event_loop.stalled":
                    stalls += 1 + int(record.get("stalls_not_logged") or 0)
                    with contextlib.suppress(TypeError, ValueError):
                        worst_lag = max(worst_lag, float(record.get("lag_ms") or 0))
            else:
                plain += 1
                if b"Traceback (most recent call last)" in line:
                    tracebacks += 1
                    bad = True
                elif line.strip():
                    bad = True  # every line of the gateway's is JSON: anything else is news
            if bad and len(samples) < 10:
                samples.append(line[:600].decode(errors="replace"))
    top = dict(sorted(events.items(), key=lambda kv: -kv[1])[:12])
    return {
        "lines": lines,
        "by_level": levels,
        "top_events": top,
        "error_lines": errors,
        "tracebacks": tracebacks,
        "plain_text_lines": plain,
        "event_loop_stalls": stalls,
        "worst_loop_lag_ms": worst_lag,
        "samples": samples,
    }


def _stats(http_base: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(http_base + "/v1/stats", timeout=3) as r:
            snap = json.loads(r.read())
    except (OSError, ValueError):
        return None
    return {k: snap.get(k) for k in ("connections", "active_requests", "requests_total")}


def _gauges(http_base: str) -> dict[str, float]:
    """The gateway's unlabelled ``muxgate_memory_*`` gauges from /metrics (none: no answer)."""
    try:
        with urllib.request.urlopen(http_base + "/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in text.splitlines())
        if name.startswith("muxgate_memory_")
    }


def _trims(http_base: str) -> float | None:
    """The gateway's ``muxgate_memory_trims`` (None: not there, or no answer)."""
    return _gauges(http_base).get("muxgate_memory_trims")


def _after_a_trim(http_base: str, timeout: float) -> None:
    """Until the gateway has given freed memory back to the system once more (it trims every
    ``--memory-trim-seconds``, gateway/memory.py), so that the RSS sampled next is what it
    holds, not the high-water mark its allocator kept; at most ``timeout`` s (a gateway that
    does not trim: at once)."""
    first = _trims(http_base)
    if first is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _trims(http_base)
        if now is None or now > first:
            return
        time.sleep(0.2)  # polling /metrics: the gateway has nothing to wait on


def _healthz(http_base: str) -> bool:
    try:
        with urllib.request.urlopen(http_base + "/healthz", timeout=3) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _rss_median(pid: int, n: int = 5, every: float = 0.1) -> int:
    values = []
    for k in range(n):
        values.append(rss_bytes(pid))
        if k < n - 1:
            time.sleep(every)  # a measurement: samples spread over half a second
    return sorted(values)[n // 2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", "rb") as f:
        state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    return True


def orchestrate(a: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="muxgate-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    gateway: subprocess.Popen[bytes] | None = None
    log_path: Path | None
    if a.spawn:
        log_path = Path(a.log_file) if a.log_file else workdir / "gateway.log"
        gateway, url = spawn_gateway(log_path, a.client_key, a.jwt_secret, a.gateway_arg or [])
        pid = gateway.pid
    else:
        if not (a.url and a.server_pid):
            raise SystemExit("give --spawn, or --url and --server-pid (and --log-file)")
        url, pid = a.url, a.server_pid
        log_path = Path(a.log_file) if a.log_file else None
    log_offset = log_path.stat().st_size if (log_path and not a.spawn) else 0
    http_base = "http://" + url.split("://", 1)[1].split("/", 1)[0]
    common = ["--url", url, "--client-key", a.client_key, "--jwt-secret", a.jwt_secret,
              "--normal", str(a.normal), "--seed", str(a.seed)]  # fmt: skip
    me = [sys.executable, str(Path(__file__).resolve())]
    hostile_args = [
        "--conns", str(a.conns), "--conn-rate", str(a.conn_rate),
        "--flood-share", str(a.flood_share), "--wrong-frame-share", str(a.wrong_frame_share),
        "--check-every", str(a.check_every), "--max-frame-bytes", str(a.max_frame_bytes),
        "--max-streams", str(a.max_streams), "--normal-ids", str(a.normal_ids),
        "--idle-conns", str(a.idle_conns), "--frames-per-conn", str(a.frames_per_conn),
        "--kind-weights", a.kind_weights, "--max-seconds", str(a.max_seconds),
        *(["--no-http-garbage"] if a.no_http_garbage else []),
        *(["--dump-dir", str(a.dump_dir)] if a.dump_dir else []),
    ]  # fmt: skip
    out: dict[str, Any] = {"seed": a.seed, "frames_target": a.frames, "url": url}
    children: list[Child] = []
    mib = float(MIB)
    try:
        normal = Child(
            [*me, "--role", "normal", *common,
             "--normal-streams", str(a.normal_streams), "--cancel-share", str(a.cancel_share),
             "--normal-token-delay-ms", str(a.normal_token_delay_ms),
             "--normal-gap-ms", str(a.normal_gap_ms), "--hang-timeout", str(a.hang_timeout),
             "--normal-ids", str(a.normal_ids)],
            workdir / "normal.stderr",
        )  # fmt: skip
        children.append(normal)
        ready = normal.line(timeout=60)
        if ready is None or ready.get("event") != "ready":
            raise RuntimeError(f"the normal side did not start: {ready} {normal.stderr_tail()}")
        # Warm-up: the same mix, counted apart.
        warm = Child(
            [*me, "--role", "hostile", *common, *hostile_args, "--frames",
             str(a.warmup_frames), "--seed", str(a.seed + 1000)],
            workdir / "warmup.stderr", nice=a.hostile_nice,
        )  # fmt: skip
        children.append(warm)
        warm_result = warm.result(timeout=a.max_seconds + 60)
        if warm_result is None:
            raise RuntimeError(f"the warm-up attacker failed: {warm.stderr_tail()}")
        time.sleep(a.settle)  # a measurement pause: the warm-up's connections are gone
        normal.tell("phase calm")
        time.sleep(a.calm)  # the normal streams alone: the calm figures
        _after_a_trim(http_base, a.trim_wait)
        rss0 = _rss_median(pid)
        stats0 = _stats(http_base)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        normal.tell("phase attack")
        hostile = Child(
            [*me, "--role", "hostile", *common, *hostile_args, "--frames", str(a.frames)],
            workdir / "hostile.stderr", nice=a.hostile_nice,
        )  # fmt: skip
        children.append(hostile)
        timeline: list[list[float]] = []
        peak, next_sample = rss0, t0
        watchdog = False
        while hostile.proc.poll() is None:
            now = time.monotonic()
            if now - t0 > a.max_seconds + 60:  # it stops itself at max_seconds: a last resort
                watchdog = True
                hostile.kill()
                break
            if not _alive(pid):
                break
            with contextlib.suppress(OSError, RuntimeError):
                rss = rss_bytes(pid)
                peak = max(peak, rss)
                if now >= next_sample and len(timeline) < 600:
                    timeline.append([round(now - t0, 1), round(rss / mib, 1)])
                    next_sample += max(1.0, a.max_seconds / 600)
            time.sleep(0.1)  # a sampling period, not a synchronisation
        attack_s = time.monotonic() - t0
        cpu1 = cpu_seconds(pid) if _alive(pid) else None
        hostile_result = hostile.result(timeout=30)
        normal.tell("phase after")
        # The settle before the last RSS sample is a measurement pause: the gateway ends the
        # hostile connections' requests and frees their buffers; nothing signals "done".
        time.sleep(a.settle)
        _after_a_trim(http_base, a.trim_wait)
        alive = _alive(pid)
        rss1 = _rss_median(pid) if alive else None
        stats1 = _stats(http_base) if alive else None
        healthz = alive and _healthz(http_base)
        normal.tell("stop")
        normal_result = normal.result(timeout=a.hang_timeout + 30)
    except BaseException:
        if gateway is not None:  # the run failed: the gateway it started goes too
            gateway.kill()
            gateway.wait()
        raise
    finally:
        for child in children:
            child.kill()
    exit_code: int | str | None = None
    if gateway is not None:
        if gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM)
            try:
                exit_code = gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
                exit_code = "killed after 30 s"
        else:
            exit_code = gateway.returncode
    log = scan_log(log_path, log_offset) if log_path is not None else None
    tolerance = max(a.rss_tolerance_mib, a.rss_tolerance_pct / 100 * rss0 / mib)
    diff = None if rss1 is None else (rss1 - rss0) / mib
    rss_out = {
        "baseline": round(rss0 / mib, 1),
        "peak": round(peak / mib, 1),
        "after": None if rss1 is None else round(rss1 / mib, 1),
        "after_minus_baseline": None if diff is None else round(diff, 1),
        "tolerance": round(tolerance, 1),
        "within_tolerance": diff is not None and diff <= tolerance,
        "timeline_s_mib": timeline,
    }
    hostile_result = hostile_result or {}
    normal_result = normal_result or {}
    normal_violations = int(normal_result.get("violations", 1 if not normal_result else 0))
    faults = int(hostile_result.get("gateway_fault_count", 0))
    out.update(
        {
            "duration_s": round(time.monotonic() - t_start, 1),
            "attack_s": round(attack_s, 2),
            "frames_sent": hostile_result.get("frames"),
            "frames_per_s": hostile_result.get("frames_per_s"),
            "violations": normal_violations + faults,
            "normal_violations": normal_violations,
            "gateway_faults_on_hostile_connections": faults,
            "log_errors": None if log is None else log["error_lines"],
            "tracebacks": None if log is None else log["tracebacks"],
            "gateway_alive": alive,
            "gateway_healthz": healthz,
            "gateway_exit_code": exit_code,
            "gateway_cpu_util_during_attack": None
            if cpu1 is None
            else round((cpu1 - cpu0) / attack_s, 3),
            "rss_mib": rss_out,
            "stats_snapshot": {"baseline": stats0, "after": stats1},
            "watchdog_fired": watchdog,
            "hostile": hostile_result,
            "warmup": {k: warm_result.get(k) for k in ("frames", "seconds", "closed_by_gateway")},
            "normal": normal_result,
            "log": log,
            "gateway_pid": pid,
            "gateway_spawned": a.spawn,
            "gateway_flags": [*GATEWAY_FLAGS, *(a.gateway_arg or [])] if a.spawn else None,
        }
    )
    failures = []
    if out["violations"]:
        failures.append(f"{out['violations']} violations")
    if log is None:
        failures.append("no log scanned (--log-file)")
    elif log["error_lines"] or log["tracebacks"]:
        failures.append(f"log: {log['error_lines']} error lines, {log['tracebacks']} tracebacks")
    if not alive:
        failures.append("the gateway died")
    if a.spawn and exit_code != 0:
        failures.append(f"the gateway's exit code after SIGTERM: {exit_code}")
    if not rss_out["within_tolerance"]:
        failures.append(f"RSS after - baseline {diff:.1f} MiB > {tolerance:.1f} MiB")
    if not normal_result.get("completed"):
        failures.append("no normal request completed")
    if watchdog or (hostile_result.get("frames") or 0) < a.frames:
        failures.append(f"frames sent {hostile_result.get('frames')} < {a.frames}")
    out["ok"] = not failures
    out["failures"] = failures
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=["orchestrate", "hostile", "normal"], default="orchestrate")
    g = p.add_argument_group("gateway")
    g.add_argument("--spawn", action="store_true", help="start the gateway (muxgate serve)")
    g.add_argument("--url", help="the gateway's WebSocket URL (without --spawn)")
    g.add_argument("--server-pid", type=int, help="the gateway's process id (without --spawn)")
    g.add_argument("--log-file", help="the gateway's stderr (JSON lines), scanned at the end")
    g.add_argument(
        "--gateway-arg",
        action="append",
        help="one more argument of the spawned `muxgate serve` (repeat; e.g. --gateway-arg=--x)",
    )
    g.add_argument("--client-key", default=DEFAULT_CLIENT_KEY)
    g.add_argument("--jwt-secret", default=DEFAULT_JWT_SECRET)
    g.add_argument("--max-frame-bytes", type=int, default=protocol.limits.MAX_FRAME_BYTES)
    g.add_argument("--max-streams", type=int, default=protocol.limits.DEFAULT_MAX_STREAMS)
    h = p.add_argument_group("hostile side")
    h.add_argument("--frames", type=int, default=1_000_000, help="hostile frames in all")
    h.add_argument("--conns", type=int, default=32, help="hostile connections at once")
    h.add_argument("--conn-rate", type=float, default=450.0, help="messages/s of a paced one")
    h.add_argument(
        "--kind-weights",
        default="",
        help="override generator weights, e.g. large=0,oversized=0 (to bisect a finding)",
    )
    h.add_argument("--flood-share", type=float, default=0.1, help="connections sending flat out")
    h.add_argument("--frames-per-conn", type=int, default=600, help="mean, before it ends")
    h.add_argument("--wrong-frame-share", type=float, default=0.06)
    h.add_argument("--check-every", type=int, default=1, help="decode every n-th frame received")
    h.add_argument("--idle-conns", type=int, default=2, help="silent connections at once")
    h.add_argument("--no-http-garbage", action="store_true")
    h.add_argument(
        "--warmup-frames",
        type=int,
        help="frames of the same mix before the baseline (default: a tenth of --frames, at "
        "least 5000): the allocator's high-water mark is reached before it is measured",
    )
    h.add_argument("--hostile-nice", type=int, default=10)
    h.add_argument("--dump-dir", type=Path, help="the last frames of a connection that hit a fault")
    h.add_argument("--seed", type=int, default=None)
    n = p.add_argument_group("normal side")
    n.add_argument("--normal", type=int, default=8, help="normal connections")
    n.add_argument("--normal-streams", type=int, default=2, help="streams at once per connection")
    n.add_argument(
        "--normal-ids", type=int, default=64, help="ids a normal connection cycles through"
    )
    n.add_argument("--cancel-share", type=float, default=0.1)
    n.add_argument("--normal-token-delay-ms", type=int, default=2)
    n.add_argument("--normal-gap-ms", type=float, default=10.0)
    n.add_argument("--hang-timeout", type=float, default=30.0)
    r = p.add_argument_group("run")
    r.add_argument("--calm", type=float, default=3.0, help="seconds without attack, measured")
    r.add_argument("--settle", type=float, default=2.0, help="seconds before the RSS after")
    r.add_argument("--trim-wait", type=float, default=10.0,
                   help="at most this long for the gateway's next memory trim before each RSS "
                   "sample (baseline, after)")  # fmt: skip
    r.add_argument(
        "--rss-tolerance-mib",
        type=float,
        default=10.0,
        help="RSS after - baseline allowed (the larger of this and --rss-tolerance-pct): "
        "allocator high-water, not live memory (see the README of the scenario)",
    )
    r.add_argument("--rss-tolerance-pct", type=float, default=15.0)
    r.add_argument(
        "--max-seconds",
        type=float,
        default=1800.0,
        help="the attacker stops after this long (warm-up and attack each), frames sent or not",
    )
    r.add_argument("--workdir", help="children's stderr, the spawned gateway's log")
    return p


def main() -> int:
    a = _parser().parse_args()
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1 << 31)
    if a.warmup_frames is None:
        a.warmup_frames = max(5000, a.frames // 10)
    if a.role == "hostile":
        return hostile_main(a)
    if a.role == "normal":
        return normal_main(a)
    try:
        result = orchestrate(a)
    except (RuntimeError, OSError) as exc:
        _emit({"error": str(exc)[-4000:], "seed": a.seed})
        return 2
    _emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
