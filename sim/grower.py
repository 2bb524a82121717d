"""A grower's tank: two-part nutrient, EC on a 700-scale meter, pumps and probes calibrated.

Issue 13's evaluation. One 50 L tank as a grower sets it up: an A:B nutrient
dosed 1:1 by two cheap peristaltic pumps whose real flows are 25 % over and
15 % under their label (so are the pH pumps and the water pump, less), a pH
probe of 93 % slope and +18 mV offset, a conductivity probe that reads 12 %
high, the setpoint in EC (1.6 mS/cm) on a gateway set to the 700 scale
(``units.conductivity: ppm700``, the stock written as 140,000 ppm on that
scale), and the raw probe values (``tds_v``, ``ph_v``) calibrated at the
gateway.

It runs twice, a day each, through the daemon's own control stack
(:func:`sim.evaluate.simulate`: the cycle, the safety guard, the pH envelope,
the adaptive controller, the parts dosed one after another):

- **as installed**: the pumps' label flows, the datasheet's probe maps;
- **calibrated**: every pump measured as `hydrogate pump calibrate` does it
  (a minute into a measuring cup read to the ml), the pH probe with buffers
  7.00 and 4.01 and the EC probe with the 1413 µS/cm standard as
  `hydrogate calibrate NODE ph|ec` does it (rules/probecal.py: readings
  taken once stable, buffers at their temperature).

Judged on the truth, not on what the gateway reads: the tank's EC and pH,
and the parts' ratio in the tank.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from rules import units
from rules.calibration import Calibrator
from rules.controller import NUTRIENT_PARTS, PH_PUMPS, REFILL, PlantConstants, create
from rules.probecal import (
    EcPoint,
    FrontEnd,
    PhPoint,
    Stability,
    buffer_ph,
    fit_ec,
    fit_ph,
)
from sim.evaluate import Result, simulate
from sim.plant import TDS_POLY, TDS_VALID_V, PlantParams, Reservoir, nernst_mv
from sim.tanks import Tank, measured_strength, timings

__all__ = ["GrowerRun", "grower", "grower_table"]

UNIT = "ppm700"
EC_SETPOINT = 1.6
PH_SETPOINT = 6.0
STOCK_PPM700 = 140_000.0  # what the grower writes: 1:1 of A and B, on the 700 scale
LABEL_ML_S = {"nutrient_a": 1.6, "nutrient_b": 1.6, "ph_up": 1.6, "ph_down": 1.6,
              "refill": 30.0}
TRUE_OVER_LABEL = {"nutrient_a": 1.25, "nutrient_b": 0.85, "ph_up": 1.15, "ph_down": 0.8,
                   "refill": 0.9}
PUMPS = (*NUTRIENT_PARTS[:2], *PH_PUMPS, REFILL)
CUP_S = 60.0  # each pump runs a minute into the cup ...
CUP_RESOLUTION_ML = 1.0  # ... read to the ml
PROBE_TEMP_C = 22.0  # the buffers' temperature
POLL_S = 5.0
DAY_S = 86_400.0
HOLD_BAND = 0.05  # of the EC setpoint: "on target"


@dataclass(frozen=True)
class _Map:
    """A calibration map (rules.calibration.CalibrationMapLike)."""

    key: str
    source: str
    poly: tuple[float, ...]
    valid: tuple[float, float] | None = None
    temp_coefficient: float | None = None


#: The datasheet maps: an ideal glass electrode, the thesis's TDS fit.
DATASHEET_MAPS = (
    _Map("ph", "ph_v", (-1000.0 / nernst_mv(25.0), 7.0)),
    _Map("tds", "tds_v", tuple(TDS_POLY), (TDS_VALID_V[0], TDS_VALID_V[1]), 0.02),
)


def grower_params() -> PlantParams:
    """The tank's truth: a 50 L reservoir, concentrated parts, pumps and probes off."""
    base = PlantParams(
        volume_l=50.0, capacity_l=80.0, lag_s=90.0, dead_time_s=20.0,
        part_a_ppm=120_000.0, part_a_acid_mol_l=0.02,
        part_b_ppm=80_000.0, part_b_phosphate_mol_l=0.32, part_b_acid_mol_l=0.10,
        ph_up_mol_l=0.5, ph_down_mol_l=0.5,
        tds_probe_gain=1.12, ph_probe_slope_pct=93.0, ph_probe_offset_mv=18.0,
        probe_response_s=8.0, evaporation_l_per_h=0.002 * 50.0,
    )
    flows = {f"{p}_flow_ml_s": LABEL_ML_S[p] * TRUE_OVER_LABEL[p] for p in PUMPS}
    return replace(base, **flows)


