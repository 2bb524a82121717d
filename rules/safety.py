"""Safety interlocks: the last word on every dose, below every controller and every RPC.

Nothing reaches a pump without :meth:`SafetyGuard.permit`. The guard knows
the node's announced actuators, what it has commanded (a ledger of runs,
seeded from the persisted history so the rolling hour survives a restart)
and, through a :class:`SensorWatch`, how fresh and plausible the sensor values
are. It enforces (issue 3, part 6):

- only announced actuators, duty 0..255, ``ms`` >= 1;
- one run never longer than ``max_actuation_ms`` (a re-``actuate`` of a
  running pump restarts its timer on the node, so the run is counted from
  when the pump last switched on);
- per actuator at most ``max_ms_per_hour`` of running time in *any* rolling
  hour, the new run included;
- never ``ph_up`` while ``ph_down`` runs, nor the reverse, and never two
  nutrient pumps at once (``nutrient`` and the parts ``nutrient_a``,
  ``nutrient_b``, ``nutrient_c`` of a multi-part feed must not meet neat);
- no dosing when the controlling sensor (``ph`` for the pH pumps, ``tds`` for
  ``nutrient``, its parts and ``refill``) is missing, stale, outside its
  physical range or stuck (unchanged for too long);
- no nutrient or pH dosing while the water level is known and low
  (``refill`` stays allowed: it is the cure).

Controllers' doses (``strict=False``) are shortened to what the limits allow,
and the returned :class:`Permit` says so; manual RPC doses (``strict=True``)
beyond a limit are refused. Every refusal is a :class:`SafetyRefusal` carrying
the actuator and a short reason code (used as a telemetry value), and is
logged once here. A ``duty`` of 0 switches a pump off and is always allowed
for an announced actuator: stopping is never unsafe.

Every time is a plain float in seconds from an injected clock; nothing here
reads the system clock, so tests and ``hydrogate evaluate`` drive it on
simulated time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from rules.controller import (
    ACTUATORS,
    NUTRIENT,
    NUTRIENT_PARTS,
    PH_PUMPS,
    REFILL,
    Dose,
    RulesError,
)

__all__ = [
    "CONTROLLING_SENSOR",
    "NODE_WATCHDOG_S",
    "Permit",
    "SafetyError",
    "SafetyGuard",
    "SafetyLimits",
    "SafetyRefusal",
    "SensorState",
    "SensorWatch",
]

_log = logging.getLogger(__name__)

#: The sensor whose value a pump acts on; dosing is refused when it is not trustworthy.
CONTROLLING_SENSOR: Mapping[str, str] = {
    **dict.fromkeys(PH_PUMPS, "ph"),
    **dict.fromkeys((NUTRIENT, REFILL, *NUTRIENT_PARTS), "tds"),
}

#: Pumps refused when the reservoir is known to be low (refill is the cure, not the harm).
_NEED_WATER: frozenset[str] = frozenset({*ACTUATORS, *NUTRIENT_PARTS} - {REFILL})

#: Groups of actuators of which at most one may run at a time: the pH pumps would
#: neutralise each other; nutrient parts must never meet neat.
_EXCLUSIVE_GROUPS: tuple[frozenset[str], ...] = (
    frozenset(PH_PUMPS),
    frozenset({"nutrient", *NUTRIENT_PARTS}),
)
_EXCLUSIVE: Mapping[str, frozenset[str]] = {
    actuator: group - {actuator} for group in _EXCLUSIVE_GROUPS for actuator in group
}

#: NodeLink: a node stops every actuator when no valid frame arrived for this long.
NODE_WATCHDOG_S = 30.0

#: NodeLink's largest ``ms`` of one ``actuate``.
_NODELINK_MAX_MS = 600_000

_HOUR_S = 3600.0


class SafetyError(RulesError):
    """Base of the safety layer's errors."""


