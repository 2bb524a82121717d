"""Real clock steps on a running daemon (LD_PRELOAD shim over the wall clock and adjtimex).

The small versions of `python -m bench.clocksteps`: a boot three days behind
that NTP then fixes, a clock an hour ahead stepped back by NTP, and a
synchronised clock stepped +1 h then -1 h. Every stored ``ts`` is within 1 s
of the true time, stamps stay unique, each step is logged once with its size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.clocksteps import run_scenario

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("scenario", "steps"),
    [
        ("boot-3-days-behind", ["+3 d 0 h 0 min 0.0 s"]),
        ("1h-ahead-ntp", ["-1 h 0 min 0.0 s"]),
        ("synced-steps", ["+1 h 0 min 0.0 s", "-1 h 0 min 0.0 s"]),
    ],
)
def test_every_stored_ts_is_within_a_second_of_true_time(
    tmp_path: Path, scenario: str, steps: list[str]
) -> None:
    out = run_scenario(scenario, tmp_path)
    assert out.exit_code == 0
    assert out.judged >= 50, out
    assert out.max_error_ms <= 1000, out
    assert out.duplicates == 0
    assert out.steps_logged == steps
