"""``hydrogate evaluate``: metric definitions, and the quick run with the adaptive targets."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from rules import evaluate as ev


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


def test_quick_run_writes_report_and_meets_adaptive_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
    pngs = sorted(p.name for p in (tmp_path / "img").iterdir())
    assert pngs == ["control_ph_down_5.5_5.0.png", "control_tds_up_1000.png"]
    assert all((tmp_path / "img" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.parametrize("scenario_name", list(ev.QUICK_SCENARIOS))
async def test_adaptive_targets(scenario_name: str) -> None:
    scenario = next(s for s in ev.SCENARIOS if s.name == scenario_name)
    mine = await ev.run_scenario(scenario, "adaptive")
    fuzzy = await ev.run_scenario(scenario, "fuzzy")
    m, f = mine.metrics, fuzzy.metrics
    assert m is not None and f is not None
    assert m.settled, scenario_name
    assert m.overshoot_pct <= 3.0
    if scenario.loop == "tds":
        assert m.steady_state_error <= 2.0
        least = ev.minimum_ml(scenario, ev.plant_params())
        assert least is not None and m.total_ml <= 1.05 * least
    else:
        assert m.steady_state_error <= 0.05
        assert m.total_ml < f.total_ml
    assert f.settling_s is None or m.settling_s < f.settling_s  # type: ignore[operator]
    # Every dose went through the safety guard and none was refused on this plant.
    assert mine.refusals == []
