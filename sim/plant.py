"""A simulated hydroponic reservoir: a pure, deterministic, steppable model.

The model stands in for the process simulator of the source documents. It is
used in real time behind a simulated node (``sim/node.py``) and in accelerated
discrete time by the controller evaluation, so it must be physically sensible,
reproducible (one seeded ``numpy.random.Generator`` for all noise) and cheap
(a few microseconds per internal sub-step, no numpy in the inner loop).

State (extensive quantities of the well-mixed tank):

- volume (L) and dissolved mass (mg): TDS in ppm (mg/L) by mass balance;
- strong-ion balance ``B`` (mol of strong cations minus strong anions), total
  carbonate (mol, from the fresh water's alkalinity) and total phosphate
  (mol, from the nutrient stock). pH is the root of the charge balance
  ``B/V + [H+] = [OH-] + carbonate charge + phosphate charge``, so a dose
  moves pH a lot far from a pKa (below ~5.5 or above ~7.5) and little in the
  buffer region around pH 6-7, as a titration curve does;
- water temperature, which follows the air temperature with a lag and mixes
  with the temperature of what is pumped in.

Between the tank and the probes there is a transport dead time and a
first-order lag (the probe sits in the return line of the circulation loop).
Both act on the *composition* (concentrations mix linearly), and the probe's
pH is solved from the lagged composition, which is what a real probe sees.
Plants take up nutrients (TDS falls; nitrate uptake releases base, so pH
rises) and water evaporates or transpires (volume falls, TDS rises) faster in
warm, dry air. Air temperature and humidity follow an optional diurnal cycle.

A multi-part nutrient has a pump per part (``nutrient_a``, ``nutrient_b``,
``nutrient_c``), each part its own composition (dissolved mass, phosphate,
free acid: part A like calcium nitrate, part B the phosphates and sulfates),
and the tank keeps each part's dissolved mass apart (:meth:`Reservoir.parts_mg`),
so a wrong ratio shows in the tank, in its TDS per ml and in its pH.

The probes can be taken out of the tank and put into a buffer or a standard
solution (:meth:`Reservoir.immerse`), as a grower calibrating them does; they
approach its value with ``probe_response_s``. The pH probe's electrode
potential (``ph_v``, volts) follows a slope (% of Nernst) and an offset (mV at
pH 7) at the water's temperature; the conductivity probe reads
``tds_probe_gain`` times the truth (a cell constant off), so calibrations can
be tested against known errors.

Simplifications, on purpose: closed carbonate system (no CO2 exchange with
air), activities equal concentrations, constants at 25 °C, the pH solutions
add no dissolved mass unless ``ph_up_ppm`` / ``ph_down_ppm`` say so.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Final

import numpy as np

from rules.controller import ACTUATORS, NUTRIENT_PARTS

__all__ = [
    "ALL_PUMPS",
    "PARTS",
    "PUMPS",
    "PH_ADC_OFFSET",
    "PH_ADC_SLOPE",
    "TDS_POLY",
    "TDS_VALID_V",
    "PlantError",
    "PlantParams",
    "Reservoir",
    "SimError",
    "nernst_mv",
    "ph_to_adc",
    "tds_to_volts",
]

PUMPS: Final = ACTUATORS
"""The actuators of a single-stock reservoir, by their NodeLink names."""
PARTS: Final = NUTRIENT_PARTS
"""The pumps of a multi-part nutrient."""
ALL_PUMPS: Final = PUMPS + PARTS
"""Every pump the reservoir has."""

TDS_POLY: Final = (913.98, -2556.2, 2437.0, -416.27, 69.331)
"""Thesis order-4 TDS calibration (volts -> ppm), highest order first."""
TDS_VALID_V: Final = (0.04, 1.58)
"""Voltage range the TDS polynomial was fitted on."""
PH_ADC_SLOPE: Final = 0.0025
PH_ADC_OFFSET: Final = 3.9926
"""Thesis two-point pH calibration: ``pH = 0.0025 * adc + 3.9926``."""

ADC_VREF: Final = 3.3
ADC_MAX: Final = 4095

_LN10: Final = math.log(10.0)
_NERNST_MV_PER_K: Final = _LN10 * 8.314462618 / 96485.33212 * 1000.0  # ln10·R/F, mV/K
_KELVIN: Final = 273.15
_KW: Final = 1e-14
_K_CARB: Final = (10**-6.35, 10**-10.33)
_K_PHOS: Final = (10**-2.15, 10**-7.20, 10**-12.35)
_MIN_VOLUME_L: Final = 0.05


class SimError(Exception):
    """Base of every error raised by the simulator package."""


class PlantError(SimError):
    """A request the reservoir model cannot honour (unknown pump, bad duty, bad step)."""


@dataclass(frozen=True)
class PlantParams:
    """Every constant of the reservoir model, with defaults from the source documents.

    Volumes in litres, flows in ml/s at duty 255 (flow is proportional to
    duty/255), concentrations in mg/L (ppm) or mol/L, times in seconds.
    """

    # Initial state.
    volume_l: float = 10.0
    initial_tds: float = 700.0
    initial_ph: float = 6.0
    initial_water_temp: float | None = None  # None: equal to the air temperature
    capacity_l: float = 20.0  # overflow drains mixed tank water beyond this

    # Pumps (the control documentation: 1.58 ml/s, stock 10,000 ppm, tank 10 L).
    nutrient_flow_ml_s: float = 1.58
    ph_up_flow_ml_s: float = 1.58
    ph_down_flow_ml_s: float = 1.58
    refill_flow_ml_s: float = 1.58
    nutrient_a_flow_ml_s: float = 1.58
    nutrient_b_flow_ml_s: float = 1.58
    nutrient_c_flow_ml_s: float = 1.58

    # What each pump adds.
    stock_ppm: float = 10_000.0
    stock_phosphate_mol_l: float = 0.016  # ~5 % of the stock's mass is phosphorus
    stock_acid_mol_l: float = 0.006  # free acid: the stock is slightly acidic
    refill_ppm: float = 0.0
    refill_ph: float = 7.0
    refill_carbonate_mol_l: float = 0.001  # tap-water alkalinity (~40 mg/L CaCO3)
    refill_temp: float = 22.0
    ph_up_mol_l: float = 0.15  # strong base (KOH)
    ph_down_mol_l: float = 0.15  # strong acid
    ph_up_ppm: float = 0.0
    ph_down_ppm: float = 0.0
    # The parts of a multi-part nutrient; A:B 1:1 is the stock above, split by chemistry.
    part_a_ppm: float = 12_000.0  # calcium nitrate, iron: no phosphate
    part_a_phosphate_mol_l: float = 0.0
    part_a_acid_mol_l: float = 0.002
    part_b_ppm: float = 8_000.0  # phosphates, sulfates, potassium, magnesium
    part_b_phosphate_mol_l: float = 0.032
    part_b_acid_mol_l: float = 0.010
    part_c_ppm: float = 4_000.0  # a supplement: no phosphate, no acid
    part_c_phosphate_mol_l: float = 0.0
    part_c_acid_mol_l: float = 0.0

    # Mixing between the well-mixed tank and the probes.
    dead_time_s: float = 25.0
    lag_s: float = 50.0

    # Slow processes.
    uptake_per_h: float = 0.003  # fraction of dissolved mass the plants take per hour
    uptake_base_mol_per_g: float = 0.005  # base released per gram taken (nitrate uptake)
    evaporation_l_per_h: float = 0.02  # at 25 °C and 50 % RH, scaled by vapour deficit
    water_temp_lag_s: float = 3600.0

    # Climate: mean + amplitude * cos(2π (hour - peak_hour) / 24).
    start_hour: float = 9.0
    air_temp_mean: float = 25.0
    air_temp_amplitude: float = 4.0
    air_temp_peak_hour: float = 14.0
    humidity_mean: float = 65.0
    humidity_amplitude: float = 15.0  # humidity peaks 12 h after the air temperature

    # Sensor noise (standard deviations) and the TDS probe's temperature dependence.
    noise_tds: float = 2.0
    noise_ph: float = 0.01
    noise_water_temp: float = 0.05
    noise_water_level: float = 0.01
    noise_air_temp: float = 0.1
    noise_humidity: float = 0.5
    tds_temp_coefficient: float = 0.02

    # The probes' own errors: the conductivity probe reads this many times the truth; the
    # pH electrode's slope (% of Nernst) and offset (mV at pH 7); their response time
    # when moved into a buffer or standard solution.
    tds_probe_gain: float = 1.0
    ph_probe_slope_pct: float = 100.0
    ph_probe_offset_mv: float = 0.0
    probe_response_s: float = 3.0

    # Numerics.
    max_substep_s: float = 0.5

    @classmethod
    def thesis_rig(cls, **overrides: float) -> PlantParams:
        """Pumps sized like the thesis's rig rather than the control documentation's 1.58 ml/s.

        The thesis names a diaphragm pump for the stock and a water pump for
        dilution but gives no flows. With 1.58 ml/s a 2 s pulse adds only
        3.2 ppm to 10 L, so its constant-step controller would need ~25 min
        for 300 -> 700 ppm and overshoot ~3 %, where the thesis measured a
        126 s rise and 28.7 % overshoot. A 12 ml/s stock pump and a 30 ml/s
        water pump reproduce that order of behaviour (an assumption, chosen
        by simulating that controller; the pH pumps keep 1.58 ml/s).
        """
        base = cls(nutrient_flow_ml_s=12.0, refill_flow_ml_s=30.0)
        return replace(base, **overrides)

    def flow_ml_s(self, pump: str) -> float:
        """Flow of ``pump`` at duty 255 in ml/s."""
        try:
            return float(getattr(self, f"{_pump_key(pump)}_flow_ml_s"))
        except AttributeError as exc:
            raise PlantError(f"unknown pump {pump!r} (known: {', '.join(ALL_PUMPS)})") from exc


def _pump_key(pump: str) -> str:
    if pump not in ALL_PUMPS:
        raise PlantError(f"unknown pump {pump!r} (known: {', '.join(ALL_PUMPS)})")
    return pump


def nernst_mv(temp_c: float) -> float:
    """The ideal pH electrode's slope at ``temp_c``: mV per pH unit (59.16 at 25 °C)."""
    return _NERNST_MV_PER_K * (temp_c + _KELVIN)


