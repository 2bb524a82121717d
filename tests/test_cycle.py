"""The control cycle state machine and its triggers, on an injected clock (no sleeping)."""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable

import pytest

from rules.controller import Decision, DecisionContext, Dose, PlantConstants
from rules.cycle import ControlCycle, CycleSettings, Triggers

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


def settings(**kw: float) -> CycleSettings:
    base: dict[str, float] = {
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


async def test_in_band_cycle_holds_tds_then_ph_then_ends() -> None:
    ctl = FakeController(never)
    cycle = ControlCycle(settings(), ctl, PlantConstants(), actuators=ALL)
    cycle.start(0.0)
    assert cycle.state == "tds"
    await run(cycle, 0.0, 189.0, lambda t: {"tds": 800.0, "ph": 6.0})
    # Window full at 10 s, hold from 10 s, done at 190 s.
    assert cycle.state == "tds"
    await cycle.tick(190.0, {"tds": 800.0, "ph": 6.0})
    assert cycle.state == "ph"
    await run(cycle, 191.0, 519.0, lambda t: {"tds": 800.0, "ph": 6.0})
    assert cycle.state == "ph"
    await cycle.tick(520.0, {"tds": 800.0, "ph": 6.0})  # 190 + 30 window + 300 hold
    assert cycle.state == "idle"
    assert cycle.outcome == "done"
    assert {c.loop for c in ctl.contexts} == {"tds", "ph"}


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
    doses = await run(cycle, 0.0, 200.0, lambda t: {"tds": 500.0 if t < 100 else 800.0})
    times = [t for t, _ in doses]
    # First decision at 10 s; the dose runs 2 s, the tank mixes 60 s, a fresh 10 s window.
    assert times[0] == 10.0
    assert times[1] == 10.0 + 2.0 + 60.0 + 10.0
    # Readings during the mixing wait are not used: the third context averages only t >= 146 s.
    assert ctl.contexts[2].measured == 800.0


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


async def test_dose_resets_hold() -> None:
    calls = 0

    def policy(ctx: DecisionContext) -> tuple[Dose, ...]:
        nonlocal calls
        calls += 1
        return (Dose("nutrient", 255, 1000),) if calls == 2 else ()

    cycle = ControlCycle(
        settings(tds_hold_s=30), FakeController(policy), PlantConstants(), actuators=ALL
    )
    cycle.start(0.0)
    doses = await run(cycle, 0.0, 125.0, lambda t: {"tds": 790.0, "ph": 6.0})
    assert [t for t, _ in doses] == [20.0]
    # Without the dose the loop would end at 40 s; with it the hold restarts
    # after 1 s run + 60 s mixing + 10 s window: 91 s + 30 s hold.
    assert cycle.state == "ph"
    assert cycle.loop_started_at == 121.0


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
    assert cycle.state == "tds"


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
