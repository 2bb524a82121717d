"""What the dosing model is asked, and what its answer means: features, references, fractions.

The model must serve every tank in the ranges of issue 11 (5–200 L, pumps
of any size, pH solutions of 0.1–2 M, a config that may be 20 % wrong), so
nothing it sees or says is in a tank's own units:

- **It answers with a fraction of a reference dose** that the controller
  computes from what the gateway knows. TDS: the *need*, the dose that
  brings the settled TDS exactly to the setpoint by mass balance with the
  *configured* constants (``V·(sp − c)/(Cs − sp)`` of stock, ``V·(c/sp − 1)``
  of water; ``V`` the level sensor's volume when there is one, else the
  configured one). pH: the pH safety envelope's limit for this decision
  (``DecisionContext.max_ml``, rules/envelope.py), which nothing may exceed.
- **It sees the plant constants as ratios and logarithms**, plus what the
  controller has measured of the tank (:data:`FEATURES`).

Both loops share one model: a row is a TDS or a pH decision (feature
``loop``), the features of the other loop are set to fixed neutral values
(:data:`NEUTRAL`), and each output is only trained and used on its own
loop's rows.

This module is pure (no model, no I/O): the ``ml`` controller
(rules/ml.py) and the training-data generator (models/closedloop.py) both
use it, so training and inference see exactly the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from rules.controller import DecisionContext

__all__ = [
    "FEATURES",
    "MIN_LEVEL_L",
    "NEUTRAL",
    "OUTPUT_SCALE",
    "QUANTILE",
    "RANGES",
    "TARGETS",
    "PhQuery",
    "TdsQuery",
    "ph_query",
    "tds_effect",
    "tds_query",
    "volume_l",
]

#: Model inputs, in this order.
FEATURES: tuple[str, ...] = (
    "loop",  # 0: a TDS decision, 1: a pH decision
    "tds_error",  # (setpoint − settled TDS) / setpoint
    "ph_error",  # setpoint − pH, pH units
    "log_volume",  # log10 of the configured tank volume (L)
    "level_ratio",  # water_level / configured volume (1 without a level sensor)
    "level_known",  # 1 when a level sensor gives the volume
    "log_stock_ratio",  # log10(configured stock ppm / TDS setpoint)
    "log_turnover",  # log10(configured flow of the pump to run, ml/s, per litre of tank)
    "factor",  # measured effect / expected effect of that TDS pump (1 until measured)
    "factor_known",  # 1 once the pump's effect on this tank has been measured
    "log_limit",  # log10 of the envelope's limit per litre (ml/L) for the pH pump to run
    "ph_move",  # pH units that limit moves by the configured strength (0: strength unknown)
    "strength_known",  # 1 when the config gives that pH solution's strength
)

#: Model outputs, in this order: fractions of the loop's reference dose.
TARGETS: tuple[str, ...] = ("tds_fraction", "ph_fraction")

#: The quantile of the landing dose each output is trained to (models/train.py): the model
#: answers with the largest fraction that lands past the aim on at most this share of the
#: training decisions that look the same to the gateway (same features, other hidden truth).
QUANTILE: Mapping[str, float] = MappingProxyType({"tds_fraction": 0.02, "ph_fraction": 0.02})

#: What an output of 1.0 stands for, per target (the model's outputs are in [0, 1]).
OUTPUT_SCALE: Mapping[str, float] = MappingProxyType({"tds_fraction": 2.5, "ph_fraction": 1.0})

#: The other loop's features, in a row of one loop.
NEUTRAL: Mapping[str, float] = MappingProxyType(
    {
        "tds_error": 0.0,
        "ph_error": 0.0,
        "log_stock_ratio": 1.0,
        "factor": 1.0,
        "factor_known": 0.0,
        "log_limit": -2.0,
        "ph_move": 0.0,
        "strength_known": 0.0,
    }
)

#: The training range of every feature: the runtime refuses (ML → RB) anything outside.
#: What the training tanks span (issue 11's ranges, the config up to 20 % wrong, stocks of
#: 5,000–30,000 ppm) with a little room; the flags are 0 or 1.
RANGES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "loop": (0.0, 1.0),
        "tds_error": (-1.1, 0.75),
        "ph_error": (-3.5, 3.5),
        "log_volume": (0.6, 2.4),
        "level_ratio": (0.6, 2.6),
        "level_known": (0.0, 1.0),
        "log_stock_ratio": (0.5, 1.75),
        "log_turnover": (-1.5, 1.5),
        "factor": (0.3, 3.0),
        "factor_known": (0.0, 1.0),
        "log_limit": (-5.0, 1.5),
        "ph_move": (0.0, 4.0),
        "strength_known": (0.0, 1.0),
    }
)

#: Below this the level sensor is not a tank volume (an empty tank, a probe out of water).
MIN_LEVEL_L = 0.5


def volume_l(ctx: DecisionContext) -> float:
    """The tank's volume now: the level sensor's, else the configured one (as the cycle)."""
    level = ctx.values.get("water_level")
    if level is not None and math.isfinite(level) and level > MIN_LEVEL_L:
        return level
    return ctx.plant.tank_volume_l


def _shared(ctx: DecisionContext, actuator: str) -> dict[str, float]:
    """The plant constants every row has; raises ``KeyError`` when the pump has no flow."""
    configured = ctx.plant.tank_volume_l
    level = ctx.values.get("water_level")
    known = level is not None and math.isfinite(level) and level > MIN_LEVEL_L
    flow = ctx.plant.flow_ml_s[actuator]
    return {
        **NEUTRAL,
        "log_volume": math.log10(configured),
        "level_ratio": level / configured if known and level is not None else 1.0,
        "level_known": 1.0 if known else 0.0,
        "log_turnover": math.log10(flow / volume_l(ctx)),
    }


def tds_effect(c: float, volume: float, ml: float, inflow_ppm: float) -> float:
    """Mass balance: the change of TDS ``c`` when ``ml`` of ``inflow_ppm`` mixes into ``volume``."""
    added = ml / 1000.0
    return (c * volume + inflow_ppm * added) / (volume + added) - c


@dataclass(frozen=True)
class TdsQuery:
    """One TDS decision put to the model: the pump, its reference dose, the features."""

    actuator: str  # "nutrient" or "refill"
    reference_ms: float  # the need (to the setpoint, configured constants) at duty 255
    features: Mapping[str, float]


@dataclass(frozen=True)
class PhQuery:
    """One pH decision put to the model: the pump, the envelope's limit, the features."""

    actuator: str  # "ph_up" or "ph_down"
    reference_ms: float  # the envelope's limit at duty 255
    features: Mapping[str, float]