# --- chemistry ---------------------------------------------------------------


def _required_base(ph: float, carb: float, phos: float) -> tuple[float, float]:
    """Strong-ion balance (mol/L) a solution needs to sit at ``ph``, and dB/dpH.

    The derivative is the buffer capacity: ln10 * ([H+] + [OH-] + Σ C·var(n)),
    where var(n) is the variance of the charge over the species of each acid.
    """
    h = 10.0**-ph
    oh = _KW / h
    k1, k2 = _K_CARB
    c1 = k1 * h
    c2 = k1 * k2
    cs = h * h + c1 + c2
    cn = (c1 + 2.0 * c2) / cs
    cvar = (c1 + 4.0 * c2) / cs - cn * cn
    p1, p2, p3 = _K_PHOS
    h2 = h * h
    d1 = p1 * h2
    d2 = p1 * p2 * h
    d3 = p1 * p2 * p3
    ps = h2 * h + d1 + d2 + d3
    pn = (d1 + 2.0 * d2 + 3.0 * d3) / ps
    pvar = (d1 + 4.0 * d2 + 9.0 * d3) / ps - pn * pn
    base = oh - h + carb * cn + phos * pn
    beta = _LN10 * (h + oh + carb * cvar + phos * pvar)
    return base, beta


def _solve_ph(base: float, carb: float, phos: float, guess: float) -> float:
    """pH of a solution with strong-ion balance ``base`` (mol/L): safeguarded Newton.

    The required base rises monotonically with pH, so a bracket on [-1, 15]
    always holds the root; a Newton step leaving the bracket is replaced by
    bisection. From a warm start this takes two or three iterations.
    """
    lo, hi = -1.0, 15.0
    x = min(max(guess, lo), hi)
    for _ in range(100):
        f, beta = _required_base(x, carb, phos)
        f -= base
        if f > 0.0:
            hi = x
        else:
            lo = x
        step = f / beta
        nxt = x - step
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        if abs(nxt - x) < 1e-10:
            return nxt
        x = nxt
    return x


