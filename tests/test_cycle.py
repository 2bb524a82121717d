"""The control cycle state machine and its triggers, on an injected clock (no sleeping)."""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable

import pytest

from rules.controller import Decision, DecisionContext, Dose, PlantConstants
from rules.cycle import ControlCycle, CycleSettings, CycleState, Triggers
from rules.envelope import STEEPEST_GAIN

ALL = ("nutrient", "ph_up", "ph_down", "refill")


class FakeController:
    """Records every context; doses what ``policy`` says."""

    name = "fake"

    def __init__(self, policy: Callable[[DecisionContext], tuple[Dose, ...]]) -> None:
        self.policy = policy
        self.contexts: list[DecisionContext] = []
        self.closed = False

    async def decide(self, ctx: DecisionContext) -> Decision:
        self.contexts.append(ctx)
        return Decision(doses=self.policy(ctx), controller=self.name, note="test")

    def close(self) -> None:
        self.closed = True


def settings(**kw: object) -> CycleSettings:
    base: dict[str, object] = {
        "tds_setpoint": 800.0,
        "ph_setpoint": 6.0,
        "tds_average_s": 10.0,
        "ph_average_s": 30.0,
        "mixing_wait_s": 60.0,
        "tds_hold_s": 180.0,
        "ph_hold_s": 300.0,
        "max_cycle_s": 3600.0,
    }
    base.update(kw)
    return CycleSettings(**base)  # type: ignore[arg-type]


def never(ctx: DecisionContext) -> tuple[Dose, ...]:
    return ()


def state(cycle: ControlCycle) -> CycleState:
    """The cycle's state read afresh (mypy keeps ``cycle.state`` narrowed by an earlier
    assert across the ticks that change it)."""
    return cycle.state


async def run(
    cycle: ControlCycle,
    start: float,
    end: float,
    values: Callable[[float], dict[str, float | None]],
    step: float = 1.0,
) -> list[tuple[float, Dose]]:
    out: list[tuple[float, Dose]] = []
    t = start
    while t <= end and cycle.state != "idle":
        out.extend((t, d) for d in await cycle.tick(t, values(t)))
        t += step
    return out


async def test_idle_cycle_does_nothing() -> None:
    ctl = FakeController(never)
    cycle = ControlCycle(settings(), ctl, PlantConstants(), actuators=ALL)
    assert await cycle.tick(0.0, {"tds": 100.0, "ph": 6.0}) == []
    assert cycle.state == "idle"
    assert ctl.contexts == []


async def test_on_target_loops_end_after_one_window_without_a_decision() -> None:
    ctl = FakeController(never)
    cycle = ControlCycle(settings(), ctl, PlantConstants(), actuators=ALL)
    cycle.start(0.0)
    assert cycle.state == "tds"
    await run(cycle, 0.0, 9.0, lambda t: {"tds": 800.0, "ph": 6.0})
    assert cycle.state == "tds"  # the 10 s window is not full yet
    await cycle.tick(10.0, {"tds": 800.0, "ph": 6.0})
    assert state(cycle) == "ph"  # nothing dosed, inside the deadband: nothing to wait for
    await run(cycle, 11.0, 39.0, lambda t: {"tds": 800.0, "ph": 6.0})
    assert state(cycle) == "ph"
    await cycle.tick(40.0, {"tds": 800.0, "ph": 6.0})
    assert state(cycle) == "idle"
    assert cycle.outcome == "done"
    assert ctl.contexts == []  # the controller was never asked


async def test_a_loop_inside_its_band_trims_then_holds() -> None:
    ctl = FakeController(never)
    cycle = ControlCycle(settings(), ctl, PlantConstants(), actuators=ALL)
    cycle.start(0.0)
    # 780 ppm: inside the 5 % band, outside the 1.25 % deadband; pH on target.
    await run(cycle, 0.0, 189.0, lambda t: {"tds": 780.0, "ph": 6.0})
    assert cycle.state == "tds"  # window full at 10 s, hold from 10 s
    assert ctl.contexts and ctl.contexts[0].loop == "tds"
    await cycle.tick(190.0, {"tds": 780.0, "ph": 6.0})
    assert state(cycle) == "ph"


