"""The full sweep of issue 11: every controller on a family of tanks nobody tuned on, and a week.

    python -m bench.control_sweep --tanks 60 --seed 11 --jobs 2 [--week 7 --week-tanks 3]

Prints the pass matrix and the worst cases (the same tables as docs/control.md) and,
with ``--json FILE``, writes every run's figures for later comparison. The suite runs a
small fixed version of this (tests/test_evaluate.py); this one is too long for CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from sim.evaluate import (
    SWEEP_CONTROLLERS,
    Result,
    matrix,
    misses,
    summarize,
    sweep,
    week_table,
    weeks,
    worst_cases,
)
from sim.tanks import family


def _row(r: Result) -> dict[str, Any]:
    return {
        "tank": r.tank.name,
        "config": r.tank.config,
        "controller": r.controller,
        "misses": misses(r),
        "first_cycle_s": r.first_cycle_s,
        "excursion_ph": round(r.excursion, 4),
        "doses": len(r.doses),
        "loops": {
            loop: {
                "settling_s": m.settling_s,
                "overshoot_pct": round(m.overshoot_pct, 3),
                "steady_state_error": round(m.steady_state_error, 4),
            }
            for loop, m in r.metrics.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Run the sweep (and the week) and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tanks", type=int, default=60)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--controllers", default=",".join(SWEEP_CONTROLLERS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--week", type=float, default=0.0, metavar="DAYS")
    parser.add_argument("--week-tanks", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.controllers.split(",") if n.strip()]
    tanks = family(args.tanks, seed=args.seed)
    started = time.monotonic()

    def progress(r: Result) -> None:
        problems = misses(r)
        print(f"  {r.tank.name:<14} {r.tank.config:<6} {r.controller:<9} "
              + ("all targets met" if not problems else "; ".join(problems)), file=sys.stderr)

    results = asyncio.run(sweep(tanks, names, progress=progress, jobs=args.jobs))
    summaries = summarize(results)
    print(matrix(summaries))
    print()
    print(worst_cases(summaries, {t.name: t for t in tanks}))
    held = []
    if args.week > 0:
        held = asyncio.run(weeks(tanks[: args.week_tanks], names, days=args.week, jobs=args.jobs))
        print()
        print(week_table(held))
    print(f"\n{len(results)} runs in {time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "command": " ".join(["python -m bench.control_sweep", *(argv or sys.argv[1:])]),
            "runs": [_row(r) for r in results],
            "weeks": [
                {"tank": w.tank.name, "controller": w.controller, "days": w.days,
                 "in_band": w.in_band, "volume_ml": w.volume_ml, "doses": w.doses,
                 "excursion_ph": w.excursion, "locked": w.locked}
                for w in held
            ],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
