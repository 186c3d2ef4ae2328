"""Configuration (defaults < TOML < environment < flags) and the ``muxgate`` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "protocol" / "SPEC.md"


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "muxgate.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- load_config ---------------------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert config.port == 8001 and config.host == "127.0.0.1"  # noqa: PT018
    assert config.backend == "simulated"
    assert not config.auth_required


def test_precedence_defaults_toml_env_flags(tmp_path: Path) -> None:
    toml = _toml(
        tmp_path,
        'host = "0.0.0.0"\nport = 9000\nmax_streams = 10\nrate_limit = 7\nbackend = "echo"\n',
    )
    env = {"MUXGATE_MAX_STREAMS": "20", "MUXGATE_PORT": "9001"}
    flags = {"max_streams": "30", "port": None}  # None: flag not given

    config = load_config(environ={}, toml_path=toml)
    assert (config.host, config.port, config.max_streams) == ("0.0.0.0", 9000, 10)
    config = load_config(environ=env, toml_path=toml)
    assert (config.host, config.port, config.max_streams) == ("0.0.0.0", 9001, 20)
    config = load_config(environ=env, toml_path=toml, flags=flags)
    assert (config.host, config.port, config.max_streams) == ("0.0.0.0", 9001, 30)
    assert config.backend == "echo"
    assert config.shutdown_grace == Config().shutdown_grace  # untouched: the default
    # The TOML file may also come from MUXGATE_CONFIG.
    config = load_config(environ={"MUXGATE_CONFIG": str(toml)})
    assert config.port == 9000


def test_type_conversion(tmp_path: Path) -> None:
    env = {
        "MUXGATE_PORT": "8080",
        "MUXGATE_RATE_LIMIT": "12.5",
        "MUXGATE_SLOW_CONSUMER_TIMEOUT": "3",
        "MUXGATE_JWT_SECRET": "s3cret",
        "MUXGATE_LOG_FORMAT": "json",
    }
    config = load_config(environ=env)
    assert config.port == 8080 and type(config.port) is int  # noqa: PT018
    assert config.rate_limit == 12.5
    assert config.slow_consumer_timeout == 3.0 and type(config.slow_consumer_timeout) is float  # noqa: PT018
    assert config.jwt_secret == "s3cret" and config.auth_required  # noqa: PT018
    # TOML: an integer where a float is expected; a table for backend_options.
    toml = _toml(tmp_path, "shutdown_grace = 2\n[backend_options]\ntokens = 5\nplan_ms = 0\n")
    config = load_config(environ={}, toml_path=toml)
    assert config.shutdown_grace == 2.0 and type(config.shutdown_grace) is float  # noqa: PT018
    assert config.backend_options == {"tokens": 5, "plan_ms": 0}
    # An empty optional setting means "not set".
    assert load_config(environ={"MUXGATE_JWT_AUDIENCE": ""}).jwt_audience is None


def test_client_keys_from_comma_separated_env(tmp_path: Path) -> None:
    config = load_config(environ={"MUXGATE_CLIENT_KEYS": "key-one, key-two,,key-three "})
    assert config.client_keys == ("key-one", "key-two", "key-three")
    assert config.auth_required
    toml = _toml(tmp_path, 'client_keys = ["a-key", "b-key"]\n')
    assert load_config(environ={}, toml_path=toml).client_keys == ("a-key", "b-key")
    assert load_config(environ={}, flags={"client_keys": ["f1", "f2"]}).client_keys == (
        "f1",
        "f2",
    )


def test_backend_options_merge_key_by_key_from_toml_env_and_flags(tmp_path: Path) -> None:
    toml = _toml(tmp_path, '[backend_options]\ntokens = 5\nplan_ms = 7\nseed = "toml"\n')
    env = {"MUXGATE_BACKEND_OPTIONS": '{"plan_ms": 8, "tool_ms": 9, "seed": "env"}'}
    flags = {
        "backend_options": [
            "seed=42",  # JSON: a number
            "model=llama3.2:3b",  # not JSON: a string
            "base_url=http://127.0.0.1:8080/v1",
            "list=[1, 2]",
            "flag=true",
            "empty=",
            "equation=a=b",
        ]
    }
    assert load_config(environ={}, toml_path=toml).backend_options == {
        "tokens": 5,
        "plan_ms": 7,
        "seed": "toml",
    }
    assert load_config(environ=env, toml_path=toml).backend_options == {
        "tokens": 5,  # TOML, untouched
        "plan_ms": 8,  # env over TOML
        "tool_ms": 9,
        "seed": "env",
    }
    assert load_config(environ=env, toml_path=toml, flags=flags).backend_options == {
        "tokens": 5,
        "plan_ms": 8,
        "tool_ms": 9,
        "seed": 42,  # flag over env over TOML
        "model": "llama3.2:3b",
        "base_url": "http://127.0.0.1:8080/v1",
        "list": [1, 2],
        "flag": True,
        "empty": "",
        "equation": "a=b",
    }
    # Given in code, the flags may be a mapping too.
    assert load_config(environ={}, flags={"backend_options": {"x": 1}}).backend_options == {"x": 1}


@pytest.mark.parametrize(
    ("env", "flags", "source"),
    [
        ({"MUXGATE_BACKEND_OPTIONS": "tokens=5"}, None, "MUXGATE_BACKEND_OPTIONS"),
        ({"MUXGATE_BACKEND_OPTIONS": "[1, 2]"}, None, "MUXGATE_BACKEND_OPTIONS"),
        ({"MUXGATE_BACKEND_OPTIONS": '"secret-value"'}, None, "MUXGATE_BACKEND_OPTIONS"),
        ({}, ["secret-value"], "--backend-option"),
        ({}, ["=secret-value"], "--backend-option"),
    ],
)
def test_bad_backend_options_name_the_setting_and_source_not_the_value(
    env: dict[str, str], flags: list[str] | None, source: str
) -> None:
    with pytest.raises(ConfigError, match="backend_options") as info:
        load_config(environ=env, flags={"backend_options": flags})
    assert source in str(info.value)
    assert "secret-value" not in str(info.value)


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"MUXGATE_MAX_STREAMS": "abc"}, "max_streams"),
        ({"MUXGATE_MAX_STREAMS": "0"}, "max_streams"),
        ({"MUXGATE_MAX_STREAMS": "1.5"}, "max_streams"),
        ({"MUXGATE_PORT": "70000"}, "port"),
        ({"MUXGATE_RATE_LIMIT": "fast"}, "rate_limit"),
        ({"MUXGATE_RATE_LIMIT": "0"}, "rate_limit"),
        ({"MUXGATE_RATE_LIMIT": "nan"}, "rate_limit"),
        ({"MUXGATE_SLOW_CONSUMER_TIMEOUT": "inf"}, "slow_consumer_timeout"),
        ({"MUXGATE_SHUTDOWN_GRACE": "-1"}, "shutdown_grace"),
        ({"MUXGATE_MAX_FRAME_BYTES": "100"}, "max_frame_bytes"),
        ({"MUXGATE_MAX_BATCH_BYTES": "-1"}, "max_batch_bytes"),
        ({"MUXGATE_MAX_TIMEOUT_MS": "3600001"}, "max_timeout_ms"),
        ({"MUXGATE_LOG_FORMAT": "xml"}, "log_format"),
        ({"MUXGATE_JWT_SECRET": ""}, None),  # "" means unset for an optional setting: valid
        ({"MUXGATE_MAX_PENDING_CHARS": "300000"}, "max_pending_chars"),
    ],
)
def test_invalid_env_values_name_the_setting(env: dict[str, str], setting: str | None) -> None:
    if setting is None:
        load_config(environ=env)
        return
    with pytest.raises(ConfigError, match=setting):
        load_config(environ=env)


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("max_streams = true\n", "max_streams"),
        ('max_streams = "many"\n', "max_streams"),
        ("max_streams = 1.5\n", "max_streams"),
        ('backend_options = "tokens=5"\n', "backend_options"),
        ("rate_limit = nan\n", "rate_limit"),
    ],
)
def test_invalid_toml_values_name_the_setting(tmp_path: Path, text: str, setting: str) -> None:
    with pytest.raises(ConfigError, match=setting):
        load_config(environ={}, toml_path=_toml(tmp_path, text))


def test_unknown_or_broken_toml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_stream"):
        load_config(environ={}, toml_path=_toml(tmp_path, "max_stream = 3\n"))
    with pytest.raises(ConfigError, match=r"muxgate\.toml"):
        load_config(environ={}, toml_path=_toml(tmp_path, "max_streams = \n"))
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(environ={}, toml_path=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="nonsense"):
        load_config(environ={}, flags={"nonsense": "1"})


def test_flags_are_converted_and_checked() -> None:
    assert load_config(environ={}, flags={"rate_burst": "17"}).rate_burst == 17
    with pytest.raises(ConfigError, match="--max-streams"):
        load_config(environ={}, flags={"max_streams": "abc"})


# --- the command line ----------------------------------------------------------------------------


def _muxgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        cwd=REPO,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_with_bad_flag_exits_2_with_a_message() -> None:
    done = _muxgate("serve", "--max-streams", "abc")
    assert done.returncode == 2
    assert "max_streams" in done.stderr and "abc" in done.stderr  # noqa: PT018
    assert "Traceback" not in done.stderr


def test_serve_with_bad_env_exits_2() -> None:
    done = _muxgate("serve", env={"MUXGATE_PORT": "99999"})
    assert done.returncode == 2
    assert "port" in done.stderr


def test_serve_with_a_bad_backend_option_exits_2_naming_it() -> None:
    done = _muxgate(
        "serve",
        "--port",
        "0",
        "--backend",
        "openai",
        "--backend-option",
        "base_url=http://127.0.0.1:9/v1",
        "--backend-option",
        "model=m",
        "--backend-option",
        "max_concurency=2",  # sic
    )
    assert done.returncode == 2
    assert "'max_concurency'" in done.stderr
    assert "Traceback" not in done.stderr
    done = _muxgate(
        "serve",
        "--port",
        "0",
        "--backend",
        "openai",
        env={
            "MUXGATE_BACKEND_OPTIONS": '{"base_url": "http://127.0.0.1:9/v1", "model": "m", '
            '"retries": "1"}'
        },
    )
    assert done.returncode == 2
    assert "'retries'" in done.stderr
    assert "Traceback" not in done.stderr


def test_spec_prints_the_specification() -> None:
    done = _muxgate("spec")
    assert done.returncode == 0
    assert done.stdout == SPEC.read_text(encoding="utf-8")


def test_no_command_exits_2() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_serve_passes_flags_env_and_toml_to_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Config] = []
    monkeypatch.setattr("gateway.server.run", seen.append)
    for key in [k for k in os.environ if k.startswith("MUXGATE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MUXGATE_RATE_BURST", "9")
    monkeypatch.setenv("MUXGATE_MAX_STREAMS", "5")
    toml = _toml(tmp_path, "max_streams = 4\nrate_burst = 3\nretention_count = 77\n")
    argv: list[Any] = ["serve", "--config", str(toml), "--max-streams", "6"]
    argv += ["--client-key", "k1", "--client-key", "k2", "--shutdown-grace", "1"]
    monkeypatch.setenv("MUXGATE_BACKEND_OPTIONS", '{"tokens": 8, "plan_ms": 1}')
    argv += ["--backend-option", "tokens=9", "--backend-option", "tool_ms=0"]
    assert cli.main(argv) == 0
    (config,) = seen
    assert config.backend_options == {"tokens": 9, "plan_ms": 1, "tool_ms": 0}
    assert config.max_streams == 6  # flag over env over TOML
    assert config.rate_burst == 9  # env over TOML
    assert config.retention_count == 77  # TOML over default
    assert config.client_keys == ("k1", "k2")
    assert config.shutdown_grace == 1.0


def test_serve_sets_the_young_collection_threshold() -> None:
    """``gc_young_threshold`` reaches the collector of the serving process (its started line
    says which thresholds it runs with)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUXGATE_")}
    command = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--log-format"]
    command += ["json", "--gc-young-threshold", "12345", "--shutdown-grace", "0.1"]
    process = subprocess.Popen(
        command,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    try:
        started = None
        for line in process.stderr:
            if '"gateway.started"' in line:
                started = json.loads(line)
                break
        assert started is not None, "the gateway did not start"
        assert started["gc_threshold"][0] == 12345
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
    assert process.returncode == 0


def test_nats_is_the_short_flag_of_nats_url() -> None:
    parser = argparse.ArgumentParser()
    cli.serve_parser(parser.add_subparsers(dest="command"))
    for flag in ("--nats", "--nats-url"):
        args = parser.parse_args(["serve", flag, "nats://127.0.0.1:4222"])
        assert args.nats_url == "nats://127.0.0.1:4222"
