"""The adaptive controller: mass balance, waiting for mixing, learning from observed effects."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

import rules.adaptive as adaptive
from rules.adaptive import AdaptiveController
from rules.controller import ControllerError, Decision, DecisionContext, PlantConstants, create

PLANT = PlantConstants(
    tank_volume_l=10.0,
    stock_ppm=10_000.0,
    flow_ml_s={"nutrient": 12.0, "refill": 30.0, "ph_up": 1.58, "ph_down": 1.58},
)


def ctx(
    loop: str,
    measured: float,
    setpoint: float,
    *,
    first: bool = False,
    level: float | None = None,
    latest: float | None = None,
) -> DecisionContext:
    """A context; the loop's latest reading is ``latest`` (default: the average itself)."""
    values = {loop: measured if latest is None else latest}
    if level is not None:
        values["water_level"] = level
    band = (
        (setpoint * 0.95, setpoint * 1.05) if loop == "tds" else (setpoint - 0.15, setpoint + 0.15)
    )
    return DecisionContext(
        loop=loop,  # type: ignore[arg-type]
        setpoint=setpoint,
        measured=measured,
        previous_error=None if first else setpoint - measured,
        values=values,
        plant=PLANT,
        band=band,
    )


async def first(c: AdaptiveController, loop: str, value: float, sp: float) -> Decision:
    """The first decision of a loop, on a quiet tank."""
    return await c.decide(ctx(loop, value, sp, first=True))


def test_registered() -> None:
    controller = create("adaptive")
    assert controller.name == "adaptive"
    controller.close()


async def test_doses_on_the_first_window_only_when_the_tank_is_quiet() -> None:
    c = AdaptiveController()
    # The latest reading is far from the window's average: the tank is still moving.
    moving = await c.decide(ctx("tds", 300.0, 700.0, first=True, latest=330.0))
    assert moving.doses == ()
    # Next window: 30 ppm higher, still moving.
    assert (await c.decide(ctx("tds", 330.0, 700.0))).doses == ()
    # Then steady: dose.
    assert (await c.decide(ctx("tds", 331.0, 700.0))).doses != ()
    quiet = await first(AdaptiveController(), "tds", 300.0, 700.0)
    assert quiet.doses != ()


def _nutrient_ms(c0: float, sp: float, volume_l: float = 10.0) -> float:
    aim = sp * (1 - adaptive.TDS_AIM_PCT / 100)
    need_ml = 1000.0 * volume_l * (aim - c0) / (10_000 - aim)
    return adaptive.TDS_FRACTION * need_ml / 12.0 * 1000.0


async def test_tds_up_is_mass_balance_to_just_below_the_setpoint() -> None:
    d = await first(AdaptiveController(), "tds", 300.0, 700.0)
    (dose,) = d.doses
    assert dose.actuator == "nutrient"
    assert dose.ms == pytest.approx(_nutrient_ms(300.0, 700.0), abs=1)
    assert dose.duty == 255
    assert d.controller == "adaptive"
    # Even if all of it arrived at once, it stays below the setpoint.
    ml = dose.ms / 1000 * 12.0
    assert (300 * 10 + 10_000 * ml / 1000) / (10 + ml / 1000) < 700 * 0.995


async def test_tds_uses_measured_water_level() -> None:
    c = AdaptiveController()
    (dose,) = (await c.decide(ctx("tds", 300.0, 700.0, first=True, level=5.0))).doses
    assert dose.ms == pytest.approx(_nutrient_ms(300.0, 700.0, volume_l=5.0), abs=1)


async def test_tds_dead_band_tolerates_a_small_excess_more_than_a_deficit() -> None:
    assert (await first(AdaptiveController(), "tds", 810.0, 800.0)).doses == ()  # +1.25 %
    assert (await first(AdaptiveController(), "tds", 795.0, 800.0)).doses == ()  # -0.6 %
    assert (await first(AdaptiveController(), "tds", 790.0, 800.0)).doses != ()  # -1.25 %


