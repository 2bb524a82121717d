"""The ML training data: reproducible, documented interactions, RB underneath, noise as asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.dataset import FEATURES, RANGES, TARGETS, Interactions, clean_targets, generate
from rules.rb import RbThresholds, rb_seconds

METADATA = Path(__file__).resolve().parent.parent / "models" / "metadata.json"
K = Interactions()
T = RbThresholds()


def row(**values: float) -> np.ndarray:
    """One feature row: a calm plant (everything in band, mild weather) changed by ``values``."""
    base = {"tds": 700.0, "ph": 6.0, "air_temp": 22.0, "humidity": 60.0,
            "water_temp": 20.0, "water_level": 1.8}
    base.update(values)
    return np.array([[base[f] for f in FEATURES]])


def labels(**values: float) -> dict[str, float]:
    y = clean_targets(row(**values))[0]
    return dict(zip(TARGETS, y.tolist(), strict=True))


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b, c = generate(n=500, seed=1), generate(n=500, seed=1), generate(n=500, seed=2)
    assert a.sha256() == b.sha256()
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert a.sha256() != c.sha256()


def test_committed_models_were_trained_on_this_exact_dataset() -> None:
    """If rules.rb or the generator changes, the dataset hash changes: retrain."""
    info = json.loads(METADATA.read_text())["dataset"]
    ds = generate(n=info["n"], seed=info["seed"], test_fraction=info["test"] / info["n"])
    assert ds.sha256() == info["sha256"]
    assert len(ds.x_train) == info["train"] and len(ds.x_test) == info["test"]
    assert info["n"] == 40_000


def test_split_shapes_and_disjoint() -> None:
    ds = generate(n=4000, seed=123, test_fraction=0.25)
    assert ds.x_train.shape == (3000, len(FEATURES)) and ds.y_train.shape == (3000, len(TARGETS))
    assert ds.x_test.shape == (1000, len(FEATURES))
    train_rows = {r.tobytes() for r in ds.x_train}
    assert not any(r.tobytes() in train_rows for r in ds.x_test)
    with pytest.raises(ValueError):
        generate(n=10, test_fraction=1.0)


def test_features_inside_the_training_range_and_labels_non_negative() -> None:
    ds = generate(n=4000, seed=5)
    x = np.vstack([ds.x_train, ds.x_test])
    for i, name in enumerate(FEATURES):
        low, high = RANGES[name]
        assert x[:, i].min() >= low and x[:, i].max() <= high
    assert (ds.y_train >= 0).all() and (ds.y_test >= 0).all()


def test_calm_plant_needs_nothing() -> None:
    assert labels() == {"ph_up": 0.0, "ph_down": 0.0, "nutrient": 0.0, "refill": 0.0}


def test_labels_are_rb_where_no_interaction_applies() -> None:
    for ph, ppm, level in [(5.0, 700, 1.8), (7.2, 700, 1.8), (6.0, 400, 1.8),
                           (6.0, 900, 1.8), (6.0, 700, 1.0), (4.0, 1500, 0.5)]:
        rb = rb_seconds(ph, ppm, level)
        got = labels(ph=ph, tds=ppm, water_level=level)
        expected_nutrient = 0.0 if not T.ph_low <= ph <= T.ph_high else rb.nutrient
        assert got == pytest.approx({"ph_up": rb.ph_up, "ph_down": rb.ph_down,
                                     "nutrient": expected_nutrient, "refill": rb.refill})


def test_interaction_1_no_nutrient_while_ph_out_of_band() -> None:
    assert labels(tds=450, ph=6.0)["nutrient"] == pytest.approx(63.0)
    assert labels(tds=450, ph=5.49)["nutrient"] == 0.0
    assert labels(tds=450, ph=6.51)["nutrient"] == 0.0


def test_interaction_2_smaller_nutrient_dose_when_hot() -> None:
    cool = labels(tds=500)["nutrient"]
    assert labels(tds=500, air_temp=K.heat_start_c)["nutrient"] == pytest.approx(cool)
    assert labels(tds=500, air_temp=32)["nutrient"] == pytest.approx(cool * 0.8)
    assert labels(tds=500, air_temp=45)["nutrient"] == pytest.approx(cool * K.heat_min_factor)


def test_interaction_3_more_refill_when_dry_while_there_is_room() -> None:
    assert labels(humidity=40)["refill"] == 0.0
    assert labels(humidity=20)["refill"] == pytest.approx(20 * K.dry_refill_s_per_pct)
    assert labels(humidity=20, water_level=2.6)["refill"] == 0.0  # tank full: no top-up
    low = rb_seconds(6.0, 700, 1.0).refill
    assert labels(humidity=20, water_level=1.0)["refill"] == pytest.approx(low + 30)


def test_interaction_4_cooling_refill_above_28c_capped() -> None:
    assert labels(water_temp=28)["refill"] == 0.0
    assert labels(water_temp=31)["refill"] == pytest.approx(3 * K.cool_refill_s_per_c)
    assert labels(water_temp=40, humidity=0, tds=900)["refill"] == T.cap_refill_s


def test_noise_only_on_non_zero_labels_with_five_percent_sigma() -> None:
    ds = generate(n=20_000, seed=9)
    x, y = np.vstack([ds.x_train, ds.x_test]), np.vstack([ds.y_train, ds.y_test])
    clean = clean_targets(x)
    assert (y[clean == 0] == 0).all()
    for j in range(len(TARGETS)):
        # Far from 0 and below the caps, the noise is untouched by clipping.
        mid = (clean[:, j] > 20) & (clean[:, j] < 40)
        sigma = np.std(y[mid, j] - clean[mid, j])
        assert sigma == pytest.approx(0.05 * np.ptp(clean[:, j]), rel=0.15)