class SafetyRefusal(SafetyError):
    """A dose was refused. ``reason`` is a short code, ``detail`` says more.

    Reason codes: ``unknown_actuator``, ``bad_duty``, ``bad_ms``,
    ``opposite_running``, ``sensor_missing``, ``sensor_stale``,
    ``sensor_out_of_range``, ``sensor_stuck``, ``water_low``,
    ``max_actuation`` and ``hour_budget``.
    """

    def __init__(self, actuator: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{actuator}: {reason}" + (f" ({detail})" if detail else ""))
        self.actuator = actuator
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SafetyLimits:
    """The node's safety limits (config ``nodes[].safety``; defaults: docs/references.md#interface).

    ``ph_range`` and ``tds_range`` are the physically possible values: a
    reading outside them is a broken probe or a bad calibration, not a tank
    to correct. ``stuck_after_s`` of 0 turns the stuck-value check off.
    """

    max_actuation_ms: int = 120_000
    max_ms_per_hour: int = 600_000
    stale_after_s: float = 60.0
    min_water_level_l: float = 1.0
    ph_range: tuple[float, float] = (2.0, 12.0)
    tds_range: tuple[float, float] = (0.0, 5000.0)
    stuck_after_s: float = 900.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_actuation_ms <= _NODELINK_MAX_MS:
            raise ValueError(f"max_actuation_ms must be 1..{_NODELINK_MAX_MS}")
        if not 1 <= self.max_ms_per_hour <= _HOUR_S * 1000:
            raise ValueError("max_ms_per_hour must be 1..3600000")
        if not (math.isfinite(self.stale_after_s) and self.stale_after_s > 0):
            raise ValueError("stale_after_s must be a positive number of seconds")
        if not (math.isfinite(self.stuck_after_s) and self.stuck_after_s >= 0):
            raise ValueError("stuck_after_s must be >= 0 seconds (0: no stuck check)")
        if not math.isfinite(self.min_water_level_l):
            raise ValueError("min_water_level_l must be finite")
        for name in ("ph_range", "tds_range"):
            low, high = getattr(self, name)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"{name} must be (low, high) with low < high")

    def physical_range(self, key: str) -> tuple[float, float] | None:
        """The plausible range of sensor ``key``, or ``None`` when unchecked."""
        if key == "ph":
            return self.ph_range
        if key == "tds":
            return self.tds_range
        return None


@dataclass(frozen=True)
class SensorState:
    """What the watch knows of one key: the last value and its times.

    ``value`` is ``None`` when the last reading of the key was null or not a
    finite number. ``seen`` is when the key last arrived with a usable value,
    ``changed`` when that value last differed from the one before.
    """

    value: float | None
    seen: float | None
    changed: float | None


class SensorWatch:
    """Follows every calibrated reading: per key the last value, its arrival and last change."""

    def __init__(self) -> None:
        # key -> [value, seen, changed]: updated in place on every reading
        # (this runs for every reading of every node, tens of thousands a second).
        self._live: dict[str, list[float | None]] = {}

    def update(self, now: float, values: Mapping[str, float | None]) -> None:
        """Take one reading. ``None``, NaN and infinities count as a missing value."""
        live = self._live
        for key, raw in values.items():
            slot = live.get(key)
            if slot is None:
                slot = live[key] = [None, None, None]
            if raw is None or not math.isfinite(raw):
                slot[0] = None
                continue
            value = float(raw)
            if slot[0] != value or slot[2] is None:
                slot[2] = now
            slot[0] = value
            slot[1] = now

    def state(self, key: str) -> SensorState | None:
        """What is known of ``key``, ``None`` if it never arrived."""
        slot = self._live.get(key)
        return None if slot is None else SensorState(*slot)

    def fresh(self, key: str, now: float, stale_after_s: float) -> float | None:
        """The value of ``key`` if it is present and not older than ``stale_after_s``."""
        st = self.state(key)
        if st is None or st.value is None or st.seen is None or now - st.seen > stale_after_s:
            return None
        return st.value

    def problem(self, key: str, now: float, limits: SafetyLimits) -> tuple[str, str] | None:
        """Why ``key`` cannot be trusted now, as ``(reason, detail)``, or ``None`` if it can."""
        st = self.state(key)
        if st is None or st.value is None or st.seen is None:
            return "sensor_missing", f"no usable {key} reading"
        age = now - st.seen
        if age > limits.stale_after_s:
            return "sensor_stale", f"{key} is {age:.0f} s old"
        rng = limits.physical_range(key)
        if rng is not None and not rng[0] <= st.value <= rng[1]:
            return "sensor_out_of_range", f"{key}={st.value:g} outside {rng[0]:g}..{rng[1]:g}"
        stuck_after = limits.stuck_after_s
        if stuck_after > 0 and st.changed is not None and now - st.changed > stuck_after:
            return "sensor_stuck", f"{key}={st.value:g} unchanged for {now - st.changed:.0f} s"
        return None


