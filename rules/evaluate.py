"""``hydrogate evaluate``: every controller, closed loop, on the simulated plant, side by side.

Each scenario starts a :class:`sim.plant.Reservoir` (pumps sized like the
thesis's rig, ``PlantParams.thesis_rig()``) at a given TDS and pH and runs one
control cycle of a single loop towards a setpoint, in simulated time, through
the *same* :class:`~rules.cycle.ControlCycle` and
:class:`~rules.safety.SafetyGuard` the daemon uses, with the daemon's default
cycle settings. The gateway polls the plant's (noisy) sensors every
``POLL_S``; every dose the guard permits runs the plant's pump at its duty for
its milliseconds. The response is recorded as the probe sees it without noise
(``truth(at_probe=True)``), and the thesis's transient metrics are computed
from it (definitions in :data:`DEFINITIONS`).

``--out DIR`` writes ``DIR/control.md`` (table, definitions, the thesis's
real-plant numbers, discussion) and one PNG per scenario in ``DIR/img/``;
``--quick`` runs one scenario of each kind (TDS up, TDS down, pH up, both pH
down) with the fuzzy and adaptive controllers only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import rules.adaptive  # noqa: F401  (registers "adaptive")
from rules.controller import Controller, ControllerError, Learner, PlantConstants, create
from rules.cycle import ControlCycle, CycleSettings, Loop, Triggers
from rules.safety import SafetyGuard, SafetyLimits, SafetyRefusal, SensorWatch
from sim.plant import PUMPS, PlantParams, Reservoir

__all__ = [
    "CONTROLLERS",
    "DEFINITIONS",
    "QUICK_SCENARIOS",
    "SCENARIOS",
    "Metrics",
    "Result",
    "Scenario",
    "add_arguments",
    "target_misses",
    "metrics",
    "run",
    "run_scenario",
    "simulate",
    "volume_until",
]

#: Controllers compared, in table order. ``NAME+learned`` is controller NAME that starts
#: each scenario knowing what it learned in one earlier pass over the other scenarios
#: (:func:`learn`): a tank it has worked on, where plain NAME is its first hour.
CONTROLLERS: tuple[str, ...] = (
    "closeloop",
    "fuzzy",
    "mamdani",
    "rb",
    "adaptive",
    "adaptive+learned",
)
QUICK_CONTROLLERS: tuple[str, ...] = ("fuzzy", "adaptive", "adaptive+learned")
LEARNED = "+learned"
LEARN_SEED = 2  # the earlier pass sees other sensor noise than the measured runs (seed 1)

POLL_S = 2.0  # the gateway's poll interval in the simulation
STEP_S = 0.5  # plant integration step between events
SETTLE_BAND = 0.05  # settling band: ±5 % of the step
TAIL_S = 60.0  # steady-state error: mean over the last minute
_EPOCH = datetime.datetime(2026, 1, 1, 9, 0, tzinfo=datetime.UTC)  # simulated wall clock


@dataclass(frozen=True)
class Scenario:
    """One step test: start state, the loop, its setpoint."""

    name: str
    title: str
    loop: Loop
    start_tds: float
    start_ph: float
    setpoint: float

    @property
    def start(self) -> float:
        """The controlled variable's start value."""
        return self.start_tds if self.loop == "tds" else self.start_ph


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("tds_up_700", "TDS 300 → 700 ppm", "tds", 300.0, 6.0, 700.0),
    Scenario("tds_up_1000", "TDS 300 → 1000 ppm", "tds", 300.0, 6.0, 1000.0),
    Scenario("tds_up_1300", "TDS 300 → 1300 ppm", "tds", 300.0, 6.0, 1300.0),
    Scenario("tds_down_800", "TDS 1300 → 800 ppm", "tds", 1300.0, 6.0, 800.0),
    Scenario("ph_up_5.5", "pH 4.8 → 5.5", "ph", 800.0, 4.8, 5.5),
    Scenario("ph_up_6.0", "pH 4.8 → 6.0", "ph", 800.0, 4.8, 6.0),
    Scenario("ph_up_6.5", "pH 4.8 → 6.5", "ph", 800.0, 4.8, 6.5),
    Scenario("ph_down_6.0_5.0", "pH 6.0 → 5.0", "ph", 800.0, 6.0, 5.0),
    Scenario("ph_down_5.5_5.0", "pH 5.5 → 5.0", "ph", 800.0, 5.5, 5.0),
)
QUICK_SCENARIOS: tuple[str, ...] = (
    "tds_up_1000",
    "tds_down_800",
    "ph_up_6.5",
    "ph_down_6.0_5.0",
    "ph_down_5.5_5.0",
)