def tds_query(
    ctx: DecisionContext, c: float, factors: Mapping[str, float]
) -> TdsQuery | None:
    """The query for settled TDS ``c``; ``None`` when no dose can move it towards the setpoint.

    ``factors`` holds the measured effect ratio of each TDS pump measured so
    far (a pump missing from it: not measured yet). Raises ``KeyError`` when
    the pump the direction picks has no configured flow.
    """
    sp = ctx.setpoint
    volume = volume_l(ctx)
    stock = ctx.plant.stock_ppm
    if c < sp:
        actuator = "nutrient"
        if stock <= sp:
            return None
        need_ml = 1000.0 * volume * (sp - c) / (stock - sp)
    elif c > sp:
        actuator = "refill"
        need_ml = 1000.0 * volume * (c / sp - 1.0)
    else:
        return None
    features = _shared(ctx, actuator)
    factor = factors.get(actuator)
    features.update(
        tds_error=(sp - c) / sp,
        log_stock_ratio=math.log10(stock / sp),
        factor=1.0 if factor is None else factor,
        factor_known=0.0 if factor is None else 1.0,
        loop=0.0,
    )
    flow = ctx.plant.flow_ml_s[actuator]
    return TdsQuery(actuator, 1000.0 * need_ml / flow, MappingProxyType(features))


def ph_query(ctx: DecisionContext, max_ml: float) -> PhQuery | None:
    """The query for a pH decision whose envelope allows ``max_ml``; ``None`` for no dose.

    Raises ``KeyError`` when the pump has no configured flow.
    """
    error = ctx.setpoint - ctx.measured
    if error == 0.0 or not max_ml > 0.0:
        return None
    actuator = "ph_up" if error > 0 else "ph_down"
    volume = volume_l(ctx)
    per_l = max_ml / volume
    strength = ctx.plant.ph_ml_per_l_per_unit.get(actuator)
    features = _shared(ctx, actuator)
    features.update(
        ph_error=error,
        log_limit=math.log10(per_l),
        ph_move=0.0 if strength is None else per_l / strength,
        strength_known=0.0 if strength is None else 1.0,
        loop=1.0,
    )
    flow = ctx.plant.flow_ml_s[actuator]
    return PhQuery(actuator, 1000.0 * max_ml / flow, MappingProxyType(features))
