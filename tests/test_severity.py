"""Fuzzy notification severity: levels and reason text against the documentation's bands."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules.severity import DEFAULT_BANDS, Band, SeverityError, assess

CASES: list[tuple[dict[str, float | None], str, str]] = [
    # none: everything inside its band (edges included), missing values ignored
    ({}, "none", "no readings"),
    ({"ph": 6.0, "tds": 700, "water_level": 1.8, "air_temp": 24, "humidity": 60}, "none",
     "all normal"),
    ({"ph": 5.5, "tds": 840, "water_level": 2.5, "air_temp": 18, "humidity": 80}, "none",
     "all normal"),
    ({"ph": None, "tds": float("nan"), "humidity": 55}, "none", "all normal"),
    # info: one parameter slightly off
    ({"ph": 6.6}, "info", "pH 6.6 high"),
    ({"ph": 5.4, "tds": 700}, "info", "pH 5.4 low"),
    ({"tds": 880}, "info", "ppm 880 high"),
    ({"tds": 500}, "info", "ppm 500 low"),
    ({"air_temp": 29.5}, "info", "air temp 29.5 high"),
    ({"humidity": 38}, "info", "humidity 38 low"),
    ({"water_level": 1.15}, "info", "water level 1.15 low"),
    # warning: one moderately off, or two or more off
    ({"ph": 6.9}, "warning", "pH 6.9 high"),
    ({"ph": 7.0}, "warning", "pH 7.0 high"),
    ({"tds": 950}, "warning", "ppm 950 high"),
    ({"tds": 880, "humidity": 85}, "warning", "ppm 880 high; humidity 85 high"),
    ({"ph": 6.55, "tds": 845, "water_level": 1.8}, "warning", "pH 6.55 high; ppm 845 high"),
    ({"water_level": 2.8}, "warning", "water level 2.8 high"),
    ({"water_level": 9.0}, "warning", "water level 9.0 high"),
    # urgent: any critical
    ({"ph": 7.3}, "urgent", "pH 7.3 critical (> 7.0)"),
    ({"ph": 7.01}, "urgent", "pH 7.01 critical (> 7.0)"),
    ({"ph": 4.9}, "urgent", "pH 4.9 critical (< 5.0)"),
    ({"tds": 1001}, "urgent", "ppm 1001 critical (> 1000)"),
    ({"tds": 350}, "urgent", "ppm 350 critical (< 400)"),
    ({"water_level": 0.9}, "urgent", "water level 0.9 critical (< 1.0)"),
    ({"air_temp": 33}, "urgent", "air temp 33.0 critical (> 32.0)"),
    ({"air_temp": 14}, "urgent", "air temp 14.0 critical (< 15.0)"),
    ({"humidity": 95}, "urgent", "humidity 95 critical (> 90)"),
    ({"humidity": 25, "tds": 880, "ph": 4.0}, "urgent",
     "pH 4.0 critical (< 5.0); humidity 25 critical (< 30); ppm 880 high"),
]


@pytest.mark.parametrize(("values", "level", "reason"), CASES)
def test_levels_and_reasons(values: dict[str, float | None], level: str, reason: str) -> None:
    s = assess(values)
    assert (s.level, s.reason) == (level, reason)


def test_degrees_report_every_assessed_parameter() -> None:
    s = assess({"ph": 6.0, "tds": 880, "humidity": None, "unknown": 3.0})
    assert s.degrees == {"ph": 0.0, "tds": pytest.approx(1 / 3)}
    assert s.memberships["tds"] == {"slight": 1.0, "moderate": 0.0, "critical": 0.0}
    assert assess({"ph": 6.75}).degrees["ph"] == pytest.approx(0.5)  # halfway: slight = moderate
    assert assess({"ph": 6.875}).degrees["ph"] == pytest.approx(2 / 3)
    assert assess({"ph": 8.0}).degrees["ph"] == 1.0


@given(st.floats(6.5, 9.0))
def test_degree_rises_monotonically(ph: float) -> None:
    lower = assess({"ph": ph}).degrees["ph"]
    higher = assess({"ph": ph + 0.01}).degrees["ph"]
    assert higher >= lower - 1e-12


@given(st.floats(0.0, 14.0), st.floats(0.0, 3000.0))
def test_level_agrees_with_crisp_table(ph: float, ppm: float) -> None:
    """The fuzzy levels reproduce the document's crisp table (a reference written apart)."""

    def crisp(v: float, low: float, high: float, clow: float, chigh: float) -> str:
        if v < clow or v > chigh:
            return "critical"
        if v < low or v > high:
            # halfway to the critical threshold separates "slightly" from "moderately"
            mid_low, mid_high = (low + clow) / 2, (high + chigh) / 2
            return "moderate" if v < mid_low or v > mid_high else "slight"
        return "normal"

    a = crisp(ph, 5.5, 6.5, 5.0, 7.0)
    b = crisp(ppm, 560, 840, 400, 1000)
    if "critical" in (a, b):
        want = "urgent"
    elif "moderate" in (a, b) or (a != "normal" and b != "normal"):
        want = "warning"
    elif "slight" in (a, b):
        want = "info"
    else:
        want = "none"
    got = assess({"ph": ph, "tds": ppm}).level
    # Exactly at a "slightly/moderately" boundary either answer is fine.
    on_edge = any(
        math.isclose(v, e, abs_tol=1e-9)
        for v, e in ((ph, 5.25), (ph, 6.75), (ppm, 480), (ppm, 920))
    )
    assert got == want or on_edge


def test_bands_can_be_overridden_for_a_crop() -> None:
    lettuce = dict(DEFAULT_BANDS)
    lettuce["ph"] = DEFAULT_BANDS["ph"].with_normal(6.0, 7.0)
    assert lettuce["ph"].critical_low == pytest.approx(5.5)
    assert lettuce["ph"].critical_high == pytest.approx(7.5)
    assert assess({"ph": 6.8}, lettuce).level == "none"
    assert assess({"ph": 6.8}).level == "warning"
    assert assess({"ph": 7.6}, lettuce).reason == "pH 7.6 critical (> 7.5)"
    # A single-value crop (pak choi pH 7.0) has a band of zero width.
    pak_choi = {"ph": DEFAULT_BANDS["ph"].with_normal(7.0, 7.0)}
    assert assess({"ph": 7.0}, pak_choi).level == "none"
    assert assess({"ph": 7.1}, pak_choi).level == "info"
    # Only the bands given are assessed.
    assert assess({"ph": 9.0, "tds": 5000}, {"tds": DEFAULT_BANDS["tds"]}).reason.startswith(
        "ppm 5000"
    )


def test_defaults_are_read_only_and_bands_validated() -> None:
    with pytest.raises(TypeError):
        DEFAULT_BANDS["ph"] = DEFAULT_BANDS["tds"]  # type: ignore[index]
    with pytest.raises(SeverityError):
        Band("x", 2.0, 1.0, 0.0, 3.0)
    with pytest.raises(SeverityError):
        Band("x", 1.0, 2.0, 1.5, 3.0)
    with pytest.raises(SeverityError):
        Band("x", 1.0, 2.0, None, None)
