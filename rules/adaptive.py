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
- **pH** — no chemistry is assumed; everything is per litre of tank, so a
  change of water level does not invalidate what was learned. Two things are
  learned per pump from each dose's effect, over a span of at least
  ``PH_MIN_SECANT`` pH of the trail of (pH, ml/L) points of that pump's doses
  (a point read off an extrapolation errs by a few hundredths, which would
  dominate the span of a small dose):

  * the tank's **titration curve** (:class:`_Titration`): the ml/L each
    0.05 pH takes, fitted to every span travelled, in this cycle or an
    earlier one. Where the way to the setpoint lies on it, the dose is
    ``PH_FRACTION_KNOWN`` of what the curve says: a tank the gateway has
    worked on before is set in one dose;
  * a **gain model** for the rest of the way, deliberately pessimistic
    outside what was observed, because titration curves are steep far from
    a buffer and flat inside it and which way the curve bends ahead is
    unknown until two doses show it: with no observation the gain is the
    prior ``PH_PRIOR_PER_ML_L`` (steeper than the tanks this gateway serves),
    a ceiling that makes the first dose on a new tank fall short; beyond the
    farthest observed point the gain is assumed to steepen by
    ``PH_STEEPEN_PER_PH`` (one observation) or ``PH_STEEPEN_FITTED_PER_PH``
    (a log-linear fit through two observations) per pH, and behind the
    observations it is not allowed to flatten; never above the ceiling.
    That part of the dose is ``∫ dpH / gain(pH)`` times a fraction below one.

  From an extrapolated value the whole dose is smaller again
  (``PREDICTED_FRACTION``): overshooting a pH setpoint costs a dose of the
  opposite pump and, below pH 5.5, a swing, while falling short costs one
  more, smaller, dose.
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

