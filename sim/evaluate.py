"""The evaluation behind ``hydrogate evaluate``: every controller, closed loop, on many tanks.

Every run starts a :class:`sim.plant.Reservoir` in some state and lets the
daemon's own control stack run it in simulated time: the same
:class:`~rules.cycle.ControlCycle` (TDS first, then pH, with its deadband,
direction check and pH safety envelope), the same
:class:`~rules.safety.SafetyGuard`, interval triggers every 30 s as in auto
mode, polling the plant's noisy sensors every ``POLL_S``. Every dose the
guard permits runs the plant's pump at its duty for its milliseconds. The
response is recorded as the probe sees it without noise
(``truth(at_probe=True)``) and judged by the metrics of :data:`DEFINITIONS`.

Three evaluations:

- the thesis comparison (:data:`SCENARIOS`): the thesis's steps on its rig,
  every controller side by side, as full cycles;
- the sweep (``--sweep N``): each controller on N tanks drawn from issue 11's
  ranges (:mod:`sim.tanks`), scored against the targets (:func:`misses`),
  with a pass matrix and the worst case per controller;
- the week (``--week DAYS``): tanks held at their setpoints for days of plant
  uptake, evaporation and the pH drift they cause, scored by the time in band
  and the volume used;
- the grower's tank (``--grower DAYS``, sim/grower.py): a two-part nutrient in
  EC on a 700-scale meter, its pumps and probes off, as installed and once
  calibrated by the gateway's commands.

The command (sim/evaluate_cli.py) prints the tables; with ``--out DIR`` it
writes ``DIR/control.md`` (worded by sim/report.py) and plots in ``DIR/img/``.
"""

from __future__ import annotations

import asyncio
import datetime
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rules.controller import (
    NUTRIENT,
    NUTRIENT_PARTS,
    PH_PUMPS,
    REFILL,
    Controller,
    ControllerError,
    Learner,
    create,
)
from rules.cycle import Loop, Triggers
from rules.envelope import PhEnvelope
from sim.plant import Reservoir
from sim.rig import Rig
from sim.tanks import Tank, thesis_tank

__all__ = [
    "CONTROLLERS",
    "DEFINITIONS",
    "QUICK_SCENARIOS",
    "SCENARIOS",
    "SWEEP_CONTROLLERS",
    "Metrics",
    "Result",
    "Scenario",
    "Summary",
    "excursion",
    "metrics",
    "misses",
    "run_scenario",
    "simulate",
    "summarize",
    "sweep",
    "volume_until",
    "week",
    "weeks",
]

#: Controllers of the thesis comparison, in table order. ``NAME+learned`` is NAME starting
#: each scenario with what it (and the pH envelope) learned in one earlier pass over the
#: other scenarios (:func:`learn`): a tank it has worked on, where plain NAME is its first hour.
CONTROLLERS: tuple[str, ...] = (
    "closeloop",
    "fuzzy",
    "mamdani",
    "rb",
    "ml",
    "adaptive",
    "adaptive+learned",
)
#: Controllers of the sweep and the week.
SWEEP_CONTROLLERS: tuple[str, ...] = ("fuzzy", "rb", "ml", "adaptive")
QUICK_CONTROLLERS: tuple[str, ...] = ("fuzzy", "rb", "adaptive")
LEARNED = "+learned"
LEARN_SEED = 2  # the earlier pass sees other sensor noise than the measured runs (seed 1)

POLL_S = 2.0  # the gateway's poll interval in the simulation
WEEK_POLL_S = 5.0  # the daemon's default poll interval, for the long runs
INTERVAL_S = 30.0  # auto mode: a cycle every 30 s when idle
SETTLE_BAND = 0.05  # settling band: ±5 % of the step
TAIL_S = 60.0  # steady-state error: mean over the last minute
OBSERVE_S = 3600.0  # a run lasts the cycle limit and this much more
_EPOCH = datetime.datetime(2026, 1, 1, 9, 0, tzinfo=datetime.UTC)  # simulated wall clock

#: Issue 11's targets for our controller (and, for safety, for every controller).
MAX_OVERSHOOT_PCT = 5.0
MAX_SSE: Mapping[str, float] = {"tds": 2.0, "ph": 0.05}  # % of the setpoint / pH units
MAX_EXCURSION_PH = 0.3  # beyond the band, after the first pH dose
MIN_WEEK_IN_BAND = 0.99


