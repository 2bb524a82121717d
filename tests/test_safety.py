"""Safety interlocks: one test per interlock, and a property test of the time limits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules.controller import Dose
from rules.safety import (
    NODE_WATCHDOG_S,
    SafetyGuard,
    SafetyLimits,
    SafetyRefusal,
    SensorWatch,
)

ALL = ("nutrient", "ph_up", "ph_down", "refill")
GOOD = {"ph": 6.0, "tds": 800.0, "water_level": 5.0}


def make_guard(
    limits: SafetyLimits | None = None,
    *,
    now: float = 0.0,
    values: dict[str, float | None] | None = None,
    history: tuple[tuple[str, float, int], ...] = (),
) -> SafetyGuard:
    watch = SensorWatch()
    watch.update(now, GOOD if values is None else values)
    return SafetyGuard(limits or SafetyLimits(), actuators=ALL, watch=watch, history=history)


def refused(guard: SafetyGuard, dose: Dose, now: float, *, strict: bool = True) -> str:
    with pytest.raises(SafetyRefusal) as info:
        guard.permit(dose, now, strict=strict)
    assert info.value.actuator == dose.actuator
    return info.value.reason


def test_plain_dose_passes_unchanged() -> None:
    guard = make_guard()
    permit = guard.permit(Dose("nutrient", 204, 1000), 1.0, strict=True)
    assert permit.dose == Dose("nutrient", 204, 1000)
    assert not permit.clamped


def test_unknown_actuator_refused() -> None:
    assert refused(make_guard(), Dose("heater", 255, 1000), 0.0) == "unknown_actuator"


def test_announce_changes_known_actuators() -> None:
    guard = make_guard()
    guard.announce(["nutrient"])
    assert refused(guard, Dose("ph_up", 255, 1000), 0.0) == "unknown_actuator"
    guard.permit(Dose("nutrient", 255, 1000), 0.0, strict=True)


def test_zero_ms_refused() -> None:
    assert refused(make_guard(), Dose("nutrient", 255, 0), 0.0, strict=False) == "bad_ms"


def test_bad_duty_refused_even_if_constructed_around_validation() -> None:
    dose = Dose("nutrient", 255, 1000)
    object.__setattr__(dose, "duty", 300)
    assert refused(make_guard(), dose, 0.0) == "bad_duty"


def test_strict_dose_longer_than_max_actuation_refused() -> None:
    guard = make_guard(SafetyLimits(max_actuation_ms=5000))
    assert refused(guard, Dose("refill", 255, 5001), 0.0) == "max_actuation"
    guard.permit(Dose("refill", 255, 5000), 0.0, strict=True)


def test_controller_dose_clamped_to_max_actuation_and_says_so() -> None:
    guard = make_guard(SafetyLimits(max_actuation_ms=5000))
    permit = guard.permit(Dose("refill", 200, 9000), 0.0, strict=False)
    assert permit.dose == Dose("refill", 200, 5000)
    assert permit.clamped_reason == "max_actuation"
    assert permit.requested_ms == 9000


def test_reactuate_of_running_pump_counts_as_one_run() -> None:
    guard = make_guard(SafetyLimits(max_actuation_ms=5000))
    guard.record(Dose("refill", 255, 4000), 0.0)
    # 3 s into the run: only 2 s may follow, the node would restart the timer.
    assert guard.allowed_ms("refill", 3.0) == 2000
    assert refused(guard, Dose("refill", 255, 2001), 3.0) == "max_actuation"
    permit = guard.permit(Dose("refill", 255, 4000), 3.0, strict=False)
    assert permit.dose.ms == 2000


def test_hour_budget_refuses_strict_and_clamps_controller() -> None:
    guard = make_guard(SafetyLimits(max_actuation_ms=10_000, max_ms_per_hour=15_000))
    guard.record(Dose("nutrient", 255, 10_000), 0.0)
    assert guard.used_ms("nutrient", 20.0) == 10_000
    assert refused(guard, Dose("nutrient", 255, 6000), 20.0) == "hour_budget"
    permit = guard.permit(Dose("nutrient", 255, 6000), 20.0, strict=False)
    assert permit.dose.ms == 5000
    assert permit.clamped_reason == "hour_budget"
    guard.record(permit.dose, 20.0)
    assert refused(guard, Dose("nutrient", 255, 1000), 30.0, strict=False) == "hour_budget"
    # The other pumps have their own budget.
    guard.permit(Dose("refill", 255, 10_000), 30.0, strict=True)


def test_hour_budget_is_rolling() -> None:
    guard = make_guard(SafetyLimits(max_actuation_ms=10_000, max_ms_per_hour=10_000))
    guard.record(Dose("nutrient", 255, 10_000), 0.0)
    t = 3600.0 + 4.0  # 4 s of the old run have left the hour ending now
    guard.watch.update(t, GOOD)
    # The hour ending at t + x s still holds max(0, 6 - x) s of the old run, so a new run of
    # x s uses max(6, x) s of it: the full 10 s fit.
    assert guard.allowed_ms("nutrient", t) == 10_000
    assert guard.allowed_ms("nutrient", 3000.0) == 0


def test_history_survives_restart() -> None:
    limits = SafetyLimits(max_actuation_ms=10_000, max_ms_per_hour=10_000)
    guard = make_guard(limits, now=100.0, history=(("ph_up", 50.0, 8000),))
    assert guard.allowed_ms("ph_up", 100.0) == 2000
    assert guard.allowed_ms("ph_down", 100.0) == 10_000


def test_ph_pumps_never_together() -> None:
    guard = make_guard()
    guard.record(Dose("ph_up", 255, 5000), 0.0)
    assert refused(guard, Dose("ph_down", 255, 1000), 2.0, strict=False) == "opposite_running"
    # Once ph_up has finished, ph_down is fine.
    guard.permit(Dose("ph_down", 255, 1000), 5.0, strict=True)
    assert guard.running(2.0) == {"ph_up"}
    assert guard.running(5.0) == set()


def test_stop_all_forgets_running_and_stop_of_one_pump() -> None:
    guard = make_guard()
    guard.record(Dose("ph_up", 255, 60_000), 0.0)
    guard.stop_all(1.0)
    assert guard.running(1.0) == set()
    guard.permit(Dose("ph_down", 255, 1000), 1.0, strict=True)
    guard.record(Dose("ph_down", 255, 60_000), 1.0)
    guard.record(Dose("ph_down", 0, 1), 2.0)  # duty 0: that pump off
    assert guard.running(2.0) == set()
    assert guard.used_ms("ph_up", 2.0) == 1000
    assert guard.used_ms("ph_down", 2.0) == 1000


def test_unconfirmed_stop_assumes_node_watchdog() -> None:
    guard = make_guard()
    guard.record(Dose("ph_up", 255, 100_000), 0.0)
    guard.stop_all(10.0, confirmed=False)
    assert guard.running(10.0 + NODE_WATCHDOG_S - 1) == {"ph_up"}
    assert guard.running(10.0 + NODE_WATCHDOG_S) == set()


def test_switching_off_is_allowed_even_with_broken_sensors() -> None:
    guard = make_guard(values={"ph": None, "tds": None})
    assert guard.permit(Dose("ph_up", 0, 1), 0.0, strict=True).dose.duty == 0


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"tds": 800.0}, "sensor_missing"),
        ({"ph": None, "tds": 800.0}, "sensor_missing"),
        ({"ph": math.nan, "tds": 800.0}, "sensor_missing"),
        ({"ph": math.inf, "tds": 800.0}, "sensor_missing"),
        ({"ph": 13.5, "tds": 800.0}, "sensor_out_of_range"),
        ({"ph": 1.0, "tds": 800.0}, "sensor_out_of_range"),
    ],
)
def test_bad_ph_sensor_refuses_ph_pumps(values: dict[str, float | None], reason: str) -> None:
    guard = make_guard(values=values)
    assert refused(guard, Dose("ph_up", 255, 1000), 0.0, strict=False) == reason
    assert refused(guard, Dose("ph_down", 255, 1000), 0.0, strict=False) == reason
    guard.permit(Dose("nutrient", 255, 1000), 0.0, strict=True)  # tds is fine


def test_tds_out_of_range_refuses_nutrient_and_refill() -> None:
    guard = make_guard(values={"ph": 6.0, "tds": 5200.0})
    assert refused(guard, Dose("nutrient", 255, 1000), 0.0) == "sensor_out_of_range"
    assert refused(guard, Dose("refill", 255, 1000), 0.0) == "sensor_out_of_range"


def test_stale_sensor_refused() -> None:
    guard = make_guard(SafetyLimits(stale_after_s=60))
    guard.permit(Dose("nutrient", 255, 1000), 60.0, strict=True)
    assert refused(guard, Dose("nutrient", 255, 1000), 60.5) == "sensor_stale"
    guard.watch.update(61.0, {"tds": 801.0, "ph": 6.0})
    guard.permit(Dose("nutrient", 255, 1000), 61.0, strict=True)


def test_null_reading_after_good_one_is_missing() -> None:
    guard = make_guard()
    guard.watch.update(5.0, {"tds": None})
    assert refused(guard, Dose("nutrient", 255, 1000), 5.0) == "sensor_missing"


def test_stuck_sensor_refused_and_recovers_on_change() -> None:
    guard = make_guard(SafetyLimits(stuck_after_s=900))
    for t in range(0, 1000, 10):
        guard.watch.update(float(t), {"ph": 6.0, "tds": 800.0 + t % 20})
    assert refused(guard, Dose("ph_up", 255, 1000), 990.0) == "sensor_stuck"
    guard.permit(Dose("nutrient", 255, 1000), 990.0, strict=True)  # tds keeps moving
    guard.watch.update(1000.0, {"ph": 6.01})
    guard.permit(Dose("ph_up", 255, 1000), 1000.0, strict=True)


def test_stuck_check_can_be_turned_off() -> None:
    guard = make_guard(SafetyLimits(stuck_after_s=0))
    guard.watch.update(5000.0, {"ph": 6.0, "tds": 800.0})
    guard.permit(Dose("ph_up", 255, 1000), 5000.0, strict=True)


def test_low_water_refuses_nutrient_and_ph_but_not_refill() -> None:
    guard = make_guard(values={**GOOD, "water_level": 0.8})
    for actuator in ("nutrient", "ph_up", "ph_down"):
        assert refused(guard, Dose(actuator, 255, 1000), 0.0) == "water_low"
    guard.permit(Dose("refill", 255, 1000), 0.0, strict=True)


def test_unknown_or_stale_water_level_does_not_block() -> None:
    guard = make_guard(values={"ph": 6.0, "tds": 800.0})
    guard.permit(Dose("nutrient", 255, 1000), 0.0, strict=True)
    guard.watch.update(0.0, {"water_level": 0.5})
    guard.watch.update(100.0, {"ph": 6.1, "tds": 801.0})
    guard.permit(Dose("nutrient", 255, 1000), 100.0, strict=True)


def test_limits_validate() -> None:
    with pytest.raises(ValueError):
        SafetyLimits(max_actuation_ms=0)
    with pytest.raises(ValueError):
        SafetyLimits(max_actuation_ms=700_000)
    with pytest.raises(ValueError):
        SafetyLimits(ph_range=(7.0, 3.0))
    with pytest.raises(ValueError):
        SafetyLimits(stale_after_s=math.nan)


# --- property test ---------------------------------------------------------------------------

LIMITS = SafetyLimits(
    max_actuation_ms=5000, max_ms_per_hour=8000, stale_after_s=60, stuck_after_s=300
)


@dataclass
class Truth:
    """What a node obeying NodeLink really runs: on from start until end."""

    runs: dict[str, list[list[float]]]

    def start(self, actuator: str, now: float, end: float) -> None:
        self.cut(actuator, now)
        self.runs.setdefault(actuator, []).append([now, end])

    def cut(self, actuator: str, at: float) -> None:
        for run in self.runs.get(actuator, []):
            run[1] = min(run[1], max(at, run[0]))


sensor_value = st.one_of(
    st.none(),
    st.just(math.nan),
    st.just(math.inf),
    st.floats(min_value=-100, max_value=6000, allow_nan=False),
    st.sampled_from([6.0, 800.0, 1.5]),
)
op = st.one_of(
    st.tuples(st.just("advance"), st.floats(min_value=0, max_value=2000)),
    st.tuples(st.just("advance"), st.floats(min_value=0, max_value=10)),
    st.tuples(st.just("advance"), st.floats(min_value=0, max_value=2)),
    st.tuples(
        st.just("sensor"),
        st.fixed_dictionaries(
            {}, optional={"ph": sensor_value, "tds": sensor_value, "water_level": sensor_value}
        ),
    ),
    st.tuples(
        st.just("dose"),
        st.sampled_from(ALL),
        st.integers(min_value=0, max_value=255),
        st.integers(min_value=0, max_value=9000),
        st.booleans(),
        st.sampled_from([True, True, True, False]),  # fresh, plausible sensors first
    ),
    st.tuples(
        st.just("dose"),
        st.sampled_from(ALL),
        st.just(255),
        st.integers(min_value=1000, max_value=6000),
        st.just(False),
        st.just(True),
    ),
    st.tuples(st.just("stop"), st.booleans()),
)


def merged(runs: list[list[float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted((r[0], r[1]) for r in runs if r[1] > r[0]):
        if out and start <= out[-1][1] + 1e-9:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def on_time(runs: list[tuple[float, float]], since: float, until: float) -> float:
    return sum(max(0.0, min(e, until) - max(s, since)) for s, e in runs)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=150))
def test_no_sequence_exceeds_limits(ops: list[tuple[object, ...]]) -> None:
    watch = SensorWatch()
    guard = SafetyGuard(LIMITS, actuators=ALL, watch=watch)
    truth = Truth({})
    now = 0.0
    for item in ops:
        kind = item[0]
        if kind == "advance":
            now += float(item[1])  # type: ignore[arg-type]
        elif kind == "sensor":
            watch.update(now, item[1])  # type: ignore[arg-type]
        elif kind == "dose":
            _, actuator, duty, ms, strict, refresh = item
            if refresh:
                jitter = (now % 1.0) / 10.0
                watch.update(now, {"ph": 6.0 + jitter, "tds": 800.0 + jitter, "water_level": 5.0})
            dose = Dose(str(actuator), int(duty), int(ms))  # type: ignore[call-overload]
            try:
                permit = guard.permit(dose, now, strict=bool(strict))
            except SafetyRefusal:
                continue
            assert permit.dose.actuator == dose.actuator
            assert permit.dose.ms <= dose.ms
            if strict:
                assert permit.dose == dose
            guard.record(permit.dose, now)
            if permit.dose.duty == 0:
                truth.cut(permit.dose.actuator, now)
            else:
                truth.start(permit.dose.actuator, now, now + permit.dose.ms / 1000.0)
        elif kind == "stop":
            confirmed = bool(item[1])
            guard.stop_all(now, confirmed=confirmed)
            for actuator in ALL:
                truth.cut(actuator, now if confirmed else now + NODE_WATCHDOG_S)

    tol = 1e-6
    for actuator in ALL:
        runs = merged(truth.runs.get(actuator, []))
        for start, end in runs:
            assert end - start <= LIMITS.max_actuation_ms / 1000.0 + tol, (actuator, start, end)
        # The on-time of a sliding hour peaks when the window's end meets a run's end
        # or its start meets a run's start.
        for s, e in runs:
            for since in (s, e - 3600.0):
                used = on_time(runs, since, since + 3600.0)
                assert used <= LIMITS.max_ms_per_hour / 1000.0 + tol, (actuator, since, used)
    ups = merged(truth.runs.get("ph_up", []))
    downs = merged(truth.runs.get("ph_down", []))
    for us, ue in ups:
        for ds, de in downs:
            assert min(ue, de) - max(us, ds) <= tol, ((us, ue), (ds, de))
