"""The control cycle: TDS first, then pH, as the thesis runs it, on an injected clock.

A cycle (issue 3, part 5) is a small state machine that never sleeps and
never reads a clock: the daemon calls :meth:`ControlCycle.tick` on every
reading (and about once a second), ``hydrogate evaluate`` calls it on
simulated time. In each loop (``"tds"``, then ``"ph"``):

1. readings of the loop's variable are averaged over a trailing window
   (``tds_average_s``, ``ph_average_s``); only readings taken after the last
   dose has run *and* the mixing wait has passed count, so a decision never
   sees a half-mixed tank;
2. when the window is full, the controller gets a :class:`DecisionContext`
   (setpoint, averaged value, previous error for Δerror, every latest value,
   plant constants, the band) and returns a :class:`Decision`; its doses are
   handed to the caller, which runs them through the safety guard;
3. the loop is done when the averaged value has stayed inside its band
   (``setpoint ± tds_tolerance_pct %`` or ``± ph_tolerance``) for the hold
   time (``tds_hold_s``, ``ph_hold_s``); a dose restarts the hold;
4. the whole cycle is aborted after ``max_cycle_s``.

Nutrient doses move pH, so pH is corrected after TDS and not the other way
round. :class:`Triggers` decides when an automatic cycle starts: at the
``schedule`` times of day (local time) and every ``interval`` seconds.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from rules.controller import Controller, Decision, DecisionContext, Dose, PlantConstants

__all__ = ["CycleSettings", "ControlCycle", "CycleState", "Loop", "Triggers"]

_log = logging.getLogger(__name__)

Loop = Literal["tds", "ph"]
CycleState = Literal["idle", "tds", "ph"]

#: Which actuators belong to which loop; a decision's other doses are dropped.
_LOOP_ACTUATORS: Mapping[str, frozenset[str]] = {
    "tds": frozenset({"nutrient", "refill"}),
    "ph": frozenset({"ph_up", "ph_down"}),
}


@dataclass(frozen=True)
class CycleSettings:
    """Setpoints, bands and timings of a control cycle (config ``nodes[].control``).

    ``loops`` names the loops a cycle runs, in order; the daemon keeps the
    thesis's ``("tds", "ph")``, the evaluation runs single loops.
    """

    tds_setpoint: float
    ph_setpoint: float
    tds_tolerance_pct: float = 5.0
    ph_tolerance: float = 0.15
    tds_average_s: float = 10.0
    ph_average_s: float = 30.0
    mixing_wait_s: float = 60.0
    tds_hold_s: float = 180.0
    ph_hold_s: float = 300.0
    max_cycle_s: float = 3600.0
    loops: tuple[Loop, ...] = ("tds", "ph")

    def __post_init__(self) -> None:
        for name in ("tds_average_s", "ph_average_s", "max_cycle_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in (
            "mixing_wait_s",
            "tds_hold_s",
            "ph_hold_s",
            "tds_tolerance_pct",
            "ph_tolerance",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.loops or any(loop not in ("tds", "ph") for loop in self.loops):
            raise ValueError("loops must be a non-empty sequence of 'tds' and 'ph'")

    def setpoint(self, loop: Loop) -> float:
        """The loop's setpoint (ppm or pH)."""
        return self.tds_setpoint if loop == "tds" else self.ph_setpoint

    def band(self, loop: Loop) -> tuple[float, float]:
        """The range that counts as on target for ``loop``."""
        if loop == "tds":
            half = self.tds_setpoint * self.tds_tolerance_pct / 100.0
            return self.tds_setpoint - half, self.tds_setpoint + half
        return self.ph_setpoint - self.ph_tolerance, self.ph_setpoint + self.ph_tolerance

    def average_s(self, loop: Loop) -> float:
        """Length of the loop's averaging window."""
        return self.tds_average_s if loop == "tds" else self.ph_average_s

    def hold_s(self, loop: Loop) -> float:
        """How long the loop's value must stay in band to finish the loop."""
        return self.tds_hold_s if loop == "tds" else self.ph_hold_s