async def test_a_trim_lets_an_out_of_band_loop_go_first() -> None:
    ctl = FakeController(never)
    cycle = ControlCycle(settings(), ctl, PlantConstants(), actuators=ALL)
    cycle.start(0.0)
    # TDS needs a trim at most, the pH is urgent: pH first, then the TDS trim.
    await run(cycle, 0.0, 10.0, lambda t: {"tds": 780.0, "ph": 7.2})
    assert cycle.state == "ph"
    await run(cycle, 11.0, 200.0, lambda t: {"tds": 780.0, "ph": 6.0 if t > 100 else 7.2})
    assert state(cycle) == "tds"  # back to the trim once the pH is on target
    loops = [c.loop for c in ctl.contexts]
    assert loops[0] == "ph" and loops[-1] == "tds"
    await run(cycle, 201.0, 400.0, lambda t: {"tds": 780.0, "ph": 6.0})
    assert cycle.outcome == "done"  # deferred once only: its hold ends the cycle


async def test_deadband_means_no_decision_whatever_the_controller() -> None:
    def always(ctx: DecisionContext) -> tuple[Dose, ...]:
        return (Dose("nutrient", 255, 1000), Dose("refill", 255, 1000))

    ctl = FakeController(always)
    cycle = ControlCycle(
        settings(tds_deadband_pct=2.0, tds_hold_s=1000), ctl, PlantConstants(), actuators=ALL
    )
    cycle.start(0.0)
    # 790 ppm is 1.25 % off: inside the 2 % deadband, so the loop is done at once.
    assert await run(cycle, 0.0, 10.0, lambda t: {"tds": 790.0, "ph": 6.0}) == []
    assert cycle.state == "ph" and ctl.contexts == []


async def test_only_doses_towards_the_setpoint_pass() -> None:
    def both(ctx: DecisionContext) -> tuple[Dose, ...]:
        return (Dose("nutrient", 255, 1000), Dose("refill", 255, 1000))

    cycle = ControlCycle(settings(), FakeController(both), PlantConstants(), actuators=ALL)
    cycle.start(0.0)
    doses = await run(cycle, 0.0, 10.0, lambda t: {"tds": 500.0, "ph": 6.0})
    assert [d.actuator for _, d in doses] == ["nutrient"]  # water would move TDS away
    cycle2 = ControlCycle(settings(), FakeController(both), PlantConstants(), actuators=ALL)
    cycle2.start(0.0)
    doses = await run(cycle2, 0.0, 10.0, lambda t: {"tds": 1000.0, "ph": 6.0})
    assert [d.actuator for _, d in doses] == ["refill"]


async def test_ph_doses_are_cut_to_the_envelope_and_it_learns_what_ran() -> None:
    def big(ctx: DecisionContext) -> tuple[Dose, ...]:
        return (Dose("ph_up", 255, 60_000),)

    ctl = FakeController(big)
    plant = PlantConstants(tank_volume_l=10.0)  # pumps of 1.58 ml/s, strength unknown
    cycle = ControlCycle(settings(loops=("ph",)), ctl, plant, actuators=ALL)
    cycle.start(0.0)
    doses = await run(cycle, 0.0, 100.0, lambda t: {"ph": 5.0})
    # Two windows must agree first (30 s each); then at most 0.3 pH on the steepest curve.
    assert [t for t, _ in doses] == [60.0]
    allowed_ml = 0.3 / STEEPEST_GAIN * 10.0
    assert doses[0][1].ms == math.floor(allowed_ml / (1.58 / 1000.0))
    assert ctl.contexts[-1].max_ml["ph_up"] == pytest.approx(allowed_ml)
    assert ctl.contexts[-1].max_ml["ph_down"] == 0.0
    cycle.ran(doses[0][1])
    assert cycle.envelope.waiting


async def test_a_locked_envelope_skips_the_ph_loop() -> None:
    ctl = FakeController(never)
    cycle = ControlCycle(settings(), ctl, PlantConstants(), actuators=ALL)
    cycle.envelope.locked = "stopped after two overshoots"
    cycle.start(0.0)
    await run(cycle, 0.0, 10.0, lambda t: {"tds": 800.0, "ph": 7.5})
    assert cycle.state == "idle" and cycle.outcome == "done"
    assert all(c.loop != "ph" for c in ctl.contexts)
    assert cycle.acknowledge() is True and cycle.envelope.locked is None


