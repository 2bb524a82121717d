"""A guided titration of one pH pump on one tank: dose a small known amount, wait, measure.

How strong is a grower's pH solution *on this tank*? Nobody can say from the
label: the same 1 M acid moves a well-buffered 200 L tank by a few hundredths
and a 10 L tank of soft water by whole units. The gateway measures it, the way
a chemist titrates a sample, but on the running tank and with every safety
limit in place:

1. wait for a steady pH: two consecutive window averages (the node's
   ``ph_average_s``) agree within :data:`STEADY_PH`; the starting pH (and the
   final one) average at least :data:`MIN_LEVEL_READINGS` readings;
2. dose a small known amount, sized by the steepest titration curve that is
   still plausible (the pH safety envelope's bound, rules/envelope.py) to
   move the pH by ``move`` (0.1 by default) at most;
3. wait ``mixing_wait_s`` and until the pH is steady again; once the doses'
   effect is visible, also until the fitted response of every dose so far
   (dead time and first-order lag, :func:`fit_response`) is :data:`COMPLETE`
   done, so a slow tank is not mistaken for a steady one; a dose with no
   visible effect yet is watched at least ``min_watch_s`` before a larger one;
4. if the total change is too small to measure well (below
   :data:`MIN_CHANGE`, or below :data:`NOISE_FACTOR` standard errors), dose
   again, larger — at most :data:`GROWTH` times the last dose, and never more
   than the bound says keeps the pH within :data:`CAP_PH` of where it
   started; every dose so far narrows the bound (what it did, or that it did
   less than :data:`DETECT_PH`);
5. report the strength: the ml of solution per litre of tank per pH unit,
   the secant of the titration curve over the span the pH travelled, with
   its uncertainty, and what the last response shows of the mixing (dead
   time, lag, and the ``mixing_wait_s`` after which 95 % of a dose is seen).

This module is pure: it never sleeps, never reads a clock and never doses.
The gateway (gateway/titration.py) feeds it readings with :meth:`Titration.add`,
asks :meth:`Titration.advance` what to do, runs the doses through the safety
guard and reports them with :meth:`Titration.dosed`; the unit tests drive it
on simulated time against ``sim.plant.Reservoir``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from rules.controller import PH_PUMPS, RulesError
from rules.envelope import CAP_PH, DETECT_PH, STEADY_PH, Anchor, direction

__all__ = [
    "COMPLETE",
    "GROWTH",
    "MAX_DOSES",
    "MIN_CHANGE",
    "MIN_LEVEL_READINGS",
    "MIN_WATCH_S",
    "MIN_MOVE",
    "NOISE_FACTOR",
    "Fit",
    "Level",
    "Mixing",
    "Phase",
    "Step",
    "Titration",
    "TitrationError",
    "TitrationResult",
    "TitrationSettings",
    "fit_response",
    "recommended_wait",
]

MIN_CHANGE = 0.05  # pH: a smaller total change is too small to measure well
MIN_MOVE = MIN_CHANGE  # the smallest ``move`` a titration may aim at
NOISE_FACTOR = 5.0  # ... and so is one below this many standard errors
GROWTH = 10.0  # a dose after one that did too little is at most this much larger
MAX_DOSES = 8  # from the steepest plausible curve, 10^7 in dose: every real tank
MAX_SETTLE_WINDOWS = 30  # windows after the mixing wait before "the pH does not settle"
# (or 10 windows more than ``min_watch_s``, if that is longer)
COMPLETE = 0.95  # of a visible response, before its level counts as steady
SIGMA_FLOOR = 0.002  # pH: the least standard deviation a probe's readings are taken to have
SIGMA_UNKNOWN = 0.01  # pH: assumed until windows of several readings show the probe's noise
MIN_WATCH_S = 60.0  # after a dose, before one that may be ten times larger (the longest dead time)
MIN_LEVEL_READINGS = 24  # the start and the final level average at least this many readings...
MAX_LEVEL_WINDOWS = 4  # ... or this many agreeing windows
_STEPS = 24  # midpoint-rule steps of an integral over the bound
_FIT_POINTS = 150  # readings the response fit works on, at most (binned by time)
_FIT_FROM = 0.05  # doses before the last that make up less than this share are settled history
_WAIT_ROUND_S = 5.0  # the recommended mixing wait is a multiple of this
_REGION = 6.0  # Δ(sum of squares)/σ² of the 95 % region of two fitted parameters

Phase = Literal["settling", "dosing", "mixing", "done", "failed"]


class TitrationError(RulesError):
    """Settings a titration cannot run with."""


@dataclass(frozen=True)
class TitrationSettings:
    """What one titration needs: the pump, the aim, and the node's timings.

    ``window_s`` and ``mixing_wait_s`` are the node's ``ph_average_s`` and
    ``mixing_wait_s``; ``stale_s`` how long without a pH reading ends the
    titration (``safety.stale_after_s``); ``ph_range`` the plausible pH
    (``safety.ph_range``): a reading outside it ends it too. ``min_watch_s``:
    a dose with no visible effect is watched at least this long before the
    next, larger one (a short ``mixing_wait_s`` must not make a late effect
    look like none: real tanks have dead times of 5-60 s).
    """

    pump: str
    move: float = 0.1
    window_s: float = 30.0
    mixing_wait_s: float = 60.0
    stale_s: float = 60.0
    ph_range: tuple[float, float] = (2.0, 12.0)
    min_watch_s: float = MIN_WATCH_S

    def __post_init__(self) -> None:
        if self.pump not in PH_PUMPS:
            raise TitrationError(
                f"actuator must be one of {', '.join(PH_PUMPS)}, not {self.pump!r}"
            )
        if not (math.isfinite(self.move) and MIN_MOVE <= self.move <= CAP_PH):
            raise TitrationError(f"move must be between {MIN_MOVE} and {CAP_PH} pH")
        if not (self.window_s > 0 and self.mixing_wait_s >= 0 and self.stale_s > 0):
            raise TitrationError("window_s and stale_s must be > 0, mixing_wait_s >= 0")


@dataclass(frozen=True)
class Level:
    """A steady pH: the mean of agreeing windows, its standard error, when it was reached."""

    ph: float
    sigma: float
    at: float
    readings: int = 0
    windows: int = 0


@dataclass
class Step:
    """One dose of the titration and the steady level after it."""

    per_l: float  # ml of solution per litre of tank
    run_s: float
    start: float
    before: float  # steady pH before the dose
    after: float | None = None  # steady pH after it, once measured


#: A dose as the response fit sees it: (start, run seconds, ml/L).
DoseRun = tuple[float, float, float]


@dataclass(frozen=True)
class Fit:
    """The doses' response fitted as dead time + first-order lag (see :func:`fit_response`).

    ``change`` is the pH change all the doses tend to, ``plausible`` every
    (dead time, lag) the readings cannot rule out.
    """

    dead_time_s: float
    lag_s: float
    change: float
    doses: tuple[DoseRun, ...]
    plausible: tuple[tuple[float, float], ...] = ()

    def least_share(self, at: float) -> float:
        """The least share of the doses' whole effect seen at time ``at``, over every
        (dead time, lag) the readings cannot rule out."""
        pairs = np.asarray([(self.dead_time_s, self.lag_s), *self.plausible])
        seen = np.zeros(len(pairs))
        total = 0.0
        for start, run_s, per_l in self.doses:
            seen += per_l * _ramp(at - start - pairs[:, 0], run_s, pairs[:, 1])
            total += per_l
        return float(np.min(seen)) / total if total > 0 else 1.0


@dataclass(frozen=True)
class Mixing:
    """What the largest dose's response shows of the tank's mixing."""

    dead_time_s: float
    lag_s: float
    mixing_wait_s: float  # recommended: 95 % of a dose's effect is seen after it


@dataclass(frozen=True)
class TitrationResult:
    """The measured strength of one pump's solution on this tank.

    ``strength`` is ml of solution per litre of tank per pH unit, the secant
    over ``ph_from`` → ``ph_to``; ``uncertainty`` its relative uncertainty
    (two standard errors of the change). ``per_l`` is every dose together.
    """

    pump: str
    strength: float
    uncertainty: float
    ph_from: float
    ph_to: float
    per_l: float
    steps: tuple[Step, ...]
    mixing: Mixing | None
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-able data (RPC replies, telemetry, the store)."""
        mixing = self.mixing
        return {
            "actuator": self.pump,
            "ml_per_l_per_unit": _sig(self.strength),
            "uncertainty_pct": round(100.0 * self.uncertainty, 1),
            "ph_from": round(self.ph_from, 3),
            "ph_to": round(self.ph_to, 3),
            "per_l": _sig(self.per_l, 4),
            "doses": len(self.steps),
            "dead_time_s": None if mixing is None else round(mixing.dead_time_s, 1),
            "lag_s": None if mixing is None else round(mixing.lag_s, 1),
            "mixing_wait_s": None if mixing is None else mixing.mixing_wait_s,
            "warning": self.warning,
        }