@dataclass(frozen=True)
class Scenario:
    """One step test of the thesis comparison: start state, the loop stepped, its setpoint."""

    name: str
    title: str
    loop: Loop
    start_tds: float
    start_ph: float
    setpoint: float

    @property
    def start(self) -> float:
        """The stepped variable's start value."""
        return self.start_tds if self.loop == "tds" else self.start_ph

    def tank(self) -> Tank:
        """The thesis rig in the start state; the other loop's setpoint is its start value."""
        return thesis_tank(
            self.name,
            start_tds=self.start_tds,
            start_ph=self.start_ph,
            tds_setpoint=self.setpoint if self.loop == "tds" else self.start_tds,
            ph_setpoint=self.setpoint if self.loop == "ph" else self.start_ph,
        )


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
    # Issue 11: an urgent pH with TDS already on target (it once never got past the TDS loop).
    Scenario("ph_down_7.2_6.0", "pH 7.2 → 6.0, TDS on target", "ph", 800.0, 7.2, 6.0),
)
QUICK_SCENARIOS: tuple[str, ...] = (
    "tds_up_1000",
    "tds_down_800",
    "ph_up_6.5",
    "ph_down_6.0_5.0",
    "ph_down_7.2_6.0",
)

DEFINITIONS = """\
All metrics are computed on the probe's noise-free value y(t) (what the probe
feels after the plant's transport delay and mixing lag), sampled at every
poll, for each loop's step from y0 (its start value: the tank's for TDS, the
pH when the first cycle's pH loop begins for pH, since the TDS loop's
nutrient doses move the pH too) to its setpoint r, Δ = r − y0, progress
p(t) = (y(t) − y0) / Δ, t = 0 when the first cycle starts (so the pH loop's
times include the TDS loop before it):

- **delay** — first t with p(t) ≥ 0.5 (time to half the step);
- **rise** — from the first t with p ≥ 0.1 to the first t with p ≥ 0.9;
- **settling** — the time of the last entry into |y − r| ≤ 5 % of |Δ|, provided
  y stays inside until the end of the run; "never" otherwise. The band is
  never narrower than the promised accuracy (2 % of r for TDS, 0.05 pH): on
  a small step 5 % of it is finer than the sensor's noise;
- **overshoot** — max of (y − r)·sign(Δ) / |Δ| over the loop's step
  response (until its loop of the first cycle ends, or the whole run when it
  never does), in % of the step (0 when y never passes r); what the plant
  does later (uptake, the pH loop's solutions diluting the tank) is judged by
  settling and the steady-state error;
- **steady-state error** — |mean of y over the last 60 s − r|, in % of r for
  TDS and in pH units for pH;
- **excursion** — how far dosing took the pH beyond its band (setpoint ±
  tolerance) after the first pH dose, in pH units: beyond the band on the far
  side counts whole, on the near side only beyond where the pH was at that
  first dose (0 when it stayed inside or on its way in);
- **volume** — ml delivered by each pump over the run (n = nutrient,
  w = refill water, up / down = pH up / pH down);
- **ml per step** — the loop's volume divided by the fraction of the step
  achieved, (mean of y over the last 60 s − y0) / Δ.

A run lasts the cycle limit (`max_cycle_s`) and an hour more, in auto mode:
after the first cycle ends, a new one starts every 30 s, as in the daemon.
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
    """One controller on one tank: the traces, what happened, and the metrics per loop."""

    tank: Tank
    controller: str
    times: list[float] = field(default_factory=list)
    tds: list[float] = field(default_factory=list)
    ph: list[float] = field(default_factory=list)
    doses: list[tuple[float, str, int, int]] = field(default_factory=list)
    refusals: list[tuple[float, str, str]] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    first_cycle_s: float | None = None  # when the first cycle ended "done" (None: it never did)
    ph_loop_s: float | None = None  # when the first cycle's pH loop began (its pH step starts)
    tds_done_s: float | None = None  # when the first cycle's TDS loop ended (its TDS step ends)
    locked: str | None = None  # the envelope's lock reason at the end, if any
    volume_ml: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Metrics] = field(default_factory=dict)
    scenario: Scenario | None = None
    parts_mg: dict[str, float] = field(default_factory=dict)  # in the tank at the end, per part

    def trace(self, loop: Loop) -> list[float]:
        """The recorded values of ``loop``'s variable."""
        return self.tds if loop == "tds" else self.ph

    @property
    def first_ph_dose_s(self) -> float | None:
        """When the first pH dose ran."""
        return next((t for t, a, _, _ in self.doses if a in PH_PUMPS), None)

    @property
    def excursion(self) -> float:
        """pH units beyond the band after the first pH dose (see :func:`excursion`)."""
        return excursion(self)


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
    response_until: float | None = None,
    response_from: float = 0.0,
) -> Metrics:
    """The metrics of :data:`DEFINITIONS` for one recorded response.

    The step response starts at ``response_from`` (earlier samples are not
    part of it) and ends at ``response_until`` (the first cycle): overshoot
    is measured up to then, the rest until the end of the run. Times stay
    counted from the start of the run.
    """
    kept = [(t, v) for t, v in zip(times, values, strict=True) if t >= response_from]
    times = [t for t, _ in kept]
    values = [v for _, v in kept]
    step = setpoint - start
    sign = 1.0 if step >= 0 else -1.0
    progress = [(v - start) / step for v in values] if step else [1.0] * len(values)
    delay = _first(times, [p >= 0.5 for p in progress])
    t10 = _first(times, [p >= 0.1 for p in progress])
    t90 = _first(times, [p >= 0.9 for p in progress])
    rise = t90 - t10 if t10 is not None and t90 is not None else None
    # A step smaller than 20 × the promised accuracy would have a settling band finer than
    # that accuracy (and the sensor's noise): the band is never narrower than MAX_SSE.
    accuracy = MAX_SSE[loop] * (setpoint / 100.0 if loop == "tds" else 1.0)
    band = max(SETTLE_BAND * abs(step), accuracy)
    entry = _first(times, [abs(v - setpoint) <= band for v in values])
    settling: float | None = None
    if values and abs(values[-1] - setpoint) <= band:
        settling = times[0]
        for i in range(len(values) - 1, -1, -1):
            if abs(values[i] - setpoint) > band:
                settling = times[i + 1]
                break
    end = math.inf if response_until is None else response_until
    overshoot = max(
        0.0,
        max(
            ((v - setpoint) * sign for t, v in zip(times, values, strict=True) if t <= end),
            default=0.0,
        ),
    )
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


