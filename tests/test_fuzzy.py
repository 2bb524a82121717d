"""The generic fuzzy engine: membership functions, Sugeno, Mamdani, vectorisation, no-rule."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules.fuzzy import (
    FuzzyError,
    FuzzySystem,
    Mf,
    Output,
    Rule,
    Variable,
    rules_from_table,
    trapmf,
    trimf,
)


def test_triangle_and_trapezoid() -> None:
    tri = trimf(-200, -100, 0)
    assert tri([-250, -200, -150, -100, -50, 0, 10]).tolist() == [0, 0, 0.5, 1, 0.5, 0, 0]
    trap = trapmf(0.1, 0.4, 1.5, 1.6)
    assert trap([0.1, 0.25, 0.4, 1.0, 1.5, 1.55, 1.6]) == pytest.approx(
        [0, 0.5, 1, 1, 1, 0.5, 0]
    )


def test_shoulders_like_the_firmware() -> None:
    left = trapmf(-250, -250, -200, -100)
    assert left([-1000, -250, -200, -150, -100, 0]).tolist() == [1, 1, 1, 0.5, 0, 0]
    right = trapmf(100, 200, 250, 250)
    assert right([0, 100, 150, 200, 250, 1000]).tolist() == [0, 0, 0.5, 1, 1, 1]


def test_nan_belongs_to_no_set_and_points_must_be_ordered() -> None:
    assert trimf(-1, 0, 1)(np.nan) == 0.0
    assert trapmf(-1, -1, 0, 1)([np.nan]).tolist() == [0.0]
    with pytest.raises(FuzzyError):
        Mf(0, 2, 1, 3)


# A small system computed by hand: one input, two outputs.
LEVEL = Variable("level", (0.0, 10.0), {"low": trapmf(0, 0, 2, 6), "high": trapmf(4, 8, 10, 10)})
SPEED = Output("speed", {"slow": 10.0, "fast": 30.0})
TIME = Output("time", {"none": 0.0, "some": 100.0, "lots": 300.0})
SMALL = FuzzySystem(
    inputs=(LEVEL,),
    outputs=(SPEED, TIME),
    rules=(
        Rule(("low",), {"speed": "fast", "time": "lots"}),
        Rule(("high",), {"speed": "slow", "time": "none"}),
    ),
)


def test_sugeno_by_hand() -> None:
    r = SMALL.sugeno(5.0)  # low 0.25, high 0.25
    assert r.outputs["speed"] == pytest.approx(20.0)
    assert r.outputs["time"] == pytest.approx(150.0)
    r = SMALL.sugeno(4.5)  # low 0.375, high 0.125
    assert r.outputs["speed"] == pytest.approx((0.375 * 30 + 0.125 * 10) / 0.5)
    assert r.outputs["time"] == pytest.approx(0.375 * 300 / 0.5)
    assert r.weight == pytest.approx(0.5)
    assert bool(r.fired)


def test_inputs_are_clamped_to_the_universe() -> None:
    r = SMALL.sugeno([-5.0, 0.0, 10.0, 50.0])
    assert r.outputs["speed"].tolist() == [30.0, 30.0, 10.0, 10.0]


def test_whole_grid_in_one_call() -> None:
    e, de = np.meshgrid(np.linspace(-1, 11, 301), np.linspace(-1, 11, 201))
    two = FuzzySystem(
        inputs=(LEVEL, LEVEL),
        outputs=(SPEED,),
        rules=rules_from_table(
            ("low", "high"), ("low", "high"), {"speed": [["fast", "fast"], ["slow", "slow"]]}
        ),
    )
    r = two.sugeno(e, de)
    assert r.outputs["speed"].shape == (201, 301)
    # The grid call equals point-by-point calls.
    for i, j in [(0, 0), (50, 120), (84, 126), (100, 150), (200, 300), (17, 250)]:
        point = two.sugeno(e[i, j], de[i, j]).outputs["speed"]
        assert r.outputs["speed"][i, j] == pytest.approx(float(point))
    # Where the second input is fully "low" or fully "high" it does not matter.
    assert r.outputs["speed"][0] == pytest.approx(SMALL.sugeno(e[0]).outputs["speed"])
    # Broadcasting: a scalar against a vector.
    assert two.sugeno(5.0, [0.0, 10.0]).outputs["speed"].shape == (2,)


def test_no_rule_fired_is_reported() -> None:
    gap = Variable("x", (0.0, 10.0), {"a": trimf(0, 1, 2), "b": trimf(8, 9, 10)})
    sys_ = FuzzySystem((gap,), (SPEED,), (Rule(("a",), {"speed": "slow"}),
                                          Rule(("b",), {"speed": "fast"})))
    r = sys_.sugeno([1.0, 5.0, np.nan, 9.0])
    assert r.fired.tolist() == [True, False, False, True]
    out = r.outputs["speed"]
    assert out[0] == 10.0 and out[3] == 30.0
    assert np.isnan(out[1]) and np.isnan(out[2])
    m = sys_.mamdani([1.0, 5.0])
    assert m.fired.tolist() == [True, False]
    assert m.outputs["speed"][0] == pytest.approx(10.0)
    assert np.isnan(m.outputs["speed"][1])


def test_definition_errors() -> None:
    with pytest.raises(FuzzyError, match="no set"):
        FuzzySystem((LEVEL,), (SPEED,), (Rule(("medium",), {"speed": "slow"}),))
    with pytest.raises(FuzzyError, match="no level"):
        FuzzySystem((LEVEL,), (SPEED,), (Rule(("low",), {"speed": "warp"}),))
    with pytest.raises(FuzzyError, match="no level"):
        FuzzySystem((LEVEL,), (SPEED,), (Rule(("low",), {}),))
    with pytest.raises(FuzzyError, match="antecedents"):
        FuzzySystem((LEVEL,), (SPEED,), (Rule(("low", "low"), {"speed": "slow"}),))
    with pytest.raises(FuzzyError, match="2x2"):
        rules_from_table(("a", "b"), ("c", "d"), {"speed": [["slow", "slow"]]})
    with pytest.raises(FuzzyError, match="universe"):
        Variable("x", (1.0, 1.0), {"a": trimf(0, 1, 2)})
    with pytest.raises(FuzzyError, match="distinct"):
        Output("y", {"a": 1.0, "b": 1.0})
    with pytest.raises(FuzzyError, match="expected 1 inputs"):
        SMALL.sugeno(1.0, 2.0)
    with pytest.raises(FuzzyError, match="method"):
        SMALL.evaluate(1.0, method="tsukamoto")  # type: ignore[arg-type]


def test_mamdani_output_sets_are_symmetric_around_levels() -> None:
    sets = Output("pwm", {"S": 178.0, "M": 204.0, "F": 255.0}).mamdani_sets()
    assert sets["S"].points == (152.0, 178.0, 178.0, 204.0)
    assert sets["M"].points == (178.0, 204.0, 204.0, 230.0)
    assert sets["F"].points == (204.0, 255.0, 255.0, 306.0)
    grid = Output("pwm", {"S": 178.0, "M": 204.0, "F": 255.0}).mamdani_grid(1001)
    assert len(grid) >= 1001
    for v in (152.0, 178.0, 204.0, 230.0, 255.0, 306.0):
        assert np.min(np.abs(grid - v)) < 1e-9


def test_mamdani_single_rule_gives_its_level_exactly() -> None:
    r = SMALL.mamdani([0.0, 10.0])
    assert r.outputs["speed"].tolist() == pytest.approx([30.0, 10.0], abs=1e-9)
    assert r.outputs["time"].tolist() == pytest.approx([300.0, 0.0], abs=1e-9)


def test_mamdani_against_numerical_integral() -> None:
    # level 5: both rules at 0.25 -> clipped triangles, centroid by fine integration.
    z = np.linspace(-200, 500, 700001)
    sets = TIME.mamdani_sets()
    agg = np.maximum(np.minimum(0.25, sets["lots"](z)), np.minimum(0.25, sets["none"](z)))
    want = float((agg * z).sum() / agg.sum())
    assert SMALL.mamdani(5.0).outputs["time"] == pytest.approx(want, abs=0.5)
    # Two equal clipped shapes symmetric about their own centres: the centroid is the mean of
    # the areas' centres weighted by area (both rules share the strength).
    assert SMALL.mamdani(5.0).outputs["speed"] == pytest.approx(20.0, abs=0.05)


@given(st.floats(-5, 15))
def test_outputs_stay_within_levels(x: float) -> None:
    methods: tuple[Literal["sugeno", "mamdani"], ...] = ("sugeno", "mamdani")
    for method in methods:
        r = SMALL.evaluate(x, method=method)
        assert 10.0 - 1e-9 <= float(r.outputs["speed"]) <= 30.0 + 1e-9
        assert 0.0 - 1e-9 <= float(r.outputs["time"]) <= 300.0 + 1e-9


def test_mamdani_chunks_agree() -> None:
    xs = np.linspace(0, 10, 97)
    whole = SMALL.mamdani(xs, chunk=4096).outputs["time"]
    pieces = SMALL.mamdani(xs, chunk=7).outputs["time"]
    assert whole == pytest.approx(pieces)