@dataclass
class _Window:
    begin: float
    mean: float
    samples: list[float] = field(default_factory=list)


class Titration:
    """One titration, driven by readings and the caller's clock (seconds, monotonic).

    ``bound(x)`` is the steepest plausible gain of the pump at pH ``x``
    (pH units per ml/L), as the node's envelope knows it now; what this
    titration sees narrows it further.
    """

    def __init__(
        self, settings: TitrationSettings, bound: Callable[[float], float], now: float
    ) -> None:
        self.settings = settings
        self._bound = bound
        self._sign = direction(settings.pump)
        self.phase: Phase = "settling"
        self.detail = "waiting for a steady pH"
        self.error: str | None = None
        self.result: TitrationResult | None = None
        self.start: Level | None = None  # the steady pH before the first dose
        self.level: Level | None = None  # the latest steady pH
        self.steps: list[Step] = []
        self._anchors: list[Anchor] = []
        self._last_sample = now
        self._samples: list[tuple[float, float]] = []  # since the windows' start
        self._response: list[tuple[float, float]] = []  # since the first dose
        self._windows: list[_Window] = []
        self._begin_windows(now)
        self._fit: Fit | None = None  # of the latest visible response
        self._blind_s = math.inf  # the shortest a dose with no visible effect yet was watched
        self._noise_ss = 0.0  # squared deviations of readings from their window's mean...
        self._noise_df = 0  # ... and their degrees of freedom: the probe's noise, pooled
        self._level_from = now

    # ------------------------------------------------------------- inputs
    def add(self, now: float, ph: float) -> None:
        """One pH reading (calibrated), in time order."""
        if self.phase in ("done", "failed"):
            return
        low, high = self.settings.ph_range
        if not (math.isfinite(ph) and low <= ph <= high):
            self.fail(f"pH reading {ph:g} is outside the plausible {low:g}..{high:g}")
            return
        self._last_sample = now
        self._samples.append((now, ph))
        if self.steps:
            self._response.append((now, ph))

    def dosed(self, start: float, per_l: float, run_s: float) -> None:
        """The dose :meth:`advance` asked for ran (maybe cut): ``per_l`` ml/L from ``start``."""
        if self.phase != "dosing":
            raise TitrationError(f"no dose was asked for (phase {self.phase})")
        if not (per_l > 0 and math.isfinite(per_l) and run_s >= 0):
            raise TitrationError(f"a dose must be > 0 ml/L, got {per_l!r}")
        assert self.level is not None
        self.steps.append(Step(per_l, run_s, start, self.level.ph))
        self.phase = "mixing"
        self.detail = f"dose {len(self.steps)} mixing in"
        self._begin_windows(start + run_s + self.settings.mixing_wait_s)

    def fail(self, reason: str) -> None:
        """End the titration without a result."""
        if self.phase not in ("done", "failed"):
            self.phase = "failed"
            self.error = reason
            self.detail = reason

    # ------------------------------------------------------------ decisions
    def advance(self, now: float) -> float | None:
        """What to do at ``now``: the ml/L of the pump to dose now, or ``None`` (wait).

        After a dose is asked for, the phase is ``dosing`` until :meth:`dosed`
        (or :meth:`fail`); ``done`` and ``failed`` are final (see
        :attr:`result`, :attr:`error`).
        """
        if self.phase in ("done", "failed", "dosing"):
            return None
        if now - self._last_sample > self.settings.stale_s:
            self.fail(f"no pH reading for {now - self._last_sample:.0f} s")
            return None
        while now >= self._next_close:
            dose = self._close_window()
            if dose is not None or self.phase in ("done", "failed"):
                return dose
        return None

    def _begin_windows(self, accept_from: float) -> None:
        self._accept_from = accept_from
        self._next_close = accept_from + self.settings.window_s
        self._windows = []
        window, watch = self.settings.window_s, self.settings.min_watch_s
        self._give_up = accept_from + max(MAX_SETTLE_WINDOWS * window, watch + 10 * window)
        self._samples = [s for s in self._samples if s[0] >= accept_from]

    def _close_window(self) -> float | None:
        end = self._next_close
        begin = end - self.settings.window_s
        self._next_close = end + self.settings.window_s
        inside = [ph for t, ph in self._samples if begin <= t < end]
        self._samples = [s for s in self._samples if s[0] >= end]
        if inside:
            mean = math.fsum(inside) / len(inside)
            self._windows.append(_Window(begin, mean, inside))
            del self._windows[:-MAX_LEVEL_WINDOWS]
            self._noise_ss += math.fsum((v - mean) ** 2 for v in inside)
            self._noise_df += len(inside) - 1
        if end > self._give_up:
            drift = self._windows[-1].mean - self._windows[0].mean if self._windows else math.nan
            self.fail(
                f"the pH did not settle within {MAX_SETTLE_WINDOWS} windows of "
                f"{self.settings.window_s:g} s (last change {drift:+.3f})"
            )
            return None
        w = self._windows
        if len(w) < 2 or abs(w[-1].mean - w[-2].mean) > STEADY_PH:
            self.detail = (
                "waiting for a steady pH" if self.phase == "settling"
                else f"dose {len(self.steps)}: waiting for a steady pH"
            )
            return None
        level = self._level(end)
        if self.phase == "mixing" and not self._response_complete(level):
            return None
        enough = level.readings >= MIN_LEVEL_READINGS or level.windows >= MAX_LEVEL_WINDOWS
        if not enough and (self.start is None or self._would_finish(level)):
            # The start and the end of the measurement: average longer.
            self.detail = "averaging the steady pH"
            return None
        return self._steady(level)

    def _level(self, at: float) -> Level:
        """The steady pH of the trailing windows that agree with the last one."""
        last = self._windows[-1]
        used = [last]
        for window in reversed(self._windows[:-1]):
            if abs(window.mean - last.mean) > STEADY_PH:
                break
            used.insert(0, window)
        self._level_from = used[0].begin
        values = [v for w in used for v in w.samples]
        n = len(values)
        mean = math.fsum(values) / n
        sd = math.sqrt(self._noise_ss / self._noise_df) if self._noise_df >= 5 else SIGMA_UNKNOWN
        return Level(mean, max(sd, SIGMA_FLOOR) / math.sqrt(n), at, n, len(used))

    def _would_finish(self, level: Level) -> bool:
        start = self.start
        return start is not None and (level.ph - start.ph) * self._sign >= MIN_CHANGE

    def _response_complete(self, level: Level) -> bool:
        """Whether the doses' effect has run its course before the level's windows began.

        Once their effect is visible, the readings since the first dose are
        fitted (:func:`fit_response`: every dose's response superposed, so
        the tail of an earlier one counts too) and the level counts only if
        the effect is :data:`COMPLETE` for every dead time and lag the
        readings allow. Before, the mixing wait is all there is to go by.
        """
        start, step = self.start, self.steps[-1]
        assert start is not None
        change = (level.ph - start.ph) * self._sign
        noise = math.hypot(start.sigma, level.sigma)
        if abs(change) < max(DETECT_PH, 3.0 * noise) or len(self._response) < 4:
            watched = level.at - step.start - step.run_s
            if watched < self.settings.min_watch_s:
                self.detail = (
                    f"dose {len(self.steps)}: no effect seen yet; watching "
                    f"{self.settings.min_watch_s:g} s before a larger dose"
                )
                return False
            self._blind_s = min(self._blind_s, watched)
            return True
        # The first doses from the steepest curve are tiny and long settled: the fit starts
        # from the steady level before the first dose that matters.
        total = math.fsum(s.per_l for s in self.steps)
        first, before = 0, 0.0
        while first < len(self.steps) - 1 and before + self.steps[first].per_l < _FIT_FROM * total:
            before += self.steps[first].per_l
            first += 1
        since = self.steps[first].start
        times = [t for t, _ in self._response if t >= since]
        values = [v for t, v in self._response if t >= since]
        doses = tuple((s.start, s.run_s, s.per_l) for s in self.steps[first:])
        fit = fit_response(times, values, self.steps[first].before, doses)
        if fit is None or fit.least_share(self._level_from) >= COMPLETE:
            self._fit = fit
            return True
        self.detail = (
            f"dose {len(self.steps)}: still mixing in (lag ~{_secs(fit.lag_s)} s, dead time "
            f"~{_secs(fit.dead_time_s)} s)"
        )
        return False

    def _steady(self, level: Level) -> float | None:
        """A steady level: the start, or the level after a dose. Returns the next dose, if any."""
        self.level = level
        if self.start is None:
            self.start = level
            return self._ask(self.settings.move)
        step = self.steps[-1]
        step.after = level.ph
        start = self.start
        change = (level.ph - start.ph) * self._sign
        noise = math.hypot(start.sigma, level.sigma)
        total = math.fsum(s.per_l for s in self.steps)
        # What every dose so far did narrows the bound for the next one; a move the wrong
        # way (a tube in the wrong bottle) counts as much, so doses grow no faster then.
        span = max(abs(change) + 2.0 * noise, DETECT_PH)
        self._anchors.append(
            Anchor(start.ph + self._sign * max(change, 0.0) / 2.0, span / total, span / 2.0,
                   measured=change >= DETECT_PH)
        )
        if change <= -max(DETECT_PH, 3.0 * noise):
            self.fail(
                f"{self.settings.pump} moved the pH the wrong way ({start.ph:.3f} -> "
                f"{level.ph:.3f}): is the pump connected to the right bottle?"
            )
            return None
        if change >= MIN_CHANGE and change >= NOISE_FACTOR * noise:
            self._finish(level, change, noise, total)
            return None
        if len(self.steps) >= MAX_DOSES:
            self.fail(
                f"no measurable response after {len(self.steps)} doses ({total:.3g} ml/L in "
                f"all, pH {start.ph:.3f} -> {level.ph:.3f}): is the pump primed and its "
                "tube in the tank?"
            )
            return None
        goal = self.settings.move
        if change >= MIN_CHANGE:  # visible, but not above the noise: aim further
            goal = min(CAP_PH, 2.0 * change)
            if goal - change < DETECT_PH:
                self.fail(
                    f"the pH readings are too noisy to measure ({noise:.3f} pH of noise on a "
                    f"change of {change:.3f}): check the probe"
                )
                return None
        return self._ask(goal - max(change, 0.0))

    def _ask(self, move: float) -> float | None:
        """Ask for the dose that moves the pH by ``move`` by the bound (and the growth rule)."""
        assert self.level is not None
        per_l = self.per_l_to_move(self.level.ph, move)
        if self.steps:
            per_l = min(per_l, GROWTH * self.steps[-1].per_l)
        if not (per_l > 0 and math.isfinite(per_l)):
            self.fail("no dose fits the bound (the envelope allows none)")
            return None
        self.phase = "dosing"
        self.detail = f"dose {len(self.steps) + 1}: {per_l:.3g} ml/L"
        return per_l

    def _finish(self, level: Level, change: float, noise: float, total: float) -> None:
        start = self.start
        assert start is not None
        warning = None
        mixing = self._mixing()
        if change > CAP_PH:
            warning = (
                f"the pH moved {change:.2f}, more than the {CAP_PH} allowed: the tank is "
                "steeper than any plausible curve predicted, or a dose's effect came later "
                "than the mixing wait; check the solution and mixing_wait_s"
            )
        elif mixing is not None and self._blind_s < mixing.dead_time_s:
            warning = (
                f"the mixing wait is shorter than this tank's dead time ({mixing.dead_time_s:.0f}"
                f" s): a small dose's effect could have been missed, and the next, larger one "
                f"made; set mixing_wait_s to {mixing.mixing_wait_s:g} before titrating again"
            )
        self.result = TitrationResult(
            pump=self.settings.pump,
            strength=total / change,
            uncertainty=2.0 * noise / change,
            ph_from=start.ph,
            ph_to=level.ph,
            per_l=total,
            steps=tuple(self.steps),
            mixing=mixing,
            warning=warning,
        )
        self.phase = "done"
        self.detail = "done"

    def _mixing(self) -> Mixing | None:
        """Dead time and lag of the latest visible response (the largest, the clearest)."""
        fit = self._fit
        if fit is None:
            return None
        return Mixing(fit.dead_time_s, fit.lag_s, recommended_wait(fit))

    # --------------------------------------------------------------- bound
    def gain_bound(self, x: float) -> float:
        """The steepest plausible gain at ``x``: the envelope's, narrowed by these doses."""
        bound = self._bound(x)
        for anchor in self._anchors:
            bound = min(bound, anchor.bound(x))
        return bound

    def per_l_to_move(self, x: float, move: float) -> float:
        """ml/L of the pump that move the pH by ``move`` from ``x`` on the steepest curve."""
        h = move / _STEPS
        return math.fsum(
            h / self.gain_bound(x + self._sign * (i + 0.5) * h) for i in range(_STEPS)
        )

    def allowed_per_l(self) -> float:
        """The most the pump may dose now and keep the pH within :data:`CAP_PH` of the start."""
        if self.start is None or self.level is None:
            return 0.0
        moved = max(0.0, (self.level.ph - self.start.ph) * self._sign)
        return self.per_l_to_move(self.level.ph, max(0.0, CAP_PH - moved))

    # -------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """Where the titration is, JSON-able (``get_state``'s ``titration``)."""
        start, level = self.start, self.level
        return {
            "state": self.phase,
            "detail": self.detail,
            "actuator": self.settings.pump,
            "move": self.settings.move,
            "window_s": self.settings.window_s,
            "mixing_wait_s": self.settings.mixing_wait_s,
            "ph_start": None if start is None else round(start.ph, 3),
            "ph": None if level is None else round(level.ph, 3),
            "doses": [
                {"per_l": _sig(s.per_l, 4), "before": round(s.before, 3),
                 "after": None if s.after is None else round(s.after, 3)}
                for s in self.steps
            ],
            "error": self.error,
        }


