"""Crop presets: the pH and nutrient ranges of the thesis' crop table, in EC and ppm.

``control.crop: lettuce`` in the configuration gives a node its setpoints (the
middle of each range) and its bands (the ranges themselves) unless the config
states setpoints explicitly. The table is in docs/references.md ("Thesis:
control", crop ranges); crops with a single pH value have a band of zero width.

The table gives ppm; every one of its ranges is exactly an EC range in mS/cm
times 700 (lettuce 560–840 ppm is 0.8–1.2 mS/cm: docs/references.md,
"Conductivity scales"), so a crop states its range in EC and gives it on any
scale (:meth:`Crop.ppm`); inside hydrogate, its setpoint and band are ppm on
the 500 scale like every reading (rules/units.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from rules import units

#: The scale of the table's ppm column.
TABLE_SCALE = "ppm700"


@dataclass(frozen=True, slots=True)
class Crop:
    """The growing ranges of one crop: pH and EC in mS/cm, each ``(low, high)``."""

    name: str
    ph: tuple[float, float]
    ec: tuple[float, float]

    @property
    def ph_setpoint(self) -> float:
        return (self.ph[0] + self.ph[1]) / 2

    @property
    def ec_setpoint(self) -> float:
        """The middle of the EC range, mS/cm."""
        return (self.ec[0] + self.ec[1]) / 2

    def ppm(self, scale: str = TABLE_SCALE) -> tuple[float, float]:
        """The range in ppm on ``scale`` (``ppm500``, ``ppm640``, ``ppm700``; ``ec``: mS/cm)."""
        low, high = self.ec
        return units.convert(low, "ec", scale), units.convert(high, "ec", scale)

    @property
    def tds_band(self) -> tuple[float, float]:
        """The range as hydrogate's readings go (ppm, 500 scale)."""
        return self.ppm(units.INTERNAL.name)

    @property
    def tds_setpoint(self) -> float:
        """The setpoint as hydrogate's readings go (ppm, 500 scale)."""
        return units.to_internal(self.ec_setpoint, "ec")


def _crop(name: str, ph: tuple[float, float], ppm: tuple[float, float]) -> tuple[str, Crop]:
    ec = (units.convert(ppm[0], TABLE_SCALE, "ec"), units.convert(ppm[1], TABLE_SCALE, "ec"))
    return name, Crop(name, (float(ph[0]), float(ph[1])), ec)


CROPS = MappingProxyType(
    dict(
        [
            _crop("artichoke", (6.5, 7.5), (560, 1260)),
            _crop("asparagus", (6.0, 6.8), (980, 1200)),
            _crop("leek", (6.5, 7.0), (980, 1260)),
            _crop("spinach", (6.0, 7.0), (1260, 1610)),
            _crop("broccoli", (6.0, 6.8), (1960, 2450)),
            _crop("brussels_sprouts", (6.5, 6.5), (1750, 2100)),
            _crop("endive", (5.5, 5.5), (1400, 1680)),
            _crop("kailan", (5.5, 6.5), (1050, 1400)),
            _crop("water_spinach", (5.5, 6.5), (1050, 1400)),
            _crop("cabbage", (6.5, 7.0), (1750, 2100)),
            _crop("cauliflower", (6.5, 7.0), (1750, 2100)),
            _crop("pak_choi", (7.0, 7.0), (1050, 1400)),
            _crop("choy_sum", (5.5, 6.5), (1050, 1400)),
            _crop("mustard_greens", (6.0, 6.5), (840, 1680)),
            _crop("celery", (6.5, 6.5), (1260, 1680)),
            _crop("lettuce", (6.0, 7.0), (560, 840)),
        ]
    )
)
"""Every known crop by its canonical name (lower case, words joined by ``_``); ppm as in the
table (700 scale)."""

ALIASES = MappingProxyType({"kangkung": "water_spinach"})
"""Other names the thesis uses for a crop in :data:`CROPS`."""


def canonical(name: str) -> str:
    """``"Brussels sprouts"`` -> ``"brussels_sprouts"``; aliases resolve to their crop."""
    key = "_".join(name.strip().lower().replace("-", " ").split())
    return ALIASES.get(key, key)


def find_crop(name: str) -> Crop | None:
    """The crop called ``name`` (any case, spaces or hyphens for ``_``), or None."""
    return CROPS.get(canonical(name))
