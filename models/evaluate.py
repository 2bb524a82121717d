"""How well the dosing model fits its closed-loop labels, on the held-out split.

Run in the main venv (no TensorFlow needed)::

    .venv/bin/python -m models.evaluate            # prints the table, rewrites docs/ml.md

Loads the committed held-out split (``models/heldout.npz``; refuses to go
on if its SHA-256 differs from the one in ``models/metadata.json``) and
measures, per target, on the held-out tanks' decisions:

- **landing share** — how often the answer is at most the landing dose
  (the dose would not have gone past the aim): the quantile the model was
  trained to is ``1 −`` :data:`rules.mlpolicy.QUANTILE`; and how often it
  is at most 2 % more (it would not have gone past the aim by more than
  2 % of the dose: within one int8 output step of the label);
- **mean answer** and mean landing dose, as fractions of the reference:
  the larger the answer at the same landing share, the fewer doses to the
  setpoint;
- **pinball loss** at the trained quantile, and the mean absolute error;
- for the int8 and float networks and for the **hand rule** our
  ``adaptive`` controller uses (0.55 of the need until the pump's effect is
  measured, then 0.95 of the corrected need; the pH envelope's limit), so
  the table says what the model adds to it;
- file size and p50/p99 latency of one guarded prediction
  (:meth:`rules.mlruntime.Model.predict`, the controller's path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.closedloop import DEFAULT_DATA, Dataset
from rules.mlpolicy import FEATURES, OUTPUT_SCALE, QUANTILE, TARGETS
from rules.mlruntime import DEFAULT_METADATA, DEFAULT_MODEL, Model, interpreter_backend

__all__ = [
    "FLOAT_MODEL",
    "Result",
    "evaluate",
    "hand_rule",
    "heldout",
    "latency_us",
    "main",
    "metrics",
    "pick",
]

FloatArray = npt.NDArray[np.float64]

COMMAND = ".venv/bin/python -m models.evaluate"
FLOAT_MODEL = DEFAULT_MODEL.with_name("hydro_float.tflite")
DOC = Path(__file__).resolve().parent.parent / "docs" / "ml.md"
BEGIN, END = "<!-- evaluate:begin -->", "<!-- evaluate:end -->"

#: adaptive's TDS rule (rules/adaptive.py), for the comparison: its fractions of the need
#: before and after a pump's effect is measured, its aim and its deadbands (below, above).
RULE_UNKNOWN, RULE_KNOWN = 0.55, 0.95
RULE_AIM_PCT = 0.5
#: An answer at most this many times the landing dose lands within 2 % of it past the aim.
LANDING_TOLERANCE = 1.02
RULE_DEADBAND_PCT = (1.0, 1.5)


def pick(ds: Dataset, outputs: FloatArray) -> FloatArray:
    """Each row's own target from per-row outputs of every target (``(n, len(TARGETS))``),
    clipped to the target's range as the ``ml`` controller clips it (an int8 output can
    round a little above it)."""
    top = np.array([OUTPUT_SCALE[t] for t in TARGETS])
    picked: FloatArray = np.minimum(outputs, top)[np.arange(len(ds)), ds.target.astype(np.intp)]
    return picked


def hand_rule(ds: Dataset) -> FloatArray:
    """``adaptive``'s answers for ``ds``'s rows, as fractions of the model's reference.

    ``adaptive`` doses its fraction of the need to *its* aim (0.5 % of the
    setpoint short of it) and nothing inside its deadbands (1 % below the
    setpoint, 1.5 % above); the need to the aim is converted here to a
    fraction of the need to the setpoint, the reference of the model.
    """
    col = {f: i for i, f in enumerate(FEATURES)}
    e = ds.x[:, col["tds_error"]]
    s = 10.0 ** ds.x[:, col["log_stock_ratio"]]
    up = e > 0
    aim = RULE_AIM_PCT / 100.0
    with np.errstate(divide="ignore", invalid="ignore"):
        to_aim = np.where(
            up,
            (e - aim) * (s - 1.0) / (e * (s - 1.0 + aim)),
            ((1.0 - e) / (1.0 + aim) - 1.0) / -e,
        )
    dead = np.where(up, e <= RULE_DEADBAND_PCT[0] / 100.0, -e <= RULE_DEADBAND_PCT[1] / 100.0)
    known = ds.x[:, col["factor_known"]] > 0.5
    fraction = np.where(known, RULE_KNOWN / ds.x[:, col["factor"]], RULE_UNKNOWN)
    tds = np.where(dead, 0.0, fraction * np.clip(to_aim, 0.0, None))
    out: FloatArray = np.where(ds.target == 0, tds, 1.0)
    return out


def metrics(ds: Dataset, answers: FloatArray) -> dict[str, dict[str, float]]:
    """Per target: rows, landing shares (exactly, within 2 %), mean answer and label, losses."""
    out: dict[str, dict[str, float]] = {}
    for i, target in enumerate(TARGETS):
        rows = ds.target == i
        y, a = ds.y[rows], answers[rows]
        if not len(y):
            continue
        tau = QUANTILE[target]
        e = y - a
        out[target] = {
            "rows": int(len(y)),
            "landing_share": round(float(np.mean(a <= y + 1e-9)), 4),
            "within_2pct": round(float(np.mean(a <= LANDING_TOLERANCE * y + 1e-9)), 4),
            "mean_answer": round(float(np.mean(a)), 4),
            "mean_label": round(float(np.mean(y)), 4),
            "pinball": round(float(np.mean(np.maximum(tau * e, (tau - 1.0) * e))), 5),
            "mae": round(float(np.mean(np.abs(e))), 4),
        }
    return out


def heldout(metadata: Path = DEFAULT_METADATA, data: Path = DEFAULT_DATA) -> Dataset:
    """The committed held-out split; ``SystemExit`` if it is not the one the model was tested on."""
    ds = Dataset.load(data)
    expected = json.loads(metadata.read_text(encoding="utf-8"))["dataset"]["heldout_sha256"]
    if ds.sha256() != expected:
        raise SystemExit(f"{data} is not the held-out split of {metadata}: regenerate and retrain")
    return ds


def latency_us(call: Callable[[int], object], runs: int) -> tuple[float, float]:
    """p50 and p99 in µs of ``call(i)`` for ``i`` in ``range(runs)``."""
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        call(i)
        times[i] = time.perf_counter() - start
    p50, p99 = np.percentile(times, [50, 99]) * 1e6
    return float(p50), float(p99)


@dataclass(frozen=True)
class Result:
    """One answerer's numbers on the held-out split (size and latency: networks only)."""

    name: str
    metrics: dict[str, dict[str, float]]
    size_bytes: int | None = None
    p50_us: float | None = None
    p99_us: float | None = None


