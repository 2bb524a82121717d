"""The guided titration procedure (rules/titration.py) on simulated time against the plant model.

Every case drives `Titration` with readings of a `sim.plant.Reservoir` stepped
in simulated time, doses the plant as the gateway would (whole milliseconds
of the pump at full duty) and compares the measured strength with the
plant's own titration curve (`Reservoir.titration_ml_per_l`). Plants take up
no nutrient here (uptake slowly raises the pH, a drift of its own that is no
error of the method; docs/titration.md gives its size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from rules.controller import PlantConstants
from rules.envelope import CAP_PH, PhEnvelope
from rules.titration import (
    GROWTH,
    MAX_DOSES,
    Phase,
    Titration,
    TitrationError,
    TitrationSettings,
    fit_response,
    recommended_wait,
)
from sim.plant import PlantParams, Reservoir


def phase(proc: Titration) -> Phase:
    """The phase read afresh (mypy keeps ``proc.phase`` narrowed by an earlier assert
    across the calls that change it)."""
    return proc.phase


BASE = PlantParams(uptake_per_h=0.0, evaporation_l_per_h=0.0)
FAST = replace(BASE, dead_time_s=1.0, lag_s=1.5)


@dataclass
class Run:
    """One simulated titration: the procedure, the tank, what the tank's true pH did."""

    proc: Titration
    tank: Reservoir
    start_ph: float
    t: float = 0.0
    doses: list[float] = field(default_factory=list)  # ml/L asked for
    extreme: float = 0.0  # largest |true pH - start| seen


def simulate(
    params: PlantParams,
    pump: str,
    *,
    ph: float = 6.0,
    poll: float = 5.0,
    window: float = 30.0,
    mixing: float = 60.0,
    strength: float | None = None,
    seed: int = 1,
    dosed_pump: str | None = None,
    flow_factor: float = 1.0,
    limit_s: float = 30000.0,
    min_watch_s: float = 60.0,
) -> Run:
    """Titrate ``pump`` on a tank of ``params``; the gateway is told ``strength`` (or nothing).

    ``dosed_pump`` is the pump that really runs (a tube on the wrong bottle);
    ``flow_factor`` how much of the configured flow it really gives.
    """
    tank = Reservoir.from_state(tds=800, ph=ph, params=params, seed=seed)
    told = PlantConstants(
        tank_volume_l=params.volume_l,
        ph_ml_per_l_per_unit={pump: strength} if strength is not None else {},
    )
    envelope = PhEnvelope(told)
    proc = Titration(
        TitrationSettings(pump, window_s=window, mixing_wait_s=mixing, min_watch_s=min_watch_s),
        lambda x: envelope.gain_bound(pump, x, ph),
        0.0,
    )
    run = Run(proc, tank, tank.truth()["ph"])
    flow = params.flow_ml_s(pump)
    while proc.phase not in ("done", "failed") and run.t < limit_s:
        tank.step(poll)
        run.t += poll
        run.extreme = max(run.extreme, abs(tank.truth()["ph"] - run.start_ph))
        proc.add(run.t, tank.sensors()["ph"])
        per_l = proc.advance(run.t)
        if per_l is None:
            continue
        run.doses.append(per_l)
        ms = math.floor(per_l * params.volume_l / flow * 1000.0)
        if ms < 1:
            assert flow / 1000.0 / params.volume_l <= proc.allowed_per_l()
            ms = 1
        really = dosed_pump or pump
        if flow_factor > 0:
            tank.set_pump(really, 255)
            tank.step(ms / 1000.0 / flow_factor if flow_factor < 1 else ms / 1000.0)
            tank.set_pump(really, 0)
        proc.dosed(run.t, ms / 1000.0 * flow / params.volume_l, ms / 1000.0)
        run.t += ms / 1000.0
    return run


def truth(run: Run) -> float:
    """The plant's own strength (ml/L per pH unit) over the span the titration measured."""
    result = run.proc.result
    assert result is not None, run.proc.error
    span = result.ph_to - result.ph_from
    return run.tank.titration_ml_per_l(result.pump, result.ph_from, result.ph_to) / abs(span)


CHEMISTRIES = {
    "dilute 0.15 M, tap water": BASE,
    "1 M acid and base": replace(BASE, ph_up_mol_l=1.0, ph_down_mol_l=1.0),
    "0.5 M, soft water": replace(BASE, ph_up_mol_l=0.5, ph_down_mol_l=0.5,
                                 refill_carbonate_mol_l=0.0003),
    "200 L tank": replace(BASE, volume_l=200.0, capacity_l=300.0),
    "slow mixing (40 s + 150 s)": replace(BASE, dead_time_s=40.0, lag_s=150.0),
}


