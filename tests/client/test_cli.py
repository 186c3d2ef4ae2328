"""``muxgate chat`` and ``muxgate cancel``, driven as a person would: the real programs on a
pseudo-terminal (pexpect), against a gateway started as its own process (``muxgate serve``).

The gateway's simulated backend is slowed down by a TOML config so an answer streams visibly for
minutes; Ctrl-C is a real SIGINT from the terminal (``sendintr``), Ctrl-D a real end of file.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest

from gateway import CancelStatus, Client

from ..gateway.conftest import native_transport

#: The gateway here is ``muxgate serve`` (its own transport), whatever MUXGATE_TEST_TRANSPORT says.
pytestmark = native_transport

KEY = "cli-test-key-0123456789"
REPO = Path(__file__).resolve().parents[2]
PROMPT = "you> "
#: Answers that take minutes (3000 tokens, 20 ms each) unless cancelled.
SLOW_BACKEND = "[backend_options]\ntokens = 3000\ntoken_delay_ms = 20\nplan_ms = 0\ntool_ms = 0\n"


def muxgate() -> list[str]:
    """The installed ``muxgate`` script next to this Python, else ``python -m gateway.cli``."""
    script = shutil.which("muxgate", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "gateway.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")}
    env.update(extra)
    return env


@dataclass
class GatewayProcess:
    process: subprocess.Popen[str]
    url: str
    http_url: str
    log: list[str]


@pytest.fixture(scope="module")
def gateway_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = tmp_path_factory.mktemp("cli") / "muxgate.toml"
    config.write_text(SLOW_BACKEND, encoding="utf-8")
    command = [*muxgate(), "serve", "--port", "0", "--log-format", "json", "--config", str(config)]
    process = subprocess.Popen(
        command,
        env=clean_env(MUXGATE_CLIENT_KEYS=KEY),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stderr is not None
    log: list[str] = []
    started = None
    for line in process.stderr:  # structured logs: wait for the line with the bound port
        log.append(line)
        if '"gateway.started"' in line:
            started = json.loads(line)
            break
    assert started is not None, "".join(log)
    # Keep draining the log, or a full pipe would block the gateway.
    threading.Thread(target=lambda: log.extend(process.stderr or ()), daemon=True).start()
    try:
        yield GatewayProcess(process, started["url"], started["http"], log)
    finally:
        process.terminate()
        process.wait(15)


def spawn_chat(gw: GatewayProcess, *args: str) -> pexpect.spawn:
    command = [*muxgate(), "chat", "--url", gw.url, *args]
    child = pexpect.spawn(
        command[0],
        command[1:],
        env=clean_env(MUXGATE_CLIENT_KEY=KEY),
        cwd=str(REPO),
        encoding="utf-8",
        timeout=15,
        dimensions=(24, 200),
    )
    child.expect_exact(PROMPT)
    return child


def test_ctrl_c_cancels_the_answer_and_ctrl_d_quits(gateway_process: GatewayProcess) -> None:
    child = spawn_chat(gateway_process, "--user-id", "terminal-user")
    try:
        child.sendline("Write a very long story")
        child.expect(r"On story, (\S+ ){6}")  # tokens arrive while the answer is running
        child.sendintr()  # Ctrl-C
        child.expect(
            r"\[cancelled · (req_[0-9a-f]{32}) · (\d+) tokens saved · (\d+) in / (\d+) out\]"
        )
        request_id, saved = child.match.group(1), int(child.match.group(2))
        assert saved > 0
        child.expect_exact(PROMPT)
        assert child.isalive()

        # The gateway's own record: cancelled in-band (reason client), with the same final usage.
        with Client(gateway_process.http_url, client_key=KEY) as client:
            info = client.get_request(request_id, user_id="terminal-user")
        assert (info.status, info.reason) == ("cancelled", "client")
        assert info.usage is not None
        assert info.usage.saved_tokens == saved

        child.sendintr()  # Ctrl-C at the prompt: a new prompt, not an exit
        child.expect_exact(PROMPT)
        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_steps_show_and_the_footer_says_where_the_pipeline_halted(
    gateway_process: GatewayProcess,
) -> None:
    """``--steps``: each step on its own line; Ctrl-C during the (non-abortable) tool call
    halts the pipeline after it, and the footer says so."""
    metadata = '{"tokens": 40, "token_delay_ms": 5, "plan_ms": 50, "tool_ms": 3000}'
    child = spawn_chat(gateway_process, "--steps", "--metadata", metadata)
    try:
        child.sendline("Find flights")
        child.expect_exact("· plan plan")
        child.expect_exact("· llm_stream answer")
        child.expect_exact("· tool search")
        child.sendintr()  # Ctrl-C while the tool call runs
        child.expect(
            r"\[cancelled · req_[0-9a-f]{32} · \d+ tokens saved · .* · halted after tool search\]"
        )
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_an_answer_streams_to_the_end(gateway_process: GatewayProcess) -> None:
    child = spawn_chat(
        gateway_process, "--codec", "msgpack", "--metadata", '{"tokens": 12, "token_delay_ms": 5}'
    )
    try:
        child.sendline("Hello there")
        child.expect(r"\[completed · req_[0-9a-f]{32} · \d+ in / (\d+) out\]")
        assert int(child.match.group(1)) > 0
        child.expect_exact(PROMPT)
        child.sendline("And again")
        child.expect(r"\[completed · ")
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def run_cancel(gw: GatewayProcess, *args: str, key: str = KEY) -> tuple[int, str]:
    output, status = pexpect.run(
        shlex.join([*muxgate(), "cancel", *args, "--url", gw.http_url]),
        env=clean_env(MUXGATE_CLIENT_KEY=key),
        cwd=str(REPO),
        withexitstatus=True,
        encoding="utf-8",
        timeout=30,
    )
    return status, output.strip()


def test_muxgate_cancel_prints_the_outcome(gateway_process: GatewayProcess) -> None:
    with Client(gateway_process.url, client_key=KEY, user_id="u-cli") as client:
        future = client.chat_async("A long essay", request_id="cli-cancel-1")
        first = client.chat_stream("warm", request_id="cli-wait")  # wait until it streams
        next(first)
        first.close()

        status, output = run_cancel(gateway_process, "cli-cancel-1", "--user-id", "u-cli")
        assert (status, output) == (0, "cli-cancel-1: cancelled")
        response = future.result(timeout=10)
        assert (response.status, response.reason) == ("cancelled", "api")

        status, output = run_cancel(gateway_process, "cli-cancel-1", "--user-id", "u-cli")
        assert (status, output) == (0, "cli-cancel-1: already_cancelled")
        status, output = run_cancel(gateway_process, "cli-cancel-1", "--user-id", "someone-else")
        assert (status, output) == (1, "cli-cancel-1: not_found")
        assert client.cancel_request("cli-wait").status is CancelStatus.ALREADY_CANCELLED

    status, output = run_cancel(gateway_process, "x-1", key="wrong-key")
    assert status == 2
    assert output.startswith("muxgate: ")  # Unauthorized, said in one line
    status, output = run_cancel(gateway_process, "not a valid id")
    assert status == 2
