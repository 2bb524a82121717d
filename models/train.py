"""Train the dosing network on the closed-loop data; export int8 and float32 TFLite and metadata.

Run in the training venv (TensorFlow is never needed on the Pi)::

    python3 -m venv .venv-train
    .venv-train/bin/pip install -e ".[train]"
    .venv/bin/python -m models.closedloop --jobs 2     # the data, if not there yet
    .venv-train/bin/python -m models.train

It reads the training split that :mod:`models.closedloop` wrote beside the
committed held-out split (``models/train.npz``, not committed: regenerated
from its seed), trains a small network with fixed seeds and deterministic
ops, and writes next to this module (or to ``--out``):

- ``hydro_int8.tflite`` — full-integer quantised: int8 weights, int8
  activations *and* int8 input/output tensors, calibrated on a sample of
  the training split. int8 I/O rather than float I/O with int8 internals
  because the runtime scales every feature in numpy anyway, so folding the
  quantisation into that affine map costs nothing, keeps
  quantise/dequantise ops out of the graph, and leaves a file that an
  integer-only accelerator could run unchanged. The training-range guard
  runs before quantisation, so an input never saturates silently.
- ``hydro_float.tflite`` — the same network in float32, so
  :mod:`models.evaluate` can measure what quantisation costs.
- ``metadata.json`` — feature order, ranges, scaling, both splits' SHA-256
  and seeds, file hashes, held-out metrics and this command.

**The loss.** A label is the landing dose of one tank; the gateway cannot
tell that tank from others whose config is wrong the other way (the same
features, another truth). Mean squared error would answer with the mean
landing dose — past the setpoint on half of them. Each output is trained
with the pinball (quantile) loss at :data:`rules.mlpolicy.QUANTILE`: the
answer is the largest fraction that lands past the aim on at most that
share of the decisions that look the same. Each row trains only its own
loop's output (the other output's loss is masked).

**The network.** One small fully connected tower per target (an int8
tensor has one scale: a shared layer would quantise both loops' signals
with one step size), a linear output while training (a ReLU output can
die), and a ReLU appended for the export (fractions are ≥ 0). Inputs are
each feature over its training range, plus "zoomed" copies (:data:`INPUTS`)
where a fine step matters: 256 int8 levels over the TDS error's whole range
are 0.7 % of the setpoint apart, too coarse for a trim.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from models.closedloop import AIM_PCT, DEFAULT_DATA, EPISODES, SEED, Dataset
from models.closedloop import COMMAND as DATA_COMMAND
from models.evaluate import metrics, pick
from rules.mlpolicy import FEATURES, OUTPUT_SCALE, QUANTILE, RANGES, TARGETS
from rules.mlruntime import DEFAULT_METADATA, DEFAULT_MODEL, InputScale, InputScaler, Model

__all__ = ["INPUTS", "main", "scale_inputs"]

FLOAT_MODEL = DEFAULT_MODEL.with_name("hydro_float.tflite")
COMMAND = ".venv-train/bin/python -m models.train"

#: (feature, low, high) per model input: every feature over its training range, then
#: zoomed windows where the answer needs a finer step than 1/256 of the range.
INPUTS: tuple[tuple[str, float, float], ...] = (
    *((f, *RANGES[f]) for f in FEATURES),
    ("tds_error", -0.15, 0.15),  # trims: the last few % to the setpoint
    ("ph_error", -0.6, 0.6),  # the last pH doses
    ("factor", 0.5, 2.0),  # the measured effect ratio sets the next dose's size
)

HIDDEN = (32, 32)
EPOCHS = 200
BATCH = 128
SEED_TRAIN = 7
CALIBRATION_ROWS = 2000


def scale_inputs(x: np.ndarray) -> np.ndarray:
    """Feature rows (``FEATURES`` order) to float32 model inputs, as the runtime scales them."""
    scaler = InputScaler(tuple(InputScale(*i) for i in INPUTS), FEATURES)
    return scaler(x).astype(np.float32)


def _targets(ds: Dataset) -> np.ndarray:
    """(n, len(TARGETS)): each row's label over its output's scale, NaN in the other column."""
    y = np.full((len(ds), len(TARGETS)), np.nan, dtype=np.float32)
    for i, target in enumerate(TARGETS):
        rows = ds.target == i
        y[rows, i] = ds.y[rows] / OUTPUT_SCALE[target]
    return y


def _train(ds: Dataset, epochs: int, hidden: tuple[int, ...]) -> Any:
    import keras  # noqa: PLC0415 - only in the training venv
    import tensorflow as tf  # noqa: PLC0415

    keras.utils.set_random_seed(SEED_TRAIN)
    tf.config.experimental.enable_op_determinism()
    x, y = scale_inputs(ds.x), _targets(ds)
    tau = tf.constant([QUANTILE[t] for t in TARGETS], dtype=tf.float32)

    def masked_pinball(y_true: Any, y_pred: Any) -> Any:
        mask = tf.math.is_finite(y_true)
        e = tf.where(mask, y_true, 0.0) - y_pred
        loss = tf.where(mask, tf.maximum(tau * e, (tau - 1.0) * e), 0.0)
        return tf.reduce_sum(loss, axis=-1)

    inputs = keras.Input(shape=(len(INPUTS),))
    towers = []
    for target in TARGETS:
        h = inputs
        for i, width in enumerate(hidden):
            h = keras.layers.Dense(width, activation="relu", name=f"{target}_{i}")(h)
        towers.append(keras.layers.Dense(1, name=target)(h))
    model = keras.Model(inputs, keras.layers.Concatenate()(towers))
    steps = epochs * int(np.ceil(len(x) / BATCH))
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=steps, alpha=0.01)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=masked_pinball)
    model.fit(x, y, epochs=epochs, batch_size=BATCH, shuffle=True, verbose=2)
    return model


def _export(trained: Any, ds: Dataset) -> tuple[bytes, bytes]:
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    model = keras.Sequential([keras.Input(shape=(len(INPUTS),)), trained, keras.layers.ReLU()])
    float_bytes = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    calibration = scale_inputs(ds.x[:: max(1, len(ds) // CALIBRATION_ROWS)][:CALIBRATION_ROWS])

    def representative() -> Any:
        for row in calibration:
            yield [row[np.newaxis, :]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return float_bytes, converter.convert()


def _metadata(
    train: Dataset, test: Dataset, files: dict[Path, bytes], epochs: int, hidden: tuple[int, ...]
) -> dict[str, Any]:
    import tensorflow as tf  # noqa: PLC0415

    command = COMMAND + (f" --epochs {epochs}" if epochs != EPOCHS else "") + (
        f" --hidden {' '.join(map(str, hidden))}" if hidden != HIDDEN else ""
    )
    return {
        "format": 2,
        "features": list(FEATURES),
        "targets": list(TARGETS),
        "units": {
            "tds_fraction": "of the need to the setpoint by the configured constants",
            "ph_fraction": "of the pH envelope's limit",
        },
        "ranges": {f: list(RANGES[f]) for f in FEATURES},
        "inputs": [{"feature": f, "low": lo, "high": hi} for f, lo, hi in INPUTS],
        "outputs": {t: {"scale": OUTPUT_SCALE[t], "quantile": QUANTILE[t]} for t in TARGETS},
        "files": {
            p.name: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
            for p, b in files.items()
        },
        "dataset": {
            "generator": "models.closedloop.generate",
            "command": DATA_COMMAND,
            "seed": SEED,
            "episodes": EPISODES,
            "aim_pct": AIM_PCT,
            "train_rows": len(train),
            "train_sha256": train.sha256(),
            "heldout_rows": len(test),
            "heldout_sha256": test.sha256(),
            "heldout_file": DEFAULT_DATA.name,
        },
        "training": {
            "command": command,
            "tensorflow": tf.__version__,
            "hidden_per_target_tower": list(hidden),
            "activation": "relu; linear output in training, relu appended for export",
            "loss": "pinball at each output's quantile, masked to the row's own loop",
            "optimizer": "adam, cosine decay from 3e-3",
            "epochs": epochs,
            "batch": BATCH,
            "seed": SEED_TRAIN,
            "calibration_rows": CALIBRATION_ROWS,
            "quantization": "hydro_int8.tflite: full-integer int8 (weights, activations, I/O)",
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Train, export and write the metadata; print the held-out metrics."""
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the held-out split; the training split is train.npz beside it")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL.parent,
                        help="directory for the .tflite files and metadata.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    hidden = tuple(args.hidden)
    train, test = Dataset.load(args.data.with_name("train.npz")), Dataset.load(args.data)
    int8_path, float_path = args.out / DEFAULT_MODEL.name, args.out / FLOAT_MODEL.name
    meta_path = args.out / DEFAULT_METADATA.name

    model = _train(train, args.epochs, hidden)
    float_bytes, int8_bytes = _export(model, train)
    files = {int8_path: int8_bytes, float_path: float_bytes}
    for path, content in files.items():
        path.write_bytes(content)
    meta = _metadata(train, test, files, args.epochs, hidden)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    meta["metrics"] = {}
    for label, path in (("float", float_path), ("int8", int8_path)):
        outputs = Model.load(path, meta_path).run_many(test.x)
        meta["metrics"][label] = metrics(test, pick(test, outputs))
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    json.dump(meta["metrics"], sys.stdout, indent=1)
    print(f"\nint8 {len(int8_bytes)} B, float {len(float_bytes)} B")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
