"""Accuracy and duration of the guided titration on the simulated plant (docs/titration.md).

    python -m bench.titration [--seeds 8]

Runs `rules.titration.Titration` on simulated time against
`sim.plant.Reservoir` with the node's default timings (a reading every 5 s,
pH windows of 30 s, a 60 s mixing wait), for several chemistries, both pumps
and several sensor-noise seeds, from nothing known (the envelope's steepest
plausible curve) and with a configured strength 30 % off. Reports the error
of the measured strength against the plant's own titration curve over the
measured span (median and worst), the claimed uncertainty, the doses, the
duration, and the largest distance the true pH went from the start. Plants
take up nutrients or not (``uptake``): uptake slowly raises the pH, a drift
the method does not see.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, replace

from rules.controller import PlantConstants
from rules.envelope import PhEnvelope
from rules.titration import Titration, TitrationSettings
from sim.plant import PlantParams, Reservoir

BASE = PlantParams(uptake_per_h=0.0, evaporation_l_per_h=0.0)
CHEMISTRIES = {
    "0.15 M, tap water, 10 L": BASE,
    "1 M, tap water, 10 L": replace(BASE, ph_up_mol_l=1.0, ph_down_mol_l=1.0),
    "0.5 M, soft water, 10 L": replace(BASE, ph_up_mol_l=0.5, ph_down_mol_l=0.5,
                                       refill_carbonate_mol_l=0.0003),
    "0.15 M, 200 L": replace(BASE, volume_l=200.0, capacity_l=300.0),
    "slow mixing (40 s + 150 s)": replace(BASE, dead_time_s=40.0, lag_s=150.0),
    "with uptake (0.15 M, 10 L)": PlantParams(),
}


@dataclass
class Outcome:
    error: float | None  # relative, against the plant's curve; None when it failed
    uncertainty: float
    doses: int
    seconds: float
    extreme: float


def titrate(params: PlantParams, pump: str, seed: int, told: float | None) -> Outcome:
    tank = Reservoir.from_state(tds=800, ph=6.0, params=params, seed=seed)
    plant = PlantConstants(tank_volume_l=params.volume_l,
                           ph_ml_per_l_per_unit={pump: told} if told else {})
    envelope = PhEnvelope(plant)
    proc = Titration(TitrationSettings(pump), lambda x: envelope.gain_bound(pump, x, 6.0), 0.0)
    start, t, extreme = tank.truth()["ph"], 0.0, 0.0
    flow = params.flow_ml_s(pump)
    while proc.phase not in ("done", "failed") and t < 20000:
        tank.step(5.0)
        t += 5.0
        extreme = max(extreme, abs(tank.truth()["ph"] - start))
        proc.add(t, tank.sensors()["ph"])
        per_l = proc.advance(t)
        if per_l is None:
            continue
        ms = max(1, math.floor(per_l * params.volume_l / flow * 1000.0))
        tank.set_pump(pump, 255)
        tank.step(ms / 1000.0)
        tank.set_pump(pump, 0)
        proc.dosed(t, ms / 1000.0 * flow / params.volume_l, ms / 1000.0)
        t += ms / 1000.0
    result = proc.result
    if result is None:
        return Outcome(None, math.nan, len(proc.steps), t, extreme)
    span = result.ph_to - result.ph_from
    truth = tank.titration_ml_per_l(pump, result.ph_from, result.ph_to) / abs(span)
    return Outcome(result.strength / truth - 1.0, result.uncertainty, len(result.steps), t,
                   extreme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    print("| tank | told | pump | error median / worst | ±2σ claimed | doses | minutes "
          "| furthest from start |")
    print("|---|---|---|---|---|---|---|---|")
    for name, params in CHEMISTRIES.items():
        for told_factor in (None, 0.7):
            for pump in ("ph_down", "ph_up"):
                sign = 1.0 if pump == "ph_up" else -1.0
                probe = Reservoir.from_state(tds=800, ph=6.0, params=params)
                truth = probe.titration_ml_per_l(pump, 6.0, 6.0 + 0.1 * sign) / 0.1
                told = None if told_factor is None else told_factor * truth
                runs = [titrate(params, pump, seed, told) for seed in range(1, args.seeds + 1)]
                errors = [r.error for r in runs if r.error is not None]
                failed = len(runs) - len(errors)
                cell = (f"{100 * statistics.median(errors):+.1f} % / "
                        f"{100 * max(errors, key=abs):+.1f} %") if errors else "-"
                if failed:
                    cell += f" ({failed} failed)"
                print(f"| {name} | {'nothing' if told is None else '0.7 × truth'} | {pump} "
                      f"| {cell} | {100 * statistics.median(r.uncertainty for r in runs):.1f} % "
                      f"| {statistics.median(r.doses for r in runs):.0f} "
                      f"| {statistics.median(r.seconds for r in runs) / 60:.1f} "
                      f"| {max(r.extreme for r in runs):.2f} |")


if __name__ == "__main__":
    main()
