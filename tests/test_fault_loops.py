"""Small versions of the fault loops in `python -m bench.faults` (which run 100 kills, 50 outages)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.faults import kill_loop, outage_loop

pytestmark = pytest.mark.slow


def test_sigkills_with_the_broker_up_and_down_lose_no_committed_reading(tmp_path: Path) -> None:
    result = kill_loop(6, tmp_path, random.Random(7))
    assert result["committed"] > 500
    assert result["lost"] == 0, result


def test_broker_outages_lose_no_reading(tmp_path: Path) -> None:
    result = outage_loop(4, tmp_path, random.Random(7))
    assert result["sent"] > 1000
    assert result["lost"] == 0, result
