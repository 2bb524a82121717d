"""The rule-based fallback (docs/references.md, "Control documentation") and the registry."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rules.controller import (
    ControllerError,
    ControllerOptions,
    Decision,
    DecisionContext,
    Dose,
    PlantConstants,
    UnknownControllerError,
    create,
    names,
)
from rules.envelope import STEEPEST_GAIN
from rules.rb import RbController, RbSeconds, RbThresholds, ph_gain_s, rb_seconds

DOC = 1e-9


def doc_band(ph: float, ppm: float, wl: float | None) -> RbSeconds:
    """The document's formulas, verbatim (docs/references.md, "Control documentation")."""
    ph_up = min(50, (5.5 - ph) * 50) if ph < 5.5 else 0.0
    ph_down = min(50, (ph - 6.5) * 50) if ph > 6.5 else 0.0
    nutrient = min(63, (560 - ppm) / 100 * 63) if ppm < 560 else 0.0
    refill = min(120, 10000 * (ppm / 840 - 1) / 1.58) if ppm > 840 else 0.0
    if wl is not None and wl < 1.2:
        refill = max(refill, 60.0)
    return RbSeconds(ph_up, ph_down, nutrient, refill)


@pytest.mark.parametrize(
    ("ph", "ppm", "wl"),
    [
        (6.0, 700, 1.8),
        (5.4, 700, 1.8),
        (4.0, 700, 1.8),
        (6.9, 700, 1.8),
        (9.0, 700, None),
        (6.0, 500, 1.8),
        (6.0, 100, 1.8),
        (6.0, 850, 1.8),
        (6.0, 1000, 1.8),
        (6.0, 700, 1.1),
        (6.0, 845, 1.0),
        (5.5, 560, 1.2),
        (6.5, 840, 2.5),
    ],
)
def test_band_variant_matches_document_formulas(ph: float, ppm: float, wl: float | None) -> None:
    got = rb_seconds(ph, ppm, wl)
    want = doc_band(ph, ppm, wl)
    assert got.ph_up == pytest.approx(want.ph_up, abs=DOC)
    assert got.ph_down == pytest.approx(want.ph_down, abs=DOC)
    assert got.refill == pytest.approx(want.refill, abs=DOC)
    # Mass balance gives 100 ml / 1.58 ml/s = 63.29 s per 100 ppm; the document rounds to 63.
    assert got.nutrient == pytest.approx(want.nutrient, rel=0.005, abs=DOC)


def test_mass_balance_is_exact_below_the_cap() -> None:
    # 60 ppm short: 60·10 L/10000 ppm = 60 ml; 60 / 1.58 = 37.97 s.
    assert rb_seconds(6.0, 500, None).nutrient == pytest.approx(60.0 / 1.58)


def test_document_dilution_example_is_capped() -> None:
    # Ci = 1000, Cf = 840: 1904.8 ml -> 1205.6 s, capped at 120 s.
    assert 10000 * (1000 / 840 - 1) / 1.58 > 120
    assert rb_seconds(6.0, 1000, None).refill == 120.0
    assert rb_seconds(6.0, 850, None).refill == pytest.approx(10000 * (850 / 840 - 1) / 1.58)


def test_target_variant_reproduces_worked_example() -> None:
    s = rb_seconds(5.3, 700, None, variant="target")
    assert s.ph_up == pytest.approx(35.0)
    assert rb_seconds(5.3, 700, None).ph_up == pytest.approx(10.0)
    # Inside the band the target variant does nothing either: RB acts only outside.
    assert rb_seconds(5.8, 650, 1.8, variant="target") == RbSeconds(0.0, 0.0, 0.0, 0.0)
    # ppm 900 above the band: diluting to 700 needs 2857 ml -> capped.
    assert rb_seconds(6.0, 900, None, variant="target").refill == 120.0
    # 155 ppm short of 700: 155 ml -> 98 s, capped at 63 s; 5 ppm short of 560 in band mode.
    assert rb_seconds(6.0, 555, None, variant="target").nutrient == 63.0
    assert rb_seconds(6.0, 555, None).nutrient == pytest.approx(5.0 / 1.58)


def test_caps() -> None:
    s = rb_seconds(2.0, 0.0, None)
    assert (s.ph_up, s.nutrient) == (50.0, 63.0)
    assert rb_seconds(12.0, 5000.0, None).ph_down == 50.0
    assert rb_seconds(12.0, 5000.0, None).refill == 120.0


def test_low_level_refill_is_a_floor_not_an_override() -> None:
    assert rb_seconds(6.0, 700, 0.5).refill == 60.0
    assert rb_seconds(6.0, 1000, 0.5).refill == 120.0
    assert rb_seconds(6.0, 700, 1.2).refill == 0.0


def test_plant_changes_doses_consistently() -> None:
    base = rb_seconds(6.0, 520, None)
    big = rb_seconds(6.0, 520, None, plant=PlantConstants(tank_volume_l=20.0))
    fast = rb_seconds(
        6.0, 520, None,
        plant=PlantConstants(flow_ml_s={"nutrient": 3.16, "refill": 3.16}),
    )
    strong = rb_seconds(6.0, 520, None, plant=PlantConstants(stock_ppm=20000.0))
    assert big.nutrient == pytest.approx(2 * base.nutrient)
    assert fast.nutrient == pytest.approx(base.nutrient / 2)
    assert strong.nutrient == pytest.approx(base.nutrient / 2)
    dil = rb_seconds(6.0, 842, None)
    dil_big = rb_seconds(6.0, 842, None, plant=PlantConstants(tank_volume_l=5.0))
    assert dil_big.refill == pytest.approx(dil.refill / 2)