# --- calibration maps, inverted ---------------------------------------------


def _tds_poly(v: float) -> float:
    a, b, c, d, e = TDS_POLY
    return (((a * v + b) * v + c) * v + d) * v + e


def _tds_poly_slope(v: float) -> float:
    a, b, c, d, _ = TDS_POLY
    return ((4.0 * a * v + 3.0 * b) * v + 2.0 * c) * v + d


def _tds_inverse_table() -> tuple[float, list[float], list[float]]:
    """Grid of the TDS polynomial on its rising branch (its minimum to ADC_VREF)."""
    grid = np.linspace(0.0, 0.3, 3001)
    v_min = float(grid[int(np.argmin(np.polyval(TDS_POLY, grid)))])
    volts = [float(v) for v in np.linspace(v_min, ADC_VREF, 4000)]
    return v_min, volts, [_tds_poly(v) for v in volts]


_TDS_VMIN, _TDS_GRID_V, _TDS_GRID_PPM = _tds_inverse_table()
_TDS_PPM_MIN: Final = _TDS_GRID_PPM[0]


def tds_to_volts(ppm: float) -> float:
    """Probe voltage whose order-4 calibration gives ``ppm`` (the map inverted).

    The polynomial falls from 0 to ~0.10 V and rises after, so the rising
    branch is used; below its minimum (~49.6 ppm) the voltage falls linearly
    to 0 V at 0 ppm, above 3.3 V it is clipped as the ADC would. Outside
    0.04-1.58 V the gateway must flag the value, not trust it.
    """
    if ppm <= _TDS_PPM_MIN:
        return max(0.0, _TDS_VMIN * ppm / _TDS_PPM_MIN)
    i = bisect.bisect_left(_TDS_GRID_PPM, ppm)
    if i >= len(_TDS_GRID_PPM):
        return ADC_VREF
    p0, p1 = _TDS_GRID_PPM[i - 1], _TDS_GRID_PPM[i]
    v0, v1 = _TDS_GRID_V[i - 1], _TDS_GRID_V[i]
    v = v0 + (v1 - v0) * (ppm - p0) / (p1 - p0)
    for _ in range(2):  # polish with Newton; the slope is positive on this branch
        v -= (_tds_poly(v) - ppm) / _tds_poly_slope(v)
    return min(max(v, v0), v1)