@pytest.mark.parametrize("pump", ["ph_down", "ph_up"])
@pytest.mark.parametrize("name", list(CHEMISTRIES))
def test_the_measured_strength_is_the_plants_within_15_percent(name: str, pump: str) -> None:
    for seed in (1, 2):
        run = simulate(CHEMISTRIES[name], pump, seed=seed)
        result = run.proc.result
        assert result is not None, run.proc.error
        error = result.strength / truth(run) - 1.0
        assert abs(error) <= 0.15, (seed, error, result)
        assert 0.05 <= abs(result.ph_to - result.ph_from) <= CAP_PH
        assert run.extreme <= CAP_PH, "the pH never goes further than 0.3 from the start"


def test_a_told_strength_makes_it_quick_and_it_still_measures() -> None:
    """With a configured strength near the truth the first dose already says it."""
    params = CHEMISTRIES["1 M acid and base"]
    told = simulate(params, "ph_down").tank.titration_ml_per_l("ph_down", 6.0, 5.9) / 0.1
    run = simulate(params, "ph_down", strength=told)
    assert run.proc.result is not None and len(run.proc.steps) <= 2
    assert abs(run.proc.result.strength / truth(run) - 1.0) <= 0.15
    # Told twice too strong (a careless guess): still measured, and safely.
    run = simulate(params, "ph_down", strength=2 * told)
    assert run.proc.result is not None
    assert abs(run.proc.result.strength / truth(run) - 1.0) <= 0.15
    assert run.extreme <= CAP_PH


def test_the_first_dose_is_the_envelopes_bound_and_each_next_at_most_ten_times_larger() -> None:
    run = simulate(FAST, "ph_up", poll=0.1, window=1.0, mixing=3.0)
    assert run.proc.result is not None
    envelope = PhEnvelope(PlantConstants(tank_volume_l=BASE.volume_l))
    start = run.proc.start
    assert start is not None
    first = envelope.per_l_to_move("ph_up", start.ph, 0.1, 6.0)
    assert run.doses[0] == pytest.approx(first, rel=1e-3)
    assert len(run.doses) >= 3, "nothing known of the tank: it starts from the steepest curve"
    for before, after in zip(run.doses, run.doses[1:], strict=False):
        assert after <= GROWTH * before * 1.001


@pytest.mark.parametrize("seed", range(6))
def test_never_more_than_0_3_from_the_start_on_any_plausible_tank(seed: int) -> None:
    """Steep tanks (2 M, no alkalinity, small and weakly buffered): the cap holds."""
    rng = np.random.default_rng(seed)
    volume = float(rng.uniform(5, 40))
    params = replace(
        FAST,
        volume_l=volume,
        capacity_l=2 * volume,
        ph_up_mol_l=float(rng.choice([0.5, 1.0, 2.0])),
        ph_down_mol_l=float(rng.choice([0.5, 1.0, 2.0])),
        refill_carbonate_mol_l=float(rng.uniform(0.0, 0.002)),
        stock_phosphate_mol_l=float(rng.uniform(0.005, 0.03)),
    )
    for pump in ("ph_up", "ph_down"):
        start = float(rng.uniform(5.0, 7.0))
        run = simulate(params, pump, ph=start, poll=0.1, window=1.0, mixing=3.0, seed=seed)
        assert run.extreme <= CAP_PH + 0.01, (pump, run.extreme, run.proc.error)
        if run.proc.result is not None:
            assert abs(run.proc.result.strength / truth(run) - 1.0) <= 0.2


def test_the_mixing_it_sees_is_the_plants() -> None:
    """Dead time and lag trade against each other in noisy readings; their 95 % time does not."""
    for dead, lag in ((25.0, 50.0), (40.0, 150.0)):
        run = simulate(replace(BASE, dead_time_s=dead, lag_s=lag), "ph_down")
        result = run.proc.result
        assert result is not None and result.mixing is not None
        mixing = result.mixing
        assert mixing.lag_s == pytest.approx(lag, rel=0.4)
        assert mixing.dead_time_s <= 2 * dead
        assert 0.8 * (dead + 3 * lag) <= mixing.mixing_wait_s <= 1.5 * (dead + 3 * lag)


def test_the_wrong_bottle_is_refused_not_measured() -> None:
    run = simulate(FAST, "ph_down", dosed_pump="ph_up", poll=0.1, window=1.0, mixing=3.0)
    assert run.proc.phase == "failed" and run.proc.result is None
    assert "wrong way" in (run.proc.error or "")
    assert run.extreme <= 0.2, "a move the wrong way keeps the doses small"