async def test_decision_context_and_window_average() -> None:
    ctl = FakeController(never)
    cycle = ControlCycle(settings(tds_hold_s=1000), ctl, PlantConstants(), actuators=ALL)
    cycle.start(0.0)
    # Readings alternate 600 / 700: the 10 s trailing window averages them.
    await run(cycle, 0.0, 10.0, lambda t: {"tds": 600.0 if int(t) % 2 else 700.0, "ph": 6.1})
    ctx = ctl.contexts[0]
    assert ctx.loop == "tds"
    assert ctx.measured == pytest.approx(650.0, abs=10.0)
    assert ctx.setpoint == 800.0
    assert ctx.band == (760.0, 840.0)
    assert ctx.previous_error is None
    assert ctx.values["ph"] == 6.1
    await run(cycle, 11.0, 20.0, lambda t: {"tds": 700.0, "ph": 6.1})
    second = ctl.contexts[1]
    assert second.previous_error == pytest.approx(ctx.error)
    assert second.delta_error == pytest.approx(second.error - ctx.error)


async def test_dose_then_mixing_wait_then_fresh_window() -> None:
    def policy(ctx: DecisionContext) -> tuple[Dose, ...]:
        return (Dose("nutrient", 255, 2000),) if ctx.error > 0 else ()

    ctl = FakeController(policy)
    cycle = ControlCycle(settings(), ctl, PlantConstants(), actuators=ALL)
    cycle.start(0.0)
    doses = await run(cycle, 0.0, 200.0, lambda t: {"tds": 500.0 if t < 100 else 700.0})
    times = [t for t, _ in doses]
    # First decision at 10 s; the dose runs 2 s, the tank mixes 60 s, a fresh 10 s window.
    assert times[0] == 10.0
    assert times[1] == 10.0 + 2.0 + 60.0 + 10.0
    # Readings during the mixing wait are not used: the third context averages only t >= 146 s.
    assert ctl.contexts[2].measured == 700.0


async def test_only_loop_actuators_and_real_doses_pass() -> None:
    def policy(ctx: DecisionContext) -> tuple[Dose, ...]:
        return (
            Dose("ph_up", 255, 1000),  # wrong loop
            Dose("nutrient", 255, 0),  # no dose
            Dose("refill", 0, 1000),  # duty 0
            Dose("heater", 255, 1000),  # not announced
            Dose("nutrient", 200, 1500),
        )

    cycle = ControlCycle(
        settings(), FakeController(policy), PlantConstants(), actuators=(*ALL, "heater")
    )
    cycle.start(0.0)
    doses = await run(cycle, 0.0, 10.0, lambda t: {"tds": 500.0})
    assert [d for _, d in doses] == [Dose("nutrient", 200, 1500)]
    cycle2 = ControlCycle(
        settings(), FakeController(policy), PlantConstants(), actuators=("ph_up",)
    )
    cycle2.start(0.0)
    assert await run(cycle2, 0.0, 10.0, lambda t: {"tds": 500.0}) == []


async def test_leaving_the_band_restarts_the_hold_a_trim_does_not() -> None:
    calls = 0

    def policy(ctx: DecisionContext) -> tuple[Dose, ...]:
        nonlocal calls
        calls += 1
        return (Dose("nutrient", 255, 1000),) if calls == 2 else ()

    cycle = ControlCycle(
        settings(tds_hold_s=100), FakeController(policy), PlantConstants(), actuators=ALL
    )
    cycle.start(0.0)
    # In band (780 of 760..840) from 10 s; a trim at 20 s; the hold still ends at 110 s.
    doses = await run(cycle, 0.0, 200.0, lambda t: {"tds": 780.0, "ph": 6.0})
    assert [t for t, _ in doses] == [20.0]
    assert cycle.loops_done[0] == ("tds", 110.0)
    # Out of band at 40-60 s (the trim's mixing wait hides it until 91 s): 700 ppm then.
    cycle2 = ControlCycle(
        settings(tds_hold_s=100), FakeController(never), PlantConstants(), actuators=ALL
    )
    cycle2.start(0.0)
    await run(cycle2, 0.0, 300.0,
              lambda t: {"tds": 700.0 if 40 <= t <= 60 else 780.0, "ph": 6.0})
    # The window leaves the band at 40 s and is back inside at 70 s: done at 170 s.
    assert cycle2.loops_done[0][0] == "tds"
    assert cycle2.loops_done[0][1] == pytest.approx(170.0, abs=2.0)


async def test_missing_and_nan_values_do_not_fill_window_and_cycle_times_out() -> None:
    ctl = FakeController(never)
    cycle = ControlCycle(settings(max_cycle_s=100), ctl, PlantConstants(), actuators=ALL)
    cycle.start(0.0)
    await run(cycle, 0.0, 200.0, lambda t: {"tds": None if t < 50 else math.nan})
    assert cycle.state == "idle"
    assert cycle.outcome == "timeout"
    assert ctl.contexts == []


