"""The adaptive controller: mass balance, waiting for mixing, learning from observed effects."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

import rules.adaptive as adaptive
from rules.adaptive import AdaptiveController
from rules.controller import ControllerError, Decision, DecisionContext, PlantConstants, create
from rules.envelope import PhEnvelope

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
    now: float | None = None,
    max_ml: dict[str, float] | None = None,
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
        now=now,
        max_ml=max_ml or {},
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
    return adaptive.TDS_FRACTION_UNKNOWN * need_ml / 12.0 * 1000.0


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
    # the next piece is the rest of the dose sized at once, whatever the reading says.
    (second,) = (await c.decide(ctx("tds", 1250.0, 800.0, level=11.8))).doses
    assert second.actuator == "refill"
    predicted = 1300.0 * 10.0 / 11.8
    aim = 800.0 * (1 + adaptive.TDS_AIM_PCT / 100)
    need_ml = adaptive.TDS_FRACTION_UNKNOWN * 10.0 * (1300.0 / aim - 1) * 1000 - 1800.0
    assert second.ms == min(round(need_ml / 30.0 * 1000), adaptive.MAX_DOSE_S * 1000)
    assert predicted > aim
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
    assert total_ml <= adaptive.TDS_FRACTION_UNKNOWN * 10_000.0 * (1300 / 800 - 1) + 1
    assert value > 800.0


async def test_tds_waits_for_a_steady_reading_then_learns_and_trims() -> None:
    c = AdaptiveController()
    (dose,) = (await first(c, "tds", 300.0, 700.0)).doses
    ml = dose.ms / 1000 * 12.0
    expected = (300 * 10 + 10 * ml) / (10 + ml / 1000) - 300
    # The probe sees the dose arrive; the change over three windows is still large.
    for value in (330.0, 400.0, 450.0, 480.0, 485.0, 486.0, 486.5):
        assert (await c.decide(ctx("tds", value, 700.0))).doses == (), value
    # Steady at ~486: the dose did less than the mass balance promised.
    trim = await c.decide(ctx("tds", 486.3, 700.0))
    (t,) = trim.doses
    factor = 186.3 / expected
    assert factor < 0.95
    aim = 700.0 * (1 - adaptive.TDS_AIM_PCT / 100)
    need_ml = 1000.0 * 10.0 * (aim - 486.3) / (10_000 - aim)
    assert t.ms == pytest.approx(adaptive.TDS_FRACTION * need_ml / factor / 12.0 * 1000, rel=0.01)


async def test_a_confirmed_pump_gets_the_larger_fraction() -> None:
    c = AdaptiveController()
    c.restore({"version": 2, "tds_factor": {"nutrient": 1.0}})
    (dose,) = (await first(c, "tds", 300.0, 700.0)).doses
    assert dose.ms == pytest.approx(
        _nutrient_ms(300.0, 700.0) * adaptive.TDS_FRACTION / adaptive.TDS_FRACTION_UNKNOWN, abs=1
    )


async def test_a_config_far_off_still_lands_short_of_the_setpoint() -> None:
    # The tank reacts 1.8 times more than its config says (volume, stock and flow each
    # ~20 % off the same way): the first dose still stays below the setpoint.
    (dose,) = (await first(AdaptiveController(), "tds", 300.0, 700.0)).doses
    ml = 1.8 * dose.ms / 1000 * 12.0
    assert (300 * 10 + 10_000 * ml / 1000) / (10 + ml / 1000) < 700.0


async def test_settling_is_judged_against_the_time_since_the_dose() -> None:
    # A slow tank: after a long mixing wait the windows change little, but the change over
    # the last third of the time since the dose shows the tail is still arriving.
    c = AdaptiveController()
    (dose,) = (await c.decide(ctx("tds", 300.0, 700.0, first=True, now=0.0))).doses
    end = dose.ms / 1000.0
    tau, gain = 300.0, 180.0  # a first-order tail
    t = end + 600.0
    for _ in range(120):
        value = 300.0 + gain * (1 - math.exp(-(t - end) / tau))
        d = await c.decide(ctx("tds", value, 700.0, now=t))
        if d.doses:
            break
        t += 10.0
    # Not before ~98 % of the response had arrived (about 4 time constants), but not
    # much later either.
    assert d.doses and 3.5 * tau <= t - end <= 5 * tau


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


async def test_ph_doses_what_the_envelope_allows() -> None:
    c = AdaptiveController()
    d = await c.decide(ctx("ph", 5.0, 6.0, first=True, max_ml={"ph_up": 2.0, "ph_down": 0.0}))
    (dose,) = d.doses
    assert dose.actuator == "ph_up" and dose.ms == math.floor(2.0 / 1.58 * 1000)
    down = await c.decide(ctx("ph", 7.0, 6.0, max_ml={"ph_up": 0.0, "ph_down": 0.0}))
    assert down.doses == ()  # still mixing in: the envelope allows nothing
    capped = await c.decide(ctx("ph", 5.0, 6.0, max_ml={"ph_up": 500.0, "ph_down": 0.0}))
    assert capped.doses[0].ms == adaptive.MAX_DOSE_S * 1000


async def test_ph_without_an_envelope_uses_the_bound_of_the_configured_plant() -> None:
    (dose,) = (await first(AdaptiveController(), "ph", 5.0, 6.0)).doses
    allowed = PhEnvelope(PLANT).per_l_to_move("ph_up", 5.0, 0.3, 6.0) * 10.0
    assert dose.ms == math.floor(allowed / 1.58 * 1000)


async def test_learned_state_survives_a_round_trip_and_bad_states_are_refused() -> None:
    c = AdaptiveController()
    assert c.learned() == {}
    c.restore({"version": 2, "tds_factor": {"nutrient": 1.2, "refill": 0.9}})
    back = json.loads(json.dumps(c.learned()))
    fresh = AdaptiveController()
    fresh.restore(back)
    assert fresh.learned() == c.learned()
    # A version-1 snapshot (it held a pH model too) gives its pump factors.
    old = AdaptiveController()
    old.restore({"version": 1, "tds_factor": {"nutrient": 1.1}, "ph_gains": {}, "ph_spans": {}})
    assert old.learned()["tds_factor"] == {"nutrient": 1.1}
    bad: list[Any] = [
        {},
        {"version": 3, "tds_factor": {}},
        {"version": 2, "tds_factor": {"nutrient": math.nan}},
        {"version": 2, "tds_factor": {"nutrient": 9.0}},
        {"version": 2, "tds_factor": []},
    ]
    for state in bad:
        with pytest.raises(ControllerError):
            AdaptiveController().restore(state)