DEFINITIONS = """\
All metrics are computed on the probe's noise-free value y(t) (what the probe
feels after the plant's transport delay and mixing lag), sampled at every
poll, for a step from y0 (the start value) to the setpoint r, Δ = r − y0,
progress p(t) = (y(t) − y0) / Δ, t = 0 when the cycle starts:

- **delay** — first t with p(t) ≥ 0.5 (time to half the step);
- **rise** — from the first t with p ≥ 0.1 to the first t with p ≥ 0.9;
- **settling** — the time of the last entry into |y − r| ≤ 5 % of |Δ|, provided
  y stays inside until the end of the run; "never" otherwise;
- **overshoot** — max over the run of (y − r)·sign(Δ) / |Δ|, in % of the step
  (0 when y never passes r);
- **steady-state error** — |mean of y over the last 60 s − r|, in % of r for
  TDS and in pH units for pH;
- **volume** — ml delivered by each pump over the run (n = nutrient,
  w = refill water, up / down = pH up / pH down);
- **to band** — ml delivered, all pumps together, until y first enters
  |y − r| ≤ 5 % of |Δ| (doses still running then count up to that moment);
  "never" when it never does. Unlike the total, it does not depend on where
  in the band a controller stops, or on whether it got there at all;
- **ml per step** — the total volume divided by the fraction of the step
  achieved, (mean of y over the last 60 s − y0) / Δ: what the whole step
  would have cost at the controller's rate, so a controller that stops short
  is not counted as thriftier.

A run lasts one control cycle: until the cycle ends (value held in its band
for the hold time), or the cycle's 3600 s limit; after a cycle that ends early
the plant is observed, undosed, until 3600 s, so a late drift still counts.
"""


@dataclass(frozen=True)
class Metrics:
    """The thesis's transient metrics of one response (``None``: never reached)."""

    delay_s: float | None
    rise_s: float | None
    settling_s: float | None
    overshoot_pct: float
    steady_state_error: float
    volume_ml: dict[str, float]
    band_entry_s: float | None = None
    band_ml: float | None = None
    achieved: float = math.nan  # fraction of the step achieved at the end

    @property
    def ml_per_step(self) -> float | None:
        """Total volume per whole step at the rate achieved (``None``: no progress)."""
        if not self.achieved > 0.05:
            return None
        return self.total_ml / self.achieved

    @property
    def settled(self) -> bool:
        """Whether the response settled within the run."""
        return self.settling_s is not None

    @property
    def total_ml(self) -> float:
        """Every pump's volume together."""
        return sum(self.volume_ml.values())


@dataclass
class Result:
    """One controller on one scenario: the trace and its metrics."""

    scenario: Scenario
    controller: str
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    doses: list[tuple[float, str, int, int]] = field(default_factory=list)
    refusals: list[tuple[float, str, str]] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    metrics: Metrics | None = None


def _first(times: Sequence[float], cond: Sequence[bool]) -> float | None:
    return next((t for t, c in zip(times, cond, strict=True) if c), None)


def metrics(
    times: Sequence[float],
    values: Sequence[float],
    *,
    start: float,
    setpoint: float,
    loop: Loop,
    volume_ml: dict[str, float],
) -> Metrics:
    """The metrics of :data:`DEFINITIONS` for one recorded response."""
    step = setpoint - start
    sign = 1.0 if step >= 0 else -1.0
    progress = [(v - start) / step for v in values] if step else [1.0] * len(values)
    delay = _first(times, [p >= 0.5 for p in progress])
    t10 = _first(times, [p >= 0.1 for p in progress])
    t90 = _first(times, [p >= 0.9 for p in progress])
    rise = t90 - t10 if t10 is not None and t90 is not None else None
    band = SETTLE_BAND * abs(step)
    entry = _first(times, [abs(v - setpoint) <= band for v in values])
    settling: float | None = None
    if values and abs(values[-1] - setpoint) <= band:
        settling = times[0]
        for i in range(len(values) - 1, -1, -1):
            if abs(values[i] - setpoint) > band:
                settling = times[i + 1]
                break
    overshoot = max(0.0, max(((v - setpoint) * sign for v in values), default=0.0))
    overshoot_pct = 100.0 * overshoot / abs(step) if step else 0.0
    t_end = times[-1] if times else 0.0
    tail = [v for t, v in zip(times, values, strict=True) if t >= t_end - TAIL_S]
    mean_tail = math.fsum(tail) / len(tail) if tail else math.nan
    err = abs(mean_tail - setpoint)
    sse = 100.0 * err / setpoint if loop == "tds" else err
    achieved = (mean_tail - start) / step if step else 1.0
    return Metrics(
        delay, rise, settling, overshoot_pct, sse, dict(volume_ml), entry, achieved=achieved
    )


