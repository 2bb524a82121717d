"""Our controller, ``"adaptive"``: mass-balance nutrient doses that learn the pumps, and pH at
the envelope's limit.

The thesis's fuzzy controller and the close-loop baseline dose a fixed-size
step every averaging window, whatever the tank: too little far from the
setpoint, too much near it. This controller computes the volume the tank
needs from what a real gateway knows (the configured plant constants, the
readings, its own doses) and looks again only once the dose has mixed in.

- **TDS up** — mass balance with the stock: ``v = V·(aim − c)/(Cs − aim)``
  (the added volume dilutes too); **TDS down** — dilution with fresh water:
  ``v = V·(c/aim − 1)``. ``V`` is the measured ``water_level`` when there is
  one, else the configured tank volume. The aim lies ``TDS_AIM_PCT`` % on the
  near side of the setpoint, so the value approaches from one side and stops
  inside a small dead band instead of trimming past the setpoint.
- **A config that may be wrong.** A grower's ``plant:`` figures (volume,
  stock strength, pump flow) are guesses, each maybe 20 % off, and together
  up to ~1.8× off. Until a pump's effect on this tank has been measured, a
  dose is ``TDS_FRACTION_UNKNOWN`` of the computed need, small enough not to
  overshoot even then; the measured effect (observed / expected change,
  from a dose whose effect is large against the noise) becomes the pump's
  correction factor, and later doses are ``TDS_FRACTION`` of the corrected
  need. A dose longer than ``MAX_DOSE_S`` is run in pieces that follow each
  other without waiting for the reading, but all the pieces together never
  exceed the fraction of the need, so a wrong config cannot make them
  overshoot either.
- **pH** — no chemistry is assumed. The pH safety envelope
  (rules/envelope.py, applied by the cycle) bounds every pH dose by the
  steepest titration the tank can plausibly have, learns the tank from each
  dose's response and allows at most what moves the pH by half the
  remaining error; this controller doses that limit. The envelope, not the
  controller, holds what is known of the tank's titration (the gateway keeps
  it across restarts), so every controller on the node benefits from it.

"Where it settles" (TDS) is rules/settling.py's test, shared with ``ml``: the
last windows agree, and the change over the last third of the time since the
dose ended is small against the dose's change so far, whatever the mixing
lag. A dose
without a visible effect (refused by the safety layer, a dry pump) teaches
nothing and is never followed by a bigger one.

The pump correction factors are what this controller learns about the tank;
the gateway saves them (:meth:`AdaptiveController.learned`) and hands them
back after a restart (:meth:`AdaptiveController.restore`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
from rules.envelope import CAP_PH, HALF, PhEnvelope
from rules.settling import MIN_PPM, Settling, threshold

__all__ = ["AdaptiveController"]

STATE_VERSION = 2  # of the learned-state snapshot (saved by the gateway across restarts)
TDS_FRACTION = 0.95  # of the need, per dose, once the pump's effect has been measured
TDS_FRACTION_UNKNOWN = 0.55  # before: a config 1.8× off still lands short of the setpoint
TDS_AIM_PCT = 0.5  # aim this far on the near side of the setpoint
TDS_DEADBAND_PCT = 1.0  # no stock while less than this below the setpoint
TDS_DILUTE_DEADBAND_PCT = 1.5  # no water while less than this above (water costs ~V/c per ppm)
TDS_LEARN_MIN_PCT = 3.0  # a dose teaches its pump's factor only above this effect
TDS_FACTOR_DEADBAND = 0.05  # observed/expected this close to 1 confirms the factor as it is
TDS_FACTOR_RANGE = (0.4, 2.5)  # a measured factor outside is a fault, not the tank
PH_DEADBAND = 0.015
MAX_DOSE_S = 60.0
MIN_DOSE_MS = 20


@dataclass
class _InFlight:
    """A TDS dose whose effect has not settled yet."""

    actuator: str
    ml: float
    before: float
    expected: float
    piece: bool = False  # a piece of a longer dose: the next piece follows at once
    remaining_ml: float = 0.0  # of the whole dose, after this piece
    end_s: float | None = None  # when it stops running, on the cycle's clock


@dataclass
class _TdsState:
    windows: Settling = field(default_factory=Settling)  # window averages since the last dose
    in_flight: _InFlight | None = None
    factor: dict[str, float] = field(default_factory=dict)  # measured pumps only


@register("adaptive")
class AdaptiveController:
    """Registered ``"adaptive"``: mass balance for TDS, the envelope's limit for pH."""

    name = "adaptive"

    def __init__(self, options: ControllerOptions | None = None) -> None:
        del options
        self._tds_state = _TdsState()

    async def decide(self, ctx: DecisionContext) -> Decision:
        """Doses for ``ctx.loop``; none while the last TDS dose is still mixing in."""
        if ctx.loop == "ph":
            return self._ph(ctx, ctx.measured)
        st = self._tds_state
        if ctx.previous_error is None:  # a new loop of a new cycle: nothing is in flight
            st.windows.reset()
            st.in_flight = None
        st.windows.add(ctx)
        dose = st.in_flight
        if dose is not None and dose.piece:
            # The next piece of one long dose: the whole was sized at once.
            st.in_flight = None
            decision = self._dose(
                ctx, dose.before + dose.expected, actuator=dose.actuator, ml=dose.remaining_ml
            )
            nxt = st.in_flight
            if nxt is not None:  # the pieces are one dose: learn from their sum
                nxt.before, nxt.expected = dose.before, dose.expected + nxt.expected
                nxt.ml += dose.ml
            return decision
        settled = st.windows.settled(
            ctx,
            before=None if dose is None else dose.before,
            end_s=None if dose is None else dose.end_s,
        )
        if settled is None:
            return self._none("waiting for the reading to settle")
        if dose is not None:
            self._learn(ctx, dose, settled)
        st.in_flight = None
        return self._tds(ctx, settled)

    def close(self) -> None:
        """Nothing to release."""

    # ---------------------------------------------------------- knowledge
    def learned(self) -> dict[str, Any]:
        """The measured correction factor of each TDS pump (the Learner side); ``{}`` before any."""
        factors = self._tds_state.factor
        if not factors:
            return {}
        return {"version": STATE_VERSION, "tds_factor": dict(factors)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back a :meth:`learned` snapshot; :class:`ControllerError` if it is unusable.

        A version-1 snapshot (which also held a pH titration model, now the
        envelope's business) gives its pump factors.
        """
        try:
            if state.get("version") not in (1, STATE_VERSION):
                raise ValueError(f"version {state.get('version')!r}, expected {STATE_VERSION}")
            factors = {str(p): float(f) for p, f in state["tds_factor"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ControllerError(f"adaptive: unusable learned state: {exc}") from exc
        low, high = TDS_FACTOR_RANGE
        if not all(math.isfinite(f) and low <= f <= high for f in factors.values()):
            raise ControllerError("adaptive: unusable learned state: a factor out of range")
        self._tds_state.factor = factors

    def recalibrated(self, actuator: str, effect: float | None) -> None:
        """A pump was calibrated (the Recalibrated side): keep what the flow did not explain.

        A factor measured through a wrong configured flow holds that error; the
        same decision now delivers ``effect`` times as much, so the factor is
        multiplied by it. ``None``, or a result outside the plausible range,
        forgets the factor: the next dose of the pump is a cautious first one.
        """
        factors = self._tds_state.factor
        old = factors.pop(actuator, None)
        self._tds_state.in_flight = None
        if old is None or effect is None:
            return
        new = old * effect
        low, high = TDS_FACTOR_RANGE
        if math.isfinite(new) and low <= new <= high:
            factors[actuator] = new

    # ---------------------------------------------------------------- TDS
    def _tds(self, ctx: DecisionContext, c: float) -> Decision:
        """The TDS decision from the settled value ``c``."""
        sp = ctx.setpoint
        error = sp - c
        # Diluting costs ~V/c litres per ppm, stock ~V/Cs: tolerate a little more above.
        band_pct = TDS_DEADBAND_PCT if error > 0 else TDS_DILUTE_DEADBAND_PCT
        if abs(error) <= max(band_pct / 100.0 * sp, MIN_PPM):
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
        factor = self._tds_state.factor.get(actuator)
        if factor is None:
            ml = TDS_FRACTION_UNKNOWN * need_l * 1000.0
        else:
            ml = TDS_FRACTION * need_l * 1000.0 / factor
        return self._dose(ctx, c, actuator=actuator, ml=ml)

    def _learn(self, ctx: DecisionContext, dose: _InFlight, final: float) -> None:
        observed = final - dose.before
        expected = dose.expected
        if expected == 0 or observed / expected <= 0 or abs(observed) < 2 * threshold(ctx):
            # No visible effect: refused by the safety layer, a dry pump, or a tank far
            # less sensitive than assumed. Nothing to learn, and never a bigger dose for
            # it: a refused dose looks the same, and it would overdose once allowed.
            return
        if abs(observed) < TDS_LEARN_MIN_PCT / 100.0 * ctx.setpoint:
            return  # a trim's effect is too small against the noise to correct the model
        ratio = observed / expected  # the expectation already holds the factor so far
        factors = self._tds_state.factor
        old = factors.get(dose.actuator, 1.0)
        if abs(ratio - 1.0) <= TDS_FACTOR_DEADBAND:
            # Within what a reading taken before the last of the mixing, or the noise,
            # explains: the factor so far is confirmed, not changed. Carried over to
            # later cycles, such an error would make their first doses overshoot.
            factors[dose.actuator] = old
            return
        low, high = TDS_FACTOR_RANGE
        factors[dose.actuator] = min(high, max(low, ratio * old))

    # ----------------------------------------------------------------- pH
    def _ph(self, ctx: DecisionContext, x0: float) -> Decision:
        """The most the pH safety envelope allows, towards the setpoint.

        The envelope (rules/envelope.py) knows what this tank's titration may
        be at worst, measures each dose's response and allows a dose that
        moves the pH by at most half the remaining error; a smaller dose only
        takes longer. Without a limit in the context (no envelope: a direct
        call) the same bound is computed from the configured plant alone.
        """
        error = ctx.setpoint - x0
        if abs(error) <= PH_DEADBAND:
            return self._none(f"on target (error {error:+.3f})")
        actuator = "ph_up" if error > 0 else "ph_down"
        flow = ctx.plant.flow_ml_s.get(actuator)
        if flow is None:
            return self._none(f"cannot dose {actuator}: no flow configured")
        if actuator in ctx.max_ml:
            ml = ctx.max_ml[actuator]
        else:
            bound = PhEnvelope(ctx.plant)
            move = min(HALF * abs(error), CAP_PH)
            ml = bound.per_l_to_move(actuator, x0, move, ctx.setpoint) * _volume_l(ctx)
        ms = min(math.floor(ml / flow * 1000.0), round(MAX_DOSE_S * 1000.0))
        if ms < 1:
            return self._none("waiting: the pH envelope allows no dose now")
        note = f"{actuator} {ms / 1000.0 * flow:.3g} ml (the envelope's limit) from pH {x0:.3f}"
        return Decision(doses=(Dose(actuator, 255, ms),), controller=self.name, note=note)

    # ---------------------------------------------------------------- doses
    def _dose(self, ctx: DecisionContext, before: float, *, actuator: str, ml: float) -> Decision:
        """Run ``actuator`` for ``ml`` of TDS dose (in pieces of at most ``MAX_DOSE_S``)."""
        flow = ctx.plant.flow_ml_s.get(actuator)
        if flow is None or ml <= 0:
            return self._none(f"cannot dose {actuator}")
        ms = max(round(min(ml / flow, MAX_DOSE_S) * 1000.0), MIN_DOSE_MS)
        dosed_ml = ms / 1000.0 * flow
        expected = _tds_effect(ctx, actuator, dosed_ml, before)
        expected *= self._tds_state.factor.get(actuator, 1.0)
        remaining = ml - dosed_ml
        piece = remaining > 0.01 * ml
        end = None if ctx.now is None else ctx.now + ms / 1000.0
        self._tds_state.in_flight = _InFlight(
            actuator, dosed_ml, before, expected, piece, max(0.0, remaining), end
        )
        self._tds_state.windows.reset()
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

