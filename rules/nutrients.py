"""Multi-part nutrients: a controller's one nutrient dose, dosed as parts in a fixed ratio.

Growers feed two- or three-part nutrients (A and B, sometimes C) that must
reach the tank in a fixed ratio and never meet neat: part A's calcium and
part B's sulfates and phosphates precipitate when their concentrates mix.
Controllers keep deciding one ``nutrient`` dose — ml of the *mixed feed*,
the parts mixed in the ratio — and the control cycle (rules/cycle.py) turns
it into the parts with :class:`Feed`, doses them one after another with a
pause between them (``part_pause_s``), each through the safety guard.

**What ``stock_ppm`` means with parts.** The ppm that one litre of the parts
mixed in the ratio would add to one litre of water — the mixed feed's
strength, exactly what ``stock_ppm`` means for one pump, so the controllers'
mass balance is unchanged. From a feed chart: "2 ml/L of A and 2 ml/L of B
give 1.2 mS/cm" is 600 ppm (500 scale) for 4 ml of feed per litre, so
``stock_ppm`` is 600 / 4 × 1000 = 150,000 (docs/calibration.md). The parts'
own strengths need not be known; a controller that learns the feed's effect
(``adaptive``) corrects a wrong figure.

**The controllers' flow.** Controllers size doses in milliseconds of the
``nutrient`` pump. With parts there is no such pump: they are given the
flow at which the parts, run one after another, deliver mixed feed
(:attr:`Feed.flow`, ``1 / Σ shareᵢ / flowᵢ``), so a decision of ``ms``
milliseconds becomes parts whose run times add up to ``ms``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from rules.controller import NUTRIENT, NUTRIENT_PARTS, Dose, PlantConstants

__all__ = ["NUTRIENT", "Feed", "shares", "split"]

# NUTRIENT (rules/controller.py) is also the controllers' name for the feed, one pump or parts.


def shares(ratio: Mapping[str, float]) -> dict[str, float]:
    """Each part's share of one ml of mixed feed (they add up to 1), in part order."""
    total = math.fsum(ratio.values())
    if not ratio or not (total > 0 and math.isfinite(total)):
        raise ValueError(f"a ratio needs positive parts, got {dict(ratio)}")
    return {p: ratio[p] / total for p in NUTRIENT_PARTS if p in ratio}


def split(ml: float, ratio: Mapping[str, float]) -> dict[str, float]:
    """``ml`` of mixed feed as ml of each part, in ``ratio`` (any positive numbers)."""
    return {part: ml * share for part, share in shares(ratio).items()}


@dataclass(frozen=True)
class Feed:
    """The parts of a node's nutrient feed: their shares of the mixed feed and their flows."""

    shares: Mapping[str, float]
    flows: Mapping[str, float]

    @classmethod
    def of(cls, plant: PlantConstants) -> Feed | None:
        """The plant's multi-part feed; ``None`` for a single ``nutrient`` pump.

        Raises ``ValueError`` when a part of the ratio has no flow.
        """
        if not plant.nutrient_ratio:
            return None
        missing = [p for p in plant.nutrient_ratio if p not in plant.flow_ml_s]
        if missing:
            raise ValueError(f"no flow for {', '.join(missing)} (plant.flow_ml_s)")
        parts = shares(plant.nutrient_ratio)
        return cls(
            MappingProxyType(parts),
            MappingProxyType({p: float(plant.flow_ml_s[p]) for p in parts}),
        )

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts, in dosing order (A, B, C)."""
        return tuple(self.shares)

    @property
    def flow(self) -> float:
        """ml/s of mixed feed when the parts run one after another (pauses not counted)."""
        return 1.0 / math.fsum(share / self.flows[p] for p, share in self.shares.items())

    def controller_plant(self, plant: PlantConstants) -> PlantConstants:
        """``plant`` as controllers see it: a ``nutrient`` pump of :attr:`flow`."""
        flows = dict(plant.flow_ml_s)
        flows[NUTRIENT] = self.flow
        return PlantConstants(
            tank_volume_l=plant.tank_volume_l,
            stock_ppm=plant.stock_ppm,
            flow_ml_s=flows,
            ph_ml_per_l_per_unit=plant.ph_ml_per_l_per_unit,
            nutrient_ratio=plant.nutrient_ratio,
        )

    def doses(self, ml: float) -> list[Dose]:
        """``ml`` of mixed feed as one dose per part, at full duty, in dosing order.

        Each part runs at least 1 ms: a part left out would change the ratio
        more than a millisecond too much of it.
        """
        return [
            Dose(part, 255, max(1, round(part_ml / self.flows[part] * 1000.0)))
            for part, part_ml in split(ml, self.shares).items()
        ]

    def effect_of_recalibration(self, part: str, old_flow: float, new_flow: float) -> float:
        """How much a nutrient decision's effect changes when ``part``'s flow is measured again.

        The old flow's error was part of what a decision delivered; with the
        others' flows taken as right and the parts worth the same per ml, the
        same decision now delivers ``1 / (1 − s + s·new/old)`` times as much
        (``s`` the part's share): ``old/new`` for a feed of one part.
        """
        share = self.shares[part]
        return 1.0 / (1.0 - share + share * new_flow / old_flow)
