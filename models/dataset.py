"""The ML controller's training data: RB doses plus four documented interactions, with noise.

The control documentation (docs/references.md) trains its ML controller on 40,000
generated samples: six features (ppm, pH, air temperature, humidity, water
temperature, water level) and four targets (seconds of phUp, phDown,
nutrientAdd, refill). The labels are the rule-based (RB) doses, taken from
:func:`rules.rb.rb_seconds` (the formulas are not copied here), changed by
four interactions the model must learn:

1. *Skip nutrient while pH is out of band* — a nutrient dose shifts pH, so
   no nutrient is dosed while pH lies outside the RB pH band (5.5–6.5).
2. *Smaller nutrient dose at high temperature* — above ``heat_start_c`` air
   temperature the nutrient dose shrinks by ``heat_slope_per_c`` per °C, down
   to ``heat_min_factor`` (plants drink more water than nutrient in heat;
   prevents overdosing).
3. *More refill at low humidity* — below ``dry_humidity_pct`` relative
   humidity, ``dry_refill_s_per_pct`` seconds of fresh water per % are added
   (anticipating evaporation), while the level is below ``level_high``.
4. *Cooling refill* — above ``cool_start_c`` water temperature,
   ``cool_refill_s_per_c`` seconds of fresh (cooler) water per °C are added,
   while the level is below ``level_high``.

Refill stays capped at the RB refill cap. The feature names are the NodeLink
telemetry keys (``tds`` is ppm) and the target names the actuator keys, so
the runtime maps readings to doses without a translation table.

Label noise: Gaussian, σ = 5 % of each target's range (max − min of the clean
labels), added only to non-zero labels and clipped at 0, so the task is not
trivially exact. Features are sampled from a mixture: 70 % from the region
where the plant normally operates (where doses change), 30 % uniformly over
the whole :data:`RANGES`, which the runtime uses as its "inside the training
range" guard. Everything is driven by one seed and reproducible; the
dataset's SHA-256 goes into ``models/metadata.json``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from rules.controller import PlantConstants
from rules.rb import RbThresholds, rb_seconds

__all__ = [
    "FEATURES",
    "OPERATING",
    "RANGES",
    "TARGETS",
    "Dataset",
    "Interactions",
    "clean_targets",
    "generate",
]

FloatArray = npt.NDArray[np.float64]

#: Model inputs, in this order: NodeLink keys (ppm, pH, °C, % RH, °C, litres).
FEATURES: tuple[str, ...] = ("tds", "ph", "air_temp", "humidity", "water_temp", "water_level")
#: Model outputs, in this order: pump seconds per actuator key.
TARGETS: tuple[str, ...] = ("ph_up", "ph_down", "nutrient", "refill")

#: The training range of each feature: every sample lies inside it, and the
#: runtime refuses (ML → RB) any reading outside it. Wide enough for real
#: operation of the documented plant: tank water 0–2000 ppm, pH 3–9, air
#: 0–45 °C, 0–100 % RH, water 0–40 °C, 0–20 L (a 10 L tank up to its overflow).
RANGES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "tds": (0.0, 2000.0),
        "ph": (3.0, 9.0),
        "air_temp": (0.0, 45.0),
        "humidity": (0.0, 100.0),
        "water_temp": (0.0, 40.0),
        "water_level": (0.0, 20.0),
    }
)

#: Where the plant normally operates and the doses change: 70 % of the
#: samples come from here, so the model is most accurate where it matters.
OPERATING: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "tds": (250.0, 1200.0),
        "ph": (4.3, 7.7),
        "air_temp": (10.0, 40.0),
        "humidity": (15.0, 95.0),
        "water_temp": (12.0, 36.0),
        "water_level": (0.5, 3.5),
    }
)

_OPERATING_FRACTION = 0.7
_NOISE_FRACTION = 0.05


@dataclass(frozen=True)
class Interactions:
    """The constants of the four documented interactions (see the module docstring)."""

    heat_start_c: float = 28.0  # air temperature above which nutrient is reduced
    heat_slope_per_c: float = 0.05  # fraction of the dose removed per °C above
    heat_min_factor: float = 0.5  # never less than half the RB dose
    dry_humidity_pct: float = 40.0  # the documentation's "low humidity" edge
    dry_refill_s_per_pct: float = 1.5  # seconds of water per % RH below it
    cool_start_c: float = 28.0  # water temperature that stresses roots
    cool_refill_s_per_c: float = 10.0  # seconds of fresh water per °C above it
    level_high: float = 2.5  # L; the documentation's water-level maximum: no top-up above


@dataclass(frozen=True)
class Dataset:
    """A generated dataset, already split; arrays are ``float64``, rows are samples."""

    x_train: FloatArray
    y_train: FloatArray
    x_test: FloatArray
    y_test: FloatArray
    seed: int

    def sha256(self) -> str:
        """SHA-256 over the four arrays (C order, little-endian float64), in field order."""
        digest = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            digest.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
        return digest.hexdigest()


def clean_targets(
    x: FloatArray,
    *,
    thresholds: RbThresholds = RbThresholds(),  # noqa: B008 - frozen, immutable default
    plant: PlantConstants = PlantConstants(),  # noqa: B008 - frozen, immutable default
    interactions: Interactions = Interactions(),  # noqa: B008 - frozen, immutable default
) -> FloatArray:
    """Noise-free labels (seconds, columns :data:`TARGETS`) for feature rows ``x``.

    RB seconds from :func:`rules.rb.rb_seconds` (band variant, the
    documentation's formulas), then the four interactions.
    """
    cols = {name: x[:, i] for i, name in enumerate(FEATURES)}
    rb = np.array(
        [
            (s.ph_up, s.ph_down, s.nutrient, s.refill)
            for s in (
                rb_seconds(ph, ppm, level, variant="band", thresholds=thresholds, plant=plant)
                for ppm, ph, level in zip(
                    cols["tds"].tolist(), cols["ph"].tolist(), cols["water_level"].tolist(),
                    strict=True,
                )
            )
        ],
        dtype=np.float64,
    ).reshape(len(x), len(TARGETS))
    k = interactions
    ph_up, ph_down, nutrient, refill = rb.T

    ph_out_of_band = (cols["ph"] < thresholds.ph_low) | (cols["ph"] > thresholds.ph_high)
    nutrient = np.where(ph_out_of_band, 0.0, nutrient)
    heat = np.clip(
        1.0 - k.heat_slope_per_c * (cols["air_temp"] - k.heat_start_c), k.heat_min_factor, 1.0
    )
    nutrient = nutrient * heat

    room = cols["water_level"] < k.level_high
    dry = np.clip(k.dry_humidity_pct - cols["humidity"], 0.0, None) * k.dry_refill_s_per_pct
    warm = np.clip(cols["water_temp"] - k.cool_start_c, 0.0, None) * k.cool_refill_s_per_c
    refill = np.minimum(thresholds.cap_refill_s, refill + np.where(room, dry + warm, 0.0))

    return np.stack([ph_up, ph_down, nutrient, refill], axis=1)


def _sample(rng: np.random.Generator, n: int) -> FloatArray:
    """``n`` feature rows: the operating region with probability 0.7, else the full range."""
    operating = rng.random(n) < _OPERATING_FRACTION
    columns = []
    for name in FEATURES:
        full = rng.uniform(*RANGES[name], size=n)
        typical = rng.uniform(*OPERATING[name], size=n)
        columns.append(np.where(operating, typical, full))
    return np.stack(columns, axis=1)


def generate(n: int = 40_000, seed: int = 20_240_611, test_fraction: float = 0.2) -> Dataset:
    """Generate ``n`` samples with ``seed`` and split off ``test_fraction`` as the held-out set.

    The same arguments always give the same arrays (and the same
    :meth:`Dataset.sha256`).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    x = _sample(rng, n)
    y = clean_targets(x)
    sigma = _NOISE_FRACTION * np.ptp(y, axis=0)
    noisy = y + rng.normal(0.0, 1.0, size=y.shape) * sigma
    y = np.where(y > 0.0, np.clip(noisy, 0.0, None), 0.0)
    order = rng.permutation(n)
    n_test = round(n * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset(x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test], seed=seed)
