"""Guided probe calibration: buffers and standards, the fit, and whether the probe is usable.

Pure functions and small classes; the daemon's side (gateway/probecal.py)
feeds them live readings. Sources of every number: docs/references.md,
"Probe calibration".

**pH.** A glass electrode's potential is ``E = E₀ − s·N(T)·(pH − 7)``:
``N(T) = ln10·R·T/F`` is the Nernst slope (59.16 mV per pH at 25 °C), ``s``
the electrode's efficiency (the *slope*, in % of Nernst) and ``E₀`` its
*offset* (the potential at pH 7, ideally 0 mV). Two or three buffers, each
at its value at the measured temperature (:func:`buffer_ph`), give ``s``
and ``E₀`` by least squares (:func:`fit_ph`). A probe is refused outside
:data:`SLOPE_RANGE_PCT` or beyond :data:`OFFSET_LIMIT_MV`: it is worn out,
dirty or its reference is exhausted, and no calibration makes it right.

The raw reading is turned into mV by the node's front end (:class:`FrontEnd`):
``ph_v`` is taken to be the electrode's potential in volts, ``ph_mv`` in mV;
an ADC count (``ph_adc``) or an amplified voltage needs the front end's mV per
unit and its zero, or slope and offset would be meaningless.

**Conductivity.** Standard solutions (1413 µS/cm, 12.88 mS/cm at 25 °C)
correct the map the probe already has: one point scales it, two points scale
and shift it (:func:`fit_ec`). The result is the same map with corrected
coefficients, so a nonlinear map (the thesis's order-4 TDS fit) keeps its
shape.

**Stable.** A reading is taken when it stopped drifting: over the last
``window_s`` seconds, the mean of the later half differs from the mean of
the earlier half by at most the tolerance (:class:`Stability`).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from rules.controller import RulesError

__all__ = [
    "BUFFERS",
    "EC_STANDARDS_US",
    "OFFSET_LIMIT_MV",
    "SLOPE_RANGE_PCT",
    "EcCalibration",
    "EcPoint",
    "FrontEnd",
    "PhCalibration",
    "PhPoint",
    "ProbeCalibrationError",
    "ProbeRefused",
    "Stability",
    "buffer_ph",
    "compose",
    "fit_ec",
    "fit_ph",
    "front_end_for",
    "nernst_mv",
]

_NERNST_MV_PER_K = math.log(10.0) * 8.314462618 / 96485.33212 * 1000.0  # ln10·R/F in mV/K
_KELVIN = 273.15

#: A usable pH probe's slope, % of Nernst (below: worn or dirty; above: a bad buffer or front end).
SLOPE_RANGE_PCT = (85.0, 105.0)
#: A usable pH probe's offset at pH 7, ±mV (beyond: a contaminated or exhausted reference).
OFFSET_LIMIT_MV = 30.0
#: Slopes this far off are not a worn probe but a raw value that is not the electrode's mV.
_FRONT_END_SUSPECT_PCT = (50.0, 150.0)
#: The default buffers, in the order a grower uses them (pH 7 first: the offset).
DEFAULT_BUFFERS = (7.00, 4.01)
THREE_BUFFERS = (7.00, 4.01, 10.01)
#: Conductivity standards, µS/cm at 25 °C.
EC_STANDARDS_US = (1413.0, 12880.0)
#: A conductivity correction beyond these factors is a wrong standard or a broken probe.
EC_SCALE_RANGE = (0.5, 2.0)
#: With two standards, the zero may move by at most this share of the lower standard.
EC_OFFSET_SHARE = 0.2


class ProbeCalibrationError(RulesError):
    """A calibration that cannot be computed (too few points, the same buffer twice...)."""


class ProbeRefused(ProbeCalibrationError):
    """The probe is outside usable limits: the fit is there, but it must not be used."""

    def __init__(self, message: str, calibration: PhCalibration | EcCalibration) -> None:
        super().__init__(message)
        self.calibration = calibration


def nernst_mv(temp_c: float) -> float:
    """The ideal electrode's slope at ``temp_c``: mV per pH unit (59.16 at 25 °C)."""
    return _NERNST_MV_PER_K * (temp_c + _KELVIN)


