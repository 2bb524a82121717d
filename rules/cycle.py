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
   plant constants, the band, the most the pH envelope allows) and returns a
   :class:`Decision`; its doses are handed to the caller, which runs them
   through the safety guard and reports back with :meth:`ControlCycle.ran`;
3. the loop is done when the averaged value has stayed inside its band
   (``setpoint ± tds_tolerance_pct %`` or ``± ph_tolerance``) for the hold
   time (``tds_hold_s``, ``ph_hold_s``); leaving the band restarts the hold, a
   trim inside it does not (a slow drift trimmed now and then must not keep a
   loop from ever ending). A loop
   whose first window is already inside its deadband is done at once:
   nothing was dosed, so there is nothing to wait for; one inside its band
   (a trim at most) lets a later loop that is out of its band go first (an
   urgent pH never waits behind a TDS trim);
4. the whole cycle is aborted after ``max_cycle_s``.

Whatever a controller says, the cycle enforces (issue 11):

- **a deadband**: no dose while the averaged value is within
  ``tds_deadband_pct`` % / ``ph_deadband`` of the setpoint (default a quarter
  of the band), so a loop comes to rest instead of trimming forever;
- **direction**: a dose only moves the value towards the setpoint (no
  nutrient above it, no water below it, no pH up above it, no pH down below);
- **the pH safety envelope** (rules/envelope.py): a pH dose is cut to what
  the steepest plausible titration says moves the pH by at most half the
  remaining error (and 0.3), none while the last one is still mixing in, and
  automatic pH dosing stops after two overshoots in a row until acknowledged.

A node with a multi-part nutrient (``plant.nutrient_ratio``) gets the
controller's ``nutrient`` dose as its parts (rules/nutrients.py), one after
another with ``part_pause_s`` between them, never two at once; each part
goes through the safety guard on its own, and when the guard shortens or
refuses one, the parts after it are cut in proportion or dropped, so the
ratio holds (:meth:`ControlCycle.ran`, :meth:`ControlCycle.refused`). The
mixing wait starts when the last part ends.

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

from rules.controller import (
    NUTRIENT_PARTS,
    PH_PUMPS,
    REFILL,
    Controller,
    Decision,
    DecisionContext,
    Dose,
    PlantConstants,
)
from rules.envelope import PhEnvelope
from rules.nutrients import NUTRIENT, Feed

__all__ = ["CycleSettings", "ControlCycle", "CycleState", "Loop", "Triggers"]

_log = logging.getLogger(__name__)

Loop = Literal["tds", "ph"]
CycleState = Literal["idle", "tds", "ph"]

#: Which actuators belong to which loop; a decision's other doses are dropped.
_LOOP_ACTUATORS: Mapping[str, frozenset[str]] = {
    "tds": frozenset({NUTRIENT, REFILL}),
    "ph": frozenset(PH_PUMPS),
}

#: The way each actuator moves its loop's value: +1 up, -1 down.
_DIRECTION: Mapping[str, float] = {"nutrient": 1.0, "refill": -1.0, "ph_up": 1.0, "ph_down": -1.0}

#: The default deadband is the band's half-width over this (pH ±0.0375 in ±0.15, TDS 1.25 %
#: in 5 %): a loop comes to rest well inside its band, so drift takes long to leave it.
DEADBAND_SHARE = 4.0

