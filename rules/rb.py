"""The control documentation's rule-based (RB) controller: the fallback of last resort.

RB only acts when a value is *outside* its band (docs/references.md, "Control
documentation": "Zone: OUTSIDE
threshold") and computes pump seconds with simple physics:

- pH below the band: ``ph_up = min(cap_ph, (ref - pH) * gain)``; above it:
  ``ph_down = min(cap_ph, (pH - ref) * gain)``. The document's gain (50 s per
  pH unit, "~80 ml per pH unit") was measured on its own tank with a very
  dilute pH solution: the same seconds of a 1 mol/L acid drive a 10 L tank
  from pH 7.2 to 2.2. So the gain here is derived from the tank: seconds per
  pH unit = ``ph_ml_per_l_per_unit · V / flow`` of the pump
  (``plant.ph_ml_per_l_per_unit``, measured by a guided titration), and when
  nobody measured it, from the steepest plausible tank
  (:data:`rules.envelope.STEEPEST_GAIN`) — tiny doses, which the pH safety
  envelope would cut anyway. ``variant="documented"`` keeps the document's
  formulas exactly (band edges, 50 s per pH unit), for the tank they were
  written for.
- ppm below the band: nutrient by mass balance, ``Vadd = (ref - ppm)·V/Cs``,
  ``t = Vadd/Q``, capped at ``cap_nutrient_s``. With the default plant this
  is 63.29 s per 100 ppm; the document rounds it to 63 s.
- ppm above the band: fresh water by dilution, ``Vwater = V·(ppm/ref - 1)``,
  ``t = Vwater/Q``, capped at ``cap_refill_s``.
- water level below ``level_low``: refill at least ``low_level_refill_s``.

The document contradicts itself about the reference ``ref``: its formulas
use the band edge (pH 5.5 / 6.5, 560 / 840 ppm), its worked example the
target (e = 6.0 − 5.3 → 35 s). Both are here: ``variant="band"`` (default,
the formulas) and ``variant="target"`` (the example), chosen by
``ControllerOptions.rb_variant``; ``"documented"`` is ``"band"`` with the
document's pH gain. In every variant, RB only acts outside the band.

The tank volume, stock concentration and flows come from
:class:`~rules.controller.PlantConstants`, so another tank or pump changes
the nutrient and water doses consistently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from rules.controller import (
    PH_PUMPS,
    ControllerError,
    ControllerOptions,
    Decision,
    DecisionContext,
    Dose,
    PlantConstants,
    register,
)
from rules.envelope import STEEPEST_GAIN

__all__ = ["RbController", "RbSeconds", "RbThresholds", "ph_gain_s", "rb_seconds"]

RbVariant = Literal["band", "target", "documented"]
_VARIANTS: tuple[RbVariant, ...] = ("band", "target", "documented")


@dataclass(frozen=True)
class RbThresholds:
    """Bands, targets and caps of the RB controller (the control documentation's defaults)."""

    ph_low: float = 5.5
    ph_high: float = 6.5
    ph_target: float = 6.0
    ppm_low: float = 560.0
    ppm_high: float = 840.0
    ppm_target: float = 700.0
    level_low: float = 1.2
    level_target: float = 1.8
    cap_ph_s: float = 50.0
    cap_nutrient_s: float = 63.0
    cap_refill_s: float = 120.0
    low_level_refill_s: float = 60.0
    ph_gain_s_per_unit: float = 50.0


@dataclass(frozen=True)
class RbSeconds:
    """Pump run times in seconds (0 means: do not run)."""

    ph_up: float
    ph_down: float
    nutrient: float
    refill: float


def rb_seconds(
    ph: float,
    ppm: float,
    water_level: float | None,
    *,
    variant: RbVariant = "band",
    thresholds: RbThresholds = RbThresholds(),  # noqa: B008 - frozen, immutable default
    plant: PlantConstants = PlantConstants(),  # noqa: B008 - frozen, immutable default
    ph_gain_s: Mapping[str, float] | None = None,
) -> RbSeconds:
    """Seconds each pump should run for the given readings (pure function).

    ``variant`` picks the reference of the proportional terms: the band edge
    (``"band"``, ``"documented"``) or the target (``"target"``). A
    ``water_level`` of ``None`` (no level sensor) disables the low-level
    refill rule. ``ph_gain_s`` gives each pH pump's seconds per pH unit
    (:func:`ph_gain_s`); without it, the document's ``ph_gain_s_per_unit``.
    """
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    t = thresholds
    by_band = variant != "target"
    gain = ph_gain_s or {"ph_up": t.ph_gain_s_per_unit, "ph_down": t.ph_gain_s_per_unit}

    ph_up = ph_down = nutrient = refill = 0.0
    if ph < t.ph_low:
        ref = t.ph_low if by_band else t.ph_target
        ph_up = min(t.cap_ph_s, (ref - ph) * gain["ph_up"])
    elif ph > t.ph_high:
        ref = t.ph_high if by_band else t.ph_target
        ph_down = min(t.cap_ph_s, (ph - ref) * gain["ph_down"])

    volume_ml = plant.tank_volume_l * 1000.0
    if ppm < t.ppm_low:
        ref = t.ppm_low if by_band else t.ppm_target
        stock_ml = (ref - ppm) * volume_ml / plant.stock_ppm  # mass balance
        nutrient = min(t.cap_nutrient_s, stock_ml / plant.flow("nutrient"))
    elif ppm > t.ppm_high:
        ref = t.ppm_high if by_band else t.ppm_target
        water_ml = volume_ml * (ppm / ref - 1.0)  # dilution C1·V1 = C2·V2
        refill = min(t.cap_refill_s, water_ml / plant.flow("refill"))

    if water_level is not None and water_level < t.level_low:
        refill = max(refill, t.low_level_refill_s)

    return RbSeconds(ph_up=ph_up, ph_down=ph_down, nutrient=nutrient, refill=refill)


def ph_gain_s(plant: PlantConstants) -> dict[str, float]:
    """Seconds of each pH pump per pH unit on this tank: ``ml/L per unit · V / flow``.

    A pump whose solution's strength was never measured gets the steepest
    plausible tank's (``1 / STEEPEST_GAIN`` ml/L per unit): RB must not
    dose an unknown acid as if it were the document's dilute one.
    """
    gains = {}
    for pump in PH_PUMPS:
        strength = plant.ph_ml_per_l_per_unit.get(pump, 1.0 / STEEPEST_GAIN)
        flow = plant.flow_ml_s.get(pump)
        gains[pump] = 0.0 if flow is None else strength * plant.tank_volume_l / flow
    return gains


def _dose(actuator: str, seconds: float) -> Dose | None:
    ms = round(seconds * 1000.0)
    return Dose(actuator, 255, ms) if ms > 0 else None


@register("rb")
class RbController:
    """Registered controller ``"rb"``: RB doses for one loop, PWM 255.

    The loop's band and target come from the decision context (the node's
    setpoint and tolerance, or a crop preset); the other thresholds and the
    caps are ``thresholds``. With the document's setpoints (700 ppm ± 140,
    pH 6.0 ± 0.5) the two agree.
    """

    name = "rb"

    def __init__(
        self,
        options: ControllerOptions | None = None,
        thresholds: RbThresholds = RbThresholds(),  # noqa: B008 - frozen, immutable default
    ) -> None:
        variant = (options or ControllerOptions()).rb_variant
        if variant not in _VARIANTS:
            raise ControllerError(f"rb_variant must be one of {_VARIANTS}, got {variant!r}")
        self.variant: RbVariant = next(v for v in _VARIANTS if v == variant)
        self.thresholds = thresholds

    def seconds(self, ctx: DecisionContext) -> RbSeconds:
        """RB seconds for ``ctx`` with the loop's band and target taken from ``ctx``."""
        low, high = ctx.band
        level = ctx.values.get("water_level")
        if ctx.loop == "tds":
            t = replace(self.thresholds, ppm_low=low, ppm_high=high, ppm_target=ctx.setpoint)
            ph = (t.ph_low + t.ph_high) / 2.0  # the other loop is not this call's business
            return rb_seconds(ph, ctx.measured, level, variant=self.variant, thresholds=t,
                              plant=ctx.plant)
        t = replace(self.thresholds, ph_low=low, ph_high=high, ph_target=ctx.setpoint)
        ppm = (t.ppm_low + t.ppm_high) / 2.0
        gains = None if self.variant == "documented" else ph_gain_s(ctx.plant)
        return rb_seconds(ctx.measured, ppm, None, variant=self.variant, thresholds=t,
                          plant=ctx.plant, ph_gain_s=gains)

    async def decide(self, ctx: DecisionContext) -> Decision:
        """Doses of ``ctx.loop``: nutrient and/or refill (tds), ph_up or ph_down (ph)."""
        s = self.seconds(ctx)
        pairs = (
            (("nutrient", s.nutrient), ("refill", s.refill))
            if ctx.loop == "tds"
            else (("ph_up", s.ph_up), ("ph_down", s.ph_down))
        )
        doses = tuple(d for a, sec in pairs if (d := _dose(a, sec)) is not None)
        note = "" if doses else "inside band"
        return Decision(doses=doses, controller=self.name, note=note)

    def close(self) -> None:
        """Nothing to release."""