def test_a_short_mixing_wait_does_not_hide_a_late_effect() -> None:
    """A dose whose effect has not arrived looks like one that did nothing, and the next is
    ten times larger: so a dose with no visible effect is watched a minute at least, whatever
    the mixing wait. With a shorter watch than the dead time it would overshoot, and say so."""
    for dead in (8.0, 40.0):
        run = simulate(replace(BASE, dead_time_s=dead, lag_s=2.0), "ph_up", poll=0.1,
                       window=1.0, mixing=1.0)
        result = run.proc.result
        assert result is not None and result.warning is None
        assert run.extreme <= CAP_PH
        assert abs(result.strength / truth(run) - 1.0) <= 0.15
    run = simulate(replace(BASE, dead_time_s=8.0, lag_s=2.0), "ph_up", poll=0.1, window=1.0,
                   mixing=1.0, min_watch_s=1.0)
    result = run.proc.result
    assert result is not None and "mixing" in (result.warning or ""), result
    assert run.extreme > CAP_PH, "what the minute of watching prevents"
    assert abs(result.strength / truth(run) - 1.0) <= 0.15, "measured all the same"
    result = simulate(FAST, "ph_up", poll=0.1, window=1.0, mixing=3.0).proc.result
    assert result is not None and result.warning is None


def test_a_pump_that_doses_nothing_fails_after_the_last_dose() -> None:
    run = simulate(FAST, "ph_up", flow_factor=0.0, poll=0.1, window=1.0, mixing=3.0)
    assert run.proc.phase == "failed"
    assert len(run.proc.steps) == MAX_DOSES
    assert "no measurable response" in (run.proc.error or "")


def test_stale_and_implausible_readings_end_it() -> None:
    proc = Titration(TitrationSettings("ph_up", window_s=1.0, stale_s=5.0), lambda x: 150.0, 0.0)
    proc.add(0.5, 6.0)
    assert proc.advance(3.0) is None and proc.phase == "settling"
    assert proc.advance(6.0) is None
    assert phase(proc) == "failed" and "no pH reading" in (proc.error or "")
    proc = Titration(TitrationSettings("ph_up"), lambda x: 150.0, 0.0)
    proc.add(1.0, 13.5)
    assert proc.phase == "failed" and "plausible" in (proc.error or "")


def test_a_ph_that_never_settles_ends_it() -> None:
    proc = Titration(TitrationSettings("ph_down", window_s=1.0), lambda x: 150.0, 0.0)
    t = 0.0
    while proc.phase == "settling" and t < 100:
        t += 0.1
        proc.add(t, 6.0 + 0.05 * t)  # a drifting probe
        assert proc.advance(t) is None
    assert proc.phase == "failed" and "did not settle" in (proc.error or "")


def test_settings_are_checked() -> None:
    for bad in ({"pump": "nutrient"}, {"pump": "ph_up", "move": 0.01},
                {"pump": "ph_up", "move": 0.5}, {"pump": "ph_up", "window_s": 0}):
        with pytest.raises(TitrationError):
            TitrationSettings(**bad)


def _unit_response(t: np.ndarray, dead: float, lag: float, run_s: float) -> np.ndarray:
    s = np.maximum(t - dead, 0.0)
    return np.where(
        s <= run_s,
        (s - lag * -np.expm1(-s / lag)) / run_s,
        1.0 - lag / run_s * np.exp(-(np.maximum(s, run_s) - run_s) / lag) * -np.expm1(-run_s / lag),
    )


def test_fit_recovers_dead_time_and_lag() -> None:
    t = np.arange(0.0, 400.0, 5.0)
    for dead, lag, run_s in ((25.0, 50.0, 2.0), (10.0, 120.0, 30.0)):
        y = _unit_response(t, dead, lag, run_s)
        fit = fit_response(list(t), list(6.0 - 0.1 * y), 6.0, [(0.0, run_s, 1.0)])
        assert fit is not None
        assert fit.dead_time_s == pytest.approx(dead, abs=6.0)
        assert fit.lag_s == pytest.approx(lag, rel=0.15)
        assert fit.change == pytest.approx(-0.1, rel=0.05)
        assert recommended_wait(fit) >= dead + 3 * lag * 0.85
        assert fit.least_share(dead + 3 * lag + run_s) >= 0.9
        assert fit.least_share(dead + lag) < 0.7


def test_fit_sees_the_tail_of_every_dose() -> None:
    """Two doses superposed: the first's tail still counts when the second is measured."""
    t = np.arange(0.0, 600.0, 5.0)
    dead, lag = 20.0, 60.0
    y = 0.02 * _unit_response(t, dead, lag, 1.0) + 0.06 * _unit_response(t - 100, dead, lag, 3.0)
    doses = [(0.0, 1.0, 0.1), (100.0, 3.0, 0.3)]
    fit = fit_response(list(t), list(6.0 + y), 6.0, doses)
    assert fit is not None
    assert fit.lag_s == pytest.approx(lag, rel=0.15)
    assert fit.change == pytest.approx(0.08, rel=0.05)
    assert fit.least_share(100 + dead + lag) < 0.8
    assert fit.least_share(100 + dead + 4 * lag) >= 0.95