def excursion(result: Result) -> float:
    """How far dosing took the pH beyond its band, after the first pH dose (pH units, ≥ 0).

    Beyond the band on the far side from where the pH was at the first dose
    counts whole; on the near side, only what lies beyond where it was then
    (a pH still on its way in is no excursion, one pushed further out is).
    """
    first = result.first_ph_dose_s
    if first is None:
        return 0.0
    low, high = result.tank.settings().band("ph")
    at_first = next(v for t, v in zip(result.times, result.ph, strict=True) if t >= first)
    below_at_first = max(0.0, low - at_first)
    above_at_first = max(0.0, at_first - high)
    worst = 0.0
    for t, v in zip(result.times, result.ph, strict=True):
        if t >= first:
            worst = max(worst, low - v - below_at_first, v - high - above_at_first)
    return worst


_LOOP_PUMPS: Mapping[str, tuple[str, ...]] = {
    "tds": (NUTRIENT, REFILL, *NUTRIENT_PARTS),
    "ph": PH_PUMPS,
}


async def simulate(
    tank: Tank,
    controller: Controller,
    *,
    envelope: PhEnvelope | None = None,
    duration_s: float | None = None,
    poll_s: float = POLL_S,
    loops: tuple[Loop, ...] = ("tds", "ph"),
    params_override: Mapping[str, float] | None = None,
    read: Callable[[Reservoir], dict[str, float | None]] | None = None,
) -> Result:
    """Run ``controller`` in auto mode on ``tank`` as the daemon would, in simulated time.

    ``envelope`` carries what an earlier run learned (else a fresh one);
    ``duration_s`` defaults to the cycle limit plus :data:`OBSERVE_S`;
    ``read`` turns the plant's probes into what the gateway sees (default: the
    engineering values of ``plant.sensors()``; sim/grower.py calibrates raw ones).
    """
    rig = Rig(
        tank, controller, loops=loops, envelope=envelope, params_override=params_override,
        poll_s=poll_s, read=read,
    )
    plant, cycle, env = rig.plant, rig.cycle, rig.envelope
    duration = rig.settings.max_cycle_s + OBSERVE_S if duration_s is None else duration_s
    triggers = Triggers((), INTERVAL_S)
    result = Result(tank, controller.name)
    while rig.t < duration:
        if rig.poll_due:
            t = rig.t
            reading = rig.read()
            truth = plant.truth(at_probe=True)
            result.times.append(t)
            result.tds.append(truth["tds"])
            result.ph.append(truth["ph"])
            if cycle.state == "idle" and triggers.due(_EPOCH + datetime.timedelta(seconds=t)):
                if cycle.outcome is not None:
                    result.outcomes.append(cycle.outcome)
                cycle.start(t)
            poll = await rig.control(reading)
            first_ends = cycle.state == "idle" and not result.outcomes  # only it counts
            if first_ends and cycle.outcome == "done" and result.first_cycle_s is None:
                result.first_cycle_s = t
            if cycle.state == "ph" and result.ph_loop_s is None:
                result.ph_loop_s = t
            if result.tds_done_s is None:
                result.tds_done_s = next((w for lp, w in cycle.loops_done if lp == "tds"), None)
            result.refusals.extend((t, d.actuator, r.reason) for d, r in poll.refused)
            result.doses.extend((t, d.actuator, d.duty, d.ms) for d in poll.ran)
        rig.advance(duration)
    if cycle.outcome is not None or cycle.state != "idle":
        result.outcomes.append("running" if cycle.state != "idle" else cycle.outcome or "idle")
    result.locked = env.locked
    result.volume_ml = plant.dosed_ml
    result.parts_mg = plant.parts_mg()
    # The pH step starts where the pH loop found it: the nutrient doses of the TDS loop
    # before it move the pH too (the stock is acidic), and that is not the pH loop's doing.
    ph_start = tank.start_ph
    if result.ph_loop_s is not None:
        ph_start = next(
            v for t_, v in zip(result.times, result.ph, strict=True) if t_ >= result.ph_loop_s
        )
    starts = {"tds": tank.start_tds, "ph": ph_start}
    setpoints = {"tds": tank.tds_setpoint, "ph": tank.ph_setpoint}
    for loop in ("tds", "ph"):
        result.metrics[loop] = metrics(
            result.times,
            result.trace(loop),
            start=starts[loop],
            setpoint=setpoints[loop],
            loop=loop,
            volume_ml={p: result.volume_ml[p] for p in _LOOP_PUMPS[loop]},
            response_until=result.tds_done_s if loop == "tds" else result.first_cycle_s,
            response_from=(result.ph_loop_s or 0.0) if loop == "ph" else 0.0,
        )
    return result


