"""Our controller, ``"adaptive"``: model-based doses that learn the tank, step by step.

The thesis's fuzzy controller and the close-loop baseline dose a fixed-size
step every averaging window, whatever the tank: too little far from the
setpoint, too much near it, and, because the probe sees a dose only after
the circulation's dead time and mixing lag, they keep dosing while the first
dose is still on its way (overshoot), or never arrive (pH down in the thesis).
This controller instead computes the volume the tank needs, doses most of it
in one run, and looks again only once it knows where that dose will settle.
It uses only what a real gateway knows: the configured plant constants
(tank volume, stock strength, pump flows), the readings, and its own doses.

- **TDS up** — mass balance with the stock: ``v = V·(aim − c)/(Cs − aim)``
  (the added volume dilutes too); **TDS down** — dilution with fresh water:
  ``v = V·(c/aim − 1)``. ``V`` is the measured ``water_level`` when there is
  one, else the configured tank volume. The aim lies ``TDS_AIM_PCT`` % on the
  near side of the setpoint (below it when adding stock, above it when
  diluting), so the value approaches from one side and stops inside a small
  dead band instead of trimming past the setpoint. Each dose is
  ``TDS_FRACTION`` of that need, so a stock stronger or a tank smaller than
  configured by up to ``1/TDS_FRACTION − 1`` still does not overshoot; a
  correction factor per pump, learned as observed/expected change from doses
  whose effect is large against the noise, absorbs such errors for the trims.
  A dose longer than ``MAX_DOSE_S`` is run in pieces; the pieces follow each
  other without waiting for the reading, because the mass balance already
  says where each one lands.
- **pH** — no chemistry is assumed. The pH change per ml (the gain) is
  learned online from each dose's effect, per pump, as a secant over at
  least ``PH_MIN_SECANT`` pH of the trail of (pH, ml) points of that pump's
  doses (a point read off an extrapolation errs by a few hundredths, which
  would dominate the secant of a small dose). Titration curves are steep far from a buffer
  and flat inside it, and which way the curve bends ahead is unknown until
  two doses show it, so the model is deliberately pessimistic ahead of what
  was observed: with no observation the gain is the prior
  ``PH_PRIOR_PER_ML_L`` (per ml in one litre, steeper than the tanks this
  gateway serves), a ceiling that makes the first dose fall short; beyond the
  farthest observed point the gain is assumed to steepen by
  ``PH_STEEPEN_PER_PH`` (one observation) or ``PH_STEEPEN_FITTED_PER_PH``
  (a log-linear fit through two observations) per pH, never above the
  ceiling. The dose is the integral of ``dpH / gain(pH)`` from the value to
  the setpoint, times a fraction below one (smaller again from an
  extrapolated value, ``PREDICTED_FRACTION``): overshooting a pH setpoint costs
  a dose of the opposite pump and, below pH 5.5, a swing, while falling short
  costs one more, smaller, dose.
- "Where it settles": before the first dose of a loop, a window average that
  agrees with the latest reading (the tank is not moving). After a dose, for
  pH, three window averages whose changes shrink geometrically (a
  first-order mixing lag) are extrapolated to their limit (Aitken's Δ²),
  or two small changes in a row; for TDS, whose windows are short against
  the mixing lag, the change over the last ``TDS_SETTLE_SPAN`` windows must
  be small too. An extrapolated value past the setpoint is never acted on
  with the opposite pump: the controller waits until the reading is steady.
  A dose without a visible effect (refused by the safety layer, a dry pump)
  teaches nothing and is never followed by a bigger one.

Decisions are pure arithmetic on the context; the learned state (gains,
correction factors, the dose in flight) lives on the instance, one instance
per node, and carries over from one cycle to the next.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from rules.controller import (
    ControllerOptions,
    Decision,
    DecisionContext,
    Dose,
    register,
)

__all__ = ["AdaptiveController"]

#: The expected change of the controlled value for a dose of so many ml.
_Effect = Callable[[float], float]

TDS_FRACTION = 0.95  # of the mass-balance need, per dose
TDS_AIM_PCT = 0.5  # aim this far on the near side of the setpoint
TDS_DEADBAND_PCT = 1.0  # no stock while less than this below the setpoint
TDS_DILUTE_DEADBAND_PCT = 1.5  # no water while less than this above (water costs ~V/c per ppm)
TDS_SETTLE_PCT = 0.3  # of the setpoint, between consecutive decisions
TDS_SETTLE_MIN_PPM = 2.5
TDS_SETTLE_SPAN = 3  # windows over which the TDS change must be small too
TDS_LEARN_MIN_PCT = 3.0  # a dose teaches its pump's factor only above this effect
PH_FRACTION_PRIOR = 0.9  # of the need under the prior (a ceiling: it already falls short)
PH_FRACTION = 0.85  # of the need under a learned model
PH_DEADBAND = 0.015
PH_SETTLE = 0.01
PH_PRIOR_PER_ML_L = 1.5  # pH per ml of pH solution in 1 L: steeper than the tanks served
PH_STEEPEN_PER_PH = 2.0  # assumed d(ln gain)/dpH ahead of a single observation
PH_STEEPEN_FITTED_PER_PH = 0.5  # extra steepening ahead of a two-point fit
MAX_SLOPE_PER_PH = 4.0  # bound on a fitted d(ln gain)/dpH
PH_MIN_SECANT = 0.2  # a learned secant spans at least this (extrapolations err by ~0.05)
PH_MIN_FIT_SPAN = 0.15  # a slope is fitted only through secants this far apart
PH_TRAIL = 6  # (pH, ml) points of one pump's run of doses kept for secants
MAX_DOSE_S = 60.0
MIN_DOSE_MS = 20
PREDICTED_FRACTION = 0.75  # of a pH dose computed from an extrapolated (not steady) value
MAX_AITKEN_RATIO = 0.85  # beyond, the extrapolated tail is too sensitive to noise
QUIET_FACTOR = 3.0  # first window: latest reading within this many settle thresholds


@dataclass
class _InFlight:
    """A dose whose effect has not settled yet."""

    actuator: str
    ml: float
    before: float
    expected: float
    piece: bool = False  # a piece of a longer TDS dose: the next piece follows at once
    trail: tuple[tuple[float, float], ...] = ()  # (pH, ml so far) of this pump's doses, to here


@dataclass
class _LoopState:
    seen: list[float] = field(default_factory=list)  # window averages since the last dose
    in_flight: _InFlight | None = None
    tds_factor: dict[str, float] = field(default_factory=dict)
    ph_gains: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


@register("adaptive")
class AdaptiveController:
    """Registered ``"adaptive"``: mass balance for TDS, a learned titration gain for pH."""

    name = "adaptive"

    def __init__(self, options: ControllerOptions | None = None) -> None:
        del options
        self._state: dict[str, _LoopState] = {"tds": _LoopState(), "ph": _LoopState()}

    async def decide(self, ctx: DecisionContext) -> Decision:
        """Doses for ``ctx.loop``; none while the last dose is still mixing in."""
        st = self._state[ctx.loop]
        if ctx.previous_error is None:  # a new loop of a new cycle: nothing is in flight
            st.seen.clear()
            st.in_flight = None
        st.seen.append(ctx.measured)
        del st.seen[:-8]
        dose = st.in_flight
        if dose is not None and dose.piece:
            # The mass balance says where the last piece lands: dose the next one now.
            st.in_flight = None
            decision = self._tds(ctx, st, dose.before + dose.expected)
            nxt = st.in_flight
            if nxt is not None:  # the pieces are one dose: learn from their sum
                nxt.before, nxt.expected = dose.before, dose.expected + nxt.expected
            return decision
        settled = self._settled(ctx, st)
        if settled is None:
            return self._none("waiting for the reading to settle")
        final, steady = settled
        if dose is not None and not steady and (ctx.setpoint - final) * dose.expected < 0:
            # The extrapolation says the last dose overshoots: never act on that with the
            # opposite pump before the reading has really settled.
            return self._none("extrapolated past the setpoint: waiting for a steady reading")
        if dose is not None:
            self._learn(ctx, st, dose, final)
        st.in_flight = None
        if ctx.loop == "tds":
            return self._tds(ctx, st, final)
        decision = self._ph(ctx, st, final, steady=steady)
        nxt = st.in_flight
        if nxt is not None:
            if dose is not None and dose.actuator == nxt.actuator and dose.trail:
                trail = (*dose.trail, (final, dose.trail[-1][1] + dose.ml))
            else:
                trail = ((final, 0.0),)
            nxt.trail = trail[-PH_TRAIL:]
        return decision

    def close(self) -> None:
        """Nothing to release."""

    # ---------------------------------------------------------- settling
    def _settled(self, ctx: DecisionContext, st: _LoopState) -> tuple[float, bool] | None:
        """Where the reading settles and whether it is steady there; ``None``: not known yet."""
        threshold = _settle_threshold(ctx)
        seen = st.seen
        if st.in_flight is None:
            latest = ctx.values.get(ctx.loop)
            quiet = latest is not None and abs(latest - ctx.measured) <= QUIET_FACTOR * threshold
            if len(seen) == 1 and quiet:
                return seen[-1], True
            if len(seen) >= 2 and abs(seen[-1] - seen[-2]) <= threshold:
                return seen[-1], True
            return None
        if ctx.loop == "tds":
            return _steady_span(seen, threshold, TDS_SETTLE_SPAN)
        return _settled_geometric(seen, threshold)

    # ---------------------------------------------------------------- TDS
    def _tds(self, ctx: DecisionContext, st: _LoopState, c: float) -> Decision:
        """The TDS decision from value ``c`` (measured, extrapolated or predicted)."""
        sp = ctx.setpoint
        error = sp - c
        # Diluting costs ~V/c litres per ppm, stock ~V/Cs: tolerate a little more above.
        band_pct = TDS_DEADBAND_PCT if error > 0 else TDS_DILUTE_DEADBAND_PCT
        if abs(error) <= max(band_pct / 100.0 * sp, TDS_SETTLE_MIN_PPM):
            return self._none(f"on target (error {error:+.1f} ppm)")
        volume_l = _volume_l(ctx)
        if error > 0:
            actuator = "nutrient"
            aim = sp * (1.0 - TDS_AIM_PCT / 100.0)
            stock = ctx.plant.stock_ppm
            if stock <= aim:
                return self._none("the stock is weaker than the setpoint")
            need_l = volume_l * (aim - c) / (stock - aim)
        else:
            actuator = "refill"
            aim = sp * (1.0 + TDS_AIM_PCT / 100.0)
            need_l = volume_l * (c / aim - 1.0)
        factor = st.tds_factor.get(actuator, 1.0)
        ml = TDS_FRACTION * need_l * 1000.0 / factor
        return self._dose(
            ctx, st, c, actuator=actuator, ml=ml, effect=lambda v: _tds_effect(ctx, actuator, v, c)
        )

    def _learn_tds(
        self, ctx: DecisionContext, st: _LoopState, dose: _InFlight, final: float
    ) -> None:
        observed = final - dose.before
        if abs(observed) < TDS_LEARN_MIN_PCT / 100.0 * ctx.setpoint:
            return  # a trim's effect is too small against the noise to correct the model
        old = st.tds_factor.get(dose.actuator, 1.0)
        st.tds_factor[dose.actuator] = min(2.0, max(0.5, observed / dose.expected * old))

    # ----------------------------------------------------------------- pH
    def _ph(self, ctx: DecisionContext, st: _LoopState, x0: float, *, steady: bool) -> Decision:
        """The pH decision from value ``x0`` (steady, or extrapolated: then a smaller dose)."""
        error = ctx.setpoint - x0
        if abs(error) <= PH_DEADBAND:
            return self._none(f"on target (error {error:+.3f})")
        actuator = "ph_up" if error > 0 else "ph_down"
        observations = st.ph_gains.get(actuator, [])
        gain = _gain_model(observations, _volume_l(ctx), direction=1.0 if error > 0 else -1.0)
        fraction = PH_FRACTION if observations else PH_FRACTION_PRIOR
        if not steady:
            fraction *= PREDICTED_FRACTION
        ml = fraction * gain.ml_between(x0, ctx.setpoint)
        return self._dose(
            ctx,
            st,
            x0,
            actuator=actuator,
            ml=ml,
            effect=lambda v: gain.walk(x0, ctx.setpoint, v) - x0,
        )

    @staticmethod
    def _learn_ph(st: _LoopState, dose: _InFlight, final: float) -> None:
        """One secant, from the latest earlier point of this pump's doses far enough away.

        A dose decided on an extrapolated value starts from that estimate; if
        its own change is small, the estimate's error would dominate its
        secant, so the secant reaches back along the trail of (pH, ml) points
        until it spans at least ``PH_MIN_SECANT``.
        """
        trail = dose.trail or ((dose.before, 0.0),)
        ml_after = trail[-1][1] + dose.ml
        start, ml_start = trail[0]
        for x, ml in reversed(trail):
            if abs(final - x) >= PH_MIN_SECANT:
                start, ml_start = x, ml
                break
        observed = final - start
        if observed * dose.expected <= 0 or ml_after <= ml_start:
            return
        obs = st.ph_gains.setdefault(dose.actuator, [])
        obs.append((start + observed / 2.0, abs(observed) / (ml_after - ml_start)))
        del obs[:-3]

    # ------------------------------------------------------------- learning
    def _learn(self, ctx: DecisionContext, st: _LoopState, dose: _InFlight, final: float) -> None:
        observed = final - dose.before
        expected = dose.expected
        if expected == 0 or observed / expected <= 0 or abs(observed) < 2 * _settle_threshold(ctx):
            # No visible effect: refused by the safety layer, a dry pump, or a tank far
            # less sensitive than assumed. Nothing to learn, and never a bigger dose for
            # it: a refused dose looks the same, and it would overdose once allowed.
            return
        if ctx.loop == "tds":
            self._learn_tds(ctx, st, dose, final)
        else:
            self._learn_ph(st, dose, final)

    # ---------------------------------------------------------------- doses
    def _dose(
        self,
        ctx: DecisionContext,
        st: _LoopState,
        before: float,
        *,
        actuator: str,
        ml: float,
        effect: _Effect,
    ) -> Decision:
        """Run ``actuator`` for ``ml`` (capped), expecting ``effect(ml dosed)``."""
        flow = ctx.plant.flow_ml_s.get(actuator)
        if flow is None or ml <= 0:
            return self._none(f"cannot dose {actuator}")
        ms = max(round(min(ml / flow, MAX_DOSE_S) * 1000.0), MIN_DOSE_MS)
        dosed_ml = ms / 1000.0 * flow
        expected = effect(dosed_ml)
        if ctx.loop == "tds":
            expected *= st.tds_factor.get(actuator, 1.0)
        piece = ctx.loop == "tds" and dosed_ml < 0.99 * ml
        st.in_flight = _InFlight(actuator, dosed_ml, before, expected, piece)
        st.seen.clear()
        note = f"{actuator} {dosed_ml:.1f} ml, expect {expected:+.3g} from {before:.4g}"
        return Decision(doses=(Dose(actuator, 255, ms),), controller=self.name, note=note)

    def _none(self, note: str) -> Decision:
        return Decision(doses=(), controller=self.name, note=note)


def _volume_l(ctx: DecisionContext) -> float:
    level = ctx.values.get("water_level")
    if level is not None and math.isfinite(level) and level > 0.5:
        return level
    return ctx.plant.tank_volume_l


def _tds_effect(ctx: DecisionContext, actuator: str, ml: float, c: float) -> float:
    """The mass balance: the change of TDS ``c`` when ``ml`` of ``actuator`` is mixed in."""
    volume_l = _volume_l(ctx)
    added = ml / 1000.0
    inflow = ctx.plant.stock_ppm if actuator == "nutrient" else 0.0
    return (c * volume_l + inflow * added) / (volume_l + added) - c


def _settle_threshold(ctx: DecisionContext) -> float:
    if ctx.loop == "tds":
        return max(TDS_SETTLE_MIN_PPM, TDS_SETTLE_PCT / 100.0 * ctx.setpoint)
    return PH_SETTLE


def _steady_span(seen: list[float], threshold: float, span: int) -> tuple[float, bool] | None:
    """Steady: the last two changes and the change over ``span`` windows are small."""
    if len(seen) < span + 1:
        return None
    d1, d2 = seen[-2] - seen[-3], seen[-1] - seen[-2]
    if max(abs(d1), abs(d2), abs(seen[-1] - seen[-1 - span])) <= threshold:
        return seen[-1], True
    return None


def _settled_geometric(seen: list[float], threshold: float) -> tuple[float, bool] | None:
    """After a dose: steady (two small changes), or the geometric tail's limit.

    Three averages whose changes shrink geometrically (as a first-order mixing
    lag makes equally spaced averages do) are extrapolated to their limit
    (Aitken's Δ²), so the controller need not wait for the whole tail; such a
    value is not steady.
    """
    if len(seen) < 3:
        return None
    d1, d2 = seen[-2] - seen[-3], seen[-1] - seen[-2]
    if abs(d1) <= threshold and abs(d2) <= threshold:
        return seen[-1], True
    if d1 * d2 > 0 and abs(d1) > 3 * threshold:
        ratio = d2 / d1
        if 0.1 <= ratio <= MAX_AITKEN_RATIO:
            return seen[-1] + d2 * ratio / (1.0 - ratio), False
    return None


def _gain_model(
    observations: list[tuple[float, float]], volume_l: float, *, direction: float
) -> _Gain:
    """The pH change per ml as a function of pH, pessimistic ahead of what was observed."""
    ceiling = PH_PRIOR_PER_ML_L / volume_l
    if not observations:
        return _Gain(ceiling, 0.0, 0.0, 0.0, 0.0, ceiling)
    ceiling = max(ceiling, *(g for _, g in observations))
    mid, gain = observations[-1]
    frontier = max(m * direction for m, _ in observations) * direction
    previous = [(m, g) for m, g in observations[:-1] if abs(m - mid) >= PH_MIN_FIT_SPAN]
    if not previous:
        return _Gain(gain, mid, 0.0, frontier, PH_STEEPEN_PER_PH * direction, ceiling)
    m0, g0 = previous[-1]
    slope = (math.log(gain) - math.log(g0)) / (mid - m0)
    slope = max(-MAX_SLOPE_PER_PH, min(MAX_SLOPE_PER_PH, slope))
    return _Gain(gain, mid, slope, frontier, PH_STEEPEN_FITTED_PER_PH * direction, ceiling)


@dataclass(frozen=True)
class _Gain:
    """pH per ml: ``g·exp(slope·(pH − at))``, steepening by ``ahead`` per pH past ``frontier``.

    ``ahead`` carries the sign of the direction of travel; the gain never
    exceeds ``ceiling``.
    """

    g: float
    at: float
    slope: float
    frontier: float
    ahead: float
    ceiling: float

    def __call__(self, ph: float) -> float:
        past = max(0.0, (ph - self.frontier) * (1.0 if self.ahead >= 0 else -1.0))
        ln_g = math.log(self.g) + self.slope * (ph - self.at) + abs(self.ahead) * past
        return min(self.ceiling, math.exp(ln_g))

    def ml_between(self, x0: float, x1: float, n: int = 32) -> float:
        """ml to move from ``x0`` to ``x1``: ∫ dpH / gain (midpoint rule)."""
        h = (x1 - x0) / n
        return sum(abs(h) / self(x0 + (i + 0.5) * h) for i in range(n))

    def walk(self, x0: float, x1: float, ml: float, n: int = 32) -> float:
        """Where ``ml`` takes the value from ``x0`` towards ``x1`` (at most ``x1``)."""
        h = (x1 - x0) / n
        spent, x = 0.0, x0
        for i in range(n):
            seg = abs(h) / self(x0 + (i + 0.5) * h)
            if spent + seg >= ml:
                return x + h * (ml - spent) / seg
            spent += seg
            x += h
        return x1