class ControlCycle:
    """One node's control cycle: ``idle`` → ``tds`` → ``ph`` → ``idle``.

    ``outcome`` tells how the last cycle ended (``done``, ``aborted``,
    ``timeout``); ``last_decision`` who decided last (telemetry ``controller``).
    """

    def __init__(
        self,
        settings: CycleSettings,
        controller: Controller,
        plant: PlantConstants,
        *,
        actuators: Collection[str],
    ) -> None:
        self.settings = settings
        self.controller = controller
        self.plant = plant
        self.actuators = frozenset(actuators)
        self.state: CycleState = "idle"
        self.last_decision: Decision | None = None
        self.outcome: str | None = None
        self.started_at: float | None = None
        self.loop_started_at: float | None = None
        self._samples: deque[tuple[float, float]] = deque()
        self._latest: dict[str, float] = {}
        self._accept_from = 0.0
        self._next_decision = 0.0
        self._previous_error: float | None = None
        self._hold_since: float | None = None
        self._loop_index = 0

    # ------------------------------------------------------------- control
    def start(self, now: float) -> None:
        """Start a cycle at ``now`` (no effect while one runs)."""
        if self.state != "idle":
            return
        self.started_at = now
        self.outcome = None
        self._loop_index = 0
        self._enter(self.settings.loops[0], now)

    def abort(self, now: float, reason: str = "aborted") -> None:
        """Stop the cycle; the caller switches the actuators off."""
        if self.state == "idle":
            return
        _log.info(
            "control cycle %s in %s after %.0f s",
            reason,
            self.state,
            now - (self.started_at or now),
        )
        self.state = "idle"
        self.outcome = reason
        self._samples.clear()

    def _enter(self, loop: Loop, now: float) -> None:
        self.state = loop
        self.loop_started_at = now
        self._samples.clear()
        self._accept_from = now
        self._next_decision = now + self.settings.average_s(loop)
        self._previous_error = None
        self._hold_since = None

    @property
    def average(self) -> float | None:
        """The current window's mean of the loop's variable, ``None`` when empty or idle."""
        if not self._samples:
            return None
        return math.fsum(v for _, v in self._samples) / len(self._samples)

    async def tick(self, now: float, values: Mapping[str, float | None]) -> list[Dose]:
        """Take the latest values; return the doses to run now (often none)."""
        for key, value in values.items():
            if value is not None and math.isfinite(value):
                self._latest[key] = float(value)
        if self.state == "idle":
            return []
        assert self.started_at is not None
        if now - self.started_at > self.settings.max_cycle_s:
            self.abort(now, "timeout")
            return []
        loop: Loop = self.state
        window = self.settings.average_s(loop)
        value = values.get(loop)
        if value is not None and math.isfinite(value) and now >= self._accept_from:
            self._samples.append((now, float(value)))
        while self._samples and self._samples[0][0] < now - window:
            self._samples.popleft()
        full = bool(self._samples) and now - self._accept_from >= window
        if not full:
            return []
        measured = self.average
        assert measured is not None

        low, high = self.settings.band(loop)
        if low <= measured <= high:
            if self._hold_since is None:
                self._hold_since = now
            if now - self._hold_since >= self.settings.hold_s(loop):
                self._loop_done(loop, now)
                return []
        else:
            self._hold_since = None

        if now < self._next_decision:
            return []
        return await self._decide(loop, measured, now)

    async def _decide(self, loop: Loop, measured: float, now: float) -> list[Dose]:
        ctx = DecisionContext(
            loop=loop,
            setpoint=self.settings.setpoint(loop),
            measured=measured,
            previous_error=self._previous_error,
            values=dict(self._latest),
            plant=self.plant,
            band=self.settings.band(loop),
        )
        decision = await self.controller.decide(ctx)
        self.last_decision = decision
        self._previous_error = ctx.error
        doses = [
            d
            for d in decision.doses
            if d.ms > 0
            and d.duty > 0
            and d.actuator in _LOOP_ACTUATORS[loop]
            and d.actuator in self.actuators
        ]
        if len(doses) != len(decision.doses):
            dropped = [d for d in decision.doses if d not in doses]
            if any(d.ms > 0 and d.duty > 0 for d in dropped):
                _log.info("doses outside loop %s or not announced dropped: %s", loop, dropped)
        if not doses:
            self._next_decision = now + self.settings.average_s(loop)
            return []
        # The mixing wait starts when the longest dose ends; the window then refills.
        run_s = max(d.ms for d in doses) / 1000.0
        self._accept_from = now + run_s + self.settings.mixing_wait_s
        self._next_decision = self._accept_from + self.settings.average_s(loop)
        self._samples.clear()
        self._hold_since = None
        return doses

    def _loop_done(self, loop: Loop, now: float) -> None:
        self._loop_index += 1
        if self._loop_index < len(self.settings.loops):
            _log.info("control loop %s on target; next loop", loop)
            self._enter(self.settings.loops[self._loop_index], now)
            return
        _log.info("control cycle done after %.0f s", now - (self.started_at or now))
        self.state = "idle"
        self.outcome = "done"
        self._samples.clear()


class Triggers:
    """When an automatic cycle is due: daily ``schedule`` times and every ``interval_s``.

    ``due`` is asked with the local wall time, at irregular moments. A
    schedule time fires once on each day, when the first call at or after it
    comes, unless that is more than ``grace_s`` late (the gateway was off or
    in manual mode: a missed cycle is not caught up hours later). The interval
    counts from the last start it triggered; 0 turns it off. The first call
    with an interval fires at once.
    """

    def __init__(
        self,
        schedule: Sequence[datetime.time],
        interval_s: float,
        *,
        grace_s: float = 3600.0,
    ) -> None:
        if interval_s < 0:
            raise ValueError("interval_s must be >= 0")
        self.schedule = tuple(schedule)
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._last_check: datetime.datetime | None = None
        self._fired: set[tuple[datetime.date, datetime.time]] = set()
        self._next_interval: float | None = None

    def due(self, now_wall: datetime.datetime) -> bool:
        """Whether a cycle should start now (each schedule time fires once per day)."""
        fired = self._schedule_due(now_wall)
        self._last_check = now_wall
        return self._interval_due(now_wall.timestamp()) or fired

    def _schedule_due(self, now: datetime.datetime) -> bool:
        if self._last_check is None:
            return False
        since = max(self._last_check, now - datetime.timedelta(seconds=self.grace_s))
        fired = False
        for at in self.schedule:
            occurrence = now.replace(
                hour=at.hour, minute=at.minute, second=at.second, microsecond=at.microsecond
            )
            if occurrence > now:
                occurrence -= datetime.timedelta(days=1)
            key = (occurrence.date(), at)
            if since < occurrence <= now and key not in self._fired:
                self._fired.add(key)
                fired = True
        cutoff = now.date() - datetime.timedelta(days=2)
        self._fired = {k for k in self._fired if k[0] >= cutoff}
        return fired

    def _interval_due(self, now: float) -> bool:
        if self.interval_s <= 0:
            return False
        nxt = self._next_interval
        # A clock set back by more than an interval would otherwise stall the trigger.
        if nxt is None or now >= nxt or nxt - now > self.interval_s:
            self._next_interval = now + self.interval_s
            return True
        return False