def misses(result: Result) -> list[str]:
    """Issue 11's targets ``result`` misses (for ``adaptive``; safety applies to all).

    The first cycle completes; both loops settle; overshoot ≤ 5 % of each
    step; steady-state error ≤ 2 % (TDS) and ≤ 0.05 pH; no pH excursion of
    more than 0.3 beyond the band after the first pH dose; no lock.
    """
    out = []
    if result.first_cycle_s is None:
        out.append("cycle never completes")
    for loop in ("tds", "ph"):
        m = result.metrics[loop]
        if not m.settled:
            out.append(f"{loop} never settles")
        if m.overshoot_pct > MAX_OVERSHOOT_PCT:
            out.append(f"{loop} overshoot {m.overshoot_pct:.1f} %")
        if m.steady_state_error > MAX_SSE[loop]:
            unit = "%" if loop == "tds" else "pH"
            out.append(f"{loop} steady-state error {m.steady_state_error:.3g} {unit}")
    if result.excursion > MAX_EXCURSION_PH:
        out.append(f"pH excursion {result.excursion:.2f} beyond the band")
    if result.locked is not None:
        out.append("pH dosing locked")
    return out


# --- the thesis comparison ---------------------------------------------------------------------


async def learn(controller_name: str, *, leave_out: Scenario | None = None) -> tuple[
    dict[str, Any], dict[str, Any]
]:
    """What ``controller_name`` and the envelope know of the rig after the other scenarios.

    One controller and one envelope run every scenario of :data:`SCENARIOS`
    but ``leave_out`` (the one they will be measured on: never learn from the
    run you are judged by) in order, each on a fresh plant with sensor-noise
    seed :data:`LEARN_SEED`, carrying what they learn from one to the next, as
    a gateway does from cycle to cycle.
    """
    controller = create(controller_name)
    try:
        if not isinstance(controller, Learner):
            raise ControllerError(f"controller {controller_name!r} learns nothing to carry over")
        envelope: PhEnvelope | None = None
        for scenario in SCENARIOS:
            if scenario != leave_out:
                tank = replace(scenario.tank(), seed=LEARN_SEED)
                if envelope is None:
                    envelope = PhEnvelope(tank.told)
                await simulate(tank, controller, envelope=envelope)
        return controller.learned(), (envelope.learned() if envelope is not None else {})
    finally:
        controller.close()