def cup(params: PlantParams, pump: str) -> float:
    """The flow `hydrogate pump calibrate` finds: a minute into a cup read to the ml."""
    ml = params.flow_ml_s(pump) * CUP_S
    ml = round(ml / CUP_RESOLUTION_ML) * CUP_RESOLUTION_ML
    return float(f"{ml / CUP_S:.4g}")  # as gateway/pumpcal.py keeps it


def _stable(tank: Reservoir, key: str, tolerance: float, *, relative: bool) -> tuple[float, float]:
    """The raw ``key`` once stable (as gateway/probecal.py reads it), and the water_temp then.

    Polled every :data:`POLL_S` like the daemon's default node, so the window is
    gateway/probecal.py's for that poll: six readings.
    """
    stability = Stability(max(10.0, 6 * POLL_S), tolerance, relative=relative)
    temps: list[float] = []
    for _ in range(120):  # at most 10 min
        tank.step(POLL_S)
        reading = tank.sensors()
        stability.add(tank.time_s, reading[key])
        temps.append(reading["water_temp"])
        value = stability.stable()
        if value is not None:
            return value, math.fsum(temps[-6:]) / len(temps[-6:])
    raise RuntimeError(f"{key} never stable")  # pragma: no cover - the model always settles


def calibrate_ph(params: PlantParams) -> tuple[_Map, float, float]:
    """Buffers 7.00 and 4.01 as `hydrogate calibrate NODE ph` takes them: map, slope, offset."""
    tank = Reservoir.from_state(tds=800, ph=6.5, params=params, seed=21)
    points = []
    for nominal in (7.00, 4.01):
        value = buffer_ph(nominal, PROBE_TEMP_C)
        assert value is not None
        tank.immerse("ph", value, PROBE_TEMP_C)
        raw, temp = _stable(tank, "ph_v", 0.3 / 1000.0, relative=False)
        ph = buffer_ph(nominal, temp)
        assert ph is not None
        points.append(PhPoint(nominal, ph, raw, temp))
    cal = fit_ph(points, FrontEnd(1000.0))
    poly = tuple(float(f"{c:.6g}") for c in cal.poly)
    return _Map("ph", "ph_v", poly), cal.slope_pct, cal.offset_mv


def calibrate_ec(params: PlantParams) -> tuple[_Map, float]:
    """The 1413 µS/cm standard as `hydrogate calibrate NODE ec` takes it: the corrected map."""
    tank = Reservoir.from_state(tds=800, ph=6.5, params=params, seed=22)
    tank.immerse("ec", 1413.0, PROBE_TEMP_C)
    raw, temp = _stable(tank, "tds_v", 0.003, relative=True)
    cal = fit_ec([EcPoint(1413.0, raw, temp)], TDS_POLY, per_us=0.5, temp_coefficient=0.02)
    poly = tuple(float(f"{c:.6g}") for c in cal.poly)
    return _Map("tds", "tds_v", poly, (TDS_VALID_V[0], TDS_VALID_V[1]), 0.02), cal.scale


