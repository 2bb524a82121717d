"""Train the dosing network and export it as int8 and float32 TFLite, with its metadata.

Run in the training venv (TensorFlow is never needed on the Pi)::

    python3 -m venv .venv-train
    .venv-train/bin/pip install tensorflow-cpu numpy scikit-learn ai-edge-litert
    .venv-train/bin/python -m models.train

(TensorFlow 2.21 no longer has ``tf.lite.Interpreter``; ``ai-edge-litert``
runs the exported files to measure them.)

It regenerates the dataset from its seed (:func:`models.dataset.generate`),
trains a small network — one fully connected tower per target, see
:func:`_train` — on the training split with fixed seeds and deterministic
ops, and writes next to this module (or to ``--out``):

- ``hydro_int8.tflite`` — full-integer quantised: int8 weights, int8
  activations *and* int8 input/output tensors, calibrated on a
  representative sample of the training split. int8 I/O rather than float I/O
  with int8 internals because the runtime scales every feature in numpy
  anyway, so folding the quantisation into that affine map costs nothing,
  keeps quantise/dequantise ops out of the graph, and leaves a file that an
  integer-only accelerator could run unchanged. The training-range guard
  runs before quantisation, so an input never saturates silently.
- ``hydro_float.tflite`` — the same network in float32, so
  :mod:`models.evaluate` can measure what quantisation costs without TensorFlow.
- ``metadata.json`` — feature order, ranges, scaling, units, dataset seed and
  SHA-256, file hashes, test-split metrics and this command.

Input scaling: every model input is one feature mapped from ``[low, high]``
to ``[0, 1]`` (see :data:`INPUTS`). Because an int8 input tensor has one
scale for all inputs and only 256 levels, the features whose doses change
steeply in a narrow region (ppm near the band, pH near its band, the
temperatures and humidity above/below the interaction edges) are fed a
second time "zoomed" on that region; at the label's step edges the window
is so narrow that it is an indicator input. Outputs are seconds divided by each
target's cap (RB caps), so all four have the same scale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from models.dataset import FEATURES, RANGES, TARGETS, Dataset, Interactions, generate
from models.evaluate import metrics
from models.runtime import DEFAULT_METADATA, DEFAULT_MODEL, InputScale, InputScaler, Model
from rules.controller import PlantConstants
from rules.rb import RbThresholds

__all__ = ["INPUTS", "OUTPUT_SCALE", "main", "scale_inputs"]

FLOAT_MODEL = DEFAULT_MODEL.with_name("hydro_float.tflite")
COMMAND = ".venv-train/bin/python -m models.train"

_THRESHOLDS = RbThresholds()

#: (feature, low, high) per model input: every feature over its training
#: range, then zoomed windows where the labels change steeply.
INPUTS: tuple[tuple[str, float, float], ...] = (
    *((f, *RANGES[f]) for f in FEATURES),
    ("tds", 440.0, 580.0),  # nutrient ramp below 560 ppm (0.63 s per ppm)
    ("tds", 836.0, 860.0),  # dilution refill jumps 0 -> 120 s between 840 and 856 ppm
    ("ph", 4.4, 7.6),  # the pH doses ramp between the band edges and their caps
    ("ph", 5.495, 5.505),  # nutrient is skipped below pH 5.5 ...
    ("ph", 6.495, 6.505),  # ... and above 6.5: steps, not ramps
    ("air_temp", 25.0, 40.0),  # nutrient reduction above 28 °C
    ("humidity", 0.0, 45.0),  # evaporation refill below 40 % RH
    ("water_temp", 25.0, 40.0),  # cooling refill above 28 °C
    ("water_level", 1.195, 1.205),  # 60 s refill below 1.2 L: a step
    ("water_level", 2.495, 2.505),  # no top-up above 2.5 L: a step
)

#: Seconds that a model output of 1.0 stands for, per target: the RB caps.
OUTPUT_SCALE: dict[str, float] = {
    "ph_up": _THRESHOLDS.cap_ph_s,
    "ph_down": _THRESHOLDS.cap_ph_s,
    "nutrient": _THRESHOLDS.cap_nutrient_s,
    "refill": _THRESHOLDS.cap_refill_s,
}

HIDDEN = (32, 32)
ZERO_MARGIN = 0.02  # of each target's scale: 1 s of pH pump, 2.4 s of refill
EPOCHS = 300
BATCH = 128
SEED = 7
CALIBRATION_ROWS = 2000


def scale_inputs(x: np.ndarray) -> np.ndarray:
    """Feature rows (``FEATURES`` order) to float32 model inputs, as the runtime scales them."""
    scaler = InputScaler(tuple(InputScale(*i) for i in INPUTS), FEATURES)
    return scaler(x).astype(np.float32)


def _train(ds: Dataset, epochs: int, hidden: tuple[int, ...]) -> Any:
    import keras  # noqa: PLC0415 - only in the training venv
    import tensorflow as tf  # noqa: PLC0415

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    scale = np.array([OUTPUT_SCALE[t] for t in TARGETS], dtype=np.float32)
    x, y = scale_inputs(ds.x_train), (ds.y_train / scale).astype(np.float32)
    # "No dose" is trained as a small negative target, so that after the
    # export's ReLU it stays an exact 0 even when int8 rounding nudges the
    # last layer's sum: a margin of several output quantisation steps.
    y = np.where(y > 0.0, y, -ZERO_MARGIN).astype(np.float32)

    # One small tower per target: in an int8 model every tensor has one scale,
    # so a shared layer would quantise the small nutrient and pH signals with
    # the step size of the large refill one. A linear output while training
    # (a ReLU output can die and never recover); the export adds the ReLU.
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
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
    model.fit(x, y, epochs=epochs, batch_size=BATCH, shuffle=True, verbose=2)
    return model


def _export(trained: Any, ds: Dataset) -> tuple[bytes, bytes]:
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    # Seconds are >= 0: a final ReLU (fused into the last layer by the
    # converter) makes "no dose" an exact zero, also after quantisation.
    model = keras.Sequential([keras.Input(shape=(len(INPUTS),)), trained, keras.layers.ReLU()])
    float_bytes = tf.lite.TFLiteConverter.from_keras_model(model).convert()

    calibration = scale_inputs(ds.x_train[:CALIBRATION_ROWS])

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
    ds: Dataset, files: dict[Path, bytes], epochs: int, hidden: tuple[int, ...]
) -> dict[str, Any]:
    import tensorflow as tf  # noqa: PLC0415

    plant = PlantConstants()
    t = _THRESHOLDS
    return {
        "format": 1,
        "features": list(FEATURES),
        "targets": list(TARGETS),
        "units": {
            "tds": "ppm", "ph": "pH", "air_temp": "°C", "humidity": "% RH",
            "water_temp": "°C", "water_level": "L",
            **dict.fromkeys(TARGETS, "s"),
        },
        "ranges": {f: list(RANGES[f]) for f in FEATURES},
        "inputs": [{"feature": f, "low": lo, "high": hi} for f, lo, hi in INPUTS],
        "outputs": {tgt: {"scale_s": OUTPUT_SCALE[tgt]} for tgt in TARGETS},
        "files": {
            p.name: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
            for p, b in files.items()
        },
        "bands": {"tds": [t.ppm_low, t.ppm_high], "ph": [t.ph_low, t.ph_high]},
        "plant": {
            "tank_volume_l": plant.tank_volume_l,
            "stock_ppm": plant.stock_ppm,
            "flow_ml_s": dict(plant.flow_ml_s),
        },
        "rb_thresholds": asdict(t),
        "interactions": asdict(Interactions()),
        "dataset": {
            "n": len(ds.x_train) + len(ds.x_test),
            "train": len(ds.x_train),
            "test": len(ds.x_test),
            "seed": ds.seed,
            "sha256": ds.sha256(),
            "generator": "models.dataset.generate",
        },
        "training": {
            "command": COMMAND + (f" --epochs {epochs}" if epochs != EPOCHS else "")
            + (f" --hidden {' '.join(map(str, hidden))}" if hidden != HIDDEN else ""),
            "tensorflow": tf.__version__,
            "hidden_per_target_tower": list(hidden),
            "activation": "relu; linear output in training, relu appended for export",
            "loss": "mse on seconds / scale_s; zero labels trained as -zero_margin",
            "zero_margin": ZERO_MARGIN,
            "optimizer": "adam, cosine decay from 3e-3",
            "epochs": epochs,
            "batch": BATCH,
            "seed": SEED,
            "calibration_rows": CALIBRATION_ROWS,
            "quantization": "hydro_int8.tflite: full-integer int8 (weights, activations, I/O)",
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Train, export and write the metadata; print the test-split metrics."""
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN))
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL.parent,
                        help="directory for the .tflite files and metadata.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    hidden = tuple(args.hidden)
    int8_path, float_path = args.out / DEFAULT_MODEL.name, args.out / FLOAT_MODEL.name
    meta_path = args.out / DEFAULT_METADATA.name

    ds = generate()
    model = _train(ds, args.epochs, hidden)
    float_bytes, int8_bytes = _export(model, ds)
    files = {int8_path: int8_bytes, float_path: float_bytes}
    for path, content in files.items():
        path.write_bytes(content)
    meta = _metadata(ds, files, args.epochs, hidden)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    meta["metrics"] = {}
    for label, path in (("float", float_path), ("int8", int8_path)):
        predicted = Model.load(path, meta_path).run_many(ds.x_test)
        meta["metrics"][label] = metrics(ds.y_test, predicted)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    json.dump(meta["metrics"], sys.stdout, indent=1)
    print(f"\nint8 {len(int8_bytes)} B, float {len(float_bytes)} B")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
