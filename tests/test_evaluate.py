"""``hydrogate evaluate``: metric definitions, and the quick run with the adaptive targets."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import pytest

from sim import evaluate as ev


def test_metrics_of_a_known_curve() -> None:
    # 0 -> 100 ramp over 100 s, overshoot to 110 at 120 s, back to 100 from 160 s.
    times = [float(t) for t in range(0, 401)]
    values = []
    for t in times:
        if t <= 100:
            values.append(t)
        elif t <= 120:
            values.append(100 + (t - 100) / 2)
        elif t <= 160:
            values.append(110 - (t - 120) / 4)
        else:
            values.append(100.0)
    m = ev.metrics(
        times, values, start=0.0, setpoint=100.0, loop="tds", volume_ml={"nutrient": 12.0}
    )
    assert m.delay_s == 50.0
    assert m.rise_s == 80.0  # 10 -> 90
    assert m.overshoot_pct == pytest.approx(10.0)
    assert m.settling_s == 140.0  # 110 - (140 - 120)/4 = 105: the band's edge counts
    assert m.steady_state_error == 0.0
    assert m.total_ml == 12.0


def test_metrics_downward_step_and_never_settling() -> None:
    times = [float(t) for t in range(100)]
    values = [6.0 - 0.004 * t for t in times]  # reaches only 5.6 of 6.0 -> 5.0
    m = ev.metrics(times, values, start=6.0, setpoint=5.0, loop="ph", volume_ml={})
    assert m.delay_s is None
    assert m.settling_s is None
    assert m.overshoot_pct == 0.0
    assert m.steady_state_error == pytest.approx(6.0 - 0.004 * 69 - 5.0)  # mean of t >= 39 s


def test_minimum_volume_is_mass_balance() -> None:
    params = ev.plant_params()
    up = next(s for s in ev.SCENARIOS if s.name == "tds_up_700")
    down = next(s for s in ev.SCENARIOS if s.name == "tds_down_800")
    assert ev.minimum_ml(up, params) == pytest.approx(10_000 * 400 / 9_300)
    assert ev.minimum_ml(down, params) == pytest.approx(10_000 * (1300 / 800 - 1))


def test_volume_until_counts_running_doses_up_to_the_moment() -> None:
    flows = {"nutrient": 12.0, "ph_up": 1.58}
    doses = [
        (0.0, "nutrient", 255, 10_000),
        (20.0, "ph_up", 255, 4_000),
        (30.0, "nutrient", 255, 1),
    ]
    assert ev.volume_until(doses, flows, 5.0) == pytest.approx(60.0)
    assert ev.volume_until(doses, flows, 22.0) == pytest.approx(120.0 + 2 * 1.58)
    assert ev.volume_until(doses, flows, 100.0) == pytest.approx(120.0 + 4 * 1.58 + 0.012)


def test_volume_per_step_and_band_entry() -> None:
    times = [float(t) for t in range(200)]
    values = [max(100.0, 300.0 - 4.0 * t) for t in times]  # 300 -> 100 by t = 50
    m = ev.metrics(times, values, start=300.0, setpoint=100.0, loop="tds", volume_ml={"refill": 50})
    assert m.band_entry_s == 48.0  # 300 - 4 t <= 110
    assert m.achieved == pytest.approx(1.0)
    assert m.ml_per_step == pytest.approx(50.0)
    half = ev.metrics(
        times, [200.0] * 200, start=300.0, setpoint=100.0, loop="tds", volume_ml={"refill": 50}
    )
    assert half.band_entry_s is None and half.ml_per_step == pytest.approx(100.0)


def test_target_misses_names_each_failure() -> None:
    scenario = next(s for s in ev.SCENARIOS if s.name == "ph_up_6.0")
    good = ev.Metrics(100.0, 50.0, 300.0, 1.0, 0.01, {"ph_up": 20.0}, 200.0, 19.0, 1.0)
    ref = ev.Metrics(100.0, 50.0, 600.0, 1.0, 0.01, {"ph_up": 25.0}, 200.0, 20.0, 1.0)
    assert ev.target_misses(scenario, good, ref) == []
    bad = ev.Metrics(100.0, 50.0, None, 4.0, 0.06, {"ph_up": 30.0}, 200.0, 30.0, 1.0)
    misses = ev.target_misses(scenario, bad, ref)
    assert [m.split(" ")[0] for m in misses] == [
        "does",
        "overshoot",
        "steady-state",
        "settles",
        "more",
    ]


def test_quick_set_covers_every_kind_of_step() -> None:
    quick = [s for s in ev.SCENARIOS if s.name in ev.QUICK_SCENARIOS]
    kinds = {(s.loop, s.setpoint > s.start) for s in quick}
    assert kinds == {("tds", True), ("tds", False), ("ph", True), ("ph", False)}
    assert {"ph_down_6.0_5.0", "ph_down_5.5_5.0"} <= set(ev.QUICK_SCENARIOS)


def test_quick_run_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path)])
    started = time.monotonic()
    assert ev.run(args) == 0
    assert time.monotonic() - started < 20.0
    out = capsys.readouterr().out
    assert "| TDS 300 → 1000 ppm | adaptive |" in out
    doc = (tmp_path / "control.md").read_text(encoding="utf-8")
    assert "## Definitions" in doc and "| pH 5.5 → 5.0 | fuzzy |" in doc
    assert "to band ml" in doc and "ml per step" in doc
    pngs = sorted(p.name for p in (tmp_path / "img").iterdir())
    assert pngs == sorted(f"control_{name}.png" for name in ev.QUICK_SCENARIOS)
    assert all((tmp_path / "img" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.fixture(scope="module")
def quick_results() -> dict[tuple[str, str], ev.Result]:
    """Adaptive (first hour and learned) and fuzzy on every quick scenario, run once."""
    scenarios = [s for s in ev.SCENARIOS if s.name in ev.QUICK_SCENARIOS]
    results = asyncio.run(ev.evaluate(scenarios, ("fuzzy", "adaptive", "adaptive+learned")))
    return {(r.scenario.name, r.controller): r for r in results}


@pytest.mark.parametrize("controller", ["adaptive", "adaptive+learned"])
@pytest.mark.parametrize("scenario_name", list(ev.QUICK_SCENARIOS))
def test_adaptive_targets(
    scenario_name: str, controller: str, quick_results: dict[tuple[str, str], ev.Result]
) -> None:
    """Issue 3's targets for adaptive, on every quick scenario, against fuzzy."""
    scenario = next(s for s in ev.SCENARIOS if s.name == scenario_name)
    mine, fuzzy = quick_results[scenario_name, controller], quick_results[scenario_name, "fuzzy"]
    m, f = mine.metrics, fuzzy.metrics
    assert m is not None and f is not None
    assert m.settling_s is not None, "adaptive must settle"
    assert m.overshoot_pct <= 3.0
    assert m.steady_state_error <= (2.0 if scenario.loop == "tds" else 0.05)
    assert f.settling_s is None or m.settling_s < f.settling_s
    least = ev.minimum_ml(scenario, ev.plant_params())
    if least is not None:
        assert m.total_ml <= 1.01 * least
    if f.band_ml is not None:
        assert m.ml_per_step is not None and f.ml_per_step is not None
        assert m.ml_per_step <= 1.01 * f.ml_per_step
    assert ev.target_misses(scenario, m, f) == []
    # Every dose went through the safety guard and none was refused on this plant.
    assert mine.refusals == []


