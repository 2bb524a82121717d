"""``hydrogate evaluate``: the command line over the evaluation (sim/evaluate.py).

Kept apart from the machinery so that the modules it ties together import
one way: :mod:`sim.evaluate` measures, :mod:`sim.grower` runs the grower's
tank through it, :mod:`sim.report` words the results, and this module —
which none of them imports — runs them and prints or writes what they give.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from rules.controller import ControllerError
from sim import report
from sim.evaluate import (
    CONTROLLERS,
    LEARNED,
    QUICK_CONTROLLERS,
    QUICK_SCENARIOS,
    SCENARIOS,
    SWEEP_CONTROLLERS,
    Result,
    matrix,
    misses,
    plot,
    run_scenario,
    summarize,
    sweep,
    table,
    week_table,
    weeks,
)
from sim.grower import grower, grower_table
from sim.tanks import family

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hydrogate evaluate``."""
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR",
        help="write DIR/control.md and DIR/img/*.png (e.g. docs)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"only {', '.join(QUICK_SCENARIOS)} with {', '.join(QUICK_CONTROLLERS)}",
    )
    parser.add_argument(
        "--controllers", default=None, help="comma-separated controller names (default: all)"
    )
    parser.add_argument(
        "--sweep", type=int, default=0, metavar="N",
        help="also run the controllers on N tanks drawn from issue 11's ranges",
    )
    parser.add_argument("--seed", type=int, default=11, help="seed of the sweep's tanks")
    parser.add_argument(
        "--week", type=float, default=0.0, metavar="DAYS",
        help="also hold the first tanks of the sweep (or the thesis rig) for DAYS days",
    )
    parser.add_argument(
        "--week-tanks", type=int, default=3, metavar="N", help="tanks of the week (default 3)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N",
        help="processes for the sweep and the week (default 1)",
    )
    parser.add_argument(
        "--grower", type=float, default=None, metavar="DAYS",
        help="days the grower's tank (two parts, EC, calibrated) is held (default 1; "
        "--quick: 0, not run)",
    )


def run(args: argparse.Namespace) -> int:
    """``hydrogate evaluate``: print the tables; with ``--out`` write the report and plots."""

    started = time.monotonic()
    grower_days = args.grower if args.grower is not None else (0.0 if args.quick else 1.0)
    scenarios = [s for s in SCENARIOS if not args.quick or s.name in QUICK_SCENARIOS]
    names = list(QUICK_CONTROLLERS if args.quick else CONTROLLERS)
    sweep_names = list(SWEEP_CONTROLLERS)
    if args.controllers:
        names = [n.strip() for n in args.controllers.split(",") if n.strip()]
        sweep_names = [n for n in names if LEARNED not in n]

    def progress(r: Result) -> None:
        what = r.scenario.name if r.scenario is not None else r.tank.name
        problems = misses(r)
        print(
            f"  {what:<18} {r.controller:<17} "
            + ("all targets met" if not problems else "; ".join(problems)),
            file=sys.stderr,
        )

    async def everything() -> report.Report:
        results = []
        for scenario in scenarios:
            for name in names:
                result = await run_scenario(scenario, name)
                progress(result)
                results.append(result)
        tanks = family(args.sweep, seed=args.seed) if args.sweep else []
        swept = await sweep(tanks, sweep_names, progress=progress, jobs=args.jobs)
        held = []
        if args.week > 0:
            held = await weeks(
                tanks[: args.week_tanks] or [SCENARIOS[0].tank()],
                sweep_names,
                days=args.week,
                jobs=args.jobs,
            )
        grown = await grower(days=grower_days) if grower_days > 0 else []
        return report.Report(results, tanks, swept, held, grown)

    try:
        outcome = asyncio.run(everything())
    except ControllerError as exc:
        print(f"hydrogate evaluate: {exc}", file=sys.stderr)
        return 2
    print(table(outcome.scenarios))
    if outcome.swept:
        print()
        print(matrix(summarize(outcome.swept)))
    if outcome.weeks:
        print()
        print(week_table(outcome.weeks))
    if outcome.grower:
        print()
        print(grower_table(outcome.grower))
    print(f"\nevaluated in {time.monotonic() - started:.1f} s", file=sys.stderr)
    if args.out is not None:
        img_dir = args.out / "img"
        img_dir.mkdir(parents=True, exist_ok=True)
        images = []
        for scenario in scenarios:
            name = f"control_{scenario.name}.png"
            plot(outcome.scenarios, scenario, img_dir / name)
            images.append(name)
        (args.out / "control.md").write_text(
            report.document(outcome, command=_command(args), images=images), encoding="utf-8"
        )
        print(f"wrote {args.out / 'control.md'} and {len(images)} plots", file=sys.stderr)
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces ``args`` (for the report's first line)."""
    words = ["hydrogate evaluate", f"--out {args.out}"]
    if args.quick:
        words.append("--quick")
    if args.controllers:
        words.append(f"--controllers {args.controllers}")
    if args.sweep:
        words.append(f"--sweep {args.sweep} --seed {args.seed}")
    if args.week:
        words.append(f"--week {args.week:g} --week-tanks {args.week_tanks}")
    if args.grower is not None:
        words.append(f"--grower {args.grower:g}")
    return " ".join(words)