@dataclass(frozen=True)
class Permit:
    """The dose the guard lets run.

    ``clamped_reason`` (``max_actuation`` or ``hour_budget``) and ``requested_ms``
    are set when the dose was shortened from what was asked.
    """

    dose: Dose
    clamped_reason: str | None = None
    requested_ms: int | None = None

    @property
    def clamped(self) -> bool:
        """Whether the dose is shorter than the one asked for."""
        return self.clamped_reason is not None


@dataclass
class _Run:
    """One commanded run of an actuator: on from ``start`` until ``end`` (seconds)."""

    start: float
    end: float


@dataclass
class _Ledger:
    """The runs of one actuator, oldest first, never overlapping."""

    runs: list[_Run] = field(default_factory=list)

    def on_time(self, since: float, until: float) -> float:
        """Seconds this actuator runs (or ran) within ``[since, until]``."""
        return sum(
            max(0.0, min(r.end, until) - max(r.start, since)) for r in self.runs if r.end > since
        )

    def running(self, now: float) -> bool:
        return bool(self.runs) and self.runs[-1].start <= now < self.runs[-1].end

    def run_start(self, now: float) -> float | None:
        """When the run that a start at ``now`` would continue began, else ``None``.

        A run that ends exactly at ``now`` counts: restarting a pump the moment
        it stops makes one continuous run.
        """
        if not self.runs or not self.runs[-1].start <= now <= self.runs[-1].end:
            return None
        start = self.runs[-1].start
        for prev in reversed(self.runs[:-1]):
            if prev.end < start:
                break
            start = prev.start
        return start

    def cut(self, at: float) -> None:
        """The pump is off from ``at`` on (stopped, or restarted with a new timer)."""
        while self.runs and self.runs[-1].start >= at:
            self.runs.pop()
        if self.runs and self.runs[-1].end > at:
            self.runs[-1].end = at

    def add(self, start: float, end: float) -> None:
        self.cut(start)
        self.runs.append(_Run(start, end))

    def forget_before(self, t: float) -> None:
        self.runs = [r for r in self.runs if r.end > t]


