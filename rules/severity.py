"""Fuzzy notification severity: none, info, warning or urgent, with a reason.

The bands and levels are the control documentation's (docs/references.md).

Each parameter has a :class:`Band`: a normal range and, on each side, an
optional critical threshold (pH normal 5.5–6.5, critical below 5.0 or above
7.0). A reading is placed on a normalised scale ``r``: 0 at the edge of the
normal range, 1 at the critical threshold (a side without one borrows the
other side's margin and is never critical). On that scale three fuzzy sets
grade how far off the reading is:

- slightly off ``trapmf(0, 0, 0.25, 0.75)`` (only outside the band, r > 0),
- moderately off ``trimf(0.25, 0.75, 1.25)`` (a right shoulder when the side
  has no critical threshold),
- critical ``trapmf(0.75, 1.25, inf, inf)``.

Rules (AND = min, OR = max) give each level an activation:

- urgent  = max over parameters of critical;
- warning = max(max of moderately off, the second largest "off" degree),
  i.e. one parameter moderately off OR two or more off;
- info    = max of slightly off;

where "off" is the bounded sum ``min(1, slight + moderate + critical)``
(1 anywhere outside the band). The result is the most severe level whose
activation reaches 0.5 (urgent needs more than 0.5). The sets cross at 0.5
exactly at the band edge (r = 0), halfway to critical (r = 0.5) and at the
critical threshold (r = 1), so the levels agree with the document's crisp
table: pH 6.6 is info, 6.9 warning, 7.0 still warning ("critical: > 7.0") and
7.01 urgent. The graded memberships are returned for dashboards and tests.

Bands are a table of frozen dataclasses keyed by telemetry key; callers
override them (a crop changes the pH and ppm normal range) with
:meth:`Band.with_normal`, which keeps the critical margins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from rules.controller import RulesError
from rules.membership import Mf, trapmf, trimf

__all__ = ["DEFAULT_BANDS", "LEVELS", "Band", "Severity", "SeverityError", "assess"]

Level = Literal["none", "info", "warning", "urgent"]
LEVELS: tuple[Level, ...] = ("none", "info", "warning", "urgent")

SLIGHT = trapmf(0.0, 0.0, 0.25, 0.75)
MODERATE = trimf(0.25, 0.75, 1.25)
MODERATE_OPEN = trapmf(0.25, 0.75, math.inf, math.inf)
CRITICAL = trapmf(0.75, 1.25, math.inf, math.inf)


class SeverityError(RulesError):
    """A severity band is inconsistent."""


@dataclass(frozen=True)
class Band:
    """Normal range ``low..high`` of one parameter and its critical thresholds.

    ``critical_low`` / ``critical_high`` are ``None`` when that side is never
    critical (water level has no critical high). ``decimals`` is how the value
    is printed in the reason text, after multiplying it by ``scale`` (the
    reading's unit as people read it: conductivity held as ppm on the 500
    scale is printed in mS/cm with ``scale`` 1/500, rules/units.py).
    """

    label: str
    low: float
    high: float
    critical_low: float | None
    critical_high: float | None
    decimals: int = 1
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise SeverityError(f"{self.label}: low {self.low} > high {self.high}")
        if self.critical_low is not None and not self.critical_low < self.low:
            raise SeverityError(f"{self.label}: critical_low must be below low")
        if self.critical_high is not None and not self.critical_high > self.high:
            raise SeverityError(f"{self.label}: critical_high must be above high")
        if self.critical_low is None and self.critical_high is None:
            raise SeverityError(f"{self.label}: needs at least one critical threshold")

    @property
    def margin_low(self) -> float:
        """Distance from ``low`` to critical (the other side's when it has none)."""
        if self.critical_low is not None:
            return self.low - self.critical_low
        assert self.critical_high is not None  # guaranteed by __post_init__
        return self.critical_high - self.high

    @property
    def margin_high(self) -> float:
        """Distance from ``high`` to critical (the other side's when it has none)."""
        if self.critical_high is not None:
            return self.critical_high - self.high
        assert self.critical_low is not None  # guaranteed by __post_init__
        return self.low - self.critical_low

    def with_normal(self, low: float, high: float) -> Band:
        """The same band moved to another normal range, keeping the critical margins."""
        return replace(
            self,
            low=low,
            high=high,
            critical_low=None if self.critical_low is None else low - self.margin_low,
            critical_high=None if self.critical_high is None else high + self.margin_high,
        )

    def position(self, value: float) -> tuple[Literal["low", "normal", "high"], float]:
        """Which side the value is on and ``r`` (0 at the band edge, 1 at critical)."""
        if value < self.low:
            return "low", (self.low - value) / self.margin_low
        if value > self.high:
            return "high", (value - self.high) / self.margin_high
        return "normal", 0.0

    def memberships(self, value: float) -> dict[str, float]:
        """Degrees of slightly off, moderately off and critical (all 0 inside the band)."""
        side, r = self.position(value)
        if side == "normal":
            return {"slight": 0.0, "moderate": 0.0, "critical": 0.0}
        has_critical = (self.critical_low if side == "low" else self.critical_high) is not None
        moderate: Mf = MODERATE if has_critical else MODERATE_OPEN
        return {
            "slight": SLIGHT.degree(r),
            "moderate": moderate.degree(r),
            "critical": CRITICAL.degree(r) if has_critical else 0.0,
        }

    def describe(self, value: float, memberships: Mapping[str, float]) -> str:
        """Short text such as ``pH 7.3 critical (> 7.0)`` or ``ppm 880 high``."""
        shown = self._shown(value)
        side, _ = self.position(value)
        if memberships["critical"] > 0.5:
            if side == "low":
                return f"{self.label} {shown} critical (< {self._shown(self.critical_low)})"
            return f"{self.label} {shown} critical (> {self._shown(self.critical_high)})"
        return f"{self.label} {shown} {side}"

    def _shown(self, value: float | None) -> str:
        assert value is not None
        return _fmt(value * self.scale if self.scale != 1.0 else value, self.decimals)


def _fmt(value: float | None, decimals: int) -> str:
    """At most ``decimals`` decimals, trailing zeros dropped but one kept: 7.0, 7.25, 880."""
    assert value is not None
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0")
        text += "0" if text.endswith(".") else ""
    return text


#: The control documentation's bands, keyed by telemetry key.
DEFAULT_BANDS: Mapping[str, Band] = MappingProxyType(
    {
        "ph": Band("pH", 5.5, 6.5, 5.0, 7.0, decimals=2),
        "tds": Band("ppm", 560.0, 840.0, 400.0, 1000.0, decimals=0),
        "water_level": Band("water level", 1.2, 2.5, 1.0, None, decimals=2),
        "air_temp": Band("air temp", 18.0, 28.0, 15.0, 32.0, decimals=1),
        "humidity": Band("humidity", 40.0, 80.0, 30.0, 90.0, decimals=0),
    }
)


@dataclass(frozen=True)
class Severity:
    """The assessed level, a short reason and the graded degrees behind it.

    ``degrees`` maps every assessed parameter to how off it is (0 inside its
    band, 1/3 slightly, 2/3 moderately, 1 critical, monotonic in between);
    ``memberships`` holds the three set degrees per parameter; ``activations``
    the rule activation of each level.
    """

    level: Level
    reason: str
    degrees: dict[str, float]
    memberships: dict[str, dict[str, float]] = field(default_factory=dict)
    activations: dict[str, float] = field(default_factory=dict)


def assess(
    values: Mapping[str, float | None], bands: Mapping[str, Band] = DEFAULT_BANDS
) -> Severity:
    """Severity of the latest readings; missing, ``None`` or non-finite values are ignored."""
    memberships: dict[str, dict[str, float]] = {}
    off: dict[str, float] = {}
    for key, band in bands.items():
        value = values.get(key)
        if value is None or not math.isfinite(value):
            continue
        mu = band.memberships(value)
        memberships[key] = mu
        off[key] = min(1.0, mu["slight"] + mu["moderate"] + mu["critical"])

    ranked = sorted(off.values(), reverse=True)
    second = ranked[1] if len(ranked) > 1 else 0.0
    activations = {
        "urgent": max((m["critical"] for m in memberships.values()), default=0.0),
        "warning": max(max((m["moderate"] for m in memberships.values()), default=0.0), second),
        "info": max((m["slight"] for m in memberships.values()), default=0.0),
    }
    level: Level = "none"
    if activations["urgent"] > 0.5:
        level = "urgent"
    elif activations["warning"] >= 0.5:
        level = "warning"
    elif activations["info"] >= 0.5:
        level = "info"
    activations["none"] = 1.0 - max(off.values(), default=0.0)

    degrees = {k: _degree(m) for k, m in memberships.items()}
    # Critical parameters first, then the rest in the order of the band table.
    culprits = sorted(
        (k for k, d in off.items() if d > 0), key=lambda k: memberships[k]["critical"] <= 0.5
    )
    if culprits:
        reason = "; ".join(bands[k].describe(float(values[k] or 0.0), memberships[k])
                           for k in culprits)
    else:
        reason = "all normal" if memberships else "no readings"
    return Severity(level, reason, degrees, memberships, activations)


def _degree(mu: Mapping[str, float]) -> float:
    """How off a parameter is, 0..1: the weighted average of 1/3, 2/3 and 1 (Sugeno-style).

    0 inside the band, 1/3 slightly off, 2/3 moderately off, 1 critical, and
    rising monotonically in between.
    """
    total = mu["slight"] + mu["moderate"] + mu["critical"]
    if total <= 0.0:
        return 0.0
    return (mu["slight"] / 3 + mu["moderate"] * 2 / 3 + mu["critical"]) / total
