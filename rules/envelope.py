"""The pH safety envelope: what no automatic pH dose may exceed, whoever decided it.

A pH dose sized for one tank can wreck another: the same ml of acid that
moves a well-buffered 200 L tank by 0.05 moves a 10 L tank of soft water by
several units. Nobody measured the chemistry of a grower's tank, so every
controller and every fallback doses through this envelope, which the control
cycle (rules/cycle.py) applies below them.

**The bound.** The local gain ``G(x)`` of a tank's titration curve (pH units
per ml of solution per litre of tank, at pH ``x``) is the solution's strength
over the tank's buffer capacity ``β(x)``. ``β`` is a sum of terms
``ln10·[H+]``, ``ln10·[OH-]`` and ``ln10·C·α(1-α)`` for each weak acid, and
each of them changes by at most a factor 10 per pH unit, so for any mixture
of weak acids in water (docs/references.md, "Titration bound")::

    G(x) <= G(y) * 10 ** abs(x - y)

One gain known at one pH bounds the gain everywhere: that is the steepest
plausible titration given what is known. What is known (anchors):

- the configured strength ``plant.ph_ml_per_l_per_unit`` (a grower's or a
  guided titration's figure near the setpoint), trusted with a margin of
  :data:`CONFIG_MARGIN` for a 20 % error in it and in the configured volume
  and flow;
- every dose's measured response: the secant ``|Δ|/dose`` over the span it
  travelled, raised by ``10 ** (|Δ|/2)`` (the steepest the curve can be
  inside the span); a dose with no visible response bounds the gain by
  :data:`DETECT_PH` per dose;
- with nothing known, :data:`STEEPEST_GAIN`: 2 mol/L solutions dosed into a
  lightly buffered 300 ppm solution made with water of no alkalinity.

The bound is the least of these at the pH in question, times ``distrust``.

**The rules.**

1. A dose moves the pH, by the bound, at most ``min(HALF · remaining error,
   CAP_PH)``, and only towards the setpoint.
2. No pH dose while the last one (or anything else) is still mixing in: the
   last two window averages must agree within :data:`STEADY_PH`. The
   remaining error counts :data:`TAIL_WINDOWS` more windows of any movement
   still under way towards the setpoint.
3. After a dose with no visible response the next may be at most
   :data:`GROWTH` times larger (a response may be late; a dose grows only
   when the last one is known to have done little).
4. A response larger than the bound allowed shrinks every later dose, and
   is logged: when earlier measurements allowed it, the tank has changed
   since (a new solution) and the new, steeper measurement replaces them;
   when only the configured strength or the plausible extremes did, the tank
   is steeper than the model allows and ``distrust`` grows by the ratio.
5. A dose that settles beyond the band on the far side of the setpoint is an
   overshoot; :data:`OVERSHOOTS_TO_LOCK` in a row stop automatic pH dosing
   until the grower acknowledges (RPC or attribute ``acknowledge``): two
   overshoots under these rules mean a broken probe, a wrong solution or a
   tank nothing here can model.

Everything is per litre of tank and in the configured units (flows and
volume as configured, or the measured water level), so measured anchors
absorb an error in those constants. The envelope's knowledge is a small
JSON snapshot the gateway keeps across restarts (:meth:`PhEnvelope.learned`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rules.controller import PH_PUMPS, PlantConstants, RulesError

__all__ = [
    "CAP_PH",
    "CONFIG_MARGIN",
    "DETECT_PH",
    "GROWTH",
    "HALF",
    "OVERSHOOTS_TO_LOCK",
    "STEADY_PH",
    "STEEPEST_GAIN",
    "TAIL_WINDOWS",
    "Anchor",
    "EnvelopeError",
    "PhEnvelope",
    "direction",
]

_log = logging.getLogger(__name__)

STEEPEST_GAIN = 150.0  # pH per ml/L: 2 M solution, 300 ppm, 30 % buffer, no alkalinity
CONFIG_MARGIN = 1.5  # the configured strength may be 20 % off, and so may volume and flow
HALF = 0.5  # of the remaining error, at most, by the bound
CAP_PH = 0.3  # pH units, at most, by the bound
STEADY_PH = 0.015  # two window averages this close: nothing is mixing in any more
DETECT_PH = 0.03  # a settled change smaller than this is no visible response
TAIL_WINDOWS = 9.0  # movement still under way counts this many windows more (lag ≤ 9.5 windows)
NOISE_PH = 0.004  # of the change between two window averages: ~1.5 σ of a steady probe
GROWTH = 10.0  # after a dose with no visible response, the next at most this much larger
MAX_ANCHORS = 8  # measured anchors kept per pump (the latest)
MAX_DISTRUST_STEP = 10.0  # one surprising response multiplies distrust by at most this
OVERSHOOTS_TO_LOCK = 2
STATE_VERSION = 1
LN10 = math.log(10.0)
CURVATURE = LN10**2 / 2  # the largest d²(ln G)/dpH² of a mixture of weak acids in water
SLOPE_ERROR = 0.3  # per pH: the least error of the slope two anchors show
SECANT_MARGIN = 0.05  # ln: a secant against the gain in the middle of its span
MIN_SLOPE_SPAN = 0.08  # pH between two anchors for a slope to mean something
MIN_SLOPE_SPREAD = 0.05  # half-span of each: a shorter secant is mostly noise
_STEPS = 24  # midpoint-rule steps of an integral over the bound
_WALK_STEP = 0.005  # pH, when walking a dose along the bound


class EnvelopeError(RulesError):
    """An envelope snapshot that cannot be restored."""


@dataclass(frozen=True)
class Anchor:
    """A secant of the tank's titration curve: ``gain`` over ``ph ± spread``.

    Inside the span the curve's gain is at most ``gain·10^spread`` (it is an
    average of gains that differ by at most that), and so at any ``x`` at most
    ``gain·10^(spread + |x − ph|)``. ``measured`` anchors come from a visible
    response; the others only say that a dose did less than
    :data:`DETECT_PH`.
    """

    ph: float
    gain: float
    spread: float = 0.0
    measured: bool = True

    def bound(self, x: float) -> float:
        """The steepest gain the curve can have at ``x`` given this anchor."""
        return self.gain * math.exp(LN10 * (self.spread + abs(x - self.ph)))


@dataclass
class _Pending:
    """A dose whose response has not settled yet."""

    pump: str
    per_l: float
    before: float
    predicted: float  # pH move by the bound, at most
    windows: int = 0


def direction(pump: str) -> float:
    """+1 for ``ph_up``, -1 for ``ph_down``."""
    return 1.0 if pump == "ph_up" else -1.0


class PhEnvelope:
    """The pH safety envelope of one tank (one per node, kept from cycle to cycle)."""

    def __init__(self, plant: PlantConstants, *, name: str = "") -> None:
        self.plant = plant
        self.name = name  # the node, for log lines
        self.distrust = 1.0
        self.overshoots = 0
        self.locked: str | None = None
        self._anchors: dict[str, list[Anchor]] = {}
        self._probe: dict[str, float] = {}  # per pump: ml/L of its last invisible dose
        self._averages: list[float] = []
        self._pending: _Pending | None = None
        self._changed = False

    # ------------------------------------------------------------- the bound
    def gain_bound(self, pump: str, x: float, setpoint: float) -> float:
        """The steepest plausible gain of ``pump`` at pH ``x`` (pH per ml/L)."""
        bound = STEEPEST_GAIN
        strength = self.plant.ph_ml_per_l_per_unit.get(pump)
        if strength is not None:
            bound = min(bound, Anchor(setpoint, CONFIG_MARGIN / strength).bound(x))
        anchors = self._anchors.get(pump, ())
        for anchor in anchors:
            bound = min(bound, anchor.bound(x))
        if len(anchors) >= 2 and anchors[-1].measured and anchors[-2].measured:
            bound = min(bound, _curved_bound(anchors[-2], anchors[-1], x))
        return bound * self.distrust

    def per_l_to_move(self, pump: str, x: float, move: float, setpoint: float) -> float:
        """ml/L of ``pump`` that move the pH by ``move`` from ``x`` on the steepest curve."""
        h = move / _STEPS
        sign = direction(pump)
        return math.fsum(
            h / self.gain_bound(pump, x + sign * (i + 0.5) * h, setpoint) for i in range(_STEPS)
        )

    def move_of(self, pump: str, x: float, per_l: float, setpoint: float) -> float:
        """The largest pH move ``per_l`` ml/L of ``pump`` can make from ``x`` (by the bound)."""
        sign = direction(pump)
        moved, spent = 0.0, 0.0
        while spent < per_l and moved < 14.0:
            cost = _WALK_STEP / self.gain_bound(pump, x + sign * (moved + _WALK_STEP / 2), setpoint)
            if spent + cost >= per_l:
                return moved + _WALK_STEP * (per_l - spent) / cost
            spent += cost
            moved += _WALK_STEP
        return moved

    # ------------------------------------------------------------ the rules
    @property
    def steady(self) -> bool:
        """Whether nothing is mixing in: two window averages agree, no dose pending."""
        a = self._averages
        return self._pending is None and len(a) >= 2 and abs(a[-1] - a[-2]) <= STEADY_PH

    @property
    def waiting(self) -> bool:
        """Whether a dose's response is still awaited."""
        return self._pending is not None

    def limit(self, pump: str, setpoint: float) -> float:
        """ml/L of ``pump`` an automatic dose may have now (0: none at all)."""
        if self.locked is not None or pump not in PH_PUMPS or not self.steady:
            return 0.0
        a = self._averages
        sign = direction(pump)
        x = a[-1]
        under_way = _moving(a[-1] - a[-2], sign)  # still moving towards the setpoint
        remaining = (setpoint - x) * sign - TAIL_WINDOWS * under_way
        if remaining <= 0.0:
            return 0.0
        per_l = self.per_l_to_move(pump, x, min(HALF * remaining, CAP_PH), setpoint)
        probe = self._probe.get(pump)
        if probe is not None:
            per_l = min(per_l, GROWTH * probe)
        return per_l

    def start_loop(self) -> None:
        """A pH loop starts: what mixes in now must be seen steady before any dose."""
        self._averages.clear()
        self._pending = None

    def observe(self, average: float, *, setpoint: float, tolerance: float) -> None:
        """One window average of the pH (mixing waits excluded), in order."""
        self._averages.append(average)
        del self._averages[:-4]
        pending = self._pending
        if pending is None:
            return
        pending.windows += 1
        a = self._averages
        if pending.windows >= 2 and abs(a[-1] - a[-2]) <= STEADY_PH:
            self._settled(pending, a[-1], setpoint, tolerance)

    def dosed(self, pump: str, per_l: float, *, setpoint: float) -> None:
        """An automatic dose of ``per_l`` ml/L ran (the node accepted it)."""
        if not self._averages or per_l <= 0.0 or pump not in PH_PUMPS:
            return
        x = self._averages[-1]
        self._pending = _Pending(pump, per_l, x, self.move_of(pump, x, per_l, setpoint))
        self._averages = []

    def limits(self, setpoint: float) -> dict[str, float]:
        """:meth:`limit` of both pH pumps (ml/L)."""
        return {pump: self.limit(pump, setpoint) for pump in PH_PUMPS}

    # ----------------------------------------------------------- learning
    def _settled(self, dose: _Pending, after: float, setpoint: float, tolerance: float) -> None:
        self._pending = None
        self._averages = self._averages[-2:]
        sign = direction(dose.pump)
        change = (after - dose.before) * sign
        # What may still be mixing in, counted so that the gain is not underestimated.
        a = self._averages
        tail = TAIL_WINDOWS * _moving(a[-1] - a[-2], sign)
        anchors = self._anchors.setdefault(dose.pump, [])
        if change + tail < DETECT_PH:
            anchors.append(
                Anchor(dose.before, DETECT_PH / dose.per_l, DETECT_PH / 2, measured=False)
            )
            self._probe[dose.pump] = max(dose.per_l, self._probe.get(dose.pump, 0.0))
        else:
            self._probe.pop(dose.pump, None)
            span = max(change + tail, DETECT_PH)
            anchor = Anchor(dose.before + sign * span / 2, span / dose.per_l, span / 2)
            if change > dose.predicted + DETECT_PH:
                self._surprised(dose, change, anchors)
            anchors.append(anchor)
        del anchors[:-MAX_ANCHORS]
        past = (after - setpoint) * sign
        if past > tolerance:
            self.overshoots += 1
            _log.warning(
                "%s%s overshot the pH setpoint %.2f: %.2f -> %.2f (%d in a row)",
                self._who(), dose.pump, setpoint, dose.before, after, self.overshoots,
                extra={"actuator": dose.pump},
            )
            if self.overshoots >= OVERSHOOTS_TO_LOCK:
                self.locked = (
                    f"automatic pH dosing stopped after {self.overshoots} overshoots in a row "
                    f"(last: {dose.pump} took pH {dose.before:.2f} to {after:.2f}, setpoint "
                    f"{setpoint:.2f}); check the pH solutions and the probe, then acknowledge"
                )
                _log.error("%s%s", self._who(), self.locked, extra={"actuator": dose.pump})
        else:
            self.overshoots = 0
        self._changed = True

    def _surprised(self, dose: _Pending, change: float, anchors: list[Anchor]) -> None:
        """A response larger than the bound allowed: every later dose must be smaller.

        When what was measured before bounded it, the tank has changed since (a
        new nutrient solution, other water): those measurements go, and the new
        one, steeper, sizes the later doses. When only the configured strength
        or the plausible extremes bounded it, the tank is steeper than the
        model allows at all: every later dose shrinks by the surprise.
        """
        measured = any(a.measured for a in anchors)
        if measured:
            anchors.clear()
            how = "the tank changed since it was measured; it is measured again from this dose"
        else:
            self.distrust *= min(change / max(dose.predicted, 1e-9), MAX_DISTRUST_STEP)
            how = (
                f"the tank is steeper than assumed, every later pH dose is "
                f"{self.distrust:.1f} times smaller"
            )
        _log.warning(
            "%s%s moved the pH by %.2f where at most %.2f was plausible: %s",
            self._who(), dose.pump, change, dose.predicted, how,
            extra={"actuator": dose.pump},
        )

    def measured(self, pump: str, ph_from: float, ph_to: float, per_l: float) -> None:
        """A guided titration's secant: ``per_l`` ml/L of ``pump`` moved the pH ``ph_from → ph_to``.

        Kept as a measured anchor like a dose's response (the caller gives the
        change it can vouch for: the measured one plus its uncertainty).
        """
        span = (ph_to - ph_from) * direction(pump)
        if pump not in PH_PUMPS or not (per_l > 0 and math.isfinite(per_l)) or not (
            span > 0 and math.isfinite(span)
        ):
            raise EnvelopeError(f"not a titration of {pump}: {ph_from} -> {ph_to} by {per_l} ml/L")
        anchors = self._anchors.setdefault(pump, [])
        anchors.append(Anchor((ph_from + ph_to) / 2.0, span / per_l, span / 2.0))
        del anchors[:-MAX_ANCHORS]
        self._probe.pop(pump, None)
        self._changed = True

    def recalibrated(self, pump: str, new_over_old: float) -> None:
        """``pump``'s flow was measured again: ``new_over_old`` times the flow believed so far.

        Every dose's ml were counted with the old flow, so what was measured
        through them is rescaled, not thrown away: a true ml/L is the counted one
        times ``new_over_old``, a gain (pH per ml/L) is divided by it.
        """
        if not (math.isfinite(new_over_old) and new_over_old > 0):
            raise EnvelopeError(f"not a flow ratio: {new_over_old}")
        anchors = self._anchors.get(pump)
        if anchors:
            self._anchors[pump] = [
                Anchor(a.ph, a.gain / new_over_old, a.spread, a.measured) for a in anchors
            ]
        if pump in self._probe:
            self._probe[pump] *= new_over_old
        if self._pending is not None and self._pending.pump == pump:
            self._pending = None  # a dose counted with the old flow: not learnt from
        self._changed = True

    def acknowledge(self) -> bool:
        """The grower looked: unlock, and start measuring the tank again. True if locked."""
        was = self.locked is not None
        self.locked = None
        self.overshoots = 0
        self.distrust = 1.0
        self._anchors.clear()
        self._probe.clear()
        self._pending = None
        self._changed = True
        return was

    def _who(self) -> str:
        return f"node {self.name}: " if self.name else ""

    # --------------------------------------------------------- persistence
    def take_changed(self) -> bool:
        """Whether the knowledge changed since the last call (then save :meth:`learned`)."""
        changed, self._changed = self._changed, False
        return changed

    def learned(self) -> dict[str, Any]:
        """What the envelope knows of the tank, JSON-able."""
        return {
            "version": STATE_VERSION,
            "anchors": {
                p: [[a.ph, a.gain, a.spread, a.measured] for a in rows]
                for p, rows in self._anchors.items()
            },
            "probe": dict(self._probe),
            "distrust": self.distrust,
            "overshoots": self.overshoots,
            "locked": self.locked,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back a :meth:`learned` snapshot; :class:`EnvelopeError` if unusable."""
        try:
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"version {state.get('version')!r}, expected {STATE_VERSION}")
            anchors = {
                str(p): [Anchor(float(x), float(g), float(w), bool(m)) for x, g, w, m in rows]
                for p, rows in state["anchors"].items()
            }
            probe = {str(p): float(v) for p, v in state["probe"].items()}
            distrust = float(state["distrust"])
            overshoots = int(state["overshoots"])
            locked = state["locked"]
            if locked is not None and not isinstance(locked, str):
                raise ValueError("locked must be text or null")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EnvelopeError(f"unusable pH envelope state: {exc}") from exc
        numbers = [*probe.values(), distrust, *(v for r in anchors.values() for a in r
                                                for v in (a.ph, a.gain, a.spread))]
        if not all(math.isfinite(v) for v in numbers) or distrust < 1.0 or any(
            a.gain <= 0 or a.spread < 0 or not 0.0 <= a.ph <= 14.0
            for r in anchors.values()
            for a in r
        ) or any(p not in PH_PUMPS for p in (*anchors, *probe)) or any(
            v <= 0 for v in probe.values()
        ):
            raise EnvelopeError("unusable pH envelope state: a value out of range")
        self._anchors = {p: rows[-MAX_ANCHORS:] for p, rows in anchors.items()}
        self._probe = probe
        self.distrust = distrust
        self.overshoots = max(0, overshoots)
        self.locked = locked


def _moving(change: float, sign: float) -> float:
    """How much of a window-to-window ``change`` is movement in direction ``sign``, not noise."""
    return max(0.0, change * sign - NOISE_PH)


def _curved_bound(older: Anchor, newer: Anchor, x: float) -> float:
    """The bound at ``x`` from the local slope of ``ln G`` two measured anchors show.

    ``d²(ln G)/dpH²`` of any mixture of weak acids is at most ``(ln 10)²/2``
    (docs/references.md, "Titration bound"), so from the slope ``s`` between
    the two anchors: ``ln G(x) <= ln G(newer) + s·d + SLOPE_ERROR·|d| +
    CURVATURE·d²`` with ``d = x − newer.ph`` (the slope error covers the
    distance between the anchors and their measurement). Where a curve
    visibly flattens towards a buffer, this lets a dose go further than the
    10-per-pH law alone; never beyond what that law allows.
    """
    span = newer.ph - older.ph
    d = x - newer.ph
    law = LN10 * (newer.spread + abs(d))
    if abs(span) < MIN_SLOPE_SPAN or min(older.spread, newer.spread) < MIN_SLOPE_SPREAD:
        return newer.gain * math.exp(law)
    slope = (math.log(newer.gain) - math.log(older.gain)) / span
    slope = max(-LN10, min(LN10, slope))
    # What the two secants' noise does to the slope, the distance the slope is carried
    # over (the curvature may bend it meanwhile), and a floor for the model.
    noise = NOISE_PH / (2 * older.spread) + NOISE_PH / (2 * newer.spread)
    error = SLOPE_ERROR + noise / abs(span) + CURVATURE * abs(span)
    curved = SECANT_MARGIN + slope * d + error * abs(d) + CURVATURE / 2 * d * d
    return newer.gain * math.exp(min(law, curved))
