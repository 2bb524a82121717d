"""Sensor calibration: raw ``_v`` / ``_adc`` readings to engineering units, and fitting maps.

A map computes ``key = numpy.polyval(poly, values[source])`` (coefficients
highest order first). Two safeguards, because a polynomial fitted on a few
points is wild outside them (the thesis's 4th-order TDS fit turns down
below 0.04 V and shoots up above 1.58 V):

- a raw value outside ``valid`` is not trusted: the engineering key is left
  out and ``flags[key] = "out_of_range"``; the raw key is still passed through
  so the user sees what the probe said;
- with ``temp_coefficient`` set, the value is compensated to 25 °C,
  ``v25 = v / (1 + a·(T − 25))`` with ``T = water_temp``, applied to the
  engineering value (the usual EC/TDS law is on conductivity, which the
  calibrated ppm is proportional to, not on the probe voltage). Without a
  ``water_temp`` the value stays uncompensated and
  ``flags[key] = "uncompensated"``.

Keys without a map pass through unchanged. ``water_temp`` may itself be a
calibrated key; compensation uses its calibrated value.

Fitting: :func:`fit_poly` (least squares) and :func:`fit_two_point`, and
:func:`format_fit`, the ``poly:`` / ``valid:`` pair ready for the config and a
table of per-point errors that ``hydrogate calibrate --points`` prints (its
command line is gateway/cli_calibrate.py).

The thesis reports 7.2% (order 3) and 1.6% (order 4) mean error; those are
from verification readings taken on the device afterwards (its tables 4.2 and
4.3), not the fit residuals. The least-squares residuals of its own 7 points
are 7.41% and 2.07%.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from rules.controller import RulesError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CalibratedReading",
    "CalibrationError",
    "CalibrationMapLike",
    "Calibrator",
    "FitResult",
    "compensate",
    "fit_poly",
    "fit_two_point",
    "format_fit",
]

TEMP_KEY = "water_temp"
REFERENCE_TEMP_C = 25.0


class CalibrationError(RulesError):
    """A calibration map or fit is unusable."""


class CalibrationMapLike(Protocol):
    """What a calibration map offers (``gateway.config.CalibrationMap`` is one)."""

    @property
    def key(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def poly(self) -> Sequence[float]: ...
    @property
    def valid(self) -> tuple[float, float] | None: ...
    @property
    def temp_coefficient(self) -> float | None: ...


@dataclass(frozen=True)
class CalibratedReading:
    """Values after calibration, and a flag per engineering key that is not trustworthy."""

    values: dict[str, float | None]
    flags: dict[str, str]


def compensate(value: float, temp_c: float, coefficient: float) -> float:
    """``value`` at ``temp_c`` compensated to 25 °C: ``value / (1 + a·(T − 25))``."""
    divisor = 1.0 + coefficient * (temp_c - REFERENCE_TEMP_C)
    if divisor <= 0.0:
        raise CalibrationError(f"temperature {temp_c} °C is outside the compensation law")
    return value / divisor


def _horner(coefficients: tuple[float, ...], x: float) -> float:
    """``numpy.polyval`` for one value: the same result, ~30x faster on a scalar."""
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


class Calibrator:
    """Applies a set of maps to each reading. Pure; build once per node config."""

    def __init__(self, maps: Mapping[str, CalibrationMapLike] | Iterable[CalibrationMapLike]):
        items = list(maps.values()) if isinstance(maps, Mapping) else list(maps)
        keys = [m.key for m in items]
        if len(set(keys)) != len(keys):
            raise CalibrationError(f"duplicate calibration keys in {keys}")
        for m in items:
            if not m.poly:
                raise CalibrationError(f"{m.key}: empty poly")
            if m.valid is not None and not m.valid[0] <= m.valid[1]:
                raise CalibrationError(f"{m.key}: valid range {m.valid} is reversed")
        self._maps: tuple[CalibrationMapLike, ...] = tuple(items)
        self._coefficients = {m.key: tuple(float(c) for c in m.poly) for m in items}

    @property
    def maps(self) -> tuple[CalibrationMapLike, ...]:
        """The maps, in the order given."""
        return self._maps

    def apply(self, values: Mapping[str, float | None]) -> CalibratedReading:
        """Calibrate one reading (see the module docstring for the rules)."""
        out: dict[str, float | None] = dict(values)
        flags: dict[str, str] = {}
        computed: dict[str, float | None] = {}
        for m in self._maps:
            if m.source not in values:
                continue  # nothing to calibrate: whatever the node sent passes through
            raw = values[m.source]
            if raw is None:
                computed[m.key] = None
                continue
            lo_hi = m.valid
            if not math.isfinite(raw) or (lo_hi is not None and not lo_hi[0] <= raw <= lo_hi[1]):
                flags[m.key] = "out_of_range"
                continue
            computed[m.key] = _horner(self._coefficients[m.key], raw)
        # Engineering keys replace whatever a node sent under the same name.
        for m in self._maps:
            if m.key in flags and m.key != m.source:
                out.pop(m.key, None)
        out.update(computed)

        temp = out.get(TEMP_KEY)
        for m in self._maps:
            value = computed.get(m.key)
            if m.temp_coefficient is None or value is None or m.key == TEMP_KEY:
                continue
            if temp is None or not math.isfinite(temp):
                flags[m.key] = "uncompensated"
                continue
            try:
                out[m.key] = compensate(value, temp, m.temp_coefficient)
            except CalibrationError:
                flags[m.key] = "uncompensated"
        return CalibratedReading(values=out, flags=flags)


@dataclass(frozen=True)
class FitResult:
    """A fitted map and how well it reproduces the points it was fitted on."""

    coefficients: tuple[float, ...]  # highest order first
    x: tuple[float, ...]
    y: tuple[float, ...]
    predicted: tuple[float, ...]
    abs_error: tuple[float, ...]
    pct_error: tuple[float, ...]
    mean_pct_error: float

    @property
    def order(self) -> int:
        """Polynomial order."""
        return len(self.coefficients) - 1

    @property
    def valid(self) -> tuple[float, float]:
        """The source range the map was fitted on."""
        return (min(self.x), max(self.x))


def _result(coefficients: np.ndarray, x: np.ndarray, y: np.ndarray) -> FitResult:
    import numpy as np  # fitting only: the daemon's path stays numpy-free

    predicted = np.polyval(coefficients, x)
    abs_error = np.abs(predicted - y)
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(y != 0, abs_error / np.abs(y) * 100.0, np.nan)
    return FitResult(
        coefficients=tuple(float(c) for c in coefficients),
        x=tuple(float(v) for v in x),
        y=tuple(float(v) for v in y),
        predicted=tuple(float(v) for v in predicted),
        abs_error=tuple(float(v) for v in abs_error),
        pct_error=tuple(float(v) for v in pct),
        mean_pct_error=float(np.nanmean(pct)) if np.isfinite(pct).any() else math.nan,
    )


def fit_poly(x: Sequence[float], y: Sequence[float], order: int) -> FitResult:
    """Least-squares polynomial of ``order`` through ``(x, y)``, highest order first."""
    import numpy as np  # fitting only: the daemon's path stays numpy-free

    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise CalibrationError("x and y must be 1-D and of equal length")
    if order < 1:
        raise CalibrationError(f"order must be >= 1, got {order}")
    if len(np.unique(xs)) <= order:
        raise CalibrationError(
            f"order {order} needs at least {order + 1} distinct points, got {len(np.unique(xs))}"
        )
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise CalibrationError("points must be finite")
    coefficients = np.polynomial.polynomial.Polynomial.fit(xs, ys, order).convert().coef[::-1]
    return _result(coefficients, xs, ys)


def fit_two_point(x1: float, y1: float, x2: float, y2: float) -> FitResult:
    """The line through two calibration points (e.g. two pH buffers)."""
    import numpy as np  # fitting only: the daemon's path stays numpy-free

    if x1 == x2:
        raise CalibrationError("the two points need different raw values")
    slope = (y2 - y1) / (x2 - x1)
    intercept = y1 - slope * x1
    return _result(np.array([slope, intercept]), np.array([x1, x2]), np.array([y1, y2]))


# ---------------------------------------------------------------- printing


def _g(value: float, digits: int) -> str:
    return f"{value:.{digits}g}"


def format_fit(fit: FitResult, digits: int = 6) -> str:
    """The config lines and the per-point error table, as printed by the command."""
    poly = ", ".join(_g(c, digits) for c in fit.coefficients)
    lo, hi = fit.valid
    lines = [
        f"poly: [{poly}]",
        f"valid: [{_g(lo, digits)}, {_g(hi, digits)}]",
        "",
        f"{'raw':>10} {'reference':>12} {'fitted':>12} {'abs err':>10} {'err %':>8}",
    ]
    for x, y, p, a, e in zip(
        fit.x, fit.y, fit.predicted, fit.abs_error, fit.pct_error, strict=True
    ):
        lines.append(f"{x:>10.6g} {y:>12.6g} {p:>12.6g} {a:>10.4g} {e:>8.3f}")
    lines.append(
        f"mean error: {fit.mean_pct_error:.3f} %  (order {fit.order}, {len(fit.x)} points)"
    )
    return "\n".join(lines)
