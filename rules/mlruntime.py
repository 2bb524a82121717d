"""Run the committed TFLite dosing model: verified loading, scaling, quantisation, guards.

The Pi runs the model with whichever TFLite interpreter is installed
(``ai-edge-litert``, the older ``tflite-runtime``, or full TensorFlow when
present, e.g. in the training venv); no TensorFlow is needed at run time.

Everything the runtime needs to know about a model file is in
``models/metadata.json`` (written by :mod:`models.train`):

- the SHA-256 of every ``.tflite`` file: :meth:`Model.load` refuses a file
  whose bytes differ, and hands the interpreter the very bytes it hashed;
- the feature order and the *training range* of each feature:
  :meth:`Model.predict` refuses a feature outside it (the model was never
  taught what to do there, so the caller must fall back to RB);
- the input scaling (each model input is one feature mapped linearly from
  ``[low, high]`` to ``[0, 1]`` and clipped; a feature may appear twice, once
  over its whole range and once "zoomed" on the region where the answers
  change most, to give int8 inputs enough resolution there);
- the output scaling (model output × ``scale`` = the target, in its units).

A quantised file has int8 input and output tensors: the runtime quantises
and dequantises with the tensors' own scale and zero point. The float file
of the same network takes and returns float32; both go through the same
code, which is what lets :mod:`models.evaluate` compare them fairly.

A :class:`Model` is not reentrant (a TFLite interpreter is not); it is meant
to be used from one dedicated worker thread, and a lock makes accidental
concurrent use safe rather than corrupting.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_METADATA",
    "DEFAULT_MODEL",
    "InputRangeError",
    "InputScale",
    "InputScaler",
    "Interpreter",
    "Model",
    "ModelError",
    "ModelFileError",
    "ModelSpec",
    "OutputError",
    "interpreter_backend",
    "load_interpreter",
]

FloatArray = npt.NDArray[np.float64]

#: Where models/train.py writes the model files: the ``models`` package's folder, a
#: sibling of this one (in the source tree and in an installed venv alike). A path,
#: not an import: rules/ imports nothing above it, and the files are package data.
MODEL_DIR = Path(__file__).resolve().parent.parent / "models"
#: The committed int8 model and its metadata.
DEFAULT_MODEL = MODEL_DIR / "hydro_int8.tflite"
DEFAULT_METADATA = MODEL_DIR / "metadata.json"

#: Interpreter modules in order of preference.
_BACKENDS: tuple[str, ...] = (
    "ai_edge_litert.interpreter",
    "tflite_runtime.interpreter",
    "tensorflow.lite",
)


class ModelError(Exception):
    """Base of every error of the ML runtime: the caller should fall back to RB."""


class ModelFileError(ModelError):
    """The model or its metadata is missing, corrupt, or does not match its hash."""


class InputRangeError(ModelError):
    """A feature is missing, not finite, or outside the model's training range."""


class OutputError(ModelError):
    """The model produced a non-finite output."""


class Interpreter(Protocol):
    """The part of the TFLite ``Interpreter`` API the runtime uses."""

    def allocate_tensors(self) -> None: ...
    def get_input_details(self) -> list[dict[str, Any]]: ...
    def get_output_details(self) -> list[dict[str, Any]]: ...
    def set_tensor(self, tensor_index: int, value: npt.NDArray[Any]) -> None: ...
    def invoke(self) -> None: ...
    def get_tensor(self, tensor_index: int) -> npt.NDArray[Any]: ...


def interpreter_backend() -> tuple[str, Callable[..., Interpreter]]:
    """The first installed TFLite backend: its module name and its ``Interpreter`` class.

    Raises :class:`ModelFileError` when none is installed.
    """
    for name in _BACKENDS:
        try:
            factory: Callable[..., Interpreter] = importlib.import_module(name).Interpreter
        except (ImportError, AttributeError):  # recent TensorFlow dropped tf.lite.Interpreter
            continue
        return name, factory
    raise ModelFileError(f"no TFLite interpreter installed (tried {', '.join(_BACKENDS)})")