class SafetyGuard:
    """Checks, clamps or refuses every dose of one node and keeps the ledger of what ran.

    ``history`` is ``(actuator, start_ts, ms)`` of earlier runs (the persisted
    ledger), so the rolling-hour budget holds across restarts. Call
    :meth:`record` once the node has accepted a dose, :meth:`stop_all` once
    every actuator was switched off.
    """

    def __init__(
        self,
        limits: SafetyLimits,
        *,
        actuators: Collection[str],
        watch: SensorWatch,
        history: Iterable[tuple[str, float, int]] = (),
    ) -> None:
        self.limits = limits
        self.watch = watch
        self._actuators = frozenset(actuators)
        self._ledgers: dict[str, _Ledger] = {}
        for actuator, start, ms in sorted(history, key=lambda h: h[1]):
            if ms > 0 and math.isfinite(start):
                self._ledger(actuator).add(start, start + ms / 1000.0)

    @property
    def actuators(self) -> frozenset[str]:
        """The actuators the node announced."""
        return self._actuators

    def announce(self, actuators: Collection[str]) -> None:
        """The node (re)announced its actuators (``hello``); the ledger is kept."""
        self._actuators = frozenset(actuators)

    def _ledger(self, actuator: str) -> _Ledger:
        return self._ledgers.setdefault(actuator, _Ledger())

    def running(self, now: float) -> set[str]:
        """The actuators commanded on at ``now`` (their run has not ended yet)."""
        return {a for a, led in self._ledgers.items() if led.running(now)}

    def used_ms(self, actuator: str, now: float) -> int:
        """Milliseconds ``actuator`` ran in the hour up to ``now`` (for telemetry and tests)."""
        led = self._ledgers.get(actuator)
        return 0 if led is None else round(led.on_time(now - _HOUR_S, now) * 1000.0)

    def allowed_ms(self, actuator: str, now: float) -> int:
        """The longest run of ``actuator`` starting at ``now`` that keeps every time limit."""
        led = self._ledgers.get(actuator, _Ledger())
        cap = self.limits.max_actuation_ms
        run_start = led.run_start(now)
        if run_start is not None:  # a re-actuate extends the running run
            cap = min(cap, math.floor(self.limits.max_actuation_ms - (now - run_start) * 1000.0))
        if cap < 1:
            return 0
        budget = self.limits.max_ms_per_hour

        def fits(ms: int) -> bool:
            # The worst hour for a run [now, now + ms] is the one ending at now + ms;
            # past on-time in it shrinks at most as fast as ms grows, so fits() is
            # monotonic and bisection finds the largest ms.
            end = now + ms / 1000.0
            past_ms = math.ceil(led.on_time(end - _HOUR_S, now) * 1000.0 - 1e-6)
            return past_ms + ms <= budget

        if not fits(1):
            return 0
        low, high = 1, cap
        while low < high:
            mid = (low + high + 1) // 2
            if fits(mid):
                low = mid
            else:
                high = mid - 1
        return low

    def permit(self, dose: Dose, now: float, *, strict: bool) -> Permit:
        """The dose to run now, maybe shortened (``strict=False``), or raise ``SafetyRefusal``."""
        try:
            return self._permit(dose, now, strict=strict)
        except SafetyRefusal as refusal:
            # DEBUG: the caller (gateway/control.py) logs the refusal with its node.
            _log.debug(
                "dose refused: %s",
                refusal,
                extra={"actuator": dose.actuator, "reason": refusal.reason, "ms": dose.ms},
            )
            raise

    def _permit(self, dose: Dose, now: float, *, strict: bool) -> Permit:
        actuator = dose.actuator
        if actuator not in self._actuators:
            raise SafetyRefusal(actuator, "unknown_actuator", "the node did not announce it")
        if not 0 <= dose.duty <= 255:
            raise SafetyRefusal(actuator, "bad_duty", f"duty {dose.duty} not in 0..255")
        if dose.ms < 1:
            raise SafetyRefusal(actuator, "bad_ms", f"ms {dose.ms} < 1")
        if dose.duty == 0:
            return Permit(dose)  # switching off is always safe
        self._check_interlocks(actuator, now)

        allowed = self.allowed_ms(actuator, now)
        if dose.ms <= allowed:
            return Permit(dose)
        reason = self._limit_reason(actuator, now, dose.ms)
        if strict or allowed < 1:
            used = self.used_ms(actuator, now)
            raise SafetyRefusal(
                actuator, reason, f"asked {dose.ms} ms, allowed {allowed} ms, used {used} ms/h"
            )
        _log.debug(  # the caller logs the clamp with its node
            "dose clamped: %s %d -> %d ms (%s)",
            actuator,
            dose.ms,
            allowed,
            reason,
            extra={"actuator": actuator, "reason": reason},
        )
        return Permit(replace(dose, ms=allowed), reason, dose.ms)

    def _limit_reason(self, actuator: str, now: float, ms: int) -> str:
        led = self._ledgers.get(actuator, _Ledger())
        run_start = led.run_start(now)
        run_ms = ms + (0.0 if run_start is None else (now - run_start) * 1000.0)
        return "max_actuation" if run_ms > self.limits.max_actuation_ms else "hour_budget"

    def _check_interlocks(self, actuator: str, now: float) -> None:
        others = sorted(_EXCLUSIVE.get(actuator, frozenset()) & self.running(now))
        if others:
            raise SafetyRefusal(actuator, "opposite_running", f"{', '.join(others)} is running")
        sensor = CONTROLLING_SENSOR.get(actuator)
        if sensor is not None:
            problem = self.watch.problem(sensor, now, self.limits)
            if problem is not None:
                raise SafetyRefusal(actuator, *problem)
        if actuator in _NEED_WATER:
            level = self.watch.fresh("water_level", now, self.limits.stale_after_s)
            if level is not None and level < self.limits.min_water_level_l:
                raise SafetyRefusal(
                    actuator,
                    "water_low",
                    f"water_level {level:g} L < {self.limits.min_water_level_l:g} L",
                )

    def record(self, dose: Dose, now: float) -> None:
        """The node accepted ``dose`` at ``now``: book it (a running pump restarts its timer)."""
        led = self._ledger(dose.actuator)
        if led.runs:  # the clock must not run backwards; never rewrite booked history
            now = max(now, led.runs[-1].start)
        if dose.duty == 0:
            led.cut(now)
        else:
            led.add(now, now + dose.ms / 1000.0)
        led.forget_before(now - 2 * _HOUR_S)

    def stop_all(self, now: float, *, confirmed: bool = True) -> None:
        """Every actuator was commanded off at ``now``.

        ``confirmed=False`` when the stop could not be delivered (the link is
        down): the node's own watchdog stops everything at the latest
        ``NODE_WATCHDOG_S`` later, so the runs are booked until then.
        """
        at = now if confirmed else now + NODE_WATCHDOG_S
        for led in self._ledgers.values():
            if led.runs and led.runs[-1].end > at:
                led.runs[-1].end = max(at, led.runs[-1].start)