async def test_abort_and_restart() -> None:
    ctl = FakeController(never)
    cycle = ControlCycle(settings(), ctl, PlantConstants(), actuators=ALL)
    cycle.start(0.0)
    cycle.start(5.0)  # already running: no effect
    assert cycle.started_at == 0.0
    cycle.abort(6.0)
    assert cycle.state == "idle"
    assert cycle.outcome == "aborted"
    assert await cycle.tick(7.0, {"tds": 1.0}) == []
    cycle.start(8.0)
    assert state(cycle) == "tds"


async def test_single_loop_setting() -> None:
    ctl = FakeController(never)
    cycle = ControlCycle(
        CycleSettings(tds_setpoint=800, ph_setpoint=6.0, ph_hold_s=0, loops=("ph",)),
        ctl,
        PlantConstants(),
        actuators=ALL,
    )
    cycle.start(0.0)
    assert cycle.state == "ph"
    await run(cycle, 0.0, 40.0, lambda t: {"ph": 6.0})
    assert cycle.outcome == "done"


def test_settings_validate() -> None:
    with pytest.raises(ValueError):
        settings(tds_average_s=0)
    with pytest.raises(ValueError):
        settings(mixing_wait_s=-1)
    with pytest.raises(ValueError):
        CycleSettings(tds_setpoint=1, ph_setpoint=6, loops=("ec",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ph_deadband"):
        settings(ph_deadband=0.2)  # wider than the band


def test_deadband_defaults_to_a_quarter_of_the_band() -> None:
    s = settings()
    assert s.deadband("tds") == pytest.approx(800.0 * 0.0125)
    assert s.deadband("ph") == pytest.approx(0.0375)
    assert settings(ph_deadband=0.0).deadband("ph") == 0.0


# --- triggers ----------------------------------------------------------------------------------

TZ = datetime.timezone(datetime.timedelta(hours=7))


def at(day: int, hh: int, mm: int, ss: int = 0) -> datetime.datetime:
    return datetime.datetime(2026, 3, day, hh, mm, ss, tzinfo=TZ)


def test_schedule_fires_once_per_day_with_irregular_ticks() -> None:
    trig = Triggers([datetime.time(9, 0), datetime.time(15, 0)], 0)
    fired = []
    t = at(1, 8, 0)
    # Irregular steps from 1 s to 17 min over three days.
    steps = [1, 7, 61, 300, 1020, 13, 2]
    i = 0
    while t < at(4, 0, 0):
        if trig.due(t):
            fired.append(t)
        t += datetime.timedelta(seconds=steps[i % len(steps)])
        i += 1
    assert [(f.day, f.hour) for f in fired] == [(1, 9), (1, 15), (2, 9), (2, 15), (3, 9), (3, 15)]
    for f in fired:
        assert f.minute < 20  # on the first tick at or after the time


def test_schedule_does_not_catch_up_a_long_missed_time() -> None:
    trig = Triggers([datetime.time(9, 0)], 0, grace_s=600)
    assert not trig.due(at(1, 8, 0))
    assert not trig.due(at(1, 11, 0))  # 2 h late: missed
    assert not trig.due(at(1, 12, 0))
    assert trig.due(at(2, 9, 5))


def test_first_call_does_not_fire_past_schedule_time() -> None:
    trig = Triggers([datetime.time(9, 0)], 0)
    assert not trig.due(at(1, 9, 0, 30))
    assert not trig.due(at(1, 9, 1))


def test_interval_fires_at_once_then_every_interval() -> None:
    trig = Triggers([], 30)
    t0 = at(1, 10, 0)
    results = [trig.due(t0 + datetime.timedelta(seconds=s)) for s in range(0, 91, 5)]
    fired = [s for s, r in zip(range(0, 91, 5), results, strict=True) if r]
    assert fired == [0, 30, 60, 90]


def test_interval_zero_is_schedule_only_and_clock_set_back_recovers() -> None:
    assert not Triggers([], 0).due(at(1, 10, 0))
    trig = Triggers([], 30)
    assert trig.due(at(2, 10, 0))
    assert trig.due(at(1, 10, 0))  # the clock went back a day: not stalled
    assert not trig.due(at(1, 10, 0, 10))