# ------------------------------------------------------------------- the response fit
def _ramp(s: np.ndarray, run_s: float, lag_s: np.ndarray | float) -> np.ndarray:
    """Unit response of a first-order lag to a dose spread evenly over ``run_s``.

    ``s`` is the time since the dose started, less the dead time; ``lag_s``
    broadcasts against it.
    """
    s = np.maximum(s, 0.0)
    run = max(run_s, 1e-6)
    inside = (s - lag_s * -np.expm1(-s / lag_s)) / run
    after_s = np.maximum(s, run)
    after = 1.0 - lag_s / run * np.exp(-(after_s - run) / lag_s) * -np.expm1(-run / lag_s)
    return np.asarray(np.where(s <= run, inside, after))


def fit_response(
    times: Sequence[float], values: Sequence[float], before: float, doses: Sequence[DoseRun]
) -> Fit | None:
    """Fit the doses' pH response as a dead time and a first-order lag (least squares, on a grid).

    ``times``/``values`` are the readings since the first dose, ``before``
    the steady pH before it, ``doses`` each dose's (start, run seconds,
    ml/L). The probe sits behind a transport delay and a mixing lag (as in
    the simulated plant, sim/plant.py), and over a few tenths of a pH the
    titration curve is nearly straight, so the response is ``before + gain ·
    Σ per_l · r(t − start − dead time)``, ``r`` the lag's response to a dose
    spread over its run. Besides the best fit it keeps every (dead time,
    lag) the readings cannot rule out (the 95 % region of the least
    squares), so that "the response is complete" can be asked of all of
    them: early in a slow response a noisy best fit may well be a short lag.
    ``None`` when there are too few readings.
    """
    if len(times) < 4 or not doses:
        return None
    first = min(d[0] for d in doses)
    t = np.asarray(times, dtype=float) - first
    y = np.asarray(values, dtype=float) - before
    span = float(t[-1])
    if span <= 0.0:
        return None
    if t.size > _FIT_POINTS:  # bin by time: the grid search stays small on a slow Pi
        edges = np.linspace(float(t[0]), span, _FIT_POINTS + 1)
        index = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, _FIT_POINTS - 1)
        counts = np.bincount(index, minlength=_FIT_POINTS)
        keep = counts > 0
        t = (np.bincount(index, t, _FIT_POINTS)[keep]) / counts[keep]
        y = (np.bincount(index, y, _FIT_POINTS)[keep]) / counts[keep]
    dead = np.linspace(0.0, 0.8 * span, 41)
    lags = np.geomspace(max(span / 500.0, 0.05), 2.0 * span, 32)
    sse = np.empty((lags.size, dead.size))
    gain = np.empty_like(sse)
    yy = float(y @ y)
    for j, lag in enumerate(lags):
        r = np.zeros((dead.size, t.size))
        for start, run_s, per_l in doses:
            r += per_l * _ramp(t[None, :] - (start - first) - dead[:, None], run_s, float(lag))
        rr = np.einsum("ij,ij->i", r, r)
        ry = r @ y
        gain[j] = np.divide(ry, rr, out=np.zeros_like(ry), where=rr > 0)
        sse[j] = yy - gain[j] * ry
    flat = int(np.argmin(sse))
    j, i = divmod(flat, dead.size)
    best = float(sse[j, i])
    variance = max(best, 0.0) / max(t.size - 3, 1)
    inside = np.argwhere(sse <= best + _REGION * variance)
    plausible = tuple((float(dead[b]), float(lags[a])) for a, b in inside)
    total = math.fsum(d[2] for d in doses)
    return Fit(float(dead[i]), float(lags[j]), float(gain[j, i]) * total, tuple(doses), plausible)


def recommended_wait(fit: Fit) -> float:
    """The mixing wait after which 95 % of a dose's effect is seen: dead time + 3 lags, rounded."""
    return max(_WAIT_ROUND_S, math.ceil((fit.dead_time_s + 3.0 * fit.lag_s) / _WAIT_ROUND_S)
               * _WAIT_ROUND_S)


def _secs(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _sig(x: float, digits: int = 3) -> float:
    """``x`` to ``digits`` significant digits (what a grower copies into the config)."""
    return float(f"{x:.{digits}g}")
