"""Closed loop on a few tanks of the sweep: ``ml`` settles where ``rb`` does not, and is as safe.

The first tanks of ``hydrogate evaluate --sweep`` (seed 11: a right config,
a 20 % wrong one without a level sensor, one without the pH strength), run
through the full cycle exactly as the sweep runs them. The whole sweep is
the benchmark of docs/ml.md (``python -m bench.ml_sweep``).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from sim.evaluate import MAX_EXCURSION_PH, MAX_OVERSHOOT_PCT, Result, run_tank
from sim.tanks import family

TANKS = 3
LOOPS = ("tds", "ph")


@pytest.fixture(scope="module")
def runs() -> dict[tuple[int, str], Result]:
    logging.getLogger("rules").setLevel(logging.ERROR)
    try:
        tanks = family(TANKS, seed=11)

        async def all_runs() -> dict[tuple[int, str], Result]:
            return {(i, name): await run_tank(tank, name)
                    for i, tank in enumerate(tanks) for name in ("rb", "ml")}

        return asyncio.run(all_runs())
    finally:
        logging.getLogger("rules").setLevel(logging.NOTSET)


def test_the_model_decides(runs: dict[tuple[int, str], Result]) -> None:
    assert {r.tank.config for r in runs.values()} == {"right", "wrong", "unset"}
    for i in range(TANKS):
        assert len(runs[i, "ml"].doses) > 0


def test_ml_never_less_safe_than_rb(runs: dict[tuple[int, str], Result]) -> None:
    for i in range(TANKS):
        ml, rb = runs[i, "ml"], runs[i, "rb"]
        assert ml.locked is None
        assert ml.excursion <= MAX_EXCURSION_PH
        assert ml.excursion <= rb.excursion + 0.05


def tds_overshoot_pct(result: Result) -> float:
    """The TDS overshoot (% of the step) while the TDS loop ran: the pH loop's solutions dilute
    the tank too (a 6 L tank of hard water takes litres of a 0.12 M acid), which is no TDS
    decision's doing."""
    tank = result.tank
    step = tank.tds_setpoint - tank.start_tds
    until = result.ph_loop_s if result.ph_loop_s is not None else result.times[-1]
    worst = max((v - tank.tds_setpoint) * (1 if step > 0 else -1)
                for t, v in zip(result.times, result.tds, strict=True) if t <= until)
    return max(0.0, 100.0 * worst / abs(step))


def test_ml_settles_sooner_than_rb_without_overshooting(
    runs: dict[tuple[int, str], Result]
) -> None:
    sooner = 0
    for i in range(TANKS):
        ml, rb = runs[i, "ml"], runs[i, "rb"]
        assert ml.first_cycle_s is not None
        assert tds_overshoot_pct(ml) <= MAX_OVERSHOOT_PCT, ml.tank.name
        assert ml.metrics["ph"].overshoot_pct <= MAX_OVERSHOOT_PCT, ml.tank.name
        for loop in LOOPS:
            m, r = ml.metrics[loop], rb.metrics[loop]
            assert m.settled, (ml.tank.name, loop)
            assert m.settling_s is not None
            if r.settling_s is None or m.settling_s < r.settling_s:
                sooner += 1
    assert sooner >= TANKS * len(LOOPS) - 1