async def test_long_dilution_runs_in_pieces_without_waiting() -> None:
    c = AdaptiveController()
    (piece,) = (await first(c, "tds", 1300.0, 800.0)).doses
    assert piece.actuator == "refill"
    assert piece.ms == adaptive.MAX_DOSE_S * 1000  # 6 L needed, 1.8 L per run
    # The next decision comes while the probe still sees the first piece arrive:
    # the next piece is dosed from the mass balance's prediction, not the reading.
    (second,) = (await c.decide(ctx("tds", 1250.0, 800.0, level=11.8))).doses
    assert second.actuator == "refill"
    predicted = 1300.0 * 10.0 / 11.8
    aim = 800.0 * (1 + adaptive.TDS_AIM_PCT / 100)
    need_ml = adaptive.TDS_FRACTION * 11.8 * (predicted / aim - 1) * 1000
    assert second.ms == min(round(need_ml / 30.0 * 1000), adaptive.MAX_DOSE_S * 1000)
    # Summed, the pieces never exceed the need of the whole step.
    c2 = AdaptiveController()
    total_ml, level, value = 0.0, 10.0, 1300.0
    d = await first(c2, "tds", value, 800.0)
    for _ in range(10):
        if not d.doses:
            break
        ml = d.doses[0].ms / 1000 * 30.0
        value, level, total_ml = (
            value * level / (level + ml / 1000),
            level + ml / 1000,
            total_ml + ml,
        )
        d = await c2.decide(ctx("tds", 1250.0, 800.0, level=level))
    assert total_ml <= 10_000.0 * (1300 / 800 - 1)
    assert value > 800.0


async def test_tds_waits_for_a_steady_reading_then_learns_and_trims() -> None:
    c = AdaptiveController()
    (dose,) = (await first(c, "tds", 300.0, 700.0)).doses
    ml = dose.ms / 1000 * 12.0
    expected = (300 * 10 + 10 * ml) / (10 + ml / 1000) - 300
    # The probe sees the dose arrive; the change over three windows is still large.
    for value in (400.0, 520.0, 580.0, 600.0, 603.0, 604.0, 604.5):
        assert (await c.decide(ctx("tds", value, 700.0))).doses == (), value
    # Steady at ~604: the dose did less than the mass balance promised.
    trim = await c.decide(ctx("tds", 604.3, 700.0))
    (t,) = trim.doses
    factor = 304.3 / expected
    assert factor < 0.95
    plain_ms = _nutrient_ms(604.3, 700.0)
    assert t.ms == pytest.approx(plain_ms / factor, rel=0.01)


async def test_a_small_trim_teaches_nothing() -> None:
    c = AdaptiveController()
    await first(c, "tds", 680.0, 700.0)  # a ~2 % trim
    for value in (684.0, 684.5, 684.0, 684.2):  # did much less than expected
        d = await c.decide(ctx("tds", value, 700.0))
    (again,) = d.doses
    assert again.ms == pytest.approx(_nutrient_ms(684.2, 700.0), abs=1)


async def test_inside_dead_band_nothing() -> None:
    assert (await first(AdaptiveController(), "tds", 695.0, 700.0)).doses == ()
    assert (await first(AdaptiveController(), "ph", 6.01, 6.0)).doses == ()


async def test_ph_first_dose_is_the_ceiling_prior() -> None:
    (dose,) = (await first(AdaptiveController(), "ph", 6.0, 5.0)).doses
    assert dose.actuator == "ph_down"
    ceiling = adaptive.PH_PRIOR_PER_ML_L / 10.0  # pH per ml in 10 L
    ml = adaptive.PH_FRACTION_PRIOR * 1.0 / ceiling
    assert dose.ms == pytest.approx(ml / 1.58 * 1000.0, abs=1)


async def _second_dose(after_first: float) -> tuple[float, float]:
    """ml of the first and second ph_down dose when the first moved 6.0 to ``after_first``."""
    c = AdaptiveController()
    (dose,) = (await first(c, "ph", 6.0, 5.0)).doses
    for value in (after_first + 0.01, after_first + 0.002, after_first):  # steady
        d = await c.decide(ctx("ph", value, 5.0))
    (second,) = d.doses
    return dose.ms / 1000 * 1.58, second.ms / 1000 * 1.58


async def test_ph_one_observation_assumes_the_curve_steepens_ahead() -> None:
    first_ml, second_ml = await _second_dose(5.9)
    gain = 0.1 / first_ml
    constant_gain_ml = 0.9 / gain
    # Pessimistic ahead: far less than the secant's straight extrapolation ...
    assert second_ml < 0.7 * constant_gain_ml
    # ... and exactly the integral under the assumed steepening.
    s = adaptive.PH_STEEPEN_PER_PH
    mid = 5.95
    integral = sum(
        0.9 / 4000 / min(adaptive.PH_PRIOR_PER_ML_L / 10, gain * math.exp(s * (mid - x)))
        for x in (5.9 - 0.9 * (i + 0.5) / 4000 for i in range(4000))
    )
    assert second_ml == pytest.approx(adaptive.PH_FRACTION * integral, rel=0.01)