def load_interpreter(path: str | Path, content: bytes | None = None) -> Interpreter:
    """A TFLite interpreter with tensors allocated, from the first backend that imports.

    ``content`` (the file's bytes, already read and verified) is used when
    given, so that what runs is exactly what was hashed. Raises
    :class:`ModelFileError` when no backend is installed or the interpreter
    refuses the file.
    """
    if content is None:
        try:
            content = Path(path).read_bytes()
        except OSError as exc:
            raise ModelFileError(f"cannot read model {path}: {exc}") from exc
    _, factory = interpreter_backend()
    try:
        interpreter = factory(model_content=content, num_threads=1)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelFileError(f"interpreter refused {path}: {exc}") from exc
    return interpreter


@dataclass(frozen=True)
class InputScale:
    """One model input: ``feature`` mapped from ``[low, high]`` to ``[0, 1]``, clipped."""

    feature: str
    low: float
    high: float


@dataclass(frozen=True)
class ModelSpec:
    """What ``metadata.json`` says about the model files (see the module docstring)."""

    features: tuple[str, ...]
    targets: tuple[str, ...]
    ranges: Mapping[str, tuple[float, float]]
    inputs: tuple[InputScale, ...]
    output_scale: Mapping[str, float]
    sha256: Mapping[str, str]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Parse the metadata document; raises :class:`ModelFileError` if it is malformed."""
        try:
            features = tuple(str(f) for f in data["features"])
            spec = cls(
                features=features,
                targets=tuple(str(t) for t in data["targets"]),
                ranges=MappingProxyType(
                    {f: _pair(data["ranges"][f]) for f in features}
                ),
                inputs=tuple(
                    InputScale(str(i["feature"]), float(i["low"]), float(i["high"]))
                    for i in data["inputs"]
                ),
                output_scale=MappingProxyType(
                    {str(t): float(o["scale"]) for t, o in data["outputs"].items()}
                ),
                sha256=MappingProxyType(
                    {str(name): str(f["sha256"]) for name, f in data["files"].items()}
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"malformed model metadata: {exc!r}") from exc
        unknown = {i.feature for i in spec.inputs} - set(features)
        if unknown or set(spec.output_scale) != set(spec.targets):
            raise ModelFileError("model metadata: inputs/outputs do not match features/targets")
        return spec

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        """Read and parse a ``metadata.json``."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"cannot read model metadata {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelFileError(f"model metadata {path} is not a JSON object")
        return cls.from_json(data)


def _pair(value: Any) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not low < high:
        raise ValueError(f"range {value!r} is empty")
    return (low, high)


class InputScaler:
    """Feature rows (in ``features`` order) to model inputs in ``[0, 1]``, per :class:`InputScale`.

    Works on one row or a 2-D array of rows; shared by the runtime and
    :mod:`models.train`, so training and inference scale identically.
    """

    def __init__(self, inputs: tuple[InputScale, ...], features: tuple[str, ...]) -> None:
        column = {f: i for i, f in enumerate(features)}
        self._cols = np.array([column[i.feature] for i in inputs])
        self._low = np.array([i.low for i in inputs])
        self._span = np.array([i.high - i.low for i in inputs])

    def __call__(self, x: FloatArray) -> FloatArray:
        scaled: FloatArray = np.clip((x[..., self._cols] - self._low) / self._span, 0.0, 1.0)
        return scaled


class Model:
    """A verified, allocated TFLite model with its scaling: features in, targets out."""

    def __init__(self, interpreter: Interpreter, spec: ModelSpec, name: str) -> None:
        self.spec = spec
        self.name = name
        self._interpreter = interpreter
        self._lock = threading.Lock()
        (inp,) = interpreter.get_input_details()
        (out,) = interpreter.get_output_details()
        n_in, n_out = len(spec.inputs), len(spec.targets)
        if tuple(inp["shape"]) != (1, n_in) or tuple(out["shape"]) != (1, n_out):
            raise ModelFileError(
                f"{name}: tensor shapes {tuple(inp['shape'])} -> {tuple(out['shape'])} "
                f"do not match the metadata ({n_in} inputs, {n_out} outputs)"
            )
        self._in_index: int = inp["index"]
        self._out_index: int = out["index"]
        self._in_dtype = np.dtype(inp["dtype"])
        self._in_q: tuple[float, int] = inp["quantization"]
        self._out_q: tuple[float, int] = out["quantization"]
        self._scale = InputScaler(spec.inputs, spec.features)
        self._out_scale = np.array([spec.output_scale[t] for t in spec.targets])
        self._range_low = np.array([spec.ranges[f][0] for f in spec.features])
        self._range_high = np.array([spec.ranges[f][1] for f in spec.features])

    @property
    def quantized(self) -> bool:
        """Whether the file takes int8 inputs (full-integer quantisation)."""
        return bool(self._in_dtype == np.int8)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_MODEL,
             metadata_path: str | Path = DEFAULT_METADATA) -> Model:
        """Load ``path`` after checking its SHA-256 against ``metadata_path``.

        Raises :class:`ModelFileError` when either file is missing or
        malformed, the file has no hash in the metadata or a different one, or
        the interpreter refuses it.
        """
        path = Path(path)
        spec = ModelSpec.load(metadata_path)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"cannot read model {path}: {exc}") from exc
        expected = spec.sha256.get(path.name)
        if expected is None:
            raise ModelFileError(f"{path.name} has no sha256 in {metadata_path}")
        actual = hashlib.sha256(content).hexdigest()
        if actual != expected:
            raise ModelFileError(
                f"{path.name}: sha256 {actual[:12]}… does not match the metadata's {expected[:12]}…"
            )
        model = cls(load_interpreter(path, content), spec, path.name)
        model.warm_up()
        return model

    def warm_up(self) -> None:
        """Run once on the middle of the training range, so the first real call is fast.

        Also proves that the file really runs: raises :class:`ModelFileError`
        if it fails or returns non-finite values.
        """
        middle = (self._range_low + self._range_high) / 2.0
        try:
            out = self.run(middle)
        except ModelError as exc:
            raise ModelFileError(f"{self.name} does not run: {exc}") from exc
        if not np.isfinite(out).all():
            raise ModelFileError(f"{self.name} returns non-finite values")

    def check(self, features: Mapping[str, float]) -> FloatArray:
        """The feature row for ``features``; raises :class:`InputRangeError` if unusable."""
        try:
            row = np.array([float(features[f]) for f in self.spec.features])
        except KeyError as exc:
            raise InputRangeError(f"missing input {exc.args[0]!r}") from exc
        bad = ~((row >= self._range_low) & (row <= self._range_high))  # NaN is bad too
        if bad.any():
            first = int(np.argmax(bad))
            name = self.spec.features[first]
            low, high = self.spec.ranges[name]
            raise InputRangeError(
                f"{name}={row[first]:g} outside the training range {low:g}..{high:g}"
            )
        return row

    def predict(self, features: Mapping[str, float]) -> dict[str, float]:
        """Each target's value for one feature mapping (keys: ``spec.features``).

        Raises :class:`InputRangeError` for a missing, non-finite or
        out-of-range feature and :class:`OutputError` for a non-finite output.
        """
        values = self.run(self.check(features))
        if not np.isfinite(values).all():
            raise OutputError(f"{self.name} returned non-finite outputs {values.tolist()}")
        return {t: float(v) for t, v in zip(self.spec.targets, values, strict=True)}

    def run(self, row: FloatArray) -> FloatArray:
        """Each target's value for one feature row in ``spec.features`` order (no guard).

        Negative outputs are clipped to 0 (a pump cannot run for less than
        nothing); anything else is left to the caller and the safety layer.
        """
        scaled = self._scale(row)
        if self.quantized:
            scale, zero = self._in_q
            tensor = np.clip(np.round(scaled / scale) + zero, -128, 127).astype(np.int8)
        else:
            tensor = scaled.astype(self._in_dtype)
        with self._lock:
            try:
                self._interpreter.set_tensor(self._in_index, tensor[np.newaxis, :])
                self._interpreter.invoke()
                raw = self._interpreter.get_tensor(self._out_index)[0]
            except (ValueError, RuntimeError) as exc:
                raise ModelError(f"{self.name}: inference failed: {exc}") from exc
        if self.quantized:
            scale, zero = self._out_q
            out = (raw.astype(np.float64) - zero) * scale
        else:
            out = raw.astype(np.float64)
        values: FloatArray = np.maximum(out * self._out_scale, 0.0)
        return values

    def run_many(self, x: FloatArray) -> FloatArray:
        """:meth:`run` for every row of ``x`` (evaluation helper; one invoke per row)."""
        if len(x) == 0:
            return np.zeros((0, len(self.spec.targets)))
        return np.stack([self.run(row) for row in x])
