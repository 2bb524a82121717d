"""Trapezoidal membership functions: the one primitive of the fuzzy engine.

Kept apart from rules/fuzzy.py, and free of numpy at import, so that the
severity assessment the daemon runs on every node (scalar values, a few a
second) does not load numpy into a gateway that has no fuzzy controller.
`Mf.__call__` is the vectorised form the engine uses; `Mf.degree` the scalar
one, with the same shoulders and NaN handling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rules.controller import RulesError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["FuzzyError", "Mf", "trapmf", "trimf"]


class FuzzyError(RulesError):
    """A fuzzy system is defined inconsistently."""


@dataclass(frozen=True)
class Mf:
    """Trapezoidal membership function ``(a, b, c, d)`` with ``a <= b <= c <= d``.

    ``a == b`` makes a left shoulder, ``c == d`` a right shoulder (see the
    module docstring).
    """

    a: float
    b: float
    c: float
    d: float

    def __post_init__(self) -> None:
        if not self.a <= self.b <= self.c <= self.d:
            raise FuzzyError(f"membership points must be ordered, got {self.points}")

    @property
    def points(self) -> tuple[float, float, float, float]:
        """The four corner points."""
        return (self.a, self.b, self.c, self.d)

    @property
    def peak(self) -> float:
        """A point of full membership (the middle of the plateau)."""
        return (self.b + self.c) / 2.0

    def degree(self, x: float) -> float:
        """Membership degree of one value, in [0, 1] (0 for NaN)."""
        if math.isnan(x):
            return 0.0
        rise = 1.0 if self.a == self.b else min(max((x - self.a) / (self.b - self.a), 0.0), 1.0)
        fall = 1.0 if self.c == self.d else min(max((self.d - x) / (self.d - self.c), 0.0), 1.0)
        return min(rise, fall)

    def __call__(self, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Membership degree of every element of ``x``, in [0, 1]."""
        import numpy as np  # only the vectorised engine pays for numpy

        xs = np.asarray(x, dtype=np.float64)
        ones = np.ones_like(xs)
        with np.errstate(invalid="ignore"):
            # A shoulder has no rising (falling) edge: full membership all the way out.
            rise = ones if self.a == self.b else np.clip((xs - self.a) / (self.b - self.a), 0, 1)
            fall = ones if self.c == self.d else np.clip((self.d - xs) / (self.d - self.c), 0, 1)
        mu = np.minimum(rise, fall)
        return np.where(np.isnan(xs), 0.0, mu)


def trimf(a: float, b: float, c: float) -> Mf:
    """Triangle with feet ``a``, ``c`` and peak ``b`` (MATLAB's ``trimf``)."""
    return Mf(a, b, b, c)


def trapmf(a: float, b: float, c: float, d: float) -> Mf:
    """Trapezoid with feet ``a``, ``d`` and plateau ``b..c`` (MATLAB's ``trapmf``)."""
    return Mf(a, b, c, d)


