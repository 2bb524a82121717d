"""Calibration maps and fits against the thesis's numbers (docs/references.md, "Thesis: sensors and calibration")."""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from gateway.cli_calibrate import add_fit_arguments, run_fit
from rules.calibration import (
    CalibrationError,
    Calibrator,
    compensate,
    fit_poly,
    fit_two_point,
)

TDS_V = [0.04, 0.49, 0.86, 1.12, 1.29, 1.44, 1.58]
TDS_PPM = [57, 198, 401, 496, 618, 844, 1100]
ORDER3 = [504.41, -821.86, 711, 22.652]
ORDER4 = [913.98, -2556.2, 2437, -416.27, 69.331]


def sig(value: float, digits: int) -> float:
    """``value`` rounded to ``digits`` significant digits, as the thesis prints."""
    return float(f"{value:.{digits}g}")


@dataclass(frozen=True)
class Map:
    key: str
    source: str
    poly: tuple[float, ...]
    valid: tuple[float, float] | None = None
    temp_coefficient: float | None = None


def test_order3_reproduces_thesis_coefficients() -> None:
    fit = fit_poly(TDS_V, TDS_PPM, 3)
    assert [sig(c, 5) for c in fit.coefficients] == [504.41, -821.86, 711.0, 22.652]


def test_order4_reproduces_thesis_coefficients() -> None:
    fit = fit_poly(TDS_V, TDS_PPM, 4)
    # The thesis prints 5 significant digits except 2437 (4).
    got = fit.coefficients
    assert [sig(got[0], 5), sig(got[1], 5), sig(got[2], 4), sig(got[3], 5), sig(got[4], 5)] == (
        ORDER4
    )


def test_fit_errors_versus_thesis() -> None:
    # The thesis's 7.237 % / 1.608 % are verification readings (its tables 4.2, 4.3); the
    # residuals of the fit on its own 7 points are a little larger, same ordering.
    e3 = fit_poly(TDS_V, TDS_PPM, 3).mean_pct_error
    e4 = fit_poly(TDS_V, TDS_PPM, 4).mean_pct_error
    assert e3 == pytest.approx(7.41, abs=0.01)
    assert e4 == pytest.approx(2.07, abs=0.01)
    assert abs(e3 - 7.237) < 0.25
    assert abs(e4 - 1.608) < 0.5
    assert e4 < e3
    # The vendor formula (docs/references.md) gave 31 %.
    v = np.array(TDS_V)
    vendor = (133.42 * v**3 - 255.86 * v**2 + 857.39 * v) * 0.5
    vendor_err = float(np.mean(np.abs(vendor - TDS_PPM) / TDS_PPM * 100))
    assert vendor_err == pytest.approx(31, abs=1)


def test_fit_result_tables() -> None:
    fit = fit_poly(TDS_V, TDS_PPM, 3)
    assert fit.order == 3
    assert fit.valid == (0.04, 1.58)
    assert len(fit.predicted) == len(fit.abs_error) == len(fit.pct_error) == 7
    assert fit.predicted[0] == pytest.approx(np.polyval(ORDER3, 0.04), abs=0.01)
    assert fit.abs_error[3] == pytest.approx(abs(fit.predicted[3] - 496))
    assert fit.pct_error[3] == pytest.approx(fit.abs_error[3] / 496 * 100)
    assert fit.mean_pct_error == pytest.approx(np.mean(fit.pct_error))


def test_two_point_ph() -> None:
    fit = fit_two_point(7, 4.01, 1152, 6.86)
    slope, intercept = fit.coefficients
    assert slope == pytest.approx(2.85 / 1145)
    # The thesis prints 0.0025 and 3.9926: the exact fit at that rounding.
    assert round(slope, 4) == 0.0025
    assert round(intercept, 4) == 3.9926
    assert fit.predicted == pytest.approx((4.01, 6.86))
    # Same line as fit_poly of order 1.
    assert fit_poly([7, 1152], [4.01, 6.86], 1).coefficients == pytest.approx(fit.coefficients)


def test_fit_refuses_bad_input() -> None:
    with pytest.raises(CalibrationError, match="distinct points"):
        fit_poly([1, 2, 3], [1, 2, 3], 3)
    with pytest.raises(CalibrationError, match="order"):
        fit_poly([1, 2, 3], [1, 2, 3], 0)
    with pytest.raises(CalibrationError, match="different"):
        fit_two_point(5, 4.0, 5, 7.0)


TDS_MAP = Map("tds", "tds_v", tuple(ORDER4), (0.04, 1.58), 0.02)
PH_MAP = Map("ph", "ph_adc", (0.0025, 3.9926))


def test_apply_polyval_and_passthrough() -> None:
    cal = Calibrator([TDS_MAP, PH_MAP])
    r = cal.apply({"tds_v": 1.12, "ph_adc": 1152, "water_temp": 25.0, "humidity": 60.0})
    assert r.values["tds"] == pytest.approx(np.polyval(ORDER4, 1.12))
    assert r.values["ph"] == pytest.approx(0.0025 * 1152 + 3.9926)
    # Raw keys and unmapped keys pass through unchanged.
    assert r.values["tds_v"] == 1.12
    assert r.values["ph_adc"] == 1152
    assert r.values["humidity"] == 60.0
    assert r.flags == {}