Decisions are pure arithmetic on the context; the learned state (curves,
gains, correction factors, the dose in flight) lives on the instance, one
instance per node, and carries over from one cycle to the next. What was
learned about the tank is handed to the gateway as a JSON snapshot
(:meth:`AdaptiveController.learned`) and taken back after a restart
(:meth:`AdaptiveController.restore`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rules.controller import (
    ControllerError,
    ControllerOptions,
    Decision,
    DecisionContext,
    Dose,
    register,
)

__all__ = ["AdaptiveController"]

#: The expected change of the controlled value for a dose of so many ml.
_Effect = Callable[[float], float]

STATE_VERSION = 1  # of the learned-state snapshot (saved by the gateway across restarts)
TDS_FRACTION = 0.95  # of the mass-balance need, per dose
TDS_AIM_PCT = 0.5  # aim this far on the near side of the setpoint
TDS_DEADBAND_PCT = 1.0  # no stock while less than this below the setpoint
TDS_DILUTE_DEADBAND_PCT = 1.5  # no water while less than this above (water costs ~V/c per ppm)
TDS_SETTLE_PCT = 0.3  # of the setpoint, between consecutive decisions
TDS_SETTLE_MIN_PPM = 2.5
TDS_SETTLE_SPAN = 3  # windows over which the TDS change must be small too
TDS_LEARN_MIN_PCT = 3.0  # a dose teaches its pump's factor only above this effect
TDS_FACTOR_DEADBAND = 0.05  # observed/expected this close to 1 teaches nothing
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
PH_BIN = 0.05  # width of a bin of the learned titration curve, pH
PH_GRID = (2.0, 11.0)  # the pH range the curve is learned over
PH_SPANS = 24  # spans a pump's curve is fitted to (the latest)
PH_RECENCY = 0.9  # weight of a span per newer span after it (the tank drifts)
PH_SMOOTHING = 4.0  # weight of the curvature penalty on ln density between neighbouring bins
PH_EXTRAPOLATED_TRUST = 0.25  # weight of a span end read off an extrapolation, not a steady pH
PH_FRACTION_KNOWN = 0.97  # of the need over bins of the curve already travelled
PH_CHANGED_RATIO = 1.4  # a steady span this far off the curve: the tank changed, start again
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
    trail: tuple[tuple[float, float, float], ...] = ()  # (pH, ml/L so far, trust) to here
    volume_l: float = 1.0  # the tank's volume when it was dosed


@dataclass
class _LoopState:
    seen: list[float] = field(default_factory=list)  # window averages since the last dose
    in_flight: _InFlight | None = None
    tds_factor: dict[str, float] = field(default_factory=dict)
    ph_gains: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # per ml/L
    curves: dict[str, _Titration] = field(default_factory=dict)


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
        trust = 1.0 if steady else PH_EXTRAPOLATED_TRUST
        if dose is not None:
            self._learn(ctx, st, dose, final, trust)
        st.in_flight = None
        if ctx.loop == "tds":
            return self._tds(ctx, st, final)
        decision = self._ph(ctx, st, final, steady=steady)
        nxt = st.in_flight
        if nxt is not None:
            if dose is not None and dose.actuator == nxt.actuator and dose.trail:
                per_l = dose.trail[-1][1] + dose.ml / dose.volume_l
                trail = (*dose.trail, (final, per_l, trust))
            else:
                trail = ((final, 0.0, trust),)
            nxt.trail = trail[-PH_TRAIL:]
        return decision

    def close(self) -> None:
        """Nothing to release."""

    # ---------------------------------------------------------- knowledge
    def learned(self) -> dict[str, Any]:
        """What this controller knows of the tank (the :class:`~rules.controller.Learner` side).

        The TDS pumps' correction factors, the latest pH secants per pump (pH
        per ml/L at a pH) and the spans each pH pump's titration curve is
        fitted to; ``{}`` before the first lesson.
        """
        tds, ph = self._state["tds"], self._state["ph"]
        if not (tds.tds_factor or ph.ph_gains or ph.curves):
            return {}
        return {
            "version": STATE_VERSION,
            "tds_factor": dict(tds.tds_factor),
            "ph_gains": {p: [list(o) for o in obs] for p, obs in ph.ph_gains.items()},
            "ph_spans": {p: [list(sp) for sp in c.spans] for p, c in ph.curves.items()},
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back a :meth:`learned` snapshot; :class:`ControllerError` if it is unusable."""
        try:
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"version {state.get('version')!r}, expected {STATE_VERSION}")
            factors = {str(p): float(f) for p, f in state["tds_factor"].items()}
            gains = {
                str(p): [(float(m), float(g)) for m, g in obs]
                for p, obs in state["ph_gains"].items()
            }
            spans = {
                str(p): [(float(lo), float(hi), float(v), float(t)) for lo, hi, v, t in rows]
                for p, rows in state["ph_spans"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ControllerError(f"adaptive: unusable learned state: {exc}") from exc
        numbers = [
            *factors.values(),
            *(v for obs in gains.values() for o in obs for v in o),
            *(v for rows in spans.values() for r in rows for v in r),
        ]
        if not all(math.isfinite(v) for v in numbers):
            raise ControllerError("adaptive: unusable learned state: a value is not finite")
        if not all(0.5 <= f <= 2.0 for f in factors.values()) or not all(
            g > 0 for obs in gains.values() for _, g in obs
        ):
            raise ControllerError("adaptive: unusable learned state: a factor or gain out of range")
        if not all(
            PH_GRID[0] <= lo < hi <= PH_GRID[1] and v > 0 and 0 < t <= 1
            for rows in spans.values()
            for lo, hi, v, t in rows
        ):
            raise ControllerError("adaptive: unusable learned state: a pH span out of range")
        self._state["tds"].tds_factor = factors
        ph = self._state["ph"]
        ph.ph_gains = {p: obs[-3:] for p, obs in gains.items()}
        ph.curves = {p: _Titration(rows[-PH_SPANS:]) for p, rows in spans.items()}

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
        ratio = observed / dose.expected  # the expectation already holds the factor so far
        if abs(ratio - 1.0) <= TDS_FACTOR_DEADBAND:
            # Within what a reading taken before the last of the mixing, or the noise,
            # explains; the dose fraction's margin and the trim absorb it. Carried over
            # to later cycles, such an error would make their first doses overshoot.
            return
        old = st.tds_factor.get(dose.actuator, 1.0)
        st.tds_factor[dose.actuator] = min(2.0, max(0.5, ratio * old))

    # ----------------------------------------------------------------- pH
    def _ph(self, ctx: DecisionContext, st: _LoopState, x0: float, *, steady: bool) -> Decision:
        """The pH decision from value ``x0`` (steady, or extrapolated: then a smaller dose).

        The way to the setpoint is costed bin by bin: over bins of the titration
        curve this pump has already travelled, at their learned ml/L; elsewhere by
        the pessimistic gain model. Each part gets its own margin.
        """
        error = ctx.setpoint - x0
        if abs(error) <= PH_DEADBAND:
            return self._none(f"on target (error {error:+.3f})")
        actuator = "ph_up" if error > 0 else "ph_down"
        observations = st.ph_gains.get(actuator, [])
        gain = _gain_model(observations, direction=1.0 if error > 0 else -1.0)
        curve = st.curves.get(actuator) or _Titration()
        known, modelled = curve.cost(x0, ctx.setpoint, gain)
        per_l = PH_FRACTION_KNOWN * known
        per_l += (PH_FRACTION if observations else PH_FRACTION_PRIOR) * modelled
        if not steady:
            per_l *= PREDICTED_FRACTION
        volume_l = _volume_l(ctx)
        decision = self._dose(
            ctx,
            st,
            x0,
            actuator=actuator,
            ml=per_l * volume_l,
            effect=lambda v: curve.walk(x0, ctx.setpoint, v / volume_l, gain) - x0,
        )
        if st.in_flight is not None:
            st.in_flight.volume_l = volume_l
        return decision

    @staticmethod
    def _learn_ph(st: _LoopState, dose: _InFlight, final: float, trust: float) -> None:
        """One secant, from the latest earlier point of this pump's doses far enough away.

        A dose decided on an extrapolated value starts from that estimate; if
        its own change is small, the estimate's error would dominate its
        secant, so the secant reaches back along the trail of (pH, ml/L)
        points until it spans at least ``PH_MIN_SECANT``. The same span is
        what the titration curve learns from, trusted as much as its ends
        (``trust``: 1 for a steady reading, less for an extrapolated one).
        """
        trail = dose.trail or ((dose.before, 0.0, PH_EXTRAPOLATED_TRUST),)
        per_l_after = trail[-1][1] + dose.ml / dose.volume_l
        start, per_l_start, start_trust = trail[0]
        for x, per_l, t in reversed(trail):
            if abs(final - x) >= PH_MIN_SECANT:
                start, per_l_start, start_trust = x, per_l, t
                break
        observed = final - start
        if observed * dose.expected <= 0 or per_l_after <= per_l_start:
            return
        obs = st.ph_gains.setdefault(dose.actuator, [])
        obs.append((start + observed / 2.0, abs(observed) / (per_l_after - per_l_start)))
        del obs[:-3]
        st.curves.setdefault(dose.actuator, _Titration()).observe(
            start, final, per_l_after - per_l_start, start_trust * trust
        )

    # ------------------------------------------------------------- learning
    def _learn(
        self, ctx: DecisionContext, st: _LoopState, dose: _InFlight, final: float, trust: float
    ) -> None:
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
            self._learn_ph(st, dose, final, trust)

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


def _gain_model(observations: list[tuple[float, float]], *, direction: float) -> _Gain:
    """The pH change per ml/L as a function of pH, pessimistic outside what was observed.

    Observations may come from earlier cycles in another part of the curve,
    so the value can lie behind them as well as ahead.
    """
    ceiling = PH_PRIOR_PER_ML_L
    if not observations:
        return _Gain(ceiling, 0.0, 0.0, 0.0, 0.0, 0.0, ceiling)
    ceiling = max(ceiling, *(g for _, g in observations))
    mid, gain = observations[-1]
    frontier = max(m * direction for m, _ in observations) * direction
    rear = min(m * direction for m, _ in observations) * direction
    previous = [(m, g) for m, g in observations[:-1] if abs(m - mid) >= PH_MIN_FIT_SPAN]
    if not previous:
        return _Gain(gain, mid, 0.0, rear, frontier, PH_STEEPEN_PER_PH * direction, ceiling)
    m0, g0 = previous[-1]
    slope = (math.log(gain) - math.log(g0)) / (mid - m0)
    slope = max(-MAX_SLOPE_PER_PH, min(MAX_SLOPE_PER_PH, slope))
    return _Gain(gain, mid, slope, rear, frontier, PH_STEEPEN_FITTED_PER_PH * direction, ceiling)


@dataclass(frozen=True)
class _Gain:
    """pH per ml/L: ``g·exp(slope·(pH − at))``, steepening by ``ahead`` per pH past ``frontier``.

    ``ahead`` carries the sign of the direction of travel. Behind ``rear``
    (the observation farthest back) the fit is not followed where it would
    flatten: the gain stays at least its value at ``rear``. The gain never
    exceeds ``ceiling``.
    """

    g: float
    at: float
    slope: float
    rear: float
    frontier: float
    ahead: float
    ceiling: float

    def __call__(self, ph: float) -> float:
        sign = 1.0 if self.ahead >= 0 else -1.0
        ln_g = math.log(self.g) + self.slope * (ph - self.at)
        if (ph - self.rear) * sign < 0:
            ln_g = max(ln_g, math.log(self.g) + self.slope * (self.rear - self.at))
        ln_g += abs(self.ahead) * max(0.0, (ph - self.frontier) * sign)
        return min(self.ceiling, math.exp(ln_g))

    def ml_between(self, x0: float, x1: float, n: int = 4) -> float:
        """ml/L to move from ``x0`` to ``x1``: ∫ dpH / gain (midpoint rule)."""
        h = (x1 - x0) / n
        return sum(abs(h) / self(x0 + (i + 0.5) * h) for i in range(n))


class _Titration:
    """This tank's titration curve for one pump: ml per litre to cross each ``PH_BIN`` of pH.

    What is observed is spans: the ml/L it took to move the settled pH from one
    value to another. A span says nothing about how its ml/L spread over the
    pH it covers, and the spread is far from even (the curve flattens tenfold
    per pH towards a buffer's pKa), so the curve is the smoothest one that
    fits every span: ``ln`` of the density per bin, least squares on each
    span's ``ln`` ml/L, with a penalty on the second difference of
    neighbouring bins. Nested or overlapping spans (each new dose's span
    reaches back ``PH_MIN_SECANT``) pin the shape down. The latest
    ``PH_SPANS`` spans are kept, newer ones weigh more (``PH_RECENCY``), so
    the curve follows a tank whose buffering drifts as nutrients are taken up
    or topped up; a span between steady readings that differs from the curve
    by more than ``PH_CHANGED_RATIO`` means the tank changed (a new nutrient
    solution), and the curve starts again from it. Bins no span covered are
    unknown: the gain model costs them.
    """

    def __init__(self, spans: list[tuple[float, float, float, float]] | None = None) -> None:
        self.spans: list[tuple[float, float, float, float]] = list(
            spans or []
        )  # lo, hi, ml/L, trust
        self._fitted: dict[int, float] | None = None

    @staticmethod
    def _pieces(x0: float, x1: float) -> list[tuple[float, float, int]]:
        """``(from, to, bin)`` sub-spans of ``x0`` → ``x1``, in the order travelled."""
        lo, hi = min(x0, x1), max(x0, x1)
        first = math.floor((lo - PH_GRID[0]) / PH_BIN)
        last = math.ceil((hi - PH_GRID[0]) / PH_BIN)
        pieces = []
        for k in range(first, last):
            a = max(lo, PH_GRID[0] + k * PH_BIN)
            b = min(hi, PH_GRID[0] + (k + 1) * PH_BIN)
            if b - a > 1e-9:
                pieces.append((a, b, k) if x1 > x0 else (b, a, k))
        return pieces if x1 > x0 else pieces[::-1]

    def observe(self, x0: float, x1: float, per_l: float, trust: float = 1.0) -> None:
        """A dose (with its trail) took the settled pH from ``x0`` to ``x1`` with ``per_l`` ml/L.

        ``trust`` (0..1] weighs the span in the fit: less when an end was extrapolated.
        """
        lo, hi = min(x0, x1), max(x0, x1)
        if hi - lo < PH_BIN / 2 or not per_l > 0 or lo < PH_GRID[0] or hi > PH_GRID[1]:
            return
        density = self.density
        pieces = self._pieces(lo, hi)
        if trust >= 1.0 and all(k in density for _, _, k in pieces):
            predicted = math.fsum(abs(b - a) * density[k] for a, b, k in pieces)
            if abs(math.log(per_l / predicted)) > math.log(PH_CHANGED_RATIO):
                self.spans.clear()  # not the tank the curve was learned on (new solution)
        self.spans.append((lo, hi, per_l, trust))
        del self.spans[:-PH_SPANS]
        self._fitted = None

    @property
    def density(self) -> dict[int, float]:
        """ml/L per pH of every bin some span covered (fitted on first use after a change)."""
        if self._fitted is None:
            self._fitted = _fit_curve(self.spans, self._pieces)
        return self._fitted

    def _costed(self, x0: float, x1: float, gain: _Gain) -> list[tuple[float, float, float, bool]]:
        """``(from, to, ml/L, learned)`` per piece of ``x0`` → ``x1``: by the curve or ``gain``."""
        density = self.density
        costed = []
        for a, b, k in self._pieces(x0, x1):
            d = density.get(k)
            if d is None:
                costed.append((a, b, gain.ml_between(a, b), False))
            else:
                costed.append((a, b, abs(b - a) * d, True))
        return costed

    def cost(self, x0: float, x1: float, gain: _Gain) -> tuple[float, float]:
        """ml/L from ``x0`` to ``x1``: over learned bins, and over the rest by ``gain``."""
        costed = self._costed(x0, x1, gain)
        known = sum(ml for _, _, ml, learned in costed if learned)
        modelled = sum(ml for _, _, ml, learned in costed if not learned)
        return known, modelled

    def walk(self, x0: float, x1: float, per_l: float, gain: _Gain) -> float:
        """Where ``per_l`` ml/L take the pH from ``x0`` towards ``x1`` (at most ``x1``)."""
        spent = 0.0
        for a, b, piece, _ in self._costed(x0, x1, gain):
            if spent + piece >= per_l:
                return a + (b - a) * (per_l - spent) / piece
            spent += piece
        return x1


def _fit_curve(
    spans: list[tuple[float, float, float, float]],
    pieces: Callable[[float, float], list[tuple[float, float, int]]],
) -> dict[int, float]:
    """The smoothest ln-density per bin that fits ``spans`` (Gauss-Newton, a few steps)."""
    if not spans:
        return {}
    import numpy as np  # only nodes whose controller learns a curve pay for numpy

    cover = [{k: abs(b - a) for a, b, k in pieces(lo, hi)} for lo, hi, _, _ in spans]
    bins = sorted({k for c in cover for k in c})
    col = {k: i for i, k in enumerate(bins)}
    overlap = np.zeros((len(spans), len(bins)))
    for row, c in enumerate(cover):
        for k, w in c.items():
            overlap[row, col[k]] = w
    target = np.log([per_l for _, _, per_l, _ in spans])
    recency = PH_RECENCY ** np.arange(len(spans) - 1, -1, -1, dtype=float)
    weight = np.sqrt(recency * np.array([trust for *_, trust in spans]))
    smooth = [(col[k - 1], col[k], col[k + 1]) for k in bins if k - 1 in col and k + 1 in col]
    second = np.zeros((len(smooth), len(bins)))
    for row, (i, j, m) in enumerate(smooth):
        second[row, i], second[row, j], second[row, m] = 1.0, -2.0, 1.0
    second *= math.sqrt(PH_SMOOTHING)
    spans_density = [per_l / (hi - lo) for lo, hi, per_l, _ in spans]
    u = np.full(len(bins), math.log(math.fsum(spans_density) / len(spans_density)))
    for _ in range(30):
        e = np.exp(u)
        total = overlap @ e
        residual = np.concatenate([weight * (np.log(total) - target), second @ u])
        jacobian = np.vstack([weight[:, None] * overlap * e / total[:, None], second])
        step = np.linalg.lstsq(jacobian, -residual, rcond=None)[0]
        u += np.clip(step, -2.0, 2.0)
        if float(np.max(np.abs(step))) < 1e-6:
            break
    return {k: float(math.exp(u[col[k]])) for k in bins}