def volume_until(
    doses: Sequence[tuple[float, str, int, int]], flows: Mapping[str, float], t: float
) -> float:
    """ml that ``doses`` (start s, actuator, duty, ms) delivered by time ``t``, all pumps."""
    total = 0.0
    for start, actuator, duty, ms in doses:
        run_s = min(ms / 1000.0, max(0.0, t - start))
        total += flows[actuator] * duty / 255.0 * run_s
    return total


def plant_params() -> PlantParams:
    """The simulated plant of every scenario."""
    return PlantParams.thesis_rig()


def plant_constants(params: PlantParams) -> PlantConstants:
    """What the controllers are told about the plant: the truth of the simulation."""
    return PlantConstants(
        tank_volume_l=params.volume_l,
        stock_ppm=params.stock_ppm,
        flow_ml_s={p: params.flow_ml_s(p) for p in PUMPS},
    )


def cycle_settings(scenario: Scenario, *, mixing_wait_s: float = 60.0) -> CycleSettings:
    """The daemon's default cycle settings, for the scenario's loop only."""
    return CycleSettings(
        tds_setpoint=scenario.setpoint if scenario.loop == "tds" else scenario.start_tds,
        ph_setpoint=scenario.setpoint if scenario.loop == "ph" else scenario.start_ph,
        mixing_wait_s=mixing_wait_s,
        loops=(scenario.loop,),
    )


async def simulate(
    scenario: Scenario,
    controller: Controller,
    *,
    duration_s: float = 3600.0,
    mixing_wait_s: float = 60.0,
    interval_s: float = 30.0,
    seed: int = 1,
) -> Result:
    """Run ``controller`` in auto mode on ``scenario`` for ``duration_s`` of simulated time."""
    params = plant_params()
    plant = Reservoir.from_state(
        tds=scenario.start_tds, ph=scenario.start_ph, params=params, seed=seed
    )
    watch = SensorWatch()
    guard = SafetyGuard(SafetyLimits(), actuators=PUMPS, watch=watch)
    settings = cycle_settings(scenario, mixing_wait_s=mixing_wait_s)
    cycle = ControlCycle(settings, controller, plant_constants(params), actuators=PUMPS)
    triggers = Triggers((), interval_s)
    result = Result(scenario, controller.name)
    off_at: dict[str, float] = {}
    t = 0.0
    next_poll = 0.0
    while t < duration_s:
        if t >= next_poll - 1e-9:
            next_poll += POLL_S
            reading = plant.sensors()
            watch.update(t, reading)
            result.times.append(t)
            result.values.append(plant.truth(at_probe=True)[scenario.loop])
            if cycle.state == "idle" and triggers.due(_EPOCH + datetime.timedelta(seconds=t)):
                if cycle.outcome is not None:
                    result.outcomes.append(cycle.outcome)
                cycle.start(t)
            for dose in await cycle.tick(t, reading):
                try:
                    permit = guard.permit(dose, t, strict=False)
                except SafetyRefusal as exc:
                    result.refusals.append((t, dose.actuator, exc.reason))
                    continue
                guard.record(permit.dose, t)
                plant.set_pump(permit.dose.actuator, permit.dose.duty)
                off_at[permit.dose.actuator] = t + permit.dose.ms / 1000.0
                result.doses.append((t, permit.dose.actuator, permit.dose.duty, permit.dose.ms))
        # Advance to the next event: a poll, a pump's end, or one integration step.
        target = min([next_poll, t + STEP_S, duration_s, *off_at.values()])
        plant.step(target - t)
        t = target
        for actuator, when in list(off_at.items()):
            if when <= t + 1e-9:
                plant.set_pump(actuator, 0)
                del off_at[actuator]
    result.outcomes.append("running" if cycle.state != "idle" else cycle.outcome or "idle")
    m = metrics(
        result.times,
        result.values,
        start=scenario.start,
        setpoint=scenario.setpoint,
        loop=scenario.loop,
        volume_ml=plant.dosed_ml,
    )
    if m.band_entry_s is not None:
        flows = {p: params.flow_ml_s(p) for p in PUMPS}
        m = replace(m, band_ml=volume_until(result.doses, flows, m.band_entry_s))
    result.metrics = m
    return result