# --- buffers -------------------------------------------------------------------------------


def _phthalate(temp_c: float) -> float:
    """pH(S) of 0.05 mol/kg potassium hydrogen phthalate (the "4.01" buffer), 0-60 °C."""
    t = temp_c + _KELVIN
    return 2073.44 / t - 13.3270 + 0.045199 * t - 3.4846e-5 * t * t


_TABLE_TEMPS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0)
_TABLES: Mapping[float, tuple[float, ...]] = {
    7.00: (7.12, 7.09, 7.06, 7.04, 7.02, 7.00, 6.99, 6.99, 6.98, 6.98, 6.97),
    10.01: (10.32, 10.25, 10.18, 10.12, 10.06, 10.01, 9.97, 9.93, 9.89, 9.86, 9.83),
}

#: Buffers whose temperature dependence is known, by their nominal value at 25 °C.
BUFFERS: tuple[float, ...] = (4.01, 7.00, 10.01)


def buffer_ph(nominal: float, temp_c: float) -> float | None:
    """The pH of the buffer labelled ``nominal`` at ``temp_c`` (0–50 °C); ``None`` if unknown.

    A buffer not in :data:`BUFFERS` (a custom one) has no known temperature
    dependence: the caller uses its label.
    """
    if not 0.0 <= temp_c <= 50.0 or not math.isfinite(temp_c):
        return None
    if math.isclose(nominal, 4.01, abs_tol=1e-6):
        return _phthalate(temp_c)
    table = next((v for k, v in _TABLES.items() if math.isclose(nominal, k, abs_tol=1e-6)), None)
    if table is None:
        return None
    i = min(max(bisect.bisect_right(_TABLE_TEMPS, temp_c), 1), len(_TABLE_TEMPS) - 1)
    t0, t1 = _TABLE_TEMPS[i - 1], _TABLE_TEMPS[i]
    return table[i - 1] + (table[i] - table[i - 1]) * (temp_c - t0) / (t1 - t0)


# --- the front end -------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontEnd:
    """How a raw value becomes the electrode's potential: ``mV = (raw − zero) · mv_per_unit``."""

    mv_per_unit: float
    zero: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mv_per_unit) and self.mv_per_unit != 0):
            raise ProbeCalibrationError("mv_per_unit must be a finite number other than 0")
        if not math.isfinite(self.zero):
            raise ProbeCalibrationError("zero must be a finite number")

    def mv(self, raw: float) -> float:
        return (raw - self.zero) * self.mv_per_unit


def front_end_for(source: str) -> FrontEnd | None:
    """The front end a raw key's name implies: ``*_v`` volts, ``*_mv`` millivolts; else ``None``."""
    if source.endswith("_mv"):
        return FrontEnd(1.0)
    if source.endswith("_v"):
        return FrontEnd(1000.0)
    return None


# --- pH ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhPoint:
    """One buffer: its label, its pH at the temperature measured, and the stable raw reading."""

    nominal: float
    ph: float
    raw: float
    temp_c: float


