"""Side-by-side evaluation: the documentation's random forest vs the float and int8 networks.

Run in the main venv (no TensorFlow needed)::

    .venv/bin/python -m models.evaluate            # prints the table, rewrites docs/ml.md

It regenerates the dataset from the seed in ``models/metadata.json`` (and
refuses to go on if its SHA-256 differs from the one the models were trained
on), trains the random forest the control documentation uses — scikit-learn
``RandomForestRegressor``, multi-output, 100 trees, otherwise defaults,
seeded — on the same training split, and measures all three on the same
held-out split:

- MAE and R² per target (seconds);
- file size (the forest as a pickle, the networks as ``.tflite``);
- p50/p99 latency of one single-sample prediction (the path the controller
  uses: :meth:`models.runtime.Model.predict` with its guards, or
  ``forest.predict`` on one row), over a bounded number of runs;
- RSS growth of loading each artefact, measured in a fresh child process so
  that the allocations of this one do not hide it.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.dataset import FEATURES, TARGETS, Dataset, generate
from models.runtime import DEFAULT_METADATA, DEFAULT_MODEL, Model, interpreter_backend

__all__ = ["Result", "evaluate", "latency_us", "main", "metrics", "train_forest"]

FloatArray = npt.NDArray[np.float64]

COMMAND = ".venv/bin/python -m models.evaluate"
FLOAT_MODEL = DEFAULT_MODEL.with_name("hydro_float.tflite")
DOC = Path(__file__).resolve().parent.parent / "docs" / "ml.md"
BEGIN, END = "<!-- evaluate:begin -->", "<!-- evaluate:end -->"


def metrics(y_true: FloatArray, y_pred: FloatArray) -> dict[str, dict[str, float]]:
    """MAE and R² per target (columns :data:`~models.dataset.TARGETS`)."""
    out: dict[str, dict[str, float]] = {}
    for i, target in enumerate(TARGETS):
        err = y_true[:, i] - y_pred[:, i]
        ss_tot = float(np.sum((y_true[:, i] - y_true[:, i].mean()) ** 2))
        out[target] = {
            "mae": round(float(np.mean(np.abs(err))), 4),
            "r2": round(1.0 - float(np.sum(err**2)) / ss_tot, 4),
        }
    return out


def train_forest(ds: Dataset, trees: int = 100) -> Any:
    """The documentation's model: a seeded multi-output random forest on the training split."""
    from sklearn.ensemble import RandomForestRegressor  # noqa: PLC0415 - dev dependency

    forest = RandomForestRegressor(n_estimators=trees, random_state=0, n_jobs=-1)
    forest.fit(ds.x_train, ds.y_train)
    forest.set_params(n_jobs=1)  # single-sample inference, as on the Pi
    return forest


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
    """One model's numbers on the held-out split."""

    name: str
    metrics: dict[str, dict[str, float]]
    size_bytes: int
    p50_us: float
    p99_us: float
    rss_bytes: int


def _rss_child(kind: str, path: str) -> None:
    """Child process: print the RSS growth of loading one artefact."""
    import psutil  # noqa: PLC0415 - dev dependency

    proc = psutil.Process()
    before = proc.memory_info().rss
    if kind == "forest":
        from sklearn.ensemble import RandomForestRegressor  # noqa: F401, PLC0415

        before = proc.memory_info().rss  # count the model, not the sklearn import
        with open(path, "rb") as f:
            loaded: object = pickle.load(f)  # noqa: S301 - our own file, just written
    else:
        interpreter_backend()  # count the model, not the interpreter library's import
        before = proc.memory_info().rss
        loaded = Model.load(path, DEFAULT_METADATA)
    print(proc.memory_info().rss - before, type(loaded).__name__)


def _rss_delta(kind: str, path: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "models.evaluate", "--rss-child", kind, str(path)],
        check=True, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    return int(out.split()[0])


def evaluate(ds: Dataset, runs: int = 2000, trees: int = 100) -> list[Result]:
    """Train the forest and measure forest, float and int8 on ``ds``'s held-out split."""
    return [
        _forest_result(ds, runs, trees),
        _tflite_result("float32 network", FLOAT_MODEL, ds, runs),
        _tflite_result("int8 network", DEFAULT_MODEL, ds, runs),
    ]


def _forest_result(ds: Dataset, runs: int, trees: int) -> Result:
    forest = train_forest(ds, trees)
    x, n = ds.x_test, len(ds.x_test)

    def one(i: int) -> object:
        return forest.predict(x[i % n : i % n + 1])

    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "forest.pkl"
        blob.write_bytes(pickle.dumps(forest, protocol=pickle.HIGHEST_PROTOCOL))
        return Result(
            f"random forest ({trees} trees)",
            metrics(ds.y_test, forest.predict(x)),
            blob.stat().st_size,
            *latency_us(one, runs),
            _rss_delta("forest", blob),
        )