async def test_learned_adaptive_meets_every_target_on_every_scenario() -> None:
    """Issue 3's targets, all nine scenarios: adaptive once it knows the tank."""
    results = await ev.evaluate(ev.SCENARIOS, ("fuzzy", "adaptive+learned"))
    by_key = {(r.scenario.name, r.controller): r.metrics for r in results}
    misses = {}
    for scenario in ev.SCENARIOS:
        mine, fuzzy = by_key[scenario.name, "adaptive+learned"], by_key[scenario.name, "fuzzy"]
        assert mine is not None and fuzzy is not None
        if found := ev.target_misses(scenario, mine, fuzzy):
            misses[scenario.name] = found
    assert misses == {}


async def test_learning_pass_carries_knowledge_between_scenarios() -> None:
    state = await ev.learn("adaptive")
    assert set(state["ph_spans"]) == {"ph_up", "ph_down"}
    assert set(state["tds_factor"]) <= {"nutrient", "refill"}
    # The scenario a controller is measured on is left out of what it learns from.
    down = next(s for s in ev.SCENARIOS if s.name == "ph_down_6.0_5.0")
    without = await ev.learn("adaptive", leave_out=down)
    assert len(without["ph_spans"]["ph_down"]) < len(state["ph_spans"]["ph_down"])
    with pytest.raises(ev.ControllerError, match="learns nothing"):
        await ev.learn("fuzzy")


@pytest.mark.parametrize("scenario_name", ["ph_up_5.5", "ph_up_6.0"])
@pytest.mark.xfail(
    strict=True,
    reason="known miss on a tank never seen before: from pH 4.8 fuzzy's fixed first dose "
    "happens to fit this tank, adaptive's safe prior needs more doses "
    "(docs/control.md, 'The first hour on a new tank')",
)
async def test_adaptive_settles_sooner_than_fuzzy_from_ph_4_8(scenario_name: str) -> None:
    scenario = next(s for s in ev.SCENARIOS if s.name == scenario_name)
    mine = (await ev.run_scenario(scenario, "adaptive")).metrics
    fuzzy = (await ev.run_scenario(scenario, "fuzzy")).metrics
    assert mine is not None and fuzzy is not None
    assert mine.settling_s is not None and fuzzy.settling_s is not None
    assert mine.overshoot_pct <= 3.0  # this part holds: the xfail is the settling time
    assert mine.settling_s < fuzzy.settling_s
