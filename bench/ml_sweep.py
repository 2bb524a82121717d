"""``ml`` against ``rb``, ``fuzzy`` and ``adaptive`` on the sweep (docs/ml.md's closed-loop table).

    .venv/bin/python -m bench.ml_sweep --tanks 60 --jobs 2      # ~10 min on two cores

Runs every controller on the tanks of ``hydrogate evaluate --sweep N``
(:func:`sim.tanks.family`, seed 11: the same tanks, the same full cycles,
:func:`sim.evaluate.run_tank`), one run per process task, and prints:

- issue 11's pass matrix (:func:`sim.evaluate.matrix`);
- per controller and loop: tanks that settle, the median settling time of
  those, the median and worst overshoot, tanks within the 5 % overshoot
  target; the worst pH excursion and the tanks kept safe;
- ``ml`` against ``rb`` tank by tank: where ``ml`` settles sooner (a run
  that never settles counts as slower than any that does), where its
  overshoot is no larger, where its excursion is no larger.

``--write`` puts the tables into docs/ml.md between the ``sweep`` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sim.evaluate import MAX_EXCURSION_PH, MAX_OVERSHOOT_PCT, matrix, misses, run_tank, summarize
from sim.tanks import family

DOC = Path(__file__).resolve().parent.parent / "docs" / "ml.md"
BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"
LOOPS = ("tds", "ph")


@dataclass(frozen=True)
class Run:
    """What the tables need of one controller on one tank."""

    tank: str
    controller: str
    settling: dict[str, float | None]
    overshoot: dict[str, float]
    excursion: float
    locked: bool
    misses: tuple[str, ...]


def _one(args: tuple[int, int, int, str]) -> tuple[Run, object]:
    count, seed, index, name = args
    logging.disable(logging.CRITICAL)
    tank = family(count, seed=seed)[index]
    result = asyncio.run(run_tank(tank, name))
    run = Run(
        tank.name,
        name,
        {lp: result.metrics[lp].settling_s for lp in LOOPS},
        {lp: result.metrics[lp].overshoot_pct for lp in LOOPS},
        result.excursion,
        result.locked is not None,
        tuple(misses(result)),
    )
    result.tank = None  # type: ignore[assignment]  # not picklable; put back by the parent
    return run, result


def sweep(count: int, seed: int, names: Sequence[str], jobs: int) -> tuple[list[Run], list[object]]:
    """Every controller on every tank; (runs, sim.evaluate results) in tank-major order."""
    work = [(count, seed, i, n) for i in range(count) for n in names]
    if jobs <= 1:
        pairs = list(map(_one, work))
    else:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            pairs = pool.map(_one, work, chunksize=1)
    tanks = family(count, seed=seed)
    results = []
    for (_, _, i, _), (_, result) in zip(work, pairs, strict=True):
        result.tank = tanks[i]  # type: ignore[attr-defined]
        results.append(result)
    return [run for run, _ in pairs], results


def _median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.0f}" if values else "–"


def per_controller(runs: Sequence[Run], names: Sequence[str]) -> str:
    """Per controller and loop: settling, overshoot; then safety."""
    lines = [
        "| controller | loop | settle | median settling s | median overshoot % "
        f"| worst overshoot % | overshoot ≤ {MAX_OVERSHOOT_PCT:g} % |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        rs = [r for r in runs if r.controller == name]
        for lp in LOOPS:
            settled = [s for r in rs if (s := r.settling[lp]) is not None]
            over = [r.overshoot[lp] for r in rs]
            ok = sum(1 for o in over if o <= MAX_OVERSHOOT_PCT)
            lines.append(
                f"| {name} | {lp} | {len(settled)}/{len(rs)} | {_median(settled)} "
                f"| {statistics.median(over):.1f} | {max(over):.1f} | {ok}/{len(rs)} |"
            )
    lines += [
        "",
        f"| controller | worst pH excursion beyond the band | pH safe (≤ {MAX_EXCURSION_PH:g}, "
        "no lock) | all of issue 11's targets |",
        "|---|---|---|---|",
    ]
    for name in names:
        rs = [r for r in runs if r.controller == name]
        safe = sum(1 for r in rs if r.excursion <= MAX_EXCURSION_PH and not r.locked)
        passed = sum(1 for r in rs if not r.misses)
        worst = max(r.excursion for r in rs)
        lines.append(f"| {name} | {worst:.3f} | {safe}/{len(rs)} | {passed}/{len(rs)} |")
    return "\n".join(lines)


def _sooner(a: float | None, b: float | None) -> bool:
    """Whether settling time ``a`` is strictly sooner than ``b`` (``None``: never)."""
    if a is None:
        return False
    return b is None or a < b


def head_to_head(runs: Sequence[Run], name: str = "ml", other: str = "rb") -> str:
    """``name`` against ``other`` tank by tank."""
    by = {(r.tank, r.controller): r for r in runs}
    tanks = sorted({r.tank for r in runs if (r.tank, name) in by and (r.tank, other) in by})
    lines = [
        f"| loop | {name} settles sooner | {other} settles sooner | neither settles "
        f"| {name} overshoot ≤ {other}'s | {name} overshoot > {other}'s | by at most |",
        "|---|---|---|---|---|---|---|",
    ]
    for lp in LOOPS:
        a = [(by[t, name], by[t, other]) for t in tanks]
        sooner = sum(1 for m, o in a if _sooner(m.settling[lp], o.settling[lp]))
        later = sum(1 for m, o in a if _sooner(o.settling[lp], m.settling[lp]))
        neither = sum(1 for m, o in a if m.settling[lp] is None and o.settling[lp] is None)
        le = sum(1 for m, o in a if m.overshoot[lp] <= o.overshoot[lp] + 1e-9)
        excess = max((m.overshoot[lp] - o.overshoot[lp] for m, o in a), default=0.0)
        lines.append(f"| {lp} | {sooner} | {later} | {neither} | {le} | {len(a) - le} "
                     f"| {max(excess, 0.0):.1f} % of the step |")
    pairs = [(by[t, name], by[t, other]) for t in tanks]
    no_worse = sum(1 for m, o in pairs if m.excursion <= o.excursion + 1e-9)
    more = max((m.excursion - o.excursion for m, o in pairs), default=0.0)
    unsafe = [m.tank for m, o in pairs if (m.excursion > MAX_EXCURSION_PH or m.locked)
              and not (o.excursion > MAX_EXCURSION_PH or o.locked)]
    lines += [
        "",
        f"pH excursion beyond the band: {name}'s no larger than {other}'s on "
        f"{no_worse}/{len(pairs)} tanks, larger by at most {more:.4f} pH; tanks where {name} "
        f"is unsafe and {other} is not: " + (", ".join(unsafe) if unsafe else "none") + ".",
    ]
    return "\n".join(lines)


def _write_doc(section: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ml_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tanks", type=int, default=60)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--controllers", default="rb,fuzzy,ml,adaptive")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the tables into docs/ml.md")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.controllers.split(",") if n.strip()]
    started = time.monotonic()
    runs, results = sweep(args.tanks, args.seed, names, args.jobs)
    elapsed = time.monotonic() - started
    command = (f".venv/bin/python -m bench.ml_sweep --tanks {args.tanks} --seed {args.seed} "
               f"--controllers {','.join(names)} --jobs {args.jobs}")
    parts = [
        f"Command: `{command}` ({elapsed / 60:.0f} min here). The tanks and runs are those of "
        f"`hydrogate evaluate --sweep {args.tanks} --seed {args.seed}`.",
        "",
        matrix(summarize(results)),  # type: ignore[arg-type]
        "",
        per_controller(runs, names),
    ]
    if "ml" in names and "rb" in names:
        parts += ["", head_to_head(runs)]
    section = "\n".join(parts)
    print(section)
    print(f"\n{elapsed:.0f} s", file=sys.stderr)
    if args.write:
        _write_doc(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