async def learn(
    controller_name: str, *, leave_out: Scenario | None = None, mixing_wait_s: float = 60.0
) -> dict[str, Any]:
    """What ``controller_name`` knows of the plant after one pass over the scenarios.

    One controller runs every scenario of :data:`SCENARIOS` but ``leave_out``
    (the one it will be measured on: it never learns from the run it is
    judged by) in order, each on a fresh plant with sensor-noise seed
    :data:`LEARN_SEED`, carrying what it learns from one to the next, as a
    gateway does from cycle to cycle; the snapshot is what the daemon would
    have saved by then.
    """
    controller = create(controller_name)
    try:
        if not isinstance(controller, Learner):
            raise ControllerError(f"controller {controller_name!r} learns nothing to carry over")
        for scenario in SCENARIOS:
            if scenario != leave_out:
                await simulate(scenario, controller, mixing_wait_s=mixing_wait_s, seed=LEARN_SEED)
        return controller.learned()
    finally:
        controller.close()


async def run_scenario(
    scenario: Scenario, controller_name: str, *, mixing_wait_s: float = 60.0
) -> Result:
    """A fresh controller on one scenario; ``NAME+learned`` first learns the other scenarios."""
    base = controller_name.removesuffix(LEARNED)
    learned = None
    if base != controller_name:
        learned = await learn(base, leave_out=scenario, mixing_wait_s=mixing_wait_s)
    controller = create(base)
    try:
        if learned is not None:
            assert isinstance(controller, Learner)  # learn() refuses any other
            controller.restore(learned)
        result = await simulate(scenario, controller, mixing_wait_s=mixing_wait_s)
        result.controller = controller_name
        return result
    finally:
        controller.close()


# --- report ------------------------------------------------------------------------------------


def _fmt_s(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f}"


def _fmt_volume(volume: Mapping[str, float]) -> str:
    short = {"nutrient": "n", "refill": "w", "ph_up": "up", "ph_down": "down"}
    parts = [f"{short.get(k, k)} {v:.0f}" for k, v in volume.items() if v >= 0.5]
    return ", ".join(parts) if parts else "0"


def _fmt_ml(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f}"


def _fmt_cycles(outcomes: Sequence[str]) -> str:
    done = outcomes.count("done")
    return f"{done}/{len(outcomes)} done" + (
        " (last running)" if outcomes[-1:] == ["running"] else ""
    )


