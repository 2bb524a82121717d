"""Our controller, ``"adaptive"``: model-based doses that learn the tank, step by step.

The thesis's fuzzy controller and the close-loop baseline dose a fixed-size
step every averaging window, whatever the tank: too little far from the
setpoint, too much near it, and, because the probe sees a dose only after
the circulation's dead time and mixing lag, they keep dosing while the first
dose is still on its way (overshoot), or never arrive (pH down in the thesis).
This controller instead computes the volume the tank needs, doses most of it
in one run, and then waits until the reading has stopped moving before it
looks again:

- **TDS up** — mass balance with the stock: ``v = V·(sp − c)/(Cs − sp)``
  (the added volume dilutes too); **TDS down** — dilution with fresh water:
  ``v = V·(c/sp − 1)``. ``V`` is the measured ``water_level`` when there is
  one, else the configured tank volume. A correction factor per pump,
  learned as observed/expected change once mixed, absorbs a wrong stock
  strength or tank volume.
- **pH** — no chemistry is assumed. The pH change per ml is learned online
  from each dose's observed effect once mixed, per pump, starting from a
  conservative (high) prior of ``PH_PRIOR_PER_ML_L`` pH per ml in one litre,
  so the first dose is small. Titration curves are steep far from a buffer
  and flat inside it; from two or more observations the gain is extrapolated
  log-linearly in pH and the volume is the integral of ``dpH / gain`` from
  the measurement to the setpoint.
- Each dose is a fraction of the computed need (``TDS_FRACTION`` of the TDS
  need; ``PH_FRACTION_*`` of the pH need, smaller while the gain is a single
  secant, and less again when the value it starts from is extrapolated), so
  the value approaches from one side; the last few per cent are a short trim
  dose. An extrapolated value past the setpoint is never acted on with the
  opposite pump: the controller waits until the reading is steady. Inside a
  small dead band (``TDS_DEADBAND_PCT`` % of the setpoint below it,
  ``TDS_DILUTE_DEADBAND_PCT`` % above it, ``PH_DEADBAND`` pH) nothing is
  dosed.
- "Mixed" means: the last two changes between consecutive decisions'
  averaged values are below a settle threshold. Before the first dose of a
  loop one such change is required, so a tank that is still moving (someone
  just topped it up) is not dosed on a transient. To save time, three window averages whose changes
  shrink geometrically (a first-order mixing lag) are extrapolated to where
  they will settle (Aitken's Δ²). Only steady values teach. A dose without a
  visible effect (refused by the safety layer, a dry pump) teaches nothing and
  is never followed by a bigger one.

Decisions are pure arithmetic on the context; the learned state (gains,
the dose in flight) lives on the instance, one instance per node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rules.controller import (
    ControllerOptions,
    Decision,
    DecisionContext,
    Dose,
    register,
)

__all__ = ["AdaptiveController"]

TDS_FRACTION = 0.92
TDS_DEADBAND_PCT = 1.0
TDS_DILUTE_DEADBAND_PCT = 1.5
TDS_SETTLE_PCT = 0.3  # of the setpoint, between consecutive decisions
TDS_SETTLE_MIN_PPM = 2.5
PH_FRACTION_ONE = 0.6  # with one secant (or the prior) the curve's bend is unknown
PH_FRACTION_MODEL = 0.8  # with a log-linear gain model
PH_DEADBAND = 0.02
PH_SETTLE = 0.01
PH_PRIOR_PER_ML_L = 1.5  # pH per ml of pH solution in 1 L: steeper than any real tank
MAX_DOSE_S = 60.0
MIN_DOSE_MS = 20
MAX_SLOPE_PER_PH = 4.0  # bound on d(ln gain)/dpH when extrapolating
MAX_AITKEN_RATIO = 0.85  # beyond, the extrapolated tail is too sensitive to noise
PREDICTED_FRACTION = 0.7  # of a dose computed from an extrapolated (not steady) value


@dataclass
class _InFlight:
    """A dose whose effect has not settled yet."""

    actuator: str
    ml: float
    before: float
    expected: float


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
        self._caution = 1.0

    async def decide(self, ctx: DecisionContext) -> Decision:
        """Doses for ``ctx.loop``; none while the last dose is still mixing in."""
        st = self._state[ctx.loop]
        if ctx.previous_error is None:  # a new loop of a new cycle: nothing is in flight
            st.seen.clear()
            st.in_flight = None
        st.seen.append(ctx.measured)
        del st.seen[:-4]
        settled = _settled_value(
            st.seen, _settle_threshold(ctx), after_dose=st.in_flight is not None
        )
        if settled is None:
            return self._none("waiting for the reading to settle")
        final, steady = settled
        dose = st.in_flight
        if dose is not None and not steady and (ctx.setpoint - final) * dose.expected < 0:
            # The extrapolation says the last dose overshoots: never act on that with the
            # opposite pump before the reading has really settled.
            return self._none("extrapolated past the setpoint: waiting for a steady reading")
        if dose is not None and steady:
            self._learn(ctx, st, dose, final)
        st.in_flight = None
        # An extrapolated value tends to fall short after a long dose: dose less on it.
        self._caution = 1.0 if steady else PREDICTED_FRACTION
        error = ctx.setpoint - final
        if ctx.loop == "tds":
            # Diluting costs ~V/c litres per ppm, nutrient ~V/Cs: tolerate a little more above.
            band_pct = TDS_DEADBAND_PCT if error > 0 else TDS_DILUTE_DEADBAND_PCT
            if abs(error) <= max(band_pct / 100.0 * ctx.setpoint, TDS_SETTLE_MIN_PPM):
                return self._none(f"on target (error {error:+.1f} ppm)")
            actuator, ml, expected = self._tds_need(ctx, st, final)
            return self._dose(ctx, st, final, actuator=actuator, ml=ml, expected=expected)
        if abs(error) <= PH_DEADBAND:
            return self._none(f"on target (error {error:+.3f})")
        actuator, ml, expected = self._ph_need(ctx, st, final)
        return self._dose(ctx, st, final, actuator=actuator, ml=ml, expected=expected)

    def close(self) -> None:
        """Nothing to release."""

    # ------------------------------------------------------------------ TDS
    def _tds_need(self, ctx: DecisionContext, st: _LoopState, c: float) -> tuple[str, float, float]:
        """(pump, ml to dose, expected change) for the TDS loop from value ``c``."""
        volume_l = _volume_l(ctx)
        sp = ctx.setpoint
        if c < sp:
            stock = ctx.plant.stock_ppm
            if stock <= sp:
                return "nutrient", 0.0, 0.0
            actuator = "nutrient"
            need_l = volume_l * (sp - c) / (stock - sp)
        else:
            actuator = "refill"
            need_l = volume_l * (c / sp - 1.0)
        factor = st.tds_factor.get(actuator, 1.0)
        ml = TDS_FRACTION * need_l * 1000.0 / factor
        return actuator, ml, self._tds_effect(ctx, actuator, ml, c) * factor

    @staticmethod
    def _tds_effect(ctx: DecisionContext, actuator: str, ml: float, c: float) -> float:
        volume_l = _volume_l(ctx)
        added = ml / 1000.0
        inflow = ctx.plant.stock_ppm if actuator == "nutrient" else 0.0
        return (c * volume_l + inflow * added) / (volume_l + added) - c

    # ------------------------------------------------------------------- pH
    def _ph_need(self, ctx: DecisionContext, st: _LoopState, x0: float) -> tuple[str, float, float]:
        """(pump, ml to dose, expected change) for the pH loop from value ``x0``."""
        actuator = "ph_up" if ctx.setpoint > x0 else "ph_down"
        observations = st.ph_gains.get(actuator, [])
        x1 = ctx.setpoint
        gain = _gain_model(observations, _volume_l(ctx))
        fraction = PH_FRACTION_MODEL if _has_model(observations) else PH_FRACTION_ONE
        # ml = ∫ dpH / gain(pH) from the measurement to the setpoint (midpoint rule).
        n = 16
        h = (x1 - x0) / n
        full_ml = sum(abs(h) / gain(x0 + (i + 0.5) * h) for i in range(n))
        ml = fraction * full_ml
        # Expected change: walk the same model until ml is spent.
        spent, x = 0.0, x0
        for i in range(n):
            seg = abs(h) / gain(x0 + (i + 0.5) * h)
            if spent + seg >= ml:
                x += h * (ml - spent) / seg
                break
            spent += seg
            x += h
        return actuator, ml, x - x0

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
            ratio = observed / expected * st.tds_factor.get(dose.actuator, 1.0)
            st.tds_factor[dose.actuator] = min(2.0, max(0.5, ratio))
            return
        gain = abs(observed) / dose.ml
        mid = dose.before + observed / 2.0
        obs = st.ph_gains.setdefault(dose.actuator, [])
        obs.append((mid, gain))
        del obs[:-3]

    # ---------------------------------------------------------------- doses
    def _dose(
        self,
        ctx: DecisionContext,
        st: _LoopState,
        before: float,
        *,
        actuator: str,
        ml: float,
        expected: float,
    ) -> Decision:
        flow = ctx.plant.flow_ml_s.get(actuator)
        if flow is None or ml <= 0:
            return self._none(f"cannot dose {actuator}")
        ml *= self._caution
        expected *= self._caution
        ms = round(min(ml / flow, MAX_DOSE_S) * 1000.0)
        ms = max(ms, MIN_DOSE_MS)
        dosed_ml = ms / 1000.0 * flow
        expected *= dosed_ml / ml
        st.in_flight = _InFlight(actuator, dosed_ml, before, expected)
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


def _settle_threshold(ctx: DecisionContext) -> float:
    if ctx.loop == "tds":
        return max(TDS_SETTLE_MIN_PPM, TDS_SETTLE_PCT / 100.0 * ctx.setpoint)
    return PH_SETTLE


def _settled_value(
    seen: list[float], threshold: float, *, after_dose: bool
) -> tuple[float, bool] | None:
    """Where the reading settles, and whether it is steady there; ``None``: not known yet.

    Steady — the last two changes (one before a first dose) are within
    ``threshold`` — gives the last average. After a dose, three averages
    whose changes shrink geometrically (as a first-order mixing lag makes
    equally spaced averages do) are extrapolated to their limit (Aitken's
    Δ²), so the controller need not wait for the whole tail; such a value
    is not steady.
    """
    need = 3 if after_dose else 2
    if len(seen) < need:
        return None
    d2 = seen[-1] - seen[-2]
    if not after_dose and abs(d2) <= threshold:
        return seen[-1], True
    d1 = seen[-2] - seen[-3] if len(seen) >= 3 else math.inf
    if abs(d1) <= threshold and abs(d2) <= threshold:
        return seen[-1], True
    if after_dose and d1 * d2 > 0 and abs(d1) > 3 * threshold:
        ratio = d2 / d1
        if 0.1 <= ratio <= MAX_AITKEN_RATIO:
            return seen[-1] + d2 * ratio / (1.0 - ratio), False
    return None


def _has_model(observations: list[tuple[float, float]]) -> bool:
    return len(observations) >= 2 and abs(observations[-1][0] - observations[-2][0]) > 0.05


def _gain_model(observations: list[tuple[float, float]], volume_l: float) -> _Gain:
    """The pH change per ml as a function of pH, from what was observed so far."""
    if not observations:
        return _Gain(PH_PRIOR_PER_ML_L / volume_l, 0.0, 0.0)
    mid, gain = observations[-1]
    if not _has_model(observations):
        return _Gain(gain, mid, 0.0)
    m0, g0 = observations[-2]
    slope = (math.log(gain) - math.log(g0)) / (mid - m0)
    slope = max(-MAX_SLOPE_PER_PH, min(MAX_SLOPE_PER_PH, slope))
    return _Gain(gain, mid, slope)


@dataclass(frozen=True)
class _Gain:
    """``gain(pH) = g · exp(slope · (pH − at))``, pH per ml."""

    g: float
    at: float
    slope: float

    def __call__(self, ph: float) -> float:
        return self.g * math.exp(self.slope * (ph - self.at))