async def test_ph_never_crosses_the_setpoint_on_steepening_or_flattening_curves() -> None:
    """Toy titration curves whose gain changes by ``slope`` per pH travelled (below the
    prior ceiling, steepening no faster than assumed), each dose settled at once:
    the value approaches from one side, never crosses the setpoint, and arrives."""
    ceiling = adaptive.PH_PRIOR_PER_ML_L / 10.0
    for start, sp, g0, slope in (
        (6.0, 5.0, 0.02, 1.6),  # pH down into a steepening region
        (6.5, 5.0, 0.015, 1.9),
        (4.8, 6.0, 0.13, -1.4),  # pH up into a flattening region
        (5.5, 5.0, 0.05, 1.5),
        (7.0, 6.0, 0.03, -0.5),
    ):
        c = AdaptiveController()
        x = start
        d = await first(c, "ph", x, sp)
        for _ in range(40):
            if not d.doses:
                break
            (dose,) = d.doses
            ml = dose.ms / 1000 * 1.58
            sign = 1.0 if dose.actuator == "ph_up" else -1.0
            for _ in range(200):  # integrate dx = gain(x) dml
                x += sign * min(ceiling, g0 * math.exp(slope * abs(x - start))) * ml / 200
            assert (x - sp) * (sp - start) <= 0.005, (start, sp, x)
            for _ in range(3):  # three steady windows: settled
                d = await c.decide(ctx("ph", x, sp))
                if d.doses:
                    break
        assert abs(x - sp) <= adaptive.PH_DEADBAND + 1e-9, (start, sp, x)


async def test_extrapolated_past_the_setpoint_waits_for_a_steady_reading() -> None:
    c = AdaptiveController()
    await first(c, "ph", 6.0, 5.9)
    # Geometric approach whose limit (5.84) lies past the setpoint: no ph_up on that.
    for value in (5.94, 5.88, 5.86):
        assert (await c.decide(ctx("ph", value, 5.9))).doses == ()


async def test_dose_without_effect_teaches_nothing() -> None:
    c = AdaptiveController()
    (dose,) = (await first(c, "ph", 6.0, 5.0)).doses
    for _ in range(3):  # refused by safety: the reading never moved
        d = await c.decide(ctx("ph", 6.0, 5.0))
    (again,) = d.doses
    assert again.ms == dose.ms


async def test_new_cycle_forgets_the_dose_in_flight() -> None:
    c = AdaptiveController()
    await first(c, "tds", 300.0, 700.0)
    # A new cycle starts (previous_error None): no waiting for the old dose.
    d = await first(c, "tds", 650.0, 700.0)
    assert d.doses and d.doses[0].actuator == "nutrient"


async def test_long_dose_is_capped() -> None:
    (dose,) = (await first(AdaptiveController(), "tds", 100.0, 2000.0)).doses
    assert dose.ms == adaptive.MAX_DOSE_S * 1000


# ------------------------------------------------------- the learned titration curve


def _density(x: float) -> float:
    """A toy tank: ml/L per pH, flattening tenfold per pH towards a buffer above."""
    return 0.5 * math.exp(2.3 * (x - 4.8))


def _integral(x0: float, x1: float) -> float:
    lo, hi = min(x0, x1), max(x0, x1)
    return 0.5 / 2.3 * (math.exp(2.3 * (hi - 4.8)) - math.exp(2.3 * (lo - 4.8)))


def test_curve_fitted_to_nested_spans_costs_the_way_like_the_tank() -> None:
    """Spans that all start at 4.8 (as a run of doses' secants do) pin down the shape:
    sub-spans no dose travelled on its own are costed within a few per cent."""
    curve = adaptive._Titration()
    for end in (5.1, 5.3, 5.45, 5.6):
        curve.observe(4.8, end, _integral(4.8, end))
    no_gain = adaptive._gain_model([], direction=1.0)
    for x0, x1 in ((4.8, 5.5), (5.0, 5.4), (5.3, 5.55), (5.5, 5.2)):
        known, modelled = curve.cost(x0, x1, no_gain)
        assert modelled == 0.0
        assert known == pytest.approx(_integral(x0, x1), rel=0.05), (x0, x1)
    # An even spread over a span (no fit) would be off by far more at its far end.
    flat = _integral(4.8, 5.6) / 0.8 * 0.15
    assert abs(flat / _integral(5.45, 5.6) - 1) > 0.3
    # Outside every span the gain model costs the way, pessimistically (less ml).
    known, modelled = curve.cost(5.6, 5.8, no_gain)
    assert known == 0.0 and 0 < modelled < _integral(5.6, 5.8)


def test_spans_with_extrapolated_ends_weigh_less() -> None:
    truth = _integral(5.0, 5.4)
    curve = adaptive._Titration()
    curve.observe(5.0, 5.4, truth)
    curve.observe(5.0, 5.4, 1.3 * truth, trust=adaptive.PH_EXTRAPOLATED_TRUST)
    no_gain = adaptive._gain_model([], direction=1.0)
    known, _ = curve.cost(5.0, 5.4, no_gain)
    assert truth < known < 1.1 * truth


