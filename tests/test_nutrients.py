"""Multi-part nutrients: the split, the cycle dosing parts one after another, the guard."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules.adaptive import AdaptiveController
from rules.controller import Dose, PlantConstants
from rules.cycle import ControlCycle
from rules.nutrients import Feed, shares, split
from rules.safety import SafetyGuard, SafetyLimits, SafetyRefusal, SensorWatch
from sim.plant import PlantParams, Reservoir
from tests.test_cycle import FakeController, settings

PARTS = ("nutrient_a", "nutrient_b", "nutrient_c")
ratios = st.dictionaries(
    st.sampled_from(PARTS), st.floats(min_value=0.01, max_value=100.0), min_size=1
)


@given(st.floats(min_value=0.0, max_value=1e4), ratios)
def test_split_keeps_the_total_and_the_ratio(ml: float, ratio: dict[str, float]) -> None:
    parts = split(ml, ratio)
    assert list(parts) == [p for p in PARTS if p in ratio]  # A, then B, then C
    assert math.isclose(sum(parts.values()), ml, rel_tol=1e-9, abs_tol=1e-12)
    first = next(iter(ratio.keys() & parts.keys()))
    for part, value in parts.items():
        assert math.isclose(value * ratio[first], parts[first] * ratio[part], rel_tol=1e-9,
                            abs_tol=1e-9)


@given(ratios, st.dictionaries(st.sampled_from(PARTS), st.floats(0.1, 50.0), min_size=3))
def test_the_parts_run_time_adds_up_to_the_controllers(ratio: dict[str, float],
                                                      flows: dict[str, float]) -> None:
    feed = Feed.of(PlantConstants(flow_ml_s=flows, nutrient_ratio=ratio))
    assert feed is not None
    ml = 100.0
    doses = feed.doses(ml)
    run_s = sum(d.ms for d in doses) / 1000.0
    # What the controllers were told (ml / feed.flow) is what the parts take, to rounding.
    assert math.isclose(run_s, ml / feed.flow, rel_tol=0.01, abs_tol=0.002 * len(doses))
    delivered = {d.actuator: d.ms / 1000.0 * flows[d.actuator] for d in doses}
    for part, share in shares(ratio).items():
        assert math.isclose(delivered[part], ml * share, rel_tol=0.01, abs_tol=0.05)


def test_a_single_pump_has_no_feed_and_a_ratio_needs_flows() -> None:
    assert Feed.of(PlantConstants()) is None
    with pytest.raises(ValueError, match="no flow for nutrient_b"):
        Feed.of(PlantConstants(flow_ml_s={"nutrient_a": 1.0}, nutrient_ratio={
            "nutrient_a": 1, "nutrient_b": 1}))
    with pytest.raises(ValueError, match="not a nutrient part"):
        PlantConstants(nutrient_ratio={"nutrient": 1.0})


def test_recalibrating_a_part_changes_the_feed_s_effect_by_its_share() -> None:
    feed = Feed.of(PlantConstants(flow_ml_s={"nutrient_a": 2.0, "nutrient_b": 2.0},
                                  nutrient_ratio={"nutrient_a": 1, "nutrient_b": 3}))
    assert feed is not None
    # A really pumps 2.5 ml/s: a decision delivered 1/4·1.25 + 3/4 = 1.0625 of what it should.
    assert feed.effect_of_recalibration("nutrient_a", 2.0, 2.5) == pytest.approx(1 / 1.0625)
    one = Feed.of(PlantConstants(flow_ml_s={"nutrient_a": 2.0}, nutrient_ratio={"nutrient_a": 1}))
    assert one is not None and one.effect_of_recalibration("nutrient_a", 2.0, 2.5) == 0.8


def test_the_guard_never_runs_two_nutrient_pumps_at_once() -> None:
    watch = SensorWatch()
    watch.update(0.0, {"tds": 500.0, "ph": 6.0})
    guard = SafetyGuard(SafetyLimits(), actuators=(*PARTS, "ph_up", "ph_down"), watch=watch)
    guard.record(guard.permit(Dose("nutrient_a", 255, 5000), 0.0, strict=True).dose, 0.0)
    with pytest.raises(SafetyRefusal) as info:
        guard.permit(Dose("nutrient_b", 255, 1000), 1.0, strict=False)
    assert info.value.reason == "opposite_running" and "nutrient_a" in info.value.detail
    guard.permit(Dose("ph_up", 255, 1000), 1.0, strict=True)  # another group: allowed
    guard.permit(Dose("nutrient_b", 255, 1000), 5.0, strict=True)  # A has ended
    # Each part has its own hour budget.
    assert guard.used_ms("nutrient_a", 10.0) == 5000 and guard.used_ms("nutrient_b", 10.0) == 0


AB = PlantConstants(
    flow_ml_s={"nutrient_a": 2.0, "nutrient_b": 1.0, "refill": 10.0, "ph_up": 1.0,
               "ph_down": 1.0},
    nutrient_ratio={"nutrient_a": 1, "nutrient_b": 1},
)
NODE = ("nutrient_a", "nutrient_b", "refill", "ph_up", "ph_down")


async def test_the_cycle_doses_the_parts_one_after_another_in_ratio() -> None:
    low = {"tds": 500.0, "ph": 6.0}
    controller = FakeController(lambda ctx: (Dose("nutrient", 255, 6000),))
    cycle = ControlCycle(settings(part_pause_s=20.0), controller, AB, actuators=NODE)
    # Controllers see one nutrient pump of the parts' combined flow: 1/(0.5/2 + 0.5/1).
    assert cycle.plant.flow("nutrient") == pytest.approx(4 / 3)
    cycle.start(0.0)
    runs: list[tuple[float, Dose]] = []
    for t in range(0, 60):
        for dose in await cycle.tick(float(t), low):
            runs.append((float(t), dose))
            cycle.ran(dose)
    # 6 s at 4/3 ml/s is 8 ml of feed: 4 ml of A (2 s), then 20 s later 4 ml of B (4 s).
    assert [(t, d.actuator, d.ms) for t, d in runs] == [
        (10.0, "nutrient_a", 2000), (32.0, "nutrient_b", 4000)]
    assert controller.contexts[0].plant.flow("nutrient") == pytest.approx(4 / 3)


async def test_a_shortened_part_shortens_the_next_and_a_refused_one_drops_it() -> None:
    low = {"tds": 500.0, "ph": 6.0}
    cycle = ControlCycle(settings(part_pause_s=5.0), FakeController(
        lambda ctx: (Dose("nutrient", 255, 6000),)), AB, actuators=NODE)
    cycle.start(0.0)
    first = await cycle.tick(10.0, low)
    assert [d.actuator for d in first] == ["nutrient_a"]
    cycle.ran(Dose("nutrient_a", 255, 1000))  # the guard allowed half
    second = []
    for t in range(11, 30):
        second += await cycle.tick(float(t), low)
    assert second == [Dose("nutrient_b", 255, 2000)]
    cycle.abort(30.0)
    cycle.start(100.0)
    first = await cycle.tick(110.0, low)
    cycle.refused(first[0])
    later = []
    for t in range(111, 140):
        later += await cycle.tick(float(t), low)
    assert later == [], "B alone would spoil the ratio"


async def test_a_node_without_the_ratio_s_parts_gets_no_nutrient(caplog: pytest.LogCaptureFixture
                                                                ) -> None:
    low = {"tds": 500.0, "ph": 6.0}
    cycle = ControlCycle(settings(), FakeController(lambda ctx: (Dose("nutrient", 255, 6000),)),
                         AB, actuators=("nutrient_a", "refill"))
    cycle.start(0.0)
    assert await cycle.tick(10.0, low) == []
    assert "did not announce nutrient_b" in caplog.text
    parts_no_ratio = ControlCycle(settings(), FakeController(
        lambda ctx: (Dose("nutrient", 255, 6000),)), PlantConstants(), actuators=NODE)
    parts_no_ratio.start(0.0)
    assert await parts_no_ratio.tick(10.0, low) == []
    assert "plant.nutrient_ratio is not set" in caplog.text


def test_the_simulated_parts_have_their_own_chemistry() -> None:
    """A wrong ratio shows: the same ml of feed in 1:1 and 1:3 gives another TDS and pH."""

    def dose(ml_a: float, ml_b: float) -> dict[str, float]:
        tank = Reservoir.from_state(tds=300, ph=6.0, params=PlantParams(
            dead_time_s=0.0, lag_s=1.0, uptake_per_h=0.0, evaporation_l_per_h=0.0,
            noise_tds=0.0, noise_ph=0.0))
        for part, ml in (("nutrient_a", ml_a), ("nutrient_b", ml_b)):
            tank.set_pump(part, 255)
            tank.step(ml / 1.58)
            tank.set_pump(part, 0)
        tank.step(60.0)
        return {**tank.truth(), **{k: v for k, v in tank.parts_mg().items() if v}}

    right, wrong = dose(20.0, 20.0), dose(10.0, 30.0)
    assert right["nutrient_a"] / right["nutrient_b"] == pytest.approx(12 / 8, rel=0.01)
    assert wrong["nutrient_a"] / wrong["nutrient_b"] == pytest.approx(12 / 24, rel=0.01)
    assert wrong["tds"] < right["tds"] - 3  # B is the weaker part: 36 ppm instead of 40
    assert wrong["ph"] < right["ph"] - 0.01  # and the acidic one


def test_adaptive_keeps_what_a_pump_calibration_does_not_explain() -> None:
    controller = AdaptiveController()
    controller.restore({"version": 2, "tds_factor": {"nutrient": 0.75, "refill": 1.1}})
    controller.recalibrated("nutrient", 1.0)  # the same flow again
    assert controller.learned()["tds_factor"]["nutrient"] == pytest.approx(0.75)
    controller.recalibrated("nutrient", 4 / 3)  # the pump really gives 0.75 of its label
    assert controller.learned()["tds_factor"]["nutrient"] == pytest.approx(1.0)
    controller.recalibrated("refill", None)
    assert "refill" not in controller.learned()["tds_factor"]