def test_mapping_of_maps_is_accepted() -> None:
    cal = Calibrator({"ph": PH_MAP})
    assert cal.apply({"ph_adc": 7}).values["ph"] == pytest.approx(0.0025 * 7 + 3.9926)


@pytest.mark.parametrize("raw", [0.0, 0.039, 1.581, 3.3, float("nan")])
def test_out_of_range_is_flagged_not_trusted(raw: float) -> None:
    cal = Calibrator([TDS_MAP])
    r = cal.apply({"tds_v": raw, "water_temp": 25.0, "tds": 999.0})
    assert "tds" not in r.values
    assert r.flags == {"tds": "out_of_range"}
    assert "tds_v" in r.values  # the raw reading is still shown
    passed = r.values["tds_v"]
    assert passed is not None
    assert passed == raw or (np.isnan(raw) and np.isnan(passed))


@pytest.mark.parametrize("raw", [0.04, 1.58])
def test_valid_range_is_inclusive(raw: float) -> None:
    r = Calibrator([TDS_MAP]).apply({"tds_v": raw, "water_temp": 25.0})
    assert r.values["tds"] == pytest.approx(np.polyval(ORDER4, raw))
    assert r.flags == {}


def test_temperature_compensation() -> None:
    cal = Calibrator([TDS_MAP])
    at25 = float(np.polyval(ORDER4, 1.0))
    r = cal.apply({"tds_v": 1.0, "water_temp": 30.0})
    assert r.values["tds"] == pytest.approx(at25 / 1.1)
    assert cal.apply({"tds_v": 1.0, "water_temp": 20.0}).values["tds"] == pytest.approx(at25 / 0.9)
    assert compensate(100.0, 25.0, 0.02) == 100.0
    with pytest.raises(CalibrationError):
        compensate(100.0, -30.0, 0.02)


@pytest.mark.parametrize("reading", [{"tds_v": 1.0}, {"tds_v": 1.0, "water_temp": None}])
def test_missing_temperature_leaves_value_uncompensated(reading: dict[str, float | None]) -> None:
    r = Calibrator([TDS_MAP]).apply(reading)
    assert r.values["tds"] == pytest.approx(np.polyval(ORDER4, 1.0))
    assert r.flags == {"tds": "uncompensated"}


def test_no_coefficient_no_compensation_no_flag() -> None:
    r = Calibrator([PH_MAP]).apply({"ph_adc": 600, "water_temp": 35.0})
    assert r.values["ph"] == pytest.approx(0.0025 * 600 + 3.9926)
    assert r.flags == {}


def test_compensation_uses_calibrated_water_temp() -> None:
    temp = Map("water_temp", "water_temp_v", (100.0, -50.0))  # 0.75 V -> 25 °C, 0.8 V -> 30 °C
    r = Calibrator([TDS_MAP, temp]).apply({"tds_v": 1.0, "water_temp_v": 0.8})
    assert r.values["water_temp"] == pytest.approx(30.0)
    assert r.values["tds"] == pytest.approx(np.polyval(ORDER4, 1.0) / 1.1)


def test_null_and_missing_sources() -> None:
    cal = Calibrator([TDS_MAP, PH_MAP])
    r = cal.apply({"tds_v": None, "water_temp": 25.0})
    assert r.values["tds"] is None
    assert "ph" not in r.values
    assert r.flags == {}


def test_bad_maps_are_refused() -> None:
    with pytest.raises(CalibrationError, match="duplicate"):
        Calibrator([PH_MAP, PH_MAP])
    with pytest.raises(CalibrationError, match="reversed"):
        Calibrator([Map("ph", "ph_adc", (1.0, 0.0), (5.0, 1.0))])


def cli(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    out = io.StringIO()
    code = run_fit(parser.parse_args(argv), out=out)
    return code, out.getvalue()


def test_cli_order4() -> None:
    points = [f"{v}:{p}" for v, p in zip(TDS_V, TDS_PPM, strict=True)]
    code, text = cli(["--points", *points, "--order", "4", "--digits", "5"])
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == "poly: [913.98, -2556.2, 2437, -416.27, 69.331]"
    assert lines[1] == "valid: [0.04, 1.58]"
    assert "mean error: 2.073 %" in text
    assert sum(1 for line in lines if line.strip().startswith(("0.", "1."))) == 7


def test_cli_two_point_and_csv(tmp_path: Path) -> None:
    code, text = cli(["--points", "7:4.01", "1152:6.86", "--digits", "5"])
    assert code == 0
    assert text.splitlines()[0] == "poly: [0.0024891, 3.9926]"
    csv_file = tmp_path / "tds.csv"
    csv_file.write_text("volts,ppm\n" + "".join(f"{v},{p}\n" for v, p in zip(TDS_V, TDS_PPM,
                                                                                strict=True)))
    code, text = cli(["--csv", str(csv_file), "--order", "3", "--digits", "5"])
    assert code == 0
    assert text.splitlines()[0] == "poly: [504.41, -821.86, 711, 22.652]"


def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = cli(["--points", "1:2", "2:3", "--order", "3"])
    assert code == 2
    assert "distinct points" in capsys.readouterr().err
    code, _ = cli(["--csv", str(tmp_path / "missing.csv")])
    assert code == 2
    with pytest.raises(SystemExit):
        cli(["--points", "nonsense"])