def reader(maps: Sequence[_Map]) -> Callable[[Reservoir], dict[str, float | None]]:
    """What the gateway makes of the node's raw probes with ``maps`` (calibration, then units)."""
    calibrator = Calibrator(list(maps))
    raw_keys = ("tds_v", "ph_v", "water_temp", "water_level", "air_temp", "humidity")

    def read(plant: Reservoir) -> dict[str, float | None]:
        sensed = plant.sensors()
        values = calibrator.apply({k: sensed[k] for k in raw_keys}).values
        return units.inbound(values, calibrated={m.key for m in maps})

    return read


@dataclass(frozen=True)
class GrowerRun:
    """One day of the grower's tank: how the gateway was set up and what the tank did."""

    label: str
    told_flows: Mapping[str, float]
    flow_error_pct: Mapping[str, float]  # told / true − 1, per pump
    probe_ph: tuple[float, float] | None  # slope %, offset mV (calibrated only)
    ec_scale: float | None
    read_error_ec_pct: float  # what the gateway reads / truth − 1, in the tank at the end
    read_error_ph: float
    result: Result

    def _after(self, first: float | None) -> list[int]:
        t0 = first if first is not None else math.inf
        return [i for i, t in enumerate(self.result.times) if t >= t0]

    @property
    def ec_held(self) -> tuple[float, float]:
        """The true EC (mS/cm) in the last 12 h, mean, and the share of the day after the
        first cycle it was within ±5 % of the setpoint."""
        r = self.result
        last = [v for t, v in zip(r.times, r.tds, strict=True) if t >= r.times[-1] - DAY_S / 2]
        after = self._after(r.first_cycle_s)
        sp = units.to_internal(EC_SETPOINT, "ec")
        inside = sum(1 for i in after if abs(r.tds[i] - sp) <= HOLD_BAND * sp)
        mean = units.from_internal(math.fsum(last) / max(1, len(last)), "ec")
        return mean, inside / len(after) if after else 0.0

    @property
    def ph_held(self) -> tuple[float, float]:
        """The true pH in the last 12 h, mean, and the share after the first cycle in band."""
        r = self.result
        last = [v for t, v in zip(r.times, r.ph, strict=True) if t >= r.times[-1] - DAY_S / 2]
        after = self._after(r.first_cycle_s)
        inside = sum(1 for i in after if abs(r.ph[i] - PH_SETPOINT) <= 0.15)
        return math.fsum(last) / max(1, len(last)), inside / len(after) if after else 0.0

    @property
    def ratio_dosed(self) -> float:
        """ml of A over ml of B over the day (the ratio is 1:1)."""
        v = self.result.volume_ml
        return v["nutrient_a"] / v["nutrient_b"] if v.get("nutrient_b") else math.nan


def _tank(params: PlantParams, told_flows: Mapping[str, float]) -> Tank:
    sp = units.to_internal(EC_SETPOINT, "ec")
    # Titrated (`hydrogate titrate`): its ml were counted with the flow the gateway had.
    strengths = {p: measured_strength(params, sp, PH_SETPOINT, p) * told_flows[p]
                 / params.flow_ml_s(p) for p in PH_PUMPS}
    told = PlantConstants(
        tank_volume_l=params.volume_l,
        stock_ppm=units.to_internal(STOCK_PPM700, UNIT),
        flow_ml_s=dict(told_flows),
        ph_ml_per_l_per_unit=strengths,
        nutrient_ratio={"nutrient_a": 1.0, "nutrient_b": 1.0},
    )
    return Tank(
        "grower", params, told, "right", start_tds=250.0, start_ph=6.8, tds_setpoint=sp,
        ph_setpoint=PH_SETPOINT, timing=timings(params), seed=23, pumps=PUMPS,
    )