async def run_scenario(scenario: Scenario, controller_name: str) -> Result:
    """A fresh controller on one scenario; ``NAME+learned`` first learns the other scenarios."""
    base = controller_name.removesuffix(LEARNED)
    learned: tuple[dict[str, Any], dict[str, Any]] | None = None
    if base != controller_name:
        learned = await learn(base, leave_out=scenario)
    controller = create(base)
    tank = scenario.tank()
    envelope = PhEnvelope(tank.told)
    try:
        if learned is not None:
            assert isinstance(controller, Learner)  # learn() refuses any other
            controller.restore(learned[0])
            if learned[1]:
                envelope.restore(learned[1])
        result = await simulate(tank, controller, envelope=envelope)
        result.controller = controller_name
        result.scenario = scenario
        return result
    finally:
        controller.close()


# --- the sweep and the week --------------------------------------------------------------------


async def run_tank(tank: Tank, controller_name: str, **kwargs: Any) -> Result:
    """A fresh controller and envelope on ``tank``."""
    controller = create(controller_name)
    try:
        result = await simulate(tank, controller, **kwargs)
        result.controller = controller_name
        return result
    finally:
        controller.close()


def _run_tank_sync(tank: Tank, name: str) -> Result:
    return asyncio.run(run_tank(tank, name))


def _week_sync(tank: Tank, name: str, days: float) -> WeekResult:
    return asyncio.run(week(tank, name, days=days))


async def sweep(
    tanks: Sequence[Tank],
    controllers: Sequence[str],
    *,
    progress: Callable[[Result], None] | None = None,
    jobs: int = 1,
) -> list[Result]:
    """Every controller on every tank (tank-major order), in ``jobs`` processes."""
    pairs = [(tank, name) for tank in tanks for name in controllers]
    results = []
    if jobs <= 1:
        for tank, name in pairs:
            result = await run_tank(tank, name)
            results.append(result)
            if progress is not None:
                progress(result)
        return results
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [loop.run_in_executor(pool, _run_tank_sync, t, n) for t, n in pairs]
        for future in futures:
            result = await future
            results.append(result)
            if progress is not None:
                progress(result)
    return results


async def weeks(
    tanks: Sequence[Tank], controllers: Sequence[str], *, days: float, jobs: int = 1
) -> list[WeekResult]:
    """Every controller holding every tank for ``days``, in ``jobs`` processes."""
    pairs = [(tank, name) for tank in tanks for name in controllers]
    if jobs <= 1:
        return [await week(t, n, days=days) for t, n in pairs]
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [loop.run_in_executor(pool, _week_sync, t, n, days) for t, n in pairs]
        return [await f for f in futures]


@dataclass(frozen=True)
class WeekResult:
    """A controller holding one tank for days: time in band and what it cost."""

    tank: Tank
    controller: str
    days: float
    in_band: dict[str, float]  # fraction of polls with the probe's value in band, per loop
    volume_ml: dict[str, float]
    doses: int
    excursion: float  # pH units beyond the band, at worst
    locked: str | None