def table(results: Sequence[Result]) -> str:
    """The markdown table of every result, grouped by scenario."""
    lines = [
        "| scenario | controller | delay s | rise s | settling s | overshoot % "
        "| steady-state error | volume ml | to band ml | ml per step | doses | cycles |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r.metrics
        assert m is not None
        sse = (
            f"{m.steady_state_error:.1f} %"
            if r.scenario.loop == "tds"
            else f"{m.steady_state_error:.3f} pH"
        )
        lines.append(
            f"| {r.scenario.title} | {r.controller} | {_fmt_s(m.delay_s)} | {_fmt_s(m.rise_s)} "
            f"| {_fmt_s(m.settling_s)} | {m.overshoot_pct:.1f} | {sse} "
            f"| {_fmt_volume(m.volume_ml)} | {_fmt_ml(m.band_ml)} | {_fmt_ml(m.ml_per_step)} "
            f"| {len(r.doses)} "
            f"| {_fmt_cycles(r.outcomes)} |"
        )
    return "\n".join(lines)


def plot(results: Sequence[Result], scenario: Scenario, path: Path) -> None:
    """One PNG: every controller's response to ``scenario``."""
    import matplotlib  # noqa: PLC0415 (only the report needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    try:
        band = SETTLE_BAND * abs(scenario.setpoint - scenario.start)
        ax.axhspan(
            scenario.setpoint - band, scenario.setpoint + band, color="0.9", label="±5 % of step"
        )
        ax.axhline(scenario.setpoint, color="0.4", lw=0.8, ls="--", label="setpoint")
        for r in results:
            if r.scenario == scenario:
                ax.plot(r.times, r.values, lw=1.3, label=r.controller)
        ax.set_xlabel("time since the first cycle started (s)")
        ax.set_ylabel("TDS (ppm)" if scenario.loop == "tds" else "pH")
        ax.set_title(f"{scenario.title}: auto mode on the simulated plant")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def minimum_ml(scenario: Scenario, params: PlantParams) -> float | None:
    """The least volume that can make a TDS step (mass balance), ``None`` for pH."""
    if scenario.loop != "tds":
        return None
    v, c0, c1 = params.volume_l, scenario.start_tds, scenario.setpoint
    if c1 >= c0:
        return 1000.0 * v * (c1 - c0) / (params.stock_ppm - c1)
    return 1000.0 * v * (c0 / c1 - 1.0)


def compare(results: Sequence[Result], ours: str = "adaptive", ref: str = "fuzzy") -> list[str]:
    """Per scenario, one line: ``ours`` against ``ref`` (settling, overshoot, volume)."""
    lines = []
    by_key = {(r.scenario.name, r.controller): r for r in results}
    params = plant_params()
    for scenario in dict.fromkeys(r.scenario for r in results):
        a, b = by_key.get((scenario.name, ours)), by_key.get((scenario.name, ref))
        if a is None or b is None or a.metrics is None or b.metrics is None:
            continue
        least = minimum_ml(scenario, params)
        floor = f" (mass-balance minimum {least:.0f} ml)" if least is not None else ""
        ma, mb = a.metrics, b.metrics
        lines.append(
            f"- {scenario.title}: {ours} settles in {_fmt_s(ma.settling_s)} s, "
            f"overshoot {ma.overshoot_pct:.1f} %, {ma.total_ml:.0f} ml "
            f"({_fmt_ml(ma.band_ml)} to the band); "
            f"{ref} {_fmt_s(mb.settling_s)} s, {mb.overshoot_pct:.1f} %, "
            f"{mb.total_ml:.0f} ml ({_fmt_ml(mb.band_ml)} to the band){floor}."
        )
    return lines


#: Issue 3's targets for our best controller.
MAX_OVERSHOOT_PCT = 3.0
MAX_SSE = {"tds": 2.0, "ph": 0.05}  # % of the setpoint / pH units
VOLUME_TOLERANCE = 0.01


def target_misses(scenario: Scenario, mine: Metrics, ref: Metrics | None) -> list[str]:
    """The targets ``mine`` misses on ``scenario``, against the reference ``ref`` (fuzzy).

    Settles; overshoot ≤ 3 % of the step; steady-state error ≤ 2 % (TDS) or
    ≤ 0.05 pH; settles sooner than the reference (when that settles at all);
    uses no more volume per step achieved than the reference, within
    ``VOLUME_TOLERANCE`` (when the reference reaches the band at all: a
    dilution's cost per ppm grows towards the setpoint, so stopping far short
    is cheaper per ppm); for TDS, no more than ``VOLUME_TOLERANCE`` over the
    mass-balance minimum of the whole step. The tolerance exists because
    adding stock costs the same per ppm for every controller that does not
    overshoot (the mass balance), so on TDS up both sit on the same floor and
    only the noise of the end value separates them.
    """
    misses = []
    if not mine.settled:
        misses.append("does not settle")
    if mine.overshoot_pct > MAX_OVERSHOOT_PCT:
        misses.append(f"overshoot {mine.overshoot_pct:.1f} % > {MAX_OVERSHOOT_PCT:g} %")
    if mine.steady_state_error > MAX_SSE[scenario.loop]:
        misses.append("steady-state error above the target")
    if ref is None:
        return misses
    if ref.settling_s is not None and (
        mine.settling_s is None or mine.settling_s >= ref.settling_s
    ):
        misses.append(
            f"settles later than fuzzy ({_fmt_s(mine.settling_s)} vs {ref.settling_s:.0f} s)"
        )
    mine_rate, ref_rate = mine.ml_per_step, ref.ml_per_step
    limit = (1.0 + VOLUME_TOLERANCE) * ref_rate if ref_rate is not None else None
    if ref.band_ml is not None and limit is not None and (mine_rate is None or mine_rate > limit):
        misses.append(
            f"more volume per step than fuzzy ({_fmt_ml(mine_rate)} vs {ref_rate:.0f} ml)"
        )
    least = minimum_ml(scenario, plant_params())
    if least is not None and mine.total_ml > (1.0 + VOLUME_TOLERANCE) * least:
        misses.append(f"total {mine.total_ml:.0f} ml over the minimum {least:.0f} ml")
    return misses


def _targets(results: Sequence[Result], ours: str = "adaptive", ref: str = "fuzzy") -> list[str]:
    """Which of issue 3's targets ``ours`` meets, scenario by scenario, and the fine print."""
    lines = []
    by_key = {(r.scenario.name, r.controller): r for r in results}
    for scenario in dict.fromkeys(r.scenario for r in results):
        a, b = by_key.get((scenario.name, ours)), by_key.get((scenario.name, ref))
        if a is None or a.metrics is None:
            continue
        m = a.metrics
        f = b.metrics if b is not None else None
        misses = target_misses(scenario, m, f)
        notes = []
        if f is not None and f.band_ml is None:
            notes.append(f"{ref} never reaches the band, so its volume is not comparable")
        if f is not None and scenario.loop == "tds" and m.total_ml > f.total_ml:
            notes.append(
                f"total {m.total_ml:.0f} ml vs {ref}'s {f.total_ml:.0f} ml because {ref} ends "
                f"{f.steady_state_error:.1f} % from the setpoint, {ours} "
                f"{m.steady_state_error:.1f} %"
            )
        text = "all targets met" if not misses else "NOT MET: " + "; ".join(misses)
        if notes:
            text += " (" + "; ".join(notes) + ")"
        lines.append(f"- {scenario.title}: {text}")
    return lines


THESIS_TABLE = """| test | delay s | rise s | settling s | overshoot | steady-state error |
|---|---|---|---|---|---|
| TDS close loop 700/1000/1300 | 77.5/64.0/98.1 | 126.1/85.3/120.7 | never | 28.7/44.8/23.5% | — |
| TDS fuzzy 700/1000/1300 | 60.3/72.5/120 | 101.5/87.1/128.3 | 170/190/200 | none | ≈7%/≈8%/— |
| pH up close loop → 5.5 | 240 | 260 | never | 30.6% | — |
| pH up fuzzy → 5.5/6.0/6.5 | 180/315/440 | 510/540/652.6 | 660/690/840 | none | < 5% |
| pH down fuzzy 5.5→5.0 and 6.0→5.0 | 440 / 570 | — | never reached | — | failed |
"""

DISCUSSION = """**The plant.** `sim/plant.py` with `PlantParams.thesis_rig()`: a 10 L tank,
a 10,000 ppm stock pumped at 12 ml/s, fresh water at 30 ml/s, pH up/down
(0.15 mol/L) at 1.58 ml/s, a 25 s transport delay and a 50 s mixing lag
between tank and probes, a charge-balance pH with carbonate and phosphate
buffers (steep below pH 5.5, flat around 6-7), sensor noise, plant uptake
and evaporation. The thesis's own rig is not reproducible here, so the
absolute times differ from its table; the comparison between controllers
on one plant is what this evaluation is for.

**How the controllers run.** Every controller runs in auto mode through the
daemon's `ControlCycle` (averaging 10 s TDS / 30 s pH, a 60 s mixing wait
after each dose, holds of 180 s / 300 s, band ±5 % TDS / ±0.15 pH, a new
cycle every 30 s when idle) and `SafetyGuard` (default limits), polling the
plant every 2 s. The thesis's firmware had no mixing wait (`--mixing-wait 0`
reproduces that); with it, the baselines overshoot less than on the real
plant and are slower.

**Why "adaptive" is faster.** The fixed-size steps of close loop and fuzzy
(at most 2 s of nutrient = 24 ml = 24 ppm, or 5 s of pH solution) take tens
of mixing waits for a large TDS step, and a fixed pH step is either far too
small (buffer region) or far too big (below pH 5.5, where the fuzzy and
close-loop controllers oscillate between pH up and pH down). The adaptive
controller computes the TDS dose from the mass balance (one run, then one
short trim; a dilution longer than one run is dosed in back-to-back pieces),
and learns the tank's titration curve from each dose's effect, so it needs a
handful of doses in every scenario, including pH down — the thesis's failed
case.

**Why pH 6.0 → 5.0 no longer overshoots.** The first pH-down dose lands in
the buffer region around pH 6, where a ml moves the pH by ~0.025; below 5.5
the titration curve is four to five times steeper. The old controller
extrapolated the flat gain it had seen and overshot to pH 4.35 (65.7 %). The
gain model is now pessimistic where it has not been: the prior (1.5 pH per
ml per litre) is a ceiling, and past the farthest observed point the gain is
assumed to steepen by a factor e² per pH (one observation) or e^0.5 per pH
beyond a two-point log-linear fit, so doses fall short on an unknown curve
and the next dose learns the bend.

**Volume.** For TDS the volume needed is fixed by the mass balance (the
minimum is given above): every controller that does not overshoot pays the
same ml per ppm of stock, so a lower total only says that a controller
stopped further below the setpoint (fuzzy ends 0.6-1.9 % short), and "to
band" rewards creeping into the band with nothing in flight. "ml per step"
is the fair number: there adaptive and fuzzy tie on TDS up (both on the
floor), and on pH adaptive needs less (no swings between the pumps).
Diluting costs far more than dosing stock (a 1 % TDS excess in 10 L takes
100 ml of water but 1 ml of stock), so adaptive aims 0.5 % on the near side
of the setpoint (below it when adding stock, above it when diluting) and
doses nothing within 1 % below or 1.5 % above. Fuzzy's lower totals for
300 → 1300 and 1300 → 800 ppm come from never getting there.

**Adaptive on a tank it knows: `adaptive+learned`.** A gateway runs the same
tank for months, and what the adaptive controller learns in one cycle it
keeps for the next (and, through the gateway's store, across restarts). Its
pH model is a titration curve per pump, fitted to every span its doses
travelled; where the way to the setpoint lies on that curve, it doses 97 % of
what the curve says, in one run. `adaptive+learned` is the same controller
starting each scenario with what it learned in one earlier pass over the
*other* eight scenarios on the same plant (never from the run it is judged
by, and with other sensor noise: seed 2 where the measured runs use seed 1).
It meets every target on every scenario, pH up from 4.8 included: the way
from 4.8 to 5.5 and 6.0 is part of the other pH-up runs, so it is set in one
dose; 6.0 → 6.5, which no other run travelled, still takes the cautious
gain model's few doses.

**The first hour on a new tank (`adaptive`).** With nothing learned, pH up
from 4.8 to 5.5 and to 6.0 settles later than fuzzy (about 830 s and 790 s
against 212 s and 698 s). Fuzzy's first 5 s dose (7.9 ml) happens to be
about what this tank needs for 5.5 (8.8 ml), fixed in its rule table by
tuning on the thesis's rig; on the same fixed dose it overshoots pH 5.5 →
5.0 by 60 % and never settles. A controller that must not overdose an
unknown tank cannot match that: the gain ceiling caps its first dose from
pH 4.8 at 4.7 ml, a dose's effect is known only after the mixing wait and a
few averaging windows (~150 s per dose here), and the next doses assume the
curve may steepen ahead (as it does going down from 6.0) until two secants
far enough apart show that it flattens (as it does going up from 4.8).
Making that assumption milder makes these two faster and lets pH 6.0 → 5.0
overshoot by 5-65 % on some sensor-noise seeds, so it stays.

**Robustness.** The numbers above are for one sensor-noise seed. For
`adaptive+learned`, learning-pass seeds 2-9 crossed with measured-run seeds
1, 11 and 12 (24 combinations of nine scenarios each): every target is met
in 23; in one, pH 5.5 → 5.0 overshoots by 3.03 % (the limit is 3 %). The
learned pH 4.8 → 5.5 wins by a thin margin (194 s against fuzzy's 212 s on
the seed above; 186-206 s over the seeds). The
pump correction factors of TDS learn only from errors above 5 %: smaller
ones are mostly a reading taken before the last of the mixing, and carried
over to the next cycle's first dose they made it overshoot.
"""


def document(results: Sequence[Result], *, command: str, images: Sequence[str]) -> str:
    """The text of docs/control.md."""
    settled: dict[str, tuple[int, int]] = {}
    for r in results:
        done, total = settled.get(r.controller, (0, 0))
        settled[r.controller] = (done + (1 if r.metrics and r.metrics.settled else 0), total + 1)
    counts = ", ".join(f"{name} {d}/{t}" for name, (d, t) in settled.items())
    plots = "\n".join(f"![{name}](img/{name})" for name in images)
    return f"""\
# Edge control: controllers compared in closed loop

Generated by `{command}` (rules/evaluate.py); rerun it after changing a
controller, the cycle or the plant model.

## Results on the simulated plant

{table(results)}

Settled within the run: {counts}.

### Adaptive against the thesis's fuzzy controller

{chr(10).join(compare(results))}
{chr(10).join(compare(results, ours="adaptive+learned"))}

Issue 3's targets (settles; overshoot ≤ 3 % of the step; steady-state error
≤ 2 % TDS / ≤ 0.05 pH; settles sooner than fuzzy where fuzzy settles; no more
volume per step achieved than fuzzy, within 1 %, where fuzzy reaches the band,
and for TDS within 1 % of the mass-balance minimum), for adaptive on a tank
it has never seen:

{chr(10).join(_targets(results))}

and for adaptive on a tank it knows (`adaptive+learned`, see the discussion):

{chr(10).join(_targets(results, ours="adaptive+learned"))}

## Definitions

{DEFINITIONS}
## The thesis's numbers on its real plant (for reference)

{THESIS_TABLE}
## Discussion

{DISCUSSION}
## The control cycle and the safety layer

- `rules/cycle.py` — TDS first, then pH (nutrient moves pH); trailing
  averaging windows; after each dose the run time plus `mixing_wait_s` must
  pass before readings count again; a loop ends after its value has held in
  its band for the hold time; a cycle is aborted after `max_cycle_s`.
  Triggers: `schedule` times of day (local time, once per day each, not caught
  up when more than an hour late), `interval` in auto mode, RPC `force_on`.
- `rules/safety.py` — below every controller and RPC: announced actuators
  only, duty 0..255, ms ≥ 1; one run ≤ `max_actuation_ms` (a re-`actuate` of
  a running pump continues its run); ≤ `max_ms_per_hour` per actuator in any
  rolling hour (history restored from the store); never pH up and pH down
  together; no dosing on a missing, stale, implausible or stuck controlling
  sensor (`ph` for the pH pumps, `tds` for nutrient and refill); no nutrient
  or pH dosing while the water level is known and below `min_water_level_l`.
  Controller doses are shortened (and say so), RPC doses beyond a limit are
  refused. A property test drives random sequences of doses, sensor values,
  time steps and stops through it and checks the limits on what really ran.

## Plots

{plots}
"""


# --- command -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hydrogate evaluate``."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="write DIR/control.md and DIR/img/*.png (e.g. docs)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"only {', '.join(QUICK_SCENARIOS)} with "
        f"{', '.join(QUICK_CONTROLLERS)} (a few seconds)",
    )
    parser.add_argument(
        "--controllers",
        default=None,
        help="comma-separated controller names (default: all compared)",
    )
    parser.add_argument(
        "--mixing-wait",
        type=float,
        default=60.0,
        metavar="S",
        help="the cycle's mixing wait after a dose (default 60 s, the "
        "daemon's; the thesis's firmware had none: 0)",
    )


