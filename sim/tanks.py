"""Families of simulated tanks: controllers are judged on tanks they were not tuned on.

A controller proven on one simulated tank is not proven. :func:`family`
draws tanks, seeded and reproducible, from the ranges of issue 11
(:data:`RANGES`): volume, buffer capacity, the water's alkalinity, the
strength of the pH solutions, the mixing lag and dead time between tank and
probes, pump sizes, and what the grower told the gateway (the ``plant:``
config) — right, 20 % wrong, or the pH solutions' strength not given at all.
Each tank also gets a start state and setpoints, both loops starting outside
their band, and cycle timings scaled with its mixing (:func:`timings`), as a
plant engineer would set them.

:func:`thesis_tank` is the one tank of the thesis comparison
(``PlantParams.thesis_rig()``, the config telling the truth).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from rules.controller import PH_PUMPS, PlantConstants
from rules.cycle import CycleSettings, Loop
from sim.plant import PUMPS, PlantParams, Reservoir

__all__ = [
    "CONFIGS",
    "RANGES",
    "Tank",
    "family",
    "measured_strength",
    "thesis_tank",
    "timings",
]

Config = Literal["right", "wrong", "unset"]
#: What the grower's ``plant:`` config says: the truth, each constant up to 20 % off, or
#: the truth without the pH solutions' strength (never measured).
CONFIGS: tuple[Config, ...] = ("right", "wrong", "unset")

#: Ranges tanks are drawn from (log-uniform unless noted).
RANGES: Mapping[str, tuple[float, float]] = {
    "volume_l": (5.0, 200.0),
    "buffer": (0.3, 3.0),  # × the nutrient stock's phosphate buffer
    "alkalinity_mmol_l": (0.05, 3.0),  # of the fresh water, as carbonate (RO water .. hard)
    "ph_mol_l": (0.1, 2.0),  # strength of each pH solution
    "lag_s": (30.0, 300.0),
    "dead_time_s": (5.0, 60.0),
    "pump": (0.5, 4.0),  # × the nominal size of each pump, independently
    "config_error": (0.8, 1.2),  # uniform: a wrong config's factor on each constant
    "start_tds": (300.0, 1400.0),  # uniform
    "start_ph": (4.5, 8.0),  # uniform
    "tds_setpoint": (700.0, 1100.0),  # uniform
    "ph_setpoint": (5.5, 6.5),  # uniform
}

#: Nominal pump flows (ml/s) for a 10 L tank; a tank of V litres gets V/10 times these.
NOMINAL_FLOW_ML_S_PER_10L: Mapping[str, float] = {
    "nutrient": 6.0,
    "refill": 30.0,
    "ph_up": 1.58,
    "ph_down": 1.58,
}

#: Starts are drawn at least this far outside the band, so each loop has a step to make.
_START_MARGIN = {"tds": 0.03, "ph": 0.2}  # × setpoint for TDS, pH units


@dataclass(frozen=True)
class Tank:
    """One simulated tank, what the gateway is told about it, and the step it must make."""

    name: str
    params: PlantParams
    told: PlantConstants
    config: Config
    start_tds: float
    start_ph: float
    tds_setpoint: float
    ph_setpoint: float
    timing: Mapping[str, float] = field(default_factory=dict)
    seed: int = 1
    hidden: tuple[str, ...] = ()  # sensor keys this tank's node does not have
    pumps: tuple[str, ...] = PUMPS  # the actuators its node has

    def settings(self, loops: tuple[Loop, ...] = ("tds", "ph")) -> CycleSettings:
        """The cycle settings a plant engineer would give this tank (defaults, timings scaled)."""
        return CycleSettings(
            tds_setpoint=self.tds_setpoint,
            ph_setpoint=self.ph_setpoint,
            loops=loops,
            **self.timing,
        )

    def describe(self) -> str:
        """One line: what makes this tank what it is."""
        p = self.params
        flows = "/".join(f"{p.flow_ml_s(k):.3g}" for k in PUMPS)
        return (
            f"{p.volume_l:.0f} L, buffer ×{p.stock_phosphate_mol_l / 0.016:.2g}, "
            f"alkalinity {p.refill_carbonate_mol_l * 1000:.2g} mM, "
            f"up {p.ph_up_mol_l:.2g} M / down {p.ph_down_mol_l:.2g} M, "
            f"lag {p.lag_s:.0f} s, dead {p.dead_time_s:.0f} s, pumps {flows} ml/s, "
            f"config {self.config}; TDS {self.start_tds:.0f} → {self.tds_setpoint:.0f}, "
            f"pH {self.start_ph:.2f} → {self.ph_setpoint:.2f}"
        )


def timings(params: PlantParams) -> dict[str, float]:
    """Cycle timings scaled with the plant's mixing, as a plant engineer would set them.

    The mixing wait covers the transport delay and two lag time constants
    (86 % of a dose's effect has arrived); holds are long enough to see a
    drift; the cycle limit leaves room for about 24 dose-and-wait
    rounds (pH needs several: the envelope halves the error per dose).
    """
    mix = params.dead_time_s + 2.0 * params.lag_s
    return {
        "mixing_wait_s": float(round(mix)),
        "tds_hold_s": float(max(180, round(2.0 * params.lag_s))),
        "ph_hold_s": float(max(300, round(3.0 * params.lag_s))),
        "max_cycle_s": float(max(3600, round(24.0 * (mix + 90.0)))),
    }


def measured_strength(params: PlantParams, tds: float, ph: float, pump: str) -> float:
    """ml/L per pH unit of ``pump`` near ``ph`` at ``tds``: what a guided titration finds.

    The secant over ±0.1 pH around ``ph`` of the tank's titration curve.
    """
    tank = Reservoir.from_state(tds=tds, ph=ph, params=params)
    sign = 1.0 if pump == "ph_up" else -1.0
    return tank.titration_ml_per_l(pump, ph - 0.1 * sign, ph + 0.1 * sign) / 0.2


def thesis_tank(
    name: str, *, start_tds: float, start_ph: float, tds_setpoint: float, ph_setpoint: float
) -> Tank:
    """The thesis comparison's tank: ``thesis_rig()``, told the truth, default timings."""
    params = PlantParams.thesis_rig()
    strengths = {
        pump: measured_strength(params, tds_setpoint, ph_setpoint, pump) for pump in PH_PUMPS
    }
    told = PlantConstants(
        tank_volume_l=params.volume_l,
        stock_ppm=params.stock_ppm,
        flow_ml_s={p: params.flow_ml_s(p) for p in PUMPS},
        ph_ml_per_l_per_unit=strengths,
    )
    return Tank(name, params, told, "right", start_tds, start_ph, tds_setpoint, ph_setpoint)


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _outside(rng: random.Random, low: float, high: float, centre: float, half: float) -> float:
    """Uniform on ``[low, high]`` without ``centre ± half``."""
    below = max(0.0, min(high, centre - half) - low)
    above = max(0.0, high - max(low, centre + half))
    u = rng.uniform(0.0, below + above)
    return low + u if u < below else centre + half + (u - below)


def draw(rng: random.Random, name: str, config: Config, *, seed: int = 1) -> Tank:
    """One tank from :data:`RANGES`, told about with ``config``."""
    r = RANGES
    volume = _log_uniform(rng, *r["volume_l"])
    buffer = _log_uniform(rng, *r["buffer"])
    base = PlantParams()
    flows = {
        pump: NOMINAL_FLOW_ML_S_PER_10L[pump] * volume / 10.0 * _log_uniform(rng, *r["pump"])
        for pump in PUMPS
    }
    params = replace(
        base,
        volume_l=volume,
        capacity_l=2.0 * volume,
        stock_phosphate_mol_l=base.stock_phosphate_mol_l * buffer,
        stock_acid_mol_l=base.stock_acid_mol_l * buffer,
        refill_carbonate_mol_l=_log_uniform(rng, *r["alkalinity_mmol_l"]) / 1000.0,
        ph_up_mol_l=_log_uniform(rng, *r["ph_mol_l"]),
        ph_down_mol_l=_log_uniform(rng, *r["ph_mol_l"]),
        lag_s=_log_uniform(rng, *r["lag_s"]),
        dead_time_s=_log_uniform(rng, *r["dead_time_s"]),
        nutrient_flow_ml_s=flows["nutrient"],
        refill_flow_ml_s=flows["refill"],
        ph_up_flow_ml_s=flows["ph_up"],
        ph_down_flow_ml_s=flows["ph_down"],
    )
    tds_sp = rng.uniform(*r["tds_setpoint"])
    ph_sp = rng.uniform(*r["ph_setpoint"])
    start_tds = _outside(rng, *r["start_tds"], tds_sp, tds_sp * (0.05 + _START_MARGIN["tds"]))
    start_ph = _outside(rng, *r["start_ph"], ph_sp, 0.15 + _START_MARGIN["ph"])
    strengths = {p: measured_strength(params, tds_sp, ph_sp, p) for p in PH_PUMPS}

    def wrong() -> float:
        return rng.uniform(*r["config_error"]) if config == "wrong" else 1.0

    told = PlantConstants(
        tank_volume_l=volume * wrong(),
        stock_ppm=params.stock_ppm * wrong(),
        flow_ml_s={p: f * wrong() for p, f in flows.items()},
        ph_ml_per_l_per_unit=(
            {} if config == "unset" else {p: s * wrong() for p, s in strengths.items()}
        ),
    )
    return Tank(
        name,
        params,
        told,
        config,
        start_tds,
        start_ph,
        tds_sp,
        ph_sp,
        timing=timings(params),
        seed=seed,
        # A wrong config is worst without a level sensor: the volume guess is all there is.
        hidden=("water_level",) if config == "wrong" else (),
    )


def family(count: int, *, seed: int = 11, configs: tuple[Config, ...] = CONFIGS) -> list[Tank]:
    """``count`` tanks drawn with ``seed``; configs taken in turn from ``configs``."""
    rng = random.Random(seed)
    return [
        draw(rng, f"tank{seed}-{i:03d}", configs[i % len(configs)], seed=seed * 1000 + i)
        for i in range(count)
    ]