def _network(label: str, path: Path, ds: Dataset, runs: int) -> Result:
    model = Model.load(path, DEFAULT_METADATA)
    rows = [dict(zip(FEATURES, r.tolist(), strict=True)) for r in ds.x]
    return Result(
        label,
        metrics(ds, pick(ds, model.run_many(ds.x))),
        path.stat().st_size,
        *latency_us(lambda i: model.predict(rows[i % len(rows)]), runs),
    )


def evaluate(ds: Dataset, runs: int = 2000) -> list[Result]:
    """The hand rule, the float network and the int8 network on ``ds``."""
    return [
        Result("adaptive's hand rule", metrics(ds, hand_rule(ds))),
        _network("float32 network", FLOAT_MODEL, ds, runs),
        _network("int8 network", DEFAULT_MODEL, ds, runs),
    ]


def table(results: list[Result]) -> str:
    """Markdown: the fit per target and answerer, then size and latency."""
    lines = [
        "| target | answerer | rows | landing share | within 2 % | mean answer "
        "| mean landing dose | pinball | MAE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target in TARGETS:
        for r in results:
            m = r.metrics.get(target)
            if m is None:
                continue
            lines.append(
                f"| {target} | {r.name} | {m['rows']:.0f} | {100 * m['landing_share']:.1f} % "
                f"| {100 * m['within_2pct']:.1f} % "
                f"| {m['mean_answer']:.3f} | {m['mean_label']:.3f} | {m['pinball']:.4f} "
                f"| {m['mae']:.3f} |"
            )
    lines += ["", "| network | file | p50 latency | p99 latency |", "|---|---|---|---|"]
    lines += [
        f"| {r.name} | {r.size_bytes / 1e3:.1f} KB | {r.p50_us:.1f} µs | {r.p99_us:.1f} µs |"
        for r in results
        if r.size_bytes is not None and r.p50_us is not None and r.p99_us is not None
    ]
    return "\n".join(lines)


def machine() -> str:
    """One line about where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    backend, _ = interpreter_backend()
    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}, "
            f"TFLite backend {backend}")


def report(results: list[Result], ds: Dataset, runs: int) -> str:
    """The section of docs/ml.md that this command writes."""
    tanks = len(set(ds.episode.tolist()))
    return "\n".join([
        f"Command: `{COMMAND}` ({runs} single-row predictions per network for the latency).",
        "",
        f"Machine: {machine()}.",
        "",
        f"Held-out split: {len(ds)} decisions on {tanks} tanks no training row comes from "
        f"(sha256 `{ds.sha256()[:16]}…`).",
        "",
        table(results),
    ])


def _write_doc(section: str, doc: Path) -> None:
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    doc.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print the report, and rewrite the results section of docs/ml.md."""
    parser = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000, help="latency runs per network")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite docs/ml.md")
    args = parser.parse_args(argv)
    ds = heldout()
    section = report(evaluate(ds, runs=args.runs), ds, args.runs)
    print(section)
    if not args.no_write:
        _write_doc(section, DOC)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