async def week(tank: Tank, controller_name: str, *, days: float = 7.0) -> WeekResult:
    """``controller_name`` holding ``tank`` at its setpoints for ``days`` of uptake and evaporation.

    The tank starts on target; plants take up nutrients (TDS falls, the pH
    rises with nitrate uptake) and water evaporates (TDS rises, the level
    falls) under a daily cycle of air temperature and humidity; evaporation
    scales with the tank (0.2 % of its volume per hour at 25 °C, 50 % RH).
    """
    on_target = replace(tank, start_tds=tank.tds_setpoint, start_ph=tank.ph_setpoint)
    result = await run_tank(
        on_target,
        controller_name,
        duration_s=days * 86400.0,
        poll_s=WEEK_POLL_S,
        params_override={"evaporation_l_per_h": 0.002 * tank.params.volume_l},
    )
    settings = tank.settings()
    in_band = {}
    for loop in ("tds", "ph"):
        low, high = settings.band(loop)
        values = result.trace(loop)
        in_band[loop] = sum(1 for v in values if low <= v <= high) / max(1, len(values))
    low, high = settings.band("ph")
    worst = max((max(low - v, v - high, 0.0) for v in result.ph), default=0.0)
    return WeekResult(
        tank, controller_name, days, in_band, result.volume_ml, len(result.doses), worst,
        result.locked,
    )


@dataclass(frozen=True)
class Summary:
    """One controller over a sweep: how many tanks pass each target, and the worst cases."""

    controller: str
    tanks: int
    passed: int  # every target
    passed_by_config: dict[str, tuple[int, int]]  # config -> (passed, tanks)
    completes: int
    settles: dict[str, int]
    overshoot_ok: dict[str, int]
    sse_ok: dict[str, int]
    safe: int  # pH excursion within the limit, no lock
    worst_excursion: tuple[float, str]
    worst_overshoot: dict[str, tuple[float, str]]
    slowest: dict[str, tuple[float | None, str]]  # settling time, tank


def summarize(results: Iterable[Result]) -> list[Summary]:
    """Per controller: the pass counts and worst cases of a sweep."""
    by: dict[str, list[Result]] = {}
    for r in results:
        by.setdefault(r.controller, []).append(r)
    out = []
    for name, rs in by.items():

        def slowest(loop: str, rs: list[Result] = rs) -> tuple[float | None, str]:
            never = [r for r in rs if r.metrics[loop].settling_s is None]
            if never:
                return None, never[0].tank.name
            r = max(rs, key=lambda r: r.metrics[loop].settling_s or 0.0)
            return r.metrics[loop].settling_s, r.tank.name

        worst_exc = max(rs, key=lambda r: r.excursion)
        out.append(
            Summary(
                controller=name,
                tanks=len(rs),
                passed=sum(1 for r in rs if not misses(r)),
                passed_by_config={
                    config: (
                        sum(1 for r in rs if r.tank.config == config and not misses(r)),
                        sum(1 for r in rs if r.tank.config == config),
                    )
                    for config in dict.fromkeys(r.tank.config for r in rs)
                },
                completes=sum(1 for r in rs if r.first_cycle_s is not None),
                settles={lp: sum(1 for r in rs if r.metrics[lp].settled) for lp in ("tds", "ph")},
                overshoot_ok={
                    lp: sum(1 for r in rs if r.metrics[lp].overshoot_pct <= MAX_OVERSHOOT_PCT)
                    for lp in ("tds", "ph")
                },
                sse_ok={
                    lp: sum(1 for r in rs if r.metrics[lp].steady_state_error <= MAX_SSE[lp])
                    for lp in ("tds", "ph")
                },
                safe=sum(
                    1 for r in rs if r.excursion <= MAX_EXCURSION_PH and r.locked is None
                ),
                worst_excursion=(worst_exc.excursion, worst_exc.tank.name),
                worst_overshoot={
                    lp: max(
                        ((r.metrics[lp].overshoot_pct, r.tank.name) for r in rs),
                        default=(0.0, ""),
                    )
                    for lp in ("tds", "ph")
                },
                slowest={lp: slowest(lp) for lp in ("tds", "ph")},
            )
        )
    return out


# --- report ------------------------------------------------------------------------------------


def _fmt_s(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f}"


def _fmt_volume(volume: Mapping[str, float]) -> str:
    short = {"nutrient": "n", "refill": "w", "ph_up": "up", "ph_down": "down"}
    parts = [f"{short.get(k, k)} {v:.0f}" for k, v in volume.items() if v >= 0.5]
    return ", ".join(parts) if parts else "0"


def _fmt_cycles(outcomes: Sequence[str]) -> str:
    done = outcomes.count("done")
    return f"{done}/{len(outcomes)} done" + (
        " (last running)" if outcomes[-1:] == ["running"] else ""
    )


