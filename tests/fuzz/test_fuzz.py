"""The fuzz harnesses in the normal test suite: a bounded run of each, and the known findings.

Each harness runs as a subprocess (libFuzzer owns its process: it exits on a finding) from the
seed corpus, for a fixed number of inputs and a fixed libFuzzer seed (``PYTHONHASHSEED`` too),
15-35 s for the three on 2 cores. The long run is ``make fuzz``. A reproducer of each known
finding, fixed since (``tests/fuzz/regressions/``), is run too: each harness passes on them.

Without atheris (the ``fuzz`` extra) these tests are skipped, except under CI, where a missing
atheris is an error: CI installs the extra.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import corpus

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the environment
    atheris = None

if atheris is None and os.environ.get("CI"):  # CI installs the extra: never skip there
    raise RuntimeError("atheris is missing: install the 'fuzz' extra")
pytestmark = pytest.mark.skipif(atheris is None, reason="atheris not installed (extra 'fuzz')")

ROOT = Path(__file__).resolve().parents[2]
REGRESSIONS = Path(__file__).resolve().parent / "regressions"
#: Inputs per harness: the three take about 15 s of CPU together (decoder ~4, handshake ~3,
#: http ~8, start-up included), 15-35 s on this 2-core machine as loaded by other jobs.
RUNS = {"decoder": 15_000, "handshake": 20_000, "http": 10_000}
#: Longer seeds are cut to this (the long run takes the harnesses' own, larger, -max_len): the
#: coverage reached is the same within a few edges, at twice the speed.
MAX_LEN = 4096
#: Far beyond what the runs take, so a hang is reported as a failure, not waited on forever.
TIMEOUT = 300
_DONE = re.compile(r"^Done (\d+) runs in \d+ second", re.MULTILINE)
_COVERAGE = re.compile(r"^#\d+\s+DONE\s+cov: (\d+) ft: (\d+)", re.MULTILINE)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": "0"}


def _harness(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"tests.fuzz.{name}", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize("name", sorted(RUNS))
def test_bounded_run(name: str, tmp_path: Path) -> None:
    """The harness runs RUNS[name] inputs from the seed corpus and finds nothing."""
    seeds = tmp_path / "seeds"
    counts = corpus.write_corpus(seeds)
    assert counts[name] > 10, counts
    grown = tmp_path / "grown"
    grown.mkdir()
    result = _harness(
        name,
        f"-runs={RUNS[name]}",
        "-seed=1",
        f"-max_len={MAX_LEN}",
        f"-artifact_prefix={tmp_path}/",
        f"-dict={seeds / f'{name}.dict'}",
        "-print_final_stats=1",
        str(grown),
        str(seeds / name),
    )
    # atheris prints a finding's Python traceback on stdout, libFuzzer its summary on stderr.
    tail = f"{result.stdout[-4000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{name} harness exited {result.returncode}:\n{tail}"
    done = _DONE.search(result.stderr)
    assert done is not None, f"no final 'Done N runs' line:\n{tail}"
    assert int(done.group(1)) >= RUNS[name], done.group(0)
    coverage = _COVERAGE.search(result.stderr)
    assert coverage is not None, f"no final coverage line:\n{tail}"
    assert int(coverage.group(1)) > 100, f"instrumentation missing? {coverage.group(0)}"
    assert not list(tmp_path.glob("crash-*")), "a crash input was written"


def _reproducers(harness: str | None = None) -> list[Path]:
    files = [p for p in REGRESSIONS.iterdir() if not p.name.startswith(("README", "."))]
    return sorted(p for p in files if harness is None or p.name.split("-", 1)[0] == harness)


@pytest.mark.parametrize("reproducer", _reproducers(), ids=lambda p: p.name)
def test_a_fixed_finding_stays_fixed(reproducer: Path) -> None:
    """The input that found a bug (tests/fuzz/regressions/): its harness passes on it now."""
    result = _harness(reproducer.name.split("-", 1)[0], str(reproducer))
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert "Uncaught Python exception" not in result.stdout
