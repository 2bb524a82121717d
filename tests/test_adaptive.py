"""The adaptive controller: mass balance, waiting for mixing, learning from observed effects."""

from __future__ import annotations

import pytest

import rules.adaptive as adaptive
from rules.adaptive import AdaptiveController
from rules.controller import Decision, DecisionContext, PlantConstants, create

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
) -> DecisionContext:
    values = {} if level is None else {"water_level": level}
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


async def steady(c: AdaptiveController, loop: str, value: float, sp: float) -> Decision:
    """Two decisions at the same value, the first of a new loop: the second may dose."""
    first = await c.decide(ctx(loop, value, sp, first=True))
    assert first.doses == ()
    return await c.decide(ctx(loop, value, sp))


def test_registered() -> None:
    controller = create("adaptive")
    assert controller.name == "adaptive"
    controller.close()


async def test_tds_up_is_mass_balance_fraction() -> None:
    c = AdaptiveController()
    d = await steady(c, "tds", 300.0, 700.0)
    (dose,) = d.doses
    assert dose.actuator == "nutrient"
    need_ml = 10_000.0 * (700 - 300) / (10_000 - 700)  # 10 L, ml
    expected_ms = adaptive.TDS_FRACTION * need_ml / 12.0 * 1000.0
    assert dose.ms == pytest.approx(expected_ms, abs=1)
    assert dose.duty == 255
    assert d.controller == "adaptive"


async def test_tds_uses_measured_water_level() -> None:
    c = AdaptiveController()
    await c.decide(ctx("tds", 300.0, 700.0, first=True, level=5.0))
    (dose,) = (await c.decide(ctx("tds", 300.0, 700.0, level=5.0))).doses
    need_ml = 5_000.0 * 400 / 9_300
    assert dose.ms == pytest.approx(adaptive.TDS_FRACTION * need_ml / 12.0 * 1000.0, abs=1)


async def test_tds_down_dilutes_but_tolerates_a_small_excess() -> None:
    c = AdaptiveController()
    d = await steady(c, "tds", 1300.0, 800.0)
    (dose,) = d.doses
    assert dose.actuator == "refill"
    need_ml = 10_000.0 * (1300 / 800 - 1)
    assert dose.ms == pytest.approx(
        min(adaptive.TDS_FRACTION * need_ml / 30.0, adaptive.MAX_DOSE_S) * 1000.0, abs=1
    )
    c2 = AdaptiveController()
    assert (await steady(c2, "tds", 810.0, 800.0)).doses == ()  # +1.25 %: no water
    assert (await steady(c2, "tds", 790.0, 800.0)).doses != ()  # -1.25 %: stock


async def test_waits_while_reading_moves_then_learns_and_trims() -> None:
    c = AdaptiveController()
    first = await steady(c, "tds", 300.0, 700.0)
    assert first.doses
    # The probe sees the dose arrive; no geometric decay yet (400, 420, 520), then a
    # decay whose limit lies past the setpoint (600 + 320): wait, never dilute on that.
    for value in (400.0, 420.0, 520.0, 600.0, 600.5):
        assert (await c.decide(ctx("tds", value, 700.0))).doses == (), value
    # Steady at ~600: the dose did ~ 80 % of what the mass balance promised.
    trim = await c.decide(ctx("tds", 600.3, 700.0))
    (dose,) = trim.doses
    # The learned factor (observed / expected < 1) makes the trim bigger than mass balance.
    plain_ms = adaptive.TDS_FRACTION * 10_000.0 * 99.7 / 9_300 / 12.0 * 1000.0
    assert dose.ms > plain_ms * 1.1


async def test_extrapolates_a_first_order_response() -> None:
    c = AdaptiveController()
    await steady(c, "tds", 300.0, 700.0)
    # Window averages approaching 660 geometrically (ratio 0.5): 660 - 80, -40, -20.
    assert (await c.decide(ctx("tds", 580.0, 700.0))).doses == ()
    assert (await c.decide(ctx("tds", 620.0, 700.0))).doses == ()
    d = await c.decide(ctx("tds", 640.0, 700.0))
    (dose,) = d.doses
    # Doses for 700 - 660 = 40 ppm, and cautiously.
    ms_for_40 = adaptive.TDS_FRACTION * 10_000.0 * 40 / 9_300 / 12.0 * 1000.0
    assert dose.ms == pytest.approx(ms_for_40 * adaptive.PREDICTED_FRACTION, rel=0.02)


async def test_inside_dead_band_nothing() -> None:
    c = AdaptiveController()
    assert (await steady(c, "tds", 695.0, 700.0)).doses == ()
    c2 = AdaptiveController()
    assert (await steady(c2, "ph", 6.01, 6.0)).doses == ()


async def test_ph_first_dose_uses_the_steep_prior_then_learns() -> None:
    c = AdaptiveController()
    d = await steady(c, "ph", 6.0, 5.0)
    (dose,) = d.doses
    assert dose.actuator == "ph_down"
    prior = adaptive.PH_PRIOR_PER_ML_L / 10.0  # pH per ml in 10 L
    ml = adaptive.PH_FRACTION_ONE * 1.0 / prior
    assert dose.ms == pytest.approx(ml / 1.58 * 1000.0, abs=1)
    # The tank is ten times less sensitive than the prior: it moved 0.04 of 0.4 expected.
    for value in (5.97, 5.96, 5.96):
        d = await c.decide(ctx("ph", value, 5.0))
    (second,) = d.doses
    learned_gain = 0.04 / (dose.ms / 1000.0 * 1.58)
    expected_ml = adaptive.PH_FRACTION_ONE * 0.96 / learned_gain
    assert second.ms == min(round(expected_ml / 1.58 * 1000.0), adaptive.MAX_DOSE_S * 1000)
    assert second.ms > 10 * dose.ms


async def test_dose_without_effect_teaches_nothing() -> None:
    c = AdaptiveController()
    (dose,) = (await steady(c, "ph", 6.0, 5.0)).doses
    for _ in range(3):  # refused by safety: the reading never moved
        d = await c.decide(ctx("ph", 6.0, 5.0))
    (again,) = d.doses
    assert again.ms == dose.ms


async def test_new_cycle_forgets_the_dose_in_flight() -> None:
    c = AdaptiveController()
    await steady(c, "tds", 300.0, 700.0)
    # A new cycle starts (previous_error None): no waiting for the old dose.
    d = await steady(c, "tds", 650.0, 700.0)
    assert d.doses and d.doses[0].actuator == "nutrient"


async def test_long_dose_is_capped() -> None:
    c = AdaptiveController()
    (dose,) = (await steady(c, "tds", 100.0, 2000.0)).doses
    assert dose.ms == adaptive.MAX_DOSE_S * 1000