#: Below this the level sensor is not a tank volume (an empty tank, a probe out of the water).
_MIN_LEVEL_L = 0.5


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
    tds_deadband_pct: float | None = None
    ph_deadband: float | None = None
    part_pause_s: float = 30.0
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
            "part_pause_s",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0")
        if not self.loops or any(loop not in ("tds", "ph") for loop in self.loops):
            raise ValueError("loops must be a non-empty sequence of 'tds' and 'ph'")
        for name, tolerance in (
            ("tds_deadband_pct", self.tds_tolerance_pct),
            ("ph_deadband", self.ph_tolerance),
        ):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= tolerance:
                raise ValueError(f"{name} must be between 0 and the tolerance ({tolerance:g})")

    def setpoint(self, loop: Loop) -> float:
        """The loop's setpoint (ppm or pH)."""
        return self.tds_setpoint if loop == "tds" else self.ph_setpoint

    def band(self, loop: Loop) -> tuple[float, float]:
        """The range that counts as on target for ``loop``."""
        if loop == "tds":
            half = self.tds_setpoint * self.tds_tolerance_pct / 100.0
            return self.tds_setpoint - half, self.tds_setpoint + half
        return self.ph_setpoint - self.ph_tolerance, self.ph_setpoint + self.ph_tolerance

    def deadband(self, loop: Loop) -> float:
        """Half-width around the setpoint inside which no dose is made (ppm or pH)."""
        if loop == "tds":
            pct = self.tds_deadband_pct
            pct = self.tds_tolerance_pct / DEADBAND_SHARE if pct is None else pct
            return self.tds_setpoint * pct / 100.0
        return self.ph_tolerance / DEADBAND_SHARE if self.ph_deadband is None else self.ph_deadband

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
    ``envelope`` is the tank's pH safety envelope; pass the same one to every
    cycle of a node, it is knowledge about the tank. ``plant`` is the node's;
    with a multi-part feed, controllers see it with a ``nutrient`` pump of the
    parts' combined flow (``Feed.controller_plant``), as :attr:`plant`.
    """

    def __init__(
        self,
        settings: CycleSettings,
        controller: Controller,
        plant: PlantConstants,
        *,
        actuators: Collection[str],
        envelope: PhEnvelope | None = None,
    ) -> None:
        self.settings = settings
        self.controller = controller
        self.feed = Feed.of(plant)
        self.plant = plant if self.feed is None else self.feed.controller_plant(plant)
        self.envelope = envelope if envelope is not None else PhEnvelope(plant)
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
        self._dosed = False  # in the current loop
        self.loops_done: list[tuple[Loop, float]] = []  # the latest loops that ended, and when
        self._order: list[Loop] = list(settings.loops)  # this cycle's loops, in order
        self._deferred: set[Loop] = set()  # loops moved behind others this cycle
        self._volume_l = plant.tank_volume_l  # at the last decision
        self._parts: deque[tuple[float, Dose]] = deque()  # parts still to run, and when
        self._asked: dict[str, int] = {}  # ms asked of each part handed out, until it ran
        self._parts_told = False  # the node has parts but no ratio: said once

    # ------------------------------------------------------------- control
    def start(self, now: float) -> None:
        """Start a cycle at ``now`` (no effect while one runs)."""
        if self.state != "idle":
            return
        self.started_at = now
        self.outcome = None
        self._loop_index = 0
        self._order = list(self.settings.loops)
        self._deferred = set()
        self._enter(self._order[0], now)

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
        self._drop_parts()

    def _enter(self, loop: Loop, now: float) -> None:
        if loop == "ph" and self.envelope.locked is not None:
            _log.debug("control loop ph skipped: %s", self.envelope.locked)
            self._loop_done(loop, now)
            return
        if loop == "ph":
            self.envelope.start_loop()
        self._dosed = False
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
        due = self._due_parts(now)
        return due + await self._step(now, values)

    async def _step(self, now: float, values: Mapping[str, float | None]) -> list[Dose]:
        assert self.state != "idle"
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
        if not self._dosed and self._settled_at_start(loop, measured, now):
            return []
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
        setpoint = self.settings.setpoint(loop)
        if loop == "ph":
            self.envelope.observe(measured, setpoint=setpoint, tolerance=self.settings.ph_tolerance)
        if abs(measured - setpoint) <= self.settings.deadband(loop):
            self._next_decision = now + self.settings.average_s(loop)
            return []
        self._volume_l = self._volume()
        max_ml: dict[str, float] = {}
        if loop == "ph":
            max_ml = {
                pump: per_l * self._volume_l
                for pump, per_l in self.envelope.limits(setpoint).items()
            }
        ctx = DecisionContext(
            loop=loop,
            setpoint=setpoint,
            measured=measured,
            previous_error=self._previous_error,
            values=dict(self._latest),
            plant=self.plant,
            band=self.settings.band(loop),
            max_ml=max_ml,
            now=now,
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
            and self._announced(d.actuator)
            and (setpoint - measured) * _DIRECTION[d.actuator] > 0
        ]
        if len(doses) != len(decision.doses):
            dropped = [d for d in decision.doses if d not in doses]
            if any(d.ms > 0 and d.duty > 0 for d in dropped):
                _log.info(
                    "doses outside loop %s, not announced or away from the setpoint dropped: %s",
                    loop, dropped,
                )
        doses = [c for d in doses if (c := self._within(d, max_ml)) is not None]
        if not doses:
            self._next_decision = now + self.settings.average_s(loop)
            return []
        doses, run_s = self._plan(doses, now)
        # The mixing wait starts when the longest dose (the last part) ends; the window
        # then refills.
        self._accept_from = now + run_s + self.settings.mixing_wait_s
        self._next_decision = self._accept_from + self.settings.average_s(loop)
        self._samples.clear()
        low, high = self.settings.band(loop)
        if not low <= measured <= high:
            self._hold_since = None  # (already so: a value out of band holds nothing)
        self._dosed = True
        return doses

    # ------------------------------------------------------------- parts
    def _announced(self, actuator: str) -> bool:
        """Whether the node has ``actuator`` (with a multi-part feed: every part of it)."""
        if actuator != NUTRIENT or self.feed is None:
            if actuator == NUTRIENT and actuator not in self.actuators and not self._parts_told:
                parts = sorted(self.actuators & set(NUTRIENT_PARTS))
                if parts:
                    self._parts_told = True
                    _log.warning(
                        "the node has nutrient parts (%s) but plant.nutrient_ratio is not set: "
                        "no nutrient is dosed until the ratio is known", ", ".join(parts),
                    )
            return actuator in self.actuators
        missing = [p for p in self.feed.parts if p not in self.actuators]
        if missing and not self._parts_told:
            self._parts_told = True
            _log.warning("no nutrient dosed: the node did not announce %s (plant.nutrient_ratio)",
                         ", ".join(missing))
        return not missing

    def _plan(self, doses: list[Dose], now: float) -> tuple[list[Dose], float]:
        """The doses to run now, the later parts queued; and how long until the last one ends.

        A ``nutrient`` dose of a multi-part feed becomes its parts at full duty,
        each ``part_pause_s`` after the one before has ended.
        """
        feed = self.feed
        now_doses: list[Dose] = []
        end = 0.0
        for dose in doses:
            if dose.actuator != NUTRIENT or feed is None:
                now_doses.append(dose)
                end = max(end, dose.ms / 1000.0)
                continue
            ml = dose.ms / 1000.0 * self.plant.flow(NUTRIENT) * dose.duty / 255.0
            at = 0.0
            for part in feed.doses(ml):
                if at == 0.0:
                    now_doses.append(part)
                else:
                    self._parts.append((now + at, part))
                end = max(end, at + part.ms / 1000.0)
                at += part.ms / 1000.0 + self.settings.part_pause_s
        for dose in now_doses:
            if dose.actuator in NUTRIENT_PARTS:
                self._asked[dose.actuator] = dose.ms
        return now_doses, end

    def _due_parts(self, now: float) -> list[Dose]:
        """The queued parts whose time has come (at most one: they never overlap)."""
        if not self._parts or self._parts[0][0] > now:
            return []
        _, part = self._parts.popleft()
        self._asked[part.actuator] = part.ms
        return [part]

    def _drop_parts(self) -> None:
        if self._parts:
            _log.info("nutrient parts not dosed: %s", ", ".join(d.actuator for _, d in self._parts))
        self._parts.clear()
        self._asked.clear()

    def refused(self, dose: Dose) -> None:
        """The guard refused ``dose`` (or the node did not confirm it): nothing ran.

        A part that did not run takes the parts after it along: one part alone
        would change the tank's ratio, and the next decision doses again.
        """
        if dose.actuator in NUTRIENT_PARTS and self._asked.pop(dose.actuator, None) is not None:
            self._drop_parts()

    def _settled_at_start(self, loop: Loop, measured: float, now: float) -> bool:
        """Before its first dose: end the loop if on target, or let a worse loop go first.

        Within the deadband there is nothing to do. Inside the band a trim at
        most is due, and it never makes a loop whose value is out of its band
        wait (an urgent pH is not kept behind a TDS trim): this loop moves to
        the end of the cycle, once.
        """
        setpoint = self.settings.setpoint(loop)
        if abs(measured - setpoint) <= self.settings.deadband(loop):
            self._loop_done(loop, now)
            return True
        low, high = self.settings.band(loop)
        if not low <= measured <= high or loop in self._deferred:
            return False
        later = self._order[self._loop_index + 1 :]
        if any(self._out_of_band(other) for other in later):
            _log.info("control loop %s only needs a trim; %s goes first", loop, ", ".join(later))
            self._deferred.add(loop)
            self._order.append(self._order.pop(self._loop_index))
            self._enter(self._order[self._loop_index], now)
            return True
        return False

    def _out_of_band(self, loop: Loop) -> bool:
        value = self._latest.get(loop)
        if value is None:
            return False
        low, high = self.settings.band(loop)
        return not low <= value <= high

    def _volume(self) -> float:
        """The tank's volume now: the level sensor's, else the configured one."""
        level = self._latest.get("water_level")
        if level is not None and level > _MIN_LEVEL_L:
            return level
        return self.plant.tank_volume_l

    def _ml_per_ms(self, dose: Dose) -> float | None:
        flow = self.plant.flow_ml_s.get(dose.actuator)
        return None if flow is None else flow * dose.duty / 255.0 / 1000.0

    def _within(self, dose: Dose, max_ml: Mapping[str, float]) -> Dose | None:
        """``dose`` cut to the envelope's limit (``None`` when nothing is left of it)."""
        limit = max_ml.get(dose.actuator)
        if limit is None:
            return dose
        per_ms = self._ml_per_ms(dose)
        if per_ms is None:  # no flow known: the envelope cannot size it
            _log.warning("pH dose dropped: no flow configured for %s", dose.actuator)
            return None
        ms = min(dose.ms, math.floor(limit / per_ms))
        if ms < dose.ms:
            _log.info(
                "%s cut by the pH envelope from %d to %d ms (%.3g ml allowed)",
                dose.actuator, dose.ms, ms, limit,
            )
        return Dose(dose.actuator, dose.duty, ms) if ms >= 1 else None

    def ran(self, dose: Dose) -> None:
        """The node accepted ``dose`` (maybe shortened by the safety guard): it is on its way.

        A nutrient part shortened by the guard shortens the parts after it in
        proportion, so the ratio holds.
        """
        asked = self._asked.pop(dose.actuator, None)
        if asked is not None and dose.ms < asked and self._parts:
            share = dose.ms / asked
            self._parts = deque(
                (at, Dose(p.actuator, p.duty, max(1, math.floor(p.ms * share))))
                for at, p in self._parts
            )
            _log.info("%s shortened to %.0f %% of its dose: the parts after it too",
                      dose.actuator, 100.0 * share)
        if dose.actuator in PH_PUMPS and dose.duty > 0 and self.state == "ph":
            per_ms = self._ml_per_ms(dose)
            if per_ms is not None:
                self.envelope.dosed(
                    dose.actuator,
                    dose.ms * per_ms / self._volume_l,
                    setpoint=self.settings.ph_setpoint,
                )

    def acknowledge(self) -> bool:
        """The grower acknowledged: automatic pH dosing may start again. True if it was locked."""
        return self.envelope.acknowledge()

    def _loop_done(self, loop: Loop, now: float) -> None:
        self.loops_done.append((loop, now))
        del self.loops_done[:-16]
        self._loop_index += 1
        if self._loop_index < len(self._order):
            _log.info("control loop %s on target; next loop", loop)
            self._enter(self._order[self._loop_index], now)
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
