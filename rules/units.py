"""Conductivity units, in one place: EC (mS/cm) and ppm on the 500, 640 and 700 scales.

A conductivity meter measures EC; "ppm" is EC times a factor that depends on
the meter (docs/references.md, "Conductivity scales"): 500 (the "TDS" or
NaCl scale, Hanna and DFRobot meters), 640 (some European meters) or 700 (the
"442" scale of many US meters). The same tank reads 1.6 mS/cm, 800 ppm on a
500 meter and 1120 ppm on a 700 meter.

hydrogate keeps **one** quantity inside: the reading ``tds`` in ppm on the
500 scale (:data:`INTERNAL`), as the contract has always called it, so every
controller, the cycle, the safety ranges and the severity bands work in it.
Values are converted only at the edges:

- **in**: config setpoints and ppm keys (:func:`to_internal`), crop presets,
  shared attributes; a node's NodeLink ``ec`` (µS/cm) becomes ``tds``
  (:func:`inbound`);
- **out**: telemetry and ``get_state`` carry one conductivity key, named by
  its unit (:func:`outbound`): ``ec`` (mS/cm), ``tds`` (ppm500), ``tds_640``
  or ``tds_700``; severity reasons print the same unit.

Results are rounded to 12 significant digits (1.6 mS/cm is 1120 ppm on the
700 scale, not 1120.0000000000002), so a round trip through any scale gives
the value back within a few parts in 10¹².
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from rules.controller import RulesError

__all__ = [
    "INTERNAL",
    "INTERNAL_KEY",
    "NODELINK_EC_KEY",
    "RAW_EC_KEY",
    "UNITS",
    "Conductivity",
    "UnitsError",
    "convert",
    "from_internal",
    "inbound",
    "outbound",
    "ppm_scale",
    "to_internal",
    "unit",
]

#: The reading's key inside hydrogate (ppm on the 500 scale).
INTERNAL_KEY = "tds"
#: NodeLink's conductivity key, in µS/cm (docs/nodelink.md).
NODELINK_EC_KEY = "ec"
#: NodeLink's ``ec`` when it is only the raw value of a calibrated ``tds``.
RAW_EC_KEY = "ec_us"
_US_PER_MS = 1000.0


class UnitsError(RulesError):
    """An unknown conductivity unit."""


@dataclass(frozen=True)
class Conductivity:
    """One way of writing conductivity.

    ``per_ms_cm`` is how much of this unit 1 mS/cm is (1 for EC, 500 for the
    500 scale, ...); ``key`` the telemetry key a reading in this unit goes
    under; ``label`` and ``decimals`` how people read it (severity reasons,
    summaries).
    """

    name: str
    key: str
    per_ms_cm: float
    label: str
    symbol: str
    decimals: int

    def text(self, value: float) -> str:
        """``value`` (in this unit) as people write it: ``1.6 mS/cm``, ``1120 ppm (700 scale)``."""
        return f"{value:.{self.decimals}f} {self.symbol}"


UNITS: Mapping[str, Conductivity] = MappingProxyType(
    {
        "ec": Conductivity("ec", "ec", 1.0, "EC", "mS/cm", 2),
        "ppm500": Conductivity("ppm500", "tds", 500.0, "ppm", "ppm", 0),
        "ppm640": Conductivity("ppm640", "tds_640", 640.0, "ppm640", "ppm (640 scale)", 0),
        "ppm700": Conductivity("ppm700", "tds_700", 700.0, "ppm700", "ppm (700 scale)", 0),
    }
)
"""Every unit ``units.conductivity`` accepts, by its config name."""

INTERNAL = UNITS["ppm500"]

_OUT_KEYS = frozenset(u.key for u in UNITS.values())
_OUT_FLAGS = frozenset(f"{k}_flag" for k in _OUT_KEYS)

_V = TypeVar("_V")


def unit(name: str) -> Conductivity:
    """The unit called ``name`` (``ec``, ``ppm500``, ``ppm640``, ``ppm700``)."""
    try:
        return UNITS[name]
    except KeyError:
        raise UnitsError(
            f"unknown conductivity unit {name!r} (known: {', '.join(UNITS)})"
        ) from None


def ppm_scale(name: str) -> Conductivity:
    """The ppm scale of the config's ``*_ppm`` keys under unit ``name`` (ppm500 for ``ec``)."""
    chosen = unit(name)
    return INTERNAL if chosen.name == "ec" else chosen


def convert(value: float, source: str | Conductivity, target: str | Conductivity) -> float:
    """``value`` written in ``source`` units, in ``target`` units."""
    src = unit(source) if isinstance(source, str) else source
    dst = unit(target) if isinstance(target, str) else target
    if src is dst:
        return value
    # Rounded to 12 significant digits: 1.6 mS/cm is 1120 ppm, not 1120.0000000000002.
    return float(f"{value * dst.per_ms_cm / src.per_ms_cm:.12g}")


def to_internal(value: float, source: str | Conductivity) -> float:
    """``value`` in ``source`` units as the internal ppm (500 scale)."""
    return convert(value, source, INTERNAL)


def from_internal(value: float, target: str | Conductivity) -> float:
    """An internal ppm (500 scale) in ``target`` units."""
    return convert(value, INTERNAL, target)


def inbound(
    values: dict[str, float | None], *, calibrated: Collection[str] = ()
) -> dict[str, float | None]:
    """A node's (calibrated) reading with NodeLink ``ec`` (µS/cm) turned into the internal ``tds``.

    ``ec`` is what a conductivity probe measures, so it wins over a ``tds``
    the node derived from it with a factor of its own, unless ``tds`` comes
    from a calibration map (named in ``calibrated``) and ``ec`` does not:
    then ``ec`` is that map's raw value and stays, as ``ec_us``. Out of
    hydrogate ``ec`` means mS/cm, so NodeLink's ``ec`` never leaves as such.
    A ``None`` or non-finite ``ec`` is dropped and leaves any ``tds`` alone.
    Without an ``ec``, ``values`` itself is returned (this runs for every reading).
    """
    if NODELINK_EC_KEY not in values:
        return values
    out = dict(values)
    micro = out.pop(NODELINK_EC_KEY)
    if micro is None or not math.isfinite(micro):
        return out
    if INTERNAL_KEY in calibrated and NODELINK_EC_KEY not in calibrated:
        out[RAW_EC_KEY] = micro
    else:
        out[INTERNAL_KEY] = to_internal(float(micro) / _US_PER_MS, "ec")
    return out


def outbound(values: dict[str, _V], target: str | Conductivity) -> dict[str, _V | float]:
    """Values as they leave hydrogate: the internal ``tds`` (and its flag) under ``target``'s key.

    Numbers are converted (``None`` stays ``None``); other keys are kept as
    they are. A key that would collide with the renamed one (a node sending
    ``tds_700`` of its own) is left out: it would be mistaken for ours. On the
    internal scale (the default) ``values`` itself is returned.
    """
    dst = unit(target) if isinstance(target, str) else target
    if dst is INTERNAL:
        return values  # type: ignore[return-value]  # dict[str, _V] is a dict[str, _V | float]
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key == INTERNAL_KEY:
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[dst.key] = from_internal(float(value), dst)
            else:
                out[dst.key] = value
        elif key == f"{INTERNAL_KEY}_flag":
            out[f"{dst.key}_flag"] = value
        elif key in _OUT_KEYS or key in _OUT_FLAGS:
            continue
        else:
            out[key] = value
    return out