def select(args: argparse.Namespace) -> tuple[list[Scenario], list[str]]:
    """The scenarios and controllers that ``args`` ask for."""
    scenarios = [s for s in SCENARIOS if not args.quick or s.name in QUICK_SCENARIOS]
    names = QUICK_CONTROLLERS if args.quick else CONTROLLERS
    if args.controllers:
        names = tuple(n.strip() for n in args.controllers.split(",") if n.strip())
    return scenarios, list(names)


async def evaluate(
    scenarios: Sequence[Scenario],
    controllers: Sequence[str],
    *,
    mixing_wait_s: float = 60.0,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Every controller on every scenario (scenario-major order)."""
    results = []
    for scenario in scenarios:
        for name in controllers:
            result = await run_scenario(scenario, name, mixing_wait_s=mixing_wait_s)
            results.append(result)
            if progress is not None:
                progress(result)
    return results


def run(args: argparse.Namespace) -> int:
    """``hydrogate evaluate``: print the table; with ``--out`` write the report and plots."""
    scenarios, names = select(args)
    started = time.monotonic()

    def progress(r: Result) -> None:
        m = r.metrics
        assert m is not None
        print(
            f"  {r.scenario.name:<18} {r.controller:<10} settling {_fmt_s(m.settling_s):>6} s "
            f"overshoot {m.overshoot_pct:5.1f} %",
            file=sys.stderr,
        )

    try:
        results = asyncio.run(
            evaluate(scenarios, names, mixing_wait_s=args.mixing_wait, progress=progress)
        )
    except ControllerError as exc:
        print(f"hydrogate evaluate: {exc}", file=sys.stderr)
        return 2
    print(table(results))
    print(f"\n{len(results)} runs in {time.monotonic() - started:.1f} s", file=sys.stderr)
    if args.out is not None:
        img_dir = args.out / "img"
        img_dir.mkdir(parents=True, exist_ok=True)
        images = []
        for scenario in scenarios:
            name = f"control_{scenario.name}.png"
            plot(results, scenario, img_dir / name)
            images.append(name)
        command = "hydrogate evaluate --out docs" + (" --quick" if args.quick else "")
        if args.mixing_wait != 60.0:
            command += f" --mixing-wait {args.mixing_wait:g}"
        (args.out / "control.md").write_text(
            document(results, command=command, images=images), encoding="utf-8"
        )
        print(f"wrote {args.out / 'control.md'} and {len(images)} plots", file=sys.stderr)
    return 0