@dataclass(frozen=True)
class PhCalibration:
    """What :func:`fit_ph` found; ``poly`` is ``pH = poly[0]·raw + poly[1]`` at ``temp_c``."""

    slope_pct: float
    offset_mv: float
    poly: tuple[float, float]
    temp_c: float
    residual_ph: float  # the largest distance of a buffer from the fitted line, in pH
    points: tuple[PhPoint, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def usable(self) -> bool:
        """Whether the probe is within the usable limits."""
        return not self.problems


def fit_ph(points: Sequence[PhPoint], front_end: FrontEnd) -> PhCalibration:
    """Slope (% of Nernst) and offset (mV) through 2 or 3 buffers; the map pH(raw).

    Raises :class:`ProbeCalibrationError` when the points cannot define a
    line, and :class:`ProbeRefused` (carrying the fit) when the probe is
    outside :data:`SLOPE_RANGE_PCT` or :data:`OFFSET_LIMIT_MV`.
    """
    if len(points) < 2:
        raise ProbeCalibrationError("a pH calibration needs at least two buffers")
    phs = [p.ph for p in points]
    if max(phs) - min(phs) < 1.0:
        raise ProbeCalibrationError("the buffers must be at least 1 pH apart (e.g. 7.00 and 4.01)")
    # E = E0 + s·x with x = −N(T)·(pH − 7): each buffer at its own temperature.
    xs = [-nernst_mv(p.temp_c) * (p.ph - 7.0) for p in points]
    ys = [front_end.mv(p.raw) for p in points]
    n = len(points)
    mx, my = math.fsum(xs) / n, math.fsum(ys) / n
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    efficiency = sxy / sxx
    if not math.isfinite(efficiency) or efficiency == 0.0:
        raise ProbeCalibrationError("the readings did not change between the buffers")
    offset = my - efficiency * mx
    temp = math.fsum(p.temp_c for p in points) / n
    slope_mv = efficiency * nernst_mv(temp)  # mV per pH at the calibration's temperature
    # pH = 7 − (E − E0) / slope_mv, with E = (raw − zero)·g
    g, zero = front_end.mv_per_unit, front_end.zero
    a = -g / slope_mv
    b = 7.0 + (zero * g + offset) / slope_mv
    residual = max(abs(a * p.raw + b - p.ph) for p in points)
    calibration = PhCalibration(
        slope_pct=100.0 * efficiency,
        offset_mv=offset,
        poly=(a, b),
        temp_c=temp,
        residual_ph=residual,
        points=tuple(points),
    )
    problems = _ph_problems(calibration)
    if problems:
        refused = replace(calibration, problems=tuple(problems))
        raise ProbeRefused("; ".join(problems), refused)
    return calibration


def _ph_problems(cal: PhCalibration) -> list[str]:
    """Why the probe is not usable, in words a grower can act on (empty: usable)."""
    low, high = SLOPE_RANGE_PCT
    slope, offset = round(cal.slope_pct, 6), round(cal.offset_mv, 6)  # the limits included
    problems = []
    suspect_low, suspect_high = _FRONT_END_SUSPECT_PCT
    if not suspect_low <= slope <= suspect_high:
        problems.append(
            f"the slope is {slope:.0f} % of Nernst, nothing a pH electrode does: the raw value "
            "is not the electrode's potential (give the front end's mV per unit and zero), or "
            "the buffers were mixed up"
        )
    elif slope < low:
        problems.append(
            f"the slope is {slope:.1f} % of Nernst (usable: {low:g}–{high:g} %): the probe is "
            "worn out or its glass is dirty; clean it and use fresh buffers, or replace it"
        )
    elif slope > high:
        problems.append(
            f"the slope is {slope:.1f} % of Nernst (usable: {low:g}–{high:g} %): a buffer is "
            "old or contaminated, or the probe was not rinsed between buffers; try fresh buffers"
        )
    if abs(offset) > OFFSET_LIMIT_MV:
        problems.append(
            f"the offset is {offset:+.1f} mV at pH 7 (usable: within ±{OFFSET_LIMIT_MV:g} mV): "
            "the reference junction is contaminated or its electrolyte exhausted; clean or "
            "refill it, or replace the probe"
        )
    return problems


# --- conductivity --------------------------------------------------------------------------


@dataclass(frozen=True)
class EcPoint:
    """One standard: its conductivity at 25 °C (µS/cm), and the stable raw reading."""

    standard_us: float
    raw: float
    temp_c: float | None


@dataclass(frozen=True)
class EcCalibration:
    """What :func:`fit_ec` found: the corrected map and the correction (``scale·old + offset``)."""

    poly: tuple[float, ...]
    scale: float
    offset: float
    points: tuple[EcPoint, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def usable(self) -> bool:
        return not self.problems


def compose(poly: Sequence[float], scale: float, offset: float) -> tuple[float, ...]:
    """The polynomial ``scale·poly(x) + offset`` (coefficients highest order first)."""
    out = [scale * c for c in poly]
    out[-1] += offset
    return tuple(out)


def _polyval(poly: Sequence[float], x: float) -> float:
    result = 0.0
    for c in poly:
        result = result * x + c
    return result


def fit_ec(
    points: Sequence[EcPoint],
    poly: Sequence[float],
    *,
    per_us: float,
    temp_coefficient: float | None,
) -> EcCalibration:
    """Correct ``poly`` (raw -> the key's unit) so that it reads each standard right.

    ``per_us`` converts µS/cm into the key's unit (0.5 for ``tds``, ppm on the
    500 scale; 1 for NodeLink ``ec``). With ``temp_coefficient`` the map's
    output is compensated to 25 °C afterwards, so at ``T`` it must read
    ``S·(1 + a·(T − 25))``. One point scales the map; two scale and shift it.
    """
    if not 1 <= len(points) <= 2:
        raise ProbeCalibrationError("a conductivity calibration takes one or two standards")
    targets, reads = [], []
    for p in points:
        target = p.standard_us * per_us
        if temp_coefficient is not None:
            if p.temp_c is None:
                raise ProbeCalibrationError("the map compensates temperature: water_temp needed")
            target *= 1.0 + temp_coefficient * (p.temp_c - 25.0)
        targets.append(target)
        reads.append(_polyval(poly, p.raw))
    if any(not (math.isfinite(r) and r > 0) for r in reads):
        raise ProbeCalibrationError(
            "the probe reads nothing in the standard: is it in the solution, and connected?"
        )
    if len(points) == 1:
        scale, offset = targets[0] / reads[0], 0.0
    else:
        if abs(reads[1] - reads[0]) < 1e-9 * max(reads):
            raise ProbeCalibrationError("the probe read the same in both standards")
        scale = (targets[1] - targets[0]) / (reads[1] - reads[0])
        offset = targets[0] - scale * reads[0]
    cal = EcCalibration(compose(poly, scale, offset), scale, offset, tuple(points))
    problems = []
    low, high = EC_SCALE_RANGE
    if not (math.isfinite(scale) and low <= scale <= high):
        problems.append(
            f"the probe reads {1 / scale if scale else math.inf:.2f} times the standard (usable: "
            f"{1 / high:g}–{1 / low:g}): a wrong standard, the probe not fully in the solution, "
            "a dirty or broken cell, or a calibration map of another probe"
        )
    if len(points) == 2 and abs(offset) > EC_OFFSET_SHARE * min(targets):
        problems.append(
            f"the zero moved by {abs(offset) / min(targets):.0%} of the lower standard (usable: "
            f"{EC_OFFSET_SHARE:.0%}): the standards may be swapped or contaminated"
        )
    if problems:
        cal = EcCalibration(cal.poly, scale, offset, cal.points, tuple(problems))
        raise ProbeRefused("; ".join(problems), cal)
    return cal


# --- stable readings -------------------------------------------------------------------------


class Stability:
    """Whether a raw reading stopped drifting: the mean of each half of a window agree.

    ``tolerance`` is in raw units (absolute) or, with ``relative=True``, a
    share of the window's mean. At least ``min_samples`` readings spanning
    ``window_s`` are needed.
    """

    def __init__(
        self, window_s: float, tolerance: float, *, relative: bool = False, min_samples: int = 5
    ) -> None:
        if not (window_s > 0 and tolerance > 0):
            raise ProbeCalibrationError("window_s and tolerance must be > 0")
        self.window_s = window_s
        self.tolerance = tolerance
        self.relative = relative
        self.min_samples = min_samples
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        if math.isfinite(value):
            self._samples.append((now, value))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()

    def reset(self) -> None:
        self._samples.clear()

    @property
    def latest(self) -> float | None:
        return self._samples[-1][1] if self._samples else None

    def drift(self) -> float | None:
        """Later half's mean minus the earlier half's, ``None`` before a full window."""
        samples = self._samples
        if len(samples) < self.min_samples or samples[-1][0] - samples[0][0] < 0.9 * self.window_s:
            return None
        half = len(samples) // 2
        first = math.fsum(v for _, v in list(samples)[:half]) / half
        second = math.fsum(v for _, v in list(samples)[half:]) / (len(samples) - half)
        return second - first

    def stable(self) -> float | None:
        """The window's mean once the reading is stable, else ``None``."""
        drift = self.drift()
        if drift is None:
            return None
        mean = math.fsum(v for _, v in self._samples) / len(self._samples)
        limit = self.tolerance * abs(mean) if self.relative else self.tolerance
        return mean if abs(drift) <= limit else None