def table(results: Sequence[Result]) -> str:
    """The thesis comparison: per scenario and controller, the stepped loop's metrics."""
    lines = [
        "| scenario | controller | delay s | rise s | settling s | overshoot % "
        "| steady-state error | other loop's error | excursion pH | volume ml | doses "
        "| first cycle s | cycles |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        assert r.scenario is not None
        loop = r.scenario.loop
        other = "ph" if loop == "tds" else "tds"
        m = r.metrics[loop]
        lines.append(
            f"| {r.scenario.title} | {r.controller} | {_fmt_s(m.delay_s)} | {_fmt_s(m.rise_s)} "
            f"| {_fmt_s(m.settling_s)} | {m.overshoot_pct:.1f} | {_sse(loop, m)} "
            f"| {_sse(other, r.metrics[other])} | {r.excursion:.2f} "
            f"| {_fmt_volume(r.volume_ml)} | {len(r.doses)} | {_fmt_s(r.first_cycle_s)} "
            f"| {_fmt_cycles(r.outcomes)} |"
        )
    return "\n".join(lines)


def _sse(loop: str, m: Metrics) -> str:
    return f"{m.steady_state_error:.1f} %" if loop == "tds" else f"{m.steady_state_error:.3f} pH"


def matrix(summaries: Sequence[Summary]) -> str:
    """The sweep's pass matrix: per controller, tanks meeting each target."""
    lines = [
        "| controller | tanks | all targets | by config | cycle completes | TDS settles "
        "| pH settles "
        f"| TDS overshoot ≤ {MAX_OVERSHOOT_PCT:g} % | pH overshoot ≤ {MAX_OVERSHOOT_PCT:g} % "
        f"| TDS error ≤ {MAX_SSE['tds']:g} % | pH error ≤ {MAX_SSE['ph']:g} "
        f"| pH safe (≤ {MAX_EXCURSION_PH:g} beyond band, no lock) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        by_config = ", ".join(f"{c} {p}/{n}" for c, (p, n) in s.passed_by_config.items())
        lines.append(
            f"| {s.controller} | {s.tanks} | {s.passed} | {by_config} | {s.completes} "
            f"| {s.settles['tds']} "
            f"| {s.settles['ph']} | {s.overshoot_ok['tds']} | {s.overshoot_ok['ph']} "
            f"| {s.sse_ok['tds']} | {s.sse_ok['ph']} | {s.safe} |"
        )
    return "\n".join(lines)


def worst_cases(summaries: Sequence[Summary], tanks: Mapping[str, Tank]) -> str:
    """Per controller, the worst tank for each target, described."""
    lines = []
    for s in summaries:
        exc, exc_tank = s.worst_excursion
        lines.append(f"- **{s.controller}**:")
        lines.append(
            f"  - largest pH excursion beyond the band: {exc:.2f} pH on {exc_tank} "
            f"({tanks[exc_tank].describe()})"
        )
        for loop in ("tds", "ph"):
            value, name = s.worst_overshoot[loop]
            lines.append(f"  - largest {loop} overshoot: {value:.1f} % on {name}")
            when, slow = s.slowest[loop]
            lines.append(
                f"  - slowest {loop} settling: {_fmt_s(when)} s on {slow} "
                f"({tanks[slow].describe()})"
            )
    return "\n".join(lines)


def week_table(results: Sequence[WeekResult]) -> str:
    """The week's results: time in band and volume per controller and tank."""
    lines = [
        "| tank | controller | TDS in band | pH in band | worst pH beyond band | volume ml "
        "| doses | locked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in results:
        lines.append(
            f"| {w.tank.name} | {w.controller} | {100 * w.in_band['tds']:.2f} % "
            f"| {100 * w.in_band['ph']:.2f} % | {w.excursion:.2f} | {_fmt_volume(w.volume_ml)} "
            f"| {w.doses} | {'yes' if w.locked else 'no'} |"
        )
    return "\n".join(lines)


def plot(results: Sequence[Result], scenario: Scenario, path: Path) -> None:
    """One PNG: every controller's response to ``scenario`` (the stepped loop)."""
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
                ax.plot(r.times, r.trace(scenario.loop), lw=1.3, label=r.controller)
        ax.set_xlabel("time since the first cycle started (s)")
        ax.set_ylabel("TDS (ppm)" if scenario.loop == "tds" else "pH")
        ax.set_title(f"{scenario.title}: auto mode on the simulated rig")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