def _tflite_result(label: str, path: Path, ds: Dataset, runs: int) -> Result:
    model = Model.load(path, DEFAULT_METADATA)
    rows = [dict(zip(FEATURES, row.tolist(), strict=True)) for row in ds.x_test]

    def one(i: int) -> object:
        return model.predict(rows[i % len(rows)])

    return Result(
        label,
        metrics(ds.y_test, model.run_many(ds.x_test)),
        path.stat().st_size,
        *latency_us(one, runs),
        _rss_delta("tflite", path),
    )


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def table(results: list[Result]) -> str:
    """The markdown tables: accuracy per target, then size, latency and memory."""
    head = "| target | " + " | ".join(f"{r.name} MAE / R²" for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for t in TARGETS:
        cells = [f"{r.metrics[t]['mae']:.3f} / {r.metrics[t]['r2']:.4f}" for r in results]
        lines.append(f"| {t} (s) | " + " | ".join(cells) + " |")
    lines += ["", "| model | file | p50 latency | p99 latency | RSS of loading |",
              "|---|---|---|---|---|"]
    lines += [
        f"| {r.name} | {_size(r.size_bytes)} | {r.p50_us:.1f} µs | {r.p99_us:.1f} µs "
        f"| {_size(r.rss_bytes)} |"
        for r in results
    ]
    return "\n".join(lines)


def checks(results: list[Result]) -> list[tuple[str, bool]]:
    """The issue's targets, each with whether it holds."""
    forest, flt, q8 = results
    return [
        ("int8 MAE < forest MAE on every target",
         all(q8.metrics[t]["mae"] < forest.metrics[t]["mae"] for t in TARGETS)),
        ("int8 R² > forest R² on every target",
         all(q8.metrics[t]["r2"] > forest.metrics[t]["r2"] for t in TARGETS)),
        ("int8 file <= 50 KB", q8.size_bytes <= 50_000),
        ("int8 p99 <= 1 ms", q8.p99_us <= 1000.0),
        ("int8 >= 20x faster than the forest (p50 and p99)",
         forest.p50_us >= 20 * q8.p50_us and forest.p99_us >= 20 * q8.p99_us),
        ("int8 MAE within 2 % of float on every target",
         all(q8.metrics[t]["mae"] <= 1.02 * flt.metrics[t]["mae"] for t in TARGETS)),
    ]


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
    import sklearn  # noqa: PLC0415

    backend, _ = interpreter_backend()
    return (f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}, "
            f"scikit-learn {sklearn.__version__}, TFLite backend {backend}")


def report(results: list[Result], ds: Dataset, runs: int) -> str:
    """The section of docs/ml.md that this command writes."""
    lines = [
        f"Command: `{COMMAND}` (under a minute here; {runs} single-sample runs per model).",
        "",
        f"Machine: {machine()}.",
        "",
        f"Held-out split: {len(ds.x_test)} samples of dataset seed {ds.seed} "
        f"(sha256 `{ds.sha256()[:16]}…`); all three trained on the same "
        f"{len(ds.x_train)}-sample training split.",
        "",
        table(results),
        "",
        *(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks(results)),
    ]
    return "\n".join(lines)


def _write_doc(section: str, doc: Path) -> None:
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    doc.write_text(text, encoding="utf-8")


def _dataset(metadata: Mapping[str, Any]) -> Dataset:
    info = metadata["dataset"]
    ds = generate(n=info["n"], seed=info["seed"], test_fraction=info["test"] / info["n"])
    if ds.sha256() != info["sha256"]:
        raise SystemExit("the regenerated dataset differs from the one the models were "
                         "trained on (rules.rb or models.dataset changed): retrain first")
    return ds


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print the report, and rewrite the results section of docs/ml.md."""
    parser = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__)
    parser.add_argument("--runs", type=int, default=2000, help="latency runs per model")
    parser.add_argument("--trees", type=int, default=100, help="trees in the forest")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite docs/ml.md")
    parser.add_argument("--rss-child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        _rss_child(*args.rss_child)
        return 0
    ds = _dataset(json.loads(DEFAULT_METADATA.read_text(encoding="utf-8")))
    results = evaluate(ds, runs=args.runs, trees=args.trees)
    section = report(results, ds, args.runs)
    print(section)
    if not args.no_write:
        _write_doc(section, DOC)
    return 0 if all(ok for _, ok in checks(results)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