async def _toy_cycle(c: AdaptiveController, start: float, sp: float) -> list[float]:
    """One pH cycle on the toy tank, each dose settled at once; the ml of each dose."""
    x, doses = start, []
    d = await first(c, "ph", x, sp)
    for _ in range(30):
        if not d.doses:
            break
        (dose,) = d.doses
        ml = dose.ms / 1000 * 1.58
        doses.append(ml)
        sign = 1.0 if dose.actuator == "ph_up" else -1.0
        for _ in range(400):  # integrate dx = dml / density
            x += sign * (ml / 10.0 / 400) / _density(x)
        for _ in range(3):
            d = await c.decide(ctx("ph", x, sp))
            if d.doses:
                break
    assert abs(x - sp) <= 0.05
    return doses


async def test_a_second_cycle_on_a_learned_tank_doses_its_need_in_one_go() -> None:
    c = AdaptiveController()
    cold = await _toy_cycle(c, 4.8, 5.5)
    warm = await _toy_cycle(c, 4.8, 5.5)
    need = 10.0 * _integral(4.8, 5.5)
    assert len(cold) >= 3 and cold[0] < 0.7 * need  # the prior is cautious
    assert warm[0] == pytest.approx(adaptive.PH_FRACTION_KNOWN * need, rel=0.03)
    assert len(warm) < len(cold)


async def test_learned_state_survives_a_round_trip_and_bad_states_are_refused() -> None:
    c = AdaptiveController()
    assert c.learned() == {}
    await _toy_cycle(c, 4.8, 5.5)
    await first(c, "tds", 600.0, 700.0)
    for value in (660.0, 660.5, 660.2, 660.3):  # far less than the mass balance said
        await c.decide(ctx("tds", value, 700.0))
    state = c.learned()
    assert json.loads(json.dumps(state)) == state
    assert state["ph_spans"]["ph_up"] and state["tds_factor"]["nutrient"] != 1.0
    again = AdaptiveController()
    again.restore(state)
    assert again.learned() == state
    same = await first(again, "ph", 4.8, 5.5)
    assert same == await first(c, "ph", 4.8, 5.5)
    bad_states: list[dict[str, Any]] = [
        {**state, "version": 99},
        {k: v for k, v in state.items() if k != "ph_spans"},
        {**state, "ph_spans": {"ph_up": [[5.5, 4.8, 1.0, 1.0]]}},  # lo > hi
        {**state, "ph_spans": {"ph_up": [[4.8, 5.5, float("nan"), 1.0]]}},
        {**state, "tds_factor": {"nutrient": 9.0}},
        {**state, "ph_gains": {"ph_up": [[5.0, -1.0]]}},
        {**state, "ph_spans": "nonsense"},
    ]
    for bad in bad_states:
        fresh = AdaptiveController()
        with pytest.raises(ControllerError):
            fresh.restore(bad)
        assert fresh.learned() == {}


def test_gain_model_does_not_flatten_behind_what_it_saw() -> None:
    """pH down secants from the steep region 5.2-5.6 (earlier cycles): costing a dose from
    6.5, behind them, must not follow the fit into ever flatter (ml-hungrier) ground."""
    obs = [(5.6, 0.4), (5.2, 0.9)]  # gain rises going down
    gain = adaptive._gain_model(obs, direction=-1.0)
    assert gain(6.5) == pytest.approx(gain(5.6))
    assert gain(5.0) > gain(5.2)  # ahead: steeper still


def test_a_span_far_off_the_curve_starts_it_again() -> None:
    """A new nutrient solution buffers differently: one steady span that disagrees with the
    curve by more than PH_CHANGED_RATIO replaces it, where drift only nudges it."""
    curve = adaptive._Titration()
    for end in (5.1, 5.3, 5.5):
        curve.observe(4.8, end, _integral(4.8, end))
    curve.observe(5.0, 5.4, 1.2 * _integral(5.0, 5.4))  # drift: kept with the rest
    assert len(curve.spans) == 4
    curve.observe(5.0, 5.4, 0.5 * _integral(5.0, 5.4), trust=adaptive.PH_EXTRAPOLATED_TRUST)
    assert len(curve.spans) == 5  # an extrapolated end is not proof enough
    curve.observe(5.0, 5.4, 0.5 * _integral(5.0, 5.4))
    assert curve.spans == [(5.0, 5.4, 0.5 * _integral(5.0, 5.4), 1.0)]
