"""The pH safety envelope: its bound, its rules, and a property over random tanks and controllers."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules import envelope as env
from rules.controller import Decision, DecisionContext, Dose, PlantConstants
from rules.envelope import Anchor, EnvelopeError, PhEnvelope
from sim.plant import _required_base
from sim.rig import Rig
from sim.tanks import draw

PLANT = PlantConstants(tank_volume_l=10.0, flow_ml_s={"ph_up": 1.0, "ph_down": 1.0})


def steady(e: PhEnvelope, ph: float, *, setpoint: float = 6.0, n: int = 2) -> None:
    for _ in range(n):
        e.observe(ph, setpoint=setpoint, tolerance=0.15)


def test_the_law_holds_for_every_mixture_of_weak_acids_in_the_simulator() -> None:
    # G(x) <= G(y) * 10^|x - y| for the simulator's carbonate + phosphate + water chemistry,
    # over buffers and alkalinities far outside the sweep's ranges.
    for carb in (0.0, 1e-4, 1e-3, 1e-2):
        for phos in (0.0, 1e-5, 1e-3, 3e-2):
            xs = [3.0 + 0.05 * i for i in range(121)]
            gains = [1.0 / _required_base(x, carb, phos)[1] for x in xs]
            for i, gi in enumerate(gains):
                for j in range(i + 1, len(gains), 7):
                    assert gains[j] <= gi * 10 ** (xs[j] - xs[i]) * (1 + 1e-9)
                    assert gi <= gains[j] * 10 ** (xs[j] - xs[i]) * (1 + 1e-9)


def test_unknown_tank_gets_the_steepest_plausible_bound() -> None:
    e = PhEnvelope(PLANT)
    assert e.gain_bound("ph_up", 5.0, 6.0) == env.STEEPEST_GAIN
    steady(e, 5.0)
    # Half of the 1.0 error is capped at 0.3 pH, on the steepest curve.
    assert e.limit("ph_up", 6.0) == pytest.approx(0.3 / env.STEEPEST_GAIN)
    assert e.limit("ph_down", 6.0) == 0.0  # away from the setpoint: never


def test_configured_strength_bounds_with_margin_and_the_ten_per_ph_law() -> None:
    plant = replace(PLANT, ph_ml_per_l_per_unit={"ph_up": 0.5})
    e = PhEnvelope(plant)
    at_setpoint = env.CONFIG_MARGIN / 0.5
    assert e.gain_bound("ph_up", 6.0, 6.0) == pytest.approx(at_setpoint)
    assert e.gain_bound("ph_up", 5.0, 6.0) == pytest.approx(at_setpoint * 10)
    assert e.gain_bound("ph_down", 6.0, 6.0) == env.STEEPEST_GAIN  # not configured


def test_no_dose_until_two_windows_agree_and_none_while_one_is_mixing_in() -> None:
    e = PhEnvelope(PLANT)
    e.observe(5.0, setpoint=6.0, tolerance=0.15)
    assert e.limit("ph_up", 6.0) == 0.0  # one window is no evidence of rest
    e.observe(5.1, setpoint=6.0, tolerance=0.15)
    assert e.limit("ph_up", 6.0) == 0.0  # still moving
    e.observe(5.101, setpoint=6.0, tolerance=0.15)
    assert e.limit("ph_up", 6.0) > 0.0
    e.dosed("ph_up", 0.001, setpoint=6.0)
    assert e.waiting and e.limit("ph_up", 6.0) == 0.0


def test_movement_towards_the_setpoint_shrinks_the_remaining_error() -> None:
    still, moving = PhEnvelope(PLANT), PhEnvelope(PLANT)
    steady(still, 5.80)
    moving.observe(5.79, setpoint=6.0, tolerance=0.15)
    moving.observe(5.80, setpoint=6.0, tolerance=0.15)  # +0.01 per window, under the threshold
    assert moving.limit("ph_up", 6.0) < still.limit("ph_up", 6.0)


def test_a_measured_response_tightens_the_bound_and_an_invisible_one_grows_slowly() -> None:
    e = PhEnvelope(PLANT)
    steady(e, 5.0)
    first = e.limit("ph_up", 6.0)
    e.dosed("ph_up", first, setpoint=6.0)
    steady(e, 5.005)  # nothing visible
    assert not e.waiting
    second = e.limit("ph_up", 6.0)
    assert first < second <= env.GROWTH * first
    e.dosed("ph_up", second, setpoint=6.0)
    steady(e, 5.205)  # 0.2 pH for `second`
    anchor = e.learned()["anchors"]["ph_up"][-1]
    assert anchor[0] == pytest.approx(5.105) and anchor[1] == pytest.approx(0.2 / second)
    assert anchor[3] is True
    # The next dose moves at most half of the remaining 0.795 (capped at 0.3) by the bound.
    third = e.limit("ph_up", 6.0)
    assert e.move_of("ph_up", 5.205, third, 6.0) == pytest.approx(0.3, abs=0.01)


def test_a_response_larger_than_plausible_shrinks_every_later_dose(
    caplog: pytest.LogCaptureFixture,
) -> None:
    e = PhEnvelope(replace(PLANT, ph_ml_per_l_per_unit={"ph_up": 0.5}), name="tank-a")
    steady(e, 5.9)
    before = e.limit("ph_up", 6.2)
    e.dosed("ph_up", before, setpoint=6.2)
    with caplog.at_level(logging.WARNING):
        steady(e, 6.25, setpoint=6.2)  # predicted at most 0.15, moved 0.35
    assert e.distrust > 2.0
    assert any("steeper than assumed" in r.message and "tank-a" in r.message
               for r in caplog.records)


def test_two_overshoots_in_a_row_lock_until_acknowledged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    e = PhEnvelope(PLANT)
    steady(e, 5.0)
    with caplog.at_level(logging.WARNING):
        e.dosed("ph_up", e.limit("ph_up", 6.0), setpoint=6.0)
        steady(e, 6.4)  # beyond the band on the far side: one overshoot
        assert e.overshoots == 1 and e.locked is None
        e.dosed("ph_down", 1e-4, setpoint=6.0)  # sized by someone else: the limit was 0
        steady(e, 5.7)
    assert e.overshoots == 2
    assert e.locked is not None and "acknowledge" in e.locked
    assert e.limit("ph_up", 6.0) == e.limit("ph_down", 6.0) == 0.0
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    state = e.learned()
    again = PhEnvelope(PLANT)
    again.restore(state)  # a restart keeps the lock
    assert again.locked == e.locked
    assert again.acknowledge() is True
    assert again.locked is None and again.distrust == 1.0 and again.learned()["anchors"] == {}
    steady(again, 5.7)
    assert again.limit("ph_up", 6.0) > 0.0


def test_an_overshoot_then_a_good_dose_does_not_lock() -> None:
    e = PhEnvelope(PLANT)
    steady(e, 5.0)
    e.dosed("ph_up", 0.001, setpoint=6.0)
    steady(e, 6.4)
    e.dosed("ph_down", 0.001, setpoint=6.0)
    steady(e, 6.1)
    assert e.overshoots == 0 and e.locked is None


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"version": 99},
        {"version": 1, "anchors": {"ph_up": [[6.0, -1.0, 0.0, True]]}, "probe": {},
         "distrust": 1.0, "overshoots": 0, "locked": None},
        {"version": 1, "anchors": {"heater": [[6.0, 1.0, 0.0, True]]}, "probe": {},
         "distrust": 1.0, "overshoots": 0, "locked": None},
        {"version": 1, "anchors": {}, "probe": {}, "distrust": math.nan, "overshoots": 0,
         "locked": None},
        {"version": 1, "anchors": {}, "probe": {}, "distrust": 1.0, "overshoots": 0,
         "locked": 5},
    ],
)
def test_unusable_states_are_refused(state: dict[str, object]) -> None:
    with pytest.raises(EnvelopeError):
        PhEnvelope(PLANT).restore(state)


def test_curved_bound_never_exceeds_the_law() -> None:
    older, newer = Anchor(5.0, 2.0, 0.1), Anchor(5.3, 1.0, 0.1)
    for x in (4.0, 5.0, 5.3, 5.6, 6.5, 8.0):
        assert env._curved_bound(older, newer, x) <= newer.bound(x) * (1 + 1e-12)
    # Flattening towards 5.6 (the gain halved over 0.3 pH): the curved bound is tighter.
    assert env._curved_bound(older, newer, 5.6) < newer.bound(5.6)


# --- the property ------------------------------------------------------------------------------


class Adversary:
    """A controller that asks for any dose of any pH pump, as a broken model might."""

    name = "adversary"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    async def decide(self, ctx: DecisionContext) -> Decision:
        pump = self.rng.choice(("ph_up", "ph_down"))
        ms = int(10 ** self.rng.uniform(0, math.log10(120_000)))
        return Decision((Dose(pump, self.rng.randint(1, 255), ms),), self.name)

    def close(self) -> None:
        """Nothing to release."""


async def run_adversary(seed: int, hours: float = 2.0) -> tuple[float, float, float]:
    """Setpoint, worst |pH − setpoint| of the well-mixed tank, and its start distance."""
    rng = random.Random(seed)
    tank = draw(rng, "prop", rng.choice(("right", "wrong", "unset")), seed=seed)
    start = tank.ph_setpoint + rng.uniform(-0.45, 0.45)
    # Only decisions move the pH here: no uptake, no evaporation, no TDS loop.
    rig = Rig(
        tank,
        Adversary(rng),
        loops=("ph",),
        params_override={"uptake_per_h": 0.0, "evaporation_l_per_h": 0.0},
        start_tds=tank.tds_setpoint,
        start_ph=start,
    )
    worst = 0.0
    end = hours * 3600.0
    while rig.t < end:
        if rig.poll_due:
            reading = rig.read()
            if rig.cycle.state == "idle":
                rig.cycle.start(rig.t)
            await rig.control(reading)
        rig.advance(end)
        worst = max(worst, abs(rig.plant.truth()["ph"] - tank.ph_setpoint))
    return tank.ph_setpoint, worst, abs(start - tank.ph_setpoint)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_no_decision_takes_the_ph_out_of_half_a_unit_once_inside(seed: int) -> None:
    setpoint, worst, start = asyncio.run(run_adversary(seed))
    assert start < 0.5
    assert worst <= 0.5, f"seed {seed}: pH went {worst:.3f} from the setpoint {setpoint:.2f}"


def test_a_surprise_after_measurements_means_the_tank_changed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    e = PhEnvelope(PLANT)
    steady(e, 5.0)
    e.dosed("ph_up", 0.01, setpoint=6.0)
    steady(e, 5.2)  # measured: 20 pH per ml/L around 5.1
    assert len(e.learned()["anchors"]["ph_up"]) == 1
    per_l = e.limit("ph_up", 6.0)
    e.dosed("ph_up", per_l, setpoint=6.0)
    with caplog.at_level(logging.WARNING):
        steady(e, 5.8)  # a new solution: far more than the measurement allowed
    assert any("changed since it was measured" in r.message for r in caplog.records)
    anchors = e.learned()["anchors"]["ph_up"]
    assert len(anchors) == 1 and anchors[0][1] == pytest.approx(0.6 / per_l)  # only the new one
    assert e.distrust == 1.0