def ph_to_adc(ph: float) -> int:
    """12-bit ADC count whose linear calibration gives ``ph``, clipped to 0..4095."""
    return min(max(round((ph - PH_ADC_OFFSET) / PH_ADC_SLOPE), 0), ADC_MAX)


def _quantize_volts(v: float) -> float:
    """Voltage as a 12-bit ADC at 3.3 V reports it."""
    counts = min(max(round(v / ADC_VREF * ADC_MAX), 0), ADC_MAX)
    return round(counts * ADC_VREF / ADC_MAX, 4)


# --- the model ---------------------------------------------------------------


def _vapour_deficit_kpa(temp: float, rh: float) -> float:
    """Vapour pressure deficit (Tetens), which drives evaporation."""
    es = 0.6108 * math.exp(17.27 * temp / (temp + 237.3))
    return es * max(0.0, 1.0 - rh / 100.0)


_VPD_REF: Final = _vapour_deficit_kpa(25.0, 50.0)

_Sample = tuple[float, float, float, float, float]  # (t, ppm, base, carbonate, phosphate)


class Reservoir:
    """The reservoir, its pumps, its probes. Pure: time moves only through ``step``.

    ``Reservoir(params, seed=...)`` starts at ``params.initial_*``;
    ``Reservoir.from_state(tds=..., ph=..., volume_l=...)`` at a given state.
    The same params, seed and sequence of calls give the same numbers.
    """

    def __init__(self, params: PlantParams | None = None, *, seed: int = 0) -> None:
        p = params if params is not None else PlantParams()
        if p.volume_l <= 0 or p.max_substep_s <= 0 or p.lag_s <= 0 or p.dead_time_s < 0:
            raise PlantError("volume_l, max_substep_s and lag_s must be > 0, dead_time_s >= 0")
        if p.initial_tds < 0:
            raise PlantError("initial_tds must be >= 0")
        self.params = p
        self._rng = np.random.default_rng(seed)
        self._t = 0.0
        self._duty: dict[str, int] = dict.fromkeys(ALL_PUMPS, 0)
        self._on: dict[str, int] = {}  # the pumps running, and their duty
        self._dosed_ml: dict[str, float] = dict.fromkeys(ALL_PUMPS, 0.0)
        # Each part's dissolved mass, divided by _parts_scale: uptake and overflow take from
        # every part alike, so they scale that one number instead of each part.
        self._parts_mg: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self._parts_scale = 1.0
        self._immersed: dict[str, tuple[float, float, float, float]] = {}  # see immerse()

        # What one litre pumped by each pump adds: (mg, base mol, carbonate mol, phosphate mol).
        refill_base, _ = _required_base(p.refill_ph, p.refill_carbonate_mol_l, 0.0)
        self._inflow: dict[str, tuple[float, float, float, float]] = {
            "nutrient": (
                p.stock_ppm,
                p.stock_phosphate_mol_l - p.stock_acid_mol_l,
                0.0,
                p.stock_phosphate_mol_l,
            ),
            "ph_up": (p.ph_up_ppm, p.ph_up_mol_l, 0.0, 0.0),
            "ph_down": (p.ph_down_ppm, -p.ph_down_mol_l, 0.0, 0.0),
            "refill": (p.refill_ppm, refill_base, p.refill_carbonate_mol_l, 0.0),
        }
        for part, letter in zip(PARTS, "abc", strict=True):
            phos = float(getattr(p, f"part_{letter}_phosphate_mol_l"))
            acid = float(getattr(p, f"part_{letter}_acid_mol_l"))
            self._inflow[part] = (float(getattr(p, f"part_{letter}_ppm")), phos - acid, 0.0, phos)
        self._flow_l_s = {k: p.flow_ml_s(k) / 1000.0 for k in ALL_PUMPS}

        # Tank: made of fresh water plus stock, brought to initial_ph by its base balance.
        vol = p.volume_l
        self._vol = vol
        self._mass = p.initial_tds * vol
        self._carb = p.refill_carbonate_mol_l * vol
        self._phos = p.stock_phosphate_mol_l * p.initial_tds / p.stock_ppm * vol
        base, _ = _required_base(p.initial_ph, self._carb / vol, self._phos / vol)
        self._base = base * vol
        air, _ = self._climate(0.0)
        self._temp = air if p.initial_water_temp is None else p.initial_water_temp

        # Probe: dead-time line and first-order lag of the composition.
        now = self._composition()
        self._history: deque[_Sample] = deque([(-math.inf, *now)])
        self._probe = list(now)
        self._lag_h = -1.0
        self._lag_a = 0.0
        self._ph_tank = p.initial_ph
        self._ph_probe = p.initial_ph
        self._ph_tank_key: tuple[float, ...] = ()
        self._ph_probe_key: tuple[float, ...] = ()

    @classmethod
    def from_state(
        cls,
        *,
        tds: float,
        ph: float,
        volume_l: float | None = None,
        water_temp: float | None = None,
        params: PlantParams | None = None,
        seed: int = 0,
    ) -> Reservoir:
        """A reservoir settled at ``tds`` ppm and ``ph`` (probes agreeing with the tank)."""
        p = params if params is not None else PlantParams()
        p = replace(
            p,
            initial_tds=tds,
            initial_ph=ph,
            volume_l=p.volume_l if volume_l is None else volume_l,
            initial_water_temp=water_temp if water_temp is not None else p.initial_water_temp,
        )
        return cls(p, seed=seed)

    # --- inputs ------------------------------------------------------------

    def set_pump(self, actuator: str, duty: int) -> None:
        """Run ``actuator`` at PWM ``duty`` (0..255; 0 = off) until changed."""
        _pump_key(actuator)
        if isinstance(duty, bool) or not isinstance(duty, int) or not 0 <= duty <= 255:
            raise PlantError(f"duty must be an integer 0..255, got {duty!r}")
        self._duty[actuator] = duty
        if duty:
            self._on[actuator] = duty
        else:
            self._on.pop(actuator, None)

    def has_pump(self, actuator: str) -> bool:
        """Whether the reservoir has a pump called ``actuator``."""
        return actuator in self._duty

    @property
    def pumps(self) -> dict[str, int]:
        """Current duty of every pump."""
        return dict(self._duty)

    @property
    def dosed_ml(self) -> dict[str, float]:
        """Volume each pump has delivered since the start, in ml."""
        return dict(self._dosed_ml)

    def parts_mg(self) -> dict[str, float]:
        """Dissolved mass (mg) in the tank that each nutrient part brought (after uptake)."""
        return {part: mg * self._parts_scale for part, mg in self._parts_mg.items()}

    @property
    def time_s(self) -> float:
        """Simulated seconds since the start."""
        return self._t

    # --- dynamics ------------------------------------------------------------

    def step(self, dt_s: float) -> None:
        """Advance the model by ``dt_s`` seconds in sub-steps of at most ``max_substep_s``."""
        if not dt_s >= 0.0 or math.isinf(dt_s):
            raise PlantError(f"dt_s must be a finite number >= 0, got {dt_s!r}")
        if dt_s == 0.0:
            return
        n = max(1, math.ceil(dt_s / self.params.max_substep_s - 1e-9))
        h = dt_s / n
        if h != self._lag_h:
            self._lag_h = h
            self._lag_a = -math.expm1(-h / self.params.lag_s)
        for _ in range(n):
            self._substep(h)

    def _substep(self, h: float) -> None:
        p = self.params
        self._t += h
        air, rh = self._climate(self._t)

        # Pumps: each adds its liquid's mass, base, carbonate, phosphate and heat.
        for pump, duty in self._on.items():
            litres = self._flow_l_s[pump] * duty / 255.0 * h
            mass, base, carb, phos = self._inflow[pump]
            vol = self._vol + litres
            self._temp = (self._temp * self._vol + p.refill_temp * litres) / vol
            self._vol = vol
            self._mass += mass * litres
            self._base += base * litres
            self._carb += carb * litres
            self._phos += phos * litres
            self._dosed_ml[pump] += litres * 1000.0
            if pump in self._parts_mg:
                self._parts_mg[pump] += mass * litres / self._parts_scale

        # Plant uptake: a parcel of nutrient (mass and phosphate with its cation),
        # plus the base that nitrate uptake releases.
        frac = p.uptake_per_h / 3600.0 * h
        taken_mg = self._mass * frac
        taken_phos = self._phos * frac
        self._mass -= taken_mg
        self._phos -= taken_phos
        self._parts_scale -= self._parts_scale * frac
        self._base += p.uptake_base_mol_per_g * taken_mg / 1000.0 - taken_phos

        # Evaporation and transpiration: water only, never below a puddle.
        evap = p.evaporation_l_per_h / 3600.0 * h * _vapour_deficit_kpa(air, rh) / _VPD_REF
        self._vol = max(_MIN_VOLUME_L, self._vol - evap)

        # Overflow drains mixed tank water.
        if self._vol > p.capacity_l:
            keep = p.capacity_l / self._vol
            self._vol = p.capacity_l
            self._mass *= keep
            self._base *= keep
            self._carb *= keep
            self._phos *= keep
            self._parts_scale *= keep

        # Water temperature relaxes toward the air.
        self._temp += (air - self._temp) * -math.expm1(-h / p.water_temp_lag_s)

        # Probe: delayed and lagged composition.
        t = self._t
        hist = self._history
        hist.append((t, *self._composition()))
        delayed = self._delayed(t - p.dead_time_s)
        a = self._lag_a
        probe = self._probe
        for i in range(4):
            probe[i] += (delayed[i] - probe[i]) * a

    def _composition(self) -> tuple[float, float, float, float]:
        v = self._vol
        return self._mass / v, self._base / v, self._carb / v, self._phos / v

    def _delayed(self, when: float) -> tuple[float, float, float, float]:
        """Tank composition at time ``when`` (linear between stored sub-steps)."""
        hist = self._history
        while len(hist) > 1 and hist[1][0] <= when:
            hist.popleft()
        first = hist[0]
        if len(hist) == 1 or first[0] == -math.inf:
            return first[1], first[2], first[3], first[4]
        second = hist[1]
        w = (when - first[0]) / (second[0] - first[0])
        w = min(max(w, 0.0), 1.0)
        return (
            first[1] + (second[1] - first[1]) * w,
            first[2] + (second[2] - first[2]) * w,
            first[3] + (second[3] - first[3]) * w,
            first[4] + (second[4] - first[4]) * w,
        )

    def _climate(self, t: float) -> tuple[float, float]:
        """Air temperature (°C) and relative humidity (%) at simulated time ``t``."""
        p = self.params
        hour = p.start_hour + t / 3600.0
        phase = 2.0 * math.pi * (hour - p.air_temp_peak_hour) / 24.0
        c = math.cos(phase)
        air = p.air_temp_mean + p.air_temp_amplitude * c
        rh = p.humidity_mean - p.humidity_amplitude * c
        return air, min(max(rh, 0.0), 100.0)

    def titration_ml_per_l(self, pump: str, ph_from: float, ph_to: float) -> float:
        """ml of ``pump``'s solution per litre of tank that take the tank from one pH to another.

        The charge balance of the tank's present composition, with the small
        dilution by the dose itself neglected: what a careful titration of a
        sample of this tank would find. Positive when ``pump`` moves the pH
        that way, negative when it cannot.
        """
        _pump_key(pump)
        v = self._vol
        carb, phos = self._carb / v, self._phos / v
        b_from, _ = _required_base(ph_from, carb, phos)
        b_to, _ = _required_base(ph_to, carb, phos)
        per_litre = self._inflow[pump][1]  # mol of strong base per litre of solution
        if per_litre == 0.0:
            raise PlantError(f"pump {pump!r} does not move the pH")
        return (b_to - b_from) / per_litre * 1000.0

    # --- outputs -------------------------------------------------------------

    def _tank_ph(self) -> float:
        key = (self._base, self._carb, self._phos, self._vol)
        if key != self._ph_tank_key:
            v = self._vol
            self._ph_tank = _solve_ph(self._base / v, self._carb / v, self._phos / v, self._ph_tank)
            self._ph_tank_key = key
        return self._ph_tank

    def _probe_ph(self) -> float:
        _, base, carb, phos = self._probe
        key = (base, carb, phos)
        if key != self._ph_probe_key:
            self._ph_probe = _solve_ph(base, carb, phos, self._ph_probe)
            self._ph_probe_key = key
        return self._ph_probe

    def truth(self, *, at_probe: bool = False) -> dict[str, float]:
        """Noise-free values: of the well-mixed tank, or (``at_probe``) what the probes feel."""
        air, rh = self._climate(self._t)
        if at_probe:
            tds, ph = self._probe[0], self._probe_ph()
        else:
            tds, ph = self._mass / self._vol, self._tank_ph()
        return {
            "tds": tds,
            "ph": ph,
            "water_temp": self._temp,
            "water_level": self._vol,
            "air_temp": air,
            "humidity": rh,
        }

    # --- probes out of the tank ----------------------------------------------

    def immerse(self, probe: str, value: float, temp_c: float) -> None:
        """Put a probe (with the temperature probe) into a calibration solution at ``temp_c``.

        ``probe`` is ``"ph"`` (``value``: the buffer's pH at ``temp_c``) or
        ``"ec"`` (``value``: the standard's conductivity at 25 °C, µS/cm). The
        reading moves from what the probe read to the solution's value with
        ``probe_response_s``, as a real probe settles.
        """
        if probe not in ("ph", "ec") or not (math.isfinite(value) and math.isfinite(temp_c)):
            raise PlantError(f"cannot immerse {probe!r} in {value!r} at {temp_c!r} °C")
        now = self._sensed_truth()
        start = now["ph"] if probe == "ph" else now["tds"]
        target = value if probe == "ph" else value / 2.0  # µS/cm -> ppm on the 500 scale
        self._immersed[probe] = (target, temp_c, start, self._t)

    def withdraw(self, probe: str) -> None:
        """Put a probe back into the tank."""
        self._immersed.pop(probe, None)

    def _sensed_truth(self) -> dict[str, float]:
        """What the probes feel, noise-free: the tank's probe line, or a calibration solution."""
        true = self.truth(at_probe=True)
        if not self._immersed:
            return true
        tau = max(self.params.probe_response_s, 1e-9)
        key = {"ph": "ph", "ec": "tds"}
        for probe, (target, temp_c, start, since) in self._immersed.items():
            w = math.exp(-(self._t - since) / tau)
            true[key[probe]] = target + (start - target) * w
            true["water_temp"] = temp_c
        return true

    def sensors(self) -> dict[str, float]:
        """One noisy reading of every probe, in engineering units and as raw values.

        Engineering keys: ``tds`` (ppm, compensated to 25 °C), ``ph``,
        ``water_temp``, ``water_level`` (L), ``air_temp``, ``humidity``.
        Raw keys, by inverting the thesis calibration maps: ``tds_v`` (the
        probe voltage of the *uncompensated* reading, so the gateway's
        ``EC25 = EC / (1 + 0.02 (T - 25))`` recovers ``tds``) and ``ph_adc``;
        and ``ph_v``, the pH electrode's potential in volts (its slope and
        offset at the water's temperature). The conductivity probe reads
        ``tds_probe_gain`` times the truth.
        """
        p = self.params
        z = self._rng.standard_normal(6)
        true = self._sensed_truth()
        temp = true["water_temp"]
        tds = max(0.0, true["tds"] * p.tds_probe_gain + p.noise_tds * float(z[0]))
        ph = true["ph"] + p.noise_ph * float(z[1])
        water_temp = temp + p.noise_water_temp * float(z[2])
        uncompensated = tds * (1.0 + p.tds_temp_coefficient * (temp - 25.0))
        electrode_mv = p.ph_probe_offset_mv - p.ph_probe_slope_pct / 100.0 * nernst_mv(temp) * (
            ph - 7.0
        )
        return {
            "tds": tds,
            "ph": ph,
            "water_temp": water_temp,
            "water_level": max(0.0, true["water_level"] + p.noise_water_level * float(z[3])),
            "air_temp": true["air_temp"] + p.noise_air_temp * float(z[4]),
            "humidity": min(max(true["humidity"] + p.noise_humidity * float(z[5]), 0.0), 100.0),
            "tds_v": _quantize_volts(tds_to_volts(uncompensated)),
            "ph_adc": float(ph_to_adc(ph)),
            "ph_v": electrode_mv / 1000.0,
        }