async def _run(label: str, params: PlantParams, told_flows: Mapping[str, float], *,
               maps: Sequence[_Map], probe_ph: tuple[float, float] | None,
               ec_scale: float | None, days: float) -> GrowerRun:
    tank = _tank(params, told_flows)
    controller = create("adaptive")
    read = reader(maps)
    try:
        result = await simulate(tank, controller, duration_s=days * DAY_S, poll_s=POLL_S,
                                read=read)
    finally:
        controller.close()
    result.controller = "adaptive"
    # What the gateway reads against the truth, in this tank at a steady state.
    probe = Reservoir.from_state(tds=units.to_internal(EC_SETPOINT, "ec"), ph=PH_SETPOINT,
                                 params=replace(params, noise_tds=0.0, noise_ph=0.0), seed=1)
    seen, truth = read(probe), probe.truth(at_probe=True)
    return GrowerRun(
        label, dict(told_flows),
        {p: 100.0 * (told_flows[p] / params.flow_ml_s(p) - 1.0) for p in PUMPS},
        probe_ph, ec_scale,
        100.0 * ((seen.get("tds") or math.nan) / truth["tds"] - 1.0),
        (seen.get("ph") or math.nan) - truth["ph"],
        result,
    )


async def grower(days: float = 1.0) -> list[GrowerRun]:
    """The grower's tank as installed, then with every pump and probe calibrated."""
    params = grower_params()
    installed = await _run("as installed (label flows, datasheet maps)", params, LABEL_ML_S,
                           maps=DATASHEET_MAPS, probe_ph=None, ec_scale=None, days=days)
    flows = {p: cup(params, p) for p in PUMPS}
    ph_map, slope, offset = calibrate_ph(params)
    ec_map, scale = calibrate_ec(params)
    calibrated = await _run("calibrated (pump calibrate, calibrate ph and ec)", params, flows,
                            maps=(ph_map, ec_map), probe_ph=(slope, offset), ec_scale=scale,
                            days=days)
    return [installed, calibrated]


def grower_table(runs: Sequence[GrowerRun]) -> str:
    """The two days side by side."""
    scale = units.unit(UNIT)

    def ec(value: float) -> str:
        return f"{value:.2f} mS/cm ({units.convert(value, 'ec', scale):.0f} ppm700)"

    rows: list[tuple[str, Callable[[GrowerRun], str]]] = [
        ("worst pump flow error", lambda g: f"{max(abs(v) for v in g.flow_error_pct.values()):.1f}"
                                            " %"),
        ("pH probe (slope, offset)", lambda g: "datasheet (100 %, 0 mV)" if g.probe_ph is None
         else f"{g.probe_ph[0]:.1f} %, {g.probe_ph[1]:+.1f} mV (true 93 %, +18 mV)"),
        ("EC read against the truth", lambda g: f"{g.read_error_ec_pct:+.1f} %"),
        ("pH read against the truth", lambda g: f"{g.read_error_ph:+.2f}"),
        ("first cycle done after", lambda g: "never" if g.result.first_cycle_s is None
         else f"{g.result.first_cycle_s / 60:.0f} min"),
        ("EC overshoot (of the step)", lambda g: f"{g.result.metrics['tds'].overshoot_pct:.1f} %"),
        ("true EC, last 12 h", lambda g: ec(g.ec_held[0])),
        ("true EC within ±5 % of 1.6", lambda g: f"{100 * g.ec_held[1]:.1f} % of the time"),
        ("true pH, last 12 h", lambda g: f"{g.ph_held[0]:.2f}"),
        ("true pH within 6.0 ± 0.15", lambda g: f"{100 * g.ph_held[1]:.1f} % of the time"),
        ("A:B dosed (1:1 wanted)", lambda g: f"1:{1 / g.ratio_dosed:.2f}"),
        ("volume ml", lambda g: ", ".join(f"{k} {v:.0f}" for k, v in g.result.volume_ml.items()
                                          if v >= 0.5)),
    ]
    lines = ["| | " + " | ".join(g.label for g in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(cell(g) for g in runs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - `python -m sim.grower` for a quick look
    print(grower_table(asyncio.run(grower())))
