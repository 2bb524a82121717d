"""The TFLite runtime: verified loading, guards, and the issue's accuracy/size/speed targets.

The accuracy check recomputes MAE and R² of the committed int8 and float
models on 2,000 rows of the held-out split and compares them with a random
forest trained here on the same training split. To keep the test fast the
forest has 50 trees instead of the documentation's 100, so it is a slightly
weaker baseline than the forest of docs/ml.md — against which
``python -m models.evaluate`` checks the same thresholds.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.dataset import FEATURES, RANGES, TARGETS, Dataset, generate
from models.evaluate import latency_us, metrics, train_forest
from models.runtime import (
    DEFAULT_METADATA,
    DEFAULT_MODEL,
    InputRangeError,
    Model,
    ModelFileError,
    ModelSpec,
    load_interpreter,
)

FLOAT_MODEL = DEFAULT_MODEL.with_name("hydro_float.tflite")
SAMPLE = 2000


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    info = json.loads(DEFAULT_METADATA.read_text())["dataset"]
    return generate(n=info["n"], seed=info["seed"], test_fraction=info["test"] / info["n"])


@pytest.fixture(scope="module")
def int8() -> Model:
    return Model.load(DEFAULT_MODEL, DEFAULT_METADATA)


@pytest.fixture(scope="module")
def results(dataset: Dataset, int8: Model) -> dict[str, Any]:
    x, y = dataset.x_test[:SAMPLE], dataset.y_test[:SAMPLE]
    forest = train_forest(dataset, trees=50)
    return {
        "forest": metrics(y, forest.predict(x)),
        "float": metrics(y, Model.load(FLOAT_MODEL, DEFAULT_METADATA).run_many(x)),
        "int8": metrics(y, int8.run_many(x)),
        "forest_model": forest,
    }


def calm() -> dict[str, float]:
    return {"tds": 700.0, "ph": 6.0, "air_temp": 22.0, "humidity": 60.0,
            "water_temp": 20.0, "water_level": 1.8}


def copy_model(tmp_path: Path, content: bytes | None = None, *, rehash: bool) -> Path:
    """The int8 model (or ``content``) with a copy of the metadata in ``tmp_path``."""
    path = tmp_path / DEFAULT_MODEL.name
    path.write_bytes(DEFAULT_MODEL.read_bytes() if content is None else content)
    meta = json.loads(DEFAULT_METADATA.read_text())
    if rehash:
        meta["files"][path.name]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    return path


# --- the targets --------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_int8_beats_the_forest_on_every_target(results: dict[str, Any], target: str) -> None:
    q8, forest = results["int8"][target], results["forest"][target]
    assert q8["mae"] < forest["mae"]
    assert q8["r2"] > forest["r2"]


@pytest.mark.parametrize("target", TARGETS)
def test_int8_within_two_percent_of_float(results: dict[str, Any], target: str) -> None:
    assert results["int8"][target]["mae"] <= 1.02 * results["float"][target]["mae"]


def test_int8_file_is_small_and_full_integer(int8: Model) -> None:
    assert DEFAULT_MODEL.stat().st_size <= 50_000
    assert int8.quantized
    assert not Model.load(FLOAT_MODEL, DEFAULT_METADATA).quantized


def test_int8_p99_under_a_millisecond_and_20x_faster_than_the_forest(
    dataset: Dataset, int8: Model, results: dict[str, Any]
) -> None:
    rows = [dict(zip(FEATURES, r.tolist(), strict=True)) for r in dataset.x_test[:500]]
    p50, p99 = latency_us(lambda i: int8.predict(rows[i % 500]), 2000)
    forest = results["forest_model"]
    f50, f99 = latency_us(lambda i: forest.predict(dataset.x_test[i : i + 1]), 100)
    assert p99 <= 1000.0
    assert f50 >= 20 * p50 and f99 >= 20 * p99


def test_committed_metrics_match_a_recomputation(dataset: Dataset, int8: Model) -> None:
    recorded = json.loads(DEFAULT_METADATA.read_text())["metrics"]["int8"]
    again = metrics(dataset.y_test, int8.run_many(dataset.x_test))
    for target in TARGETS:  # the same kernels give the same numbers; allow for other CPUs
        assert again[target] == pytest.approx(recorded[target], abs=0.01)


# --- predict: scaling and guards -----------------------------------------


def test_predict_returns_seconds_per_target(int8: Model) -> None:
    assert int8.predict(calm()) == pytest.approx(dict.fromkeys(TARGETS, 0.0), abs=1.0)
    low_ph = int8.predict({**calm(), "ph": 4.9})  # RB: (5.5 - 4.9) * 50 = 30 s
    assert low_ph["ph_up"] == pytest.approx(30.0, abs=3.0)
    assert low_ph["ph_down"] < 1.0 and low_ph["nutrient"] < 1.0
    hungry = int8.predict({**calm(), "tds": 500.0})  # RB: 60 ppm -> 37.97 s
    assert hungry["nutrient"] == pytest.approx(37.97, abs=3.0)


@pytest.mark.parametrize(
    ("key", "value"),
    [("tds", -1.0), ("tds", 2000.5), ("ph", 9.5), ("humidity", 101.0),
     ("water_level", 20.5), ("air_temp", math.nan), ("water_temp", math.inf)],
)
def test_inputs_outside_the_training_range_are_refused(int8: Model, key: str, value: float
                                                       ) -> None:
    with pytest.raises(InputRangeError, match=key):
        int8.predict({**calm(), key: value})


def test_range_edges_are_accepted_and_missing_inputs_refused(int8: Model) -> None:
    int8.predict({f: RANGES[f][0] for f in FEATURES})
    int8.predict({f: RANGES[f][1] for f in FEATURES})
    values = calm()
    del values["humidity"]
    with pytest.raises(InputRangeError, match="humidity"):
        int8.predict(values)


# --- load: hash, corruption, backends -------------------------------------


def test_missing_model_or_metadata(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="cannot read model"):
        Model.load(tmp_path / "hydro_int8.tflite", DEFAULT_METADATA)
    with pytest.raises(ModelFileError, match="metadata"):
        Model.load(DEFAULT_MODEL, tmp_path / "metadata.json")


def test_corrupted_bytes_fail_the_hash(tmp_path: Path) -> None:
    content = bytearray(DEFAULT_MODEL.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path = copy_model(tmp_path, bytes(content), rehash=False)
    with pytest.raises(ModelFileError, match="sha256"):
        Model.load(path, tmp_path / "metadata.json")


def test_truncated_file_with_matching_hash_is_refused_by_the_interpreter(tmp_path: Path) -> None:
    content = DEFAULT_MODEL.read_bytes()
    path = copy_model(tmp_path, content[: len(content) // 2], rehash=True)
    with pytest.raises(ModelFileError, match="interpreter refused"):
        Model.load(path, tmp_path / "metadata.json")


def test_file_without_a_hash_in_the_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.tflite"
    shutil.copy(DEFAULT_MODEL, path)
    with pytest.raises(ModelFileError, match="no sha256"):
        Model.load(path, DEFAULT_METADATA)


def test_malformed_metadata(tmp_path: Path) -> None:
    bad = tmp_path / "metadata.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ModelFileError):
        ModelSpec.load(bad)
    meta = json.loads(DEFAULT_METADATA.read_text())
    del meta["ranges"]["ph"]
    bad.write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="malformed"):
        ModelSpec.load(bad)


def test_interpreter_backend_loads_from_bytes_or_path() -> None:
    interpreter = load_interpreter(DEFAULT_MODEL)
    (inp,) = interpreter.get_input_details()
    assert inp["dtype"] == np.int8
    with pytest.raises(ModelFileError, match="interpreter refused"):
        load_interpreter("junk", b"not a flatbuffer at all")