def test_bad_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="variant"):
        rb_seconds(6.0, 700, None, variant="edge")  # type: ignore[arg-type]
    with pytest.raises(ControllerError, match="rb_variant"):
        create("rb", ControllerOptions(rb_variant="edge"))


def ctx(loop: str, setpoint: float, measured: float, band: tuple[float, float],
        **values: float) -> DecisionContext:
    return DecisionContext(
        loop=loop,  # type: ignore[arg-type]
        setpoint=setpoint,
        measured=measured,
        previous_error=None,
        values=values,
        plant=PlantConstants(),
        band=band,
    )


async def test_decide_tds_loop() -> None:
    rb = create("rb")
    assert rb.name == "rb"
    d = await rb.decide(ctx("tds", 700, 500, (560, 840), water_level=1.0, ph=4.0))
    assert d == Decision(
        doses=(Dose("nutrient", 255, round(60 / 1.58 * 1000)), Dose("refill", 255, 60000)),
        controller="rb",
    )
    d = await rb.decide(ctx("tds", 700, 850, (560, 840)))
    assert d.doses == (Dose("refill", 255, round(10000 * (850 / 840 - 1) / 1.58 * 1000)),)
    d = await rb.decide(ctx("tds", 700, 700, (560, 840), ph=4.0))
    assert d.doses == ()
    assert d.note == "inside band"
    rb.close()


async def test_documented_variant_keeps_the_documents_ph_gain() -> None:
    documented = create("rb", ControllerOptions(rb_variant="documented"))
    c = ctx("ph", 6.0, 5.3, (5.5, 6.5), water_level=0.5)
    assert (await documented.decide(c)).doses == (Dose("ph_up", 255, 10000),)
    # A node with setpoint 6.5 and band 6.35..6.65: pH 7.0 -> (7.0 - 6.65)·50 s down.
    c = ctx("ph", 6.5, 7.0, (6.35, 6.65))
    assert (await documented.decide(c)).doses == (Dose("ph_down", 255, 17500),)


async def test_ph_gain_is_derived_from_the_measured_strength_band_or_target() -> None:
    plant = PlantConstants(
        tank_volume_l=20.0,
        flow_ml_s={"ph_up": 2.0, "ph_down": 1.0},
        ph_ml_per_l_per_unit={"ph_up": 0.5, "ph_down": 0.2},
    )
    assert ph_gain_s(plant) == {"ph_up": 0.5 * 20 / 2.0, "ph_down": 0.2 * 20 / 1.0}
    band = create("rb")
    target = create("rb", ControllerOptions(rb_variant="target"))
    c = replace(ctx("ph", 6.0, 5.3, (5.5, 6.5)), plant=plant)
    assert (await band.decide(c)).doses == (Dose("ph_up", 255, round(0.2 * 5.0 * 1000)),)
    assert (await target.decide(c)).doses == (Dose("ph_up", 255, round(0.7 * 5.0 * 1000)),)
    c = replace(ctx("ph", 6.0, 6.9, (5.5, 6.5)), plant=plant)
    assert (await band.decide(c)).doses == (Dose("ph_down", 255, round(0.4 * 4.0 * 1000)),)


async def test_an_unmeasured_solution_gets_the_steepest_plausible_gain() -> None:
    # The document's 50 s per pH unit would dose 79 ml of a 1 mol/L acid into 10 L here.
    gains = ph_gain_s(PlantConstants())
    assert gains["ph_down"] == pytest.approx(10.0 / STEEPEST_GAIN / 1.58)
    d = await create("rb").decide(ctx("ph", 6.0, 7.2, (5.85, 6.15)))
    (dose,) = d.doses
    assert dose.ms < 50  # ms, not tens of seconds


def test_controller_thresholds_apply() -> None:
    rb = RbController(
        ControllerOptions(rb_variant="documented"),
        thresholds=RbThresholds(ph_gain_s_per_unit=10, cap_ph_s=3),
    )
    assert rb.seconds(ctx("ph", 6.0, 5.0, (5.5, 6.5))).ph_up == 3.0


def test_registry() -> None:
    assert "rb" in names()
    with pytest.raises(UnknownControllerError, match="unknown controller 'nope'"):
        create("nope")


def test_dose_and_plant_validation() -> None:
    with pytest.raises(ValueError, match="duty"):
        Dose("nutrient", 256, 10)
    with pytest.raises(ValueError, match="ms"):
        Dose("nutrient", 255, -1)
    with pytest.raises(ValueError, match="tank_volume_l"):
        PlantConstants(tank_volume_l=0)
    p = PlantConstants(flow_ml_s={"nutrient": 2.0})
    with pytest.raises(TypeError):
        p.flow_ml_s["nutrient"] = 3.0  # type: ignore[index]
