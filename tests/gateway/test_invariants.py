"""Randomized invariants at scale, the CI-sized run (issue 18, item 2): 10,000 requests over
three nodes and 2,000 on one, every kind of cancel, drops and resumes, every end checked
(tests/gateway/invariants.py says what is checked; its ``main`` runs 100,000)."""

from __future__ import annotations

import random

import pytest

from .invariants import campaign
from .test_cluster import NATS_SERVER


@pytest.mark.skipif(NATS_SERVER is None, reason="nats-server not installed (extra 'cluster')")
async def test_ten_thousand_requests_over_three_nodes_each_end_once_and_truly() -> None:
    seed = random.randrange(1 << 30)
    print(f"seed {seed} (python3 -m tests.gateway.invariants --requests 10000 --seed {seed})")
    figures, _ = await campaign(10_000, 3, seed, parallel=8)
    assert figures.requests == 10_000
    assert sum(figures.ends.values()) == 10_000  # every request's end was checked
    assert figures.drops > 0
    assert figures.resumed > 0
    assert figures.cancel_answers["cancelled"] > 0
    assert figures.cancel_answers["already_completed"] > 0


async def test_two_thousand_requests_on_one_node_each_end_once_and_truly() -> None:
    figures, _ = await campaign(2_000, 1, 18, parallel=8)
    assert sum(figures.ends.values()) == 2_000
    assert figures.drops > 0
