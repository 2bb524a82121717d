"""rules/probecal.py: buffers at temperature, the pH fit, the probe's health limits, EC, stable."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rules.probecal import (
    EcPoint,
    FrontEnd,
    PhPoint,
    ProbeCalibrationError,
    ProbeRefused,
    Stability,
    buffer_ph,
    compose,
    fit_ec,
    fit_ph,
    front_end_for,
    nernst_mv,
)


def test_nernst_and_the_buffers_at_temperature() -> None:
    assert nernst_mv(25.0) == pytest.approx(59.16, abs=0.005)
    assert nernst_mv(0.0) == pytest.approx(54.20, abs=0.01)
    assert buffer_ph(7.00, 25.0) == 7.00
    assert buffer_ph(7.00, 20.0) == pytest.approx(7.02)
    assert buffer_ph(7.00, 22.5) == pytest.approx(7.01)
    assert buffer_ph(10.01, 15.0) == pytest.approx(10.12)
    assert buffer_ph(4.01, 25.0) == pytest.approx(4.006, abs=0.001)  # NBS phthalate
    assert buffer_ph(4.01, 10.0) == pytest.approx(4.000, abs=0.001)
    assert buffer_ph(6.86, 25.0) is None  # not one of ours: taken as labelled by the caller
    assert buffer_ph(7.00, 60.0) is None


def electrode(
    slope_pct: float, offset_mv: float, *, gain: float = 1000.0, zero: float = 0.0
) -> Callable[[float, float], float]:
    """The raw value a probe of that slope and offset gives in a buffer, via a front end."""

    def raw(ph: float, temp_c: float) -> float:
        mv = offset_mv - slope_pct / 100.0 * nernst_mv(temp_c) * (ph - 7.0)
        return mv / gain + zero

    return raw


def points(raw, buffers=(7.00, 4.01), temps=(21.0, 21.5, 22.0)) -> list[PhPoint]:  # type: ignore[no-untyped-def]
    out = []
    for nominal, temp in zip(buffers, temps, strict=False):
        ph = buffer_ph(nominal, temp)
        assert ph is not None
        out.append(PhPoint(nominal, ph, raw(ph, temp), temp))
    return out


@given(st.floats(85.5, 104.5), st.floats(-29.5, 29.5), st.sampled_from([2, 3]),
       st.floats(5.0, 40.0))
def test_the_fit_recovers_any_usable_probe(slope: float, offset: float, n: int,
                                           temp: float) -> None:
    buffers = (7.00, 4.01, 10.01)[:n]
    cal = fit_ph(points(electrode(slope, offset), buffers, (temp,) * 3), FrontEnd(1000.0))
    assert cal.slope_pct == pytest.approx(slope, abs=1e-6)
    assert cal.offset_mv == pytest.approx(offset, abs=1e-6)
    assert cal.usable and cal.residual_ph < 1e-9
    # The map reads each buffer right at the calibration's temperature.
    for p in cal.points:
        assert cal.poly[0] * p.raw + cal.poly[1] == pytest.approx(p.ph, abs=1e-9)


def test_an_amplified_front_end_and_adc_counts() -> None:
    # A board that amplifies ×3 around 1.5 V (DFRobot pH V2 style), read as ph_v in volts.
    raw = electrode(97.0, -8.0, gain=1000.0 / 3.0, zero=1.5)
    cal = fit_ph(points(raw), FrontEnd(1000.0 / 3.0, 1.5))
    assert (cal.slope_pct, cal.offset_mv) == pytest.approx((97.0, -8.0))
    assert front_end_for("ph_v") == FrontEnd(1000.0)
    assert front_end_for("ph_mv") == FrontEnd(1.0)
    assert front_end_for("ph_adc") is None


@pytest.mark.parametrize(
    ("slope", "offset", "words"),
    [
        (80.0, 5.0, ["slope is 80.0 % of Nernst", "worn out"]),
        (108.0, 0.0, ["slope is 108.0 %", "fresh buffers"]),
        (95.0, 42.0, ["offset is +42.0 mV", "reference junction"]),
        (95.0, -31.0, ["offset is -31.0 mV"]),
        (300.0, 0.0, ["300 % of Nernst", "front end"]),
        (-98.0, 0.0, ["-98 % of Nernst", "buffers were mixed up"]),
    ],
)
def test_a_probe_outside_the_limits_is_refused_with_the_reason(
    slope: float, offset: float, words: list[str]
) -> None:
    with pytest.raises(ProbeRefused) as info:
        fit_ph(points(electrode(slope, offset)), FrontEnd(1000.0))
    for word in words:
        assert word in str(info.value)
    refused = info.value.calibration
    assert refused.slope_pct == pytest.approx(slope) and not refused.usable  # type: ignore[union-attr]


def test_limits_are_inclusive_at_85_105_and_30() -> None:
    for slope, offset in ((85.0, 30.0), (105.0, -30.0)):
        assert fit_ph(points(electrode(slope, offset)), FrontEnd(1000.0)).usable


def test_points_that_cannot_make_a_line() -> None:
    raw = electrode(95.0, 0.0)
    with pytest.raises(ProbeCalibrationError, match="two buffers"):
        fit_ph(points(raw, (7.0,)), FrontEnd(1000.0))
    with pytest.raises(ProbeCalibrationError, match="1 pH apart"):
        fit_ph([PhPoint(7.0, 7.0, 0.0, 25.0), PhPoint(7.5, 7.5, -0.03, 25.0)], FrontEnd(1000.0))
    with pytest.raises(ProbeCalibrationError, match="did not change"):
        fit_ph([PhPoint(7.0, 7.0, 0.01, 25.0), PhPoint(4.0, 4.0, 0.01, 25.0)], FrontEnd(1000.0))


# --- conductivity ----------------------------------------------------------------------------

THESIS = (913.98, -2556.2, 2437.0, -416.27, 69.331)


def polyval(poly: tuple[float, ...], x: float) -> float:
    return math.fsum(c * x ** (len(poly) - 1 - i) for i, c in enumerate(poly))


def test_one_standard_scales_the_map_it_corrects() -> None:
    # The probe reads 1.2 times the truth: its map gives 847.8 ppm in the 1413 µS/cm standard.
    raw = 1.0
    poly = compose(THESIS, 847.8 / polyval(THESIS, raw), 0.0)
    cal = fit_ec([EcPoint(1413.0, raw, 25.0)], poly, per_us=0.5, temp_coefficient=0.02)
    assert cal.scale == pytest.approx(706.5 / 847.8)
    assert polyval(cal.poly, raw) == pytest.approx(706.5)
    # At 20 °C, the map's output is compensated afterwards: it must read 706.5·(1 − 0.1).
    cold = fit_ec([EcPoint(1413.0, raw, 20.0)], THESIS, per_us=0.5, temp_coefficient=0.02)
    assert polyval(cold.poly, raw) / (1 + 0.02 * (20 - 25)) == pytest.approx(706.5)


def test_two_standards_scale_and_shift_a_linear_map() -> None:
    true = (1000.0, 0.0)  # µS/cm per volt
    probe = [(1413.0, 1.413 * 1.1 + 0.05), (12880.0, 12.88 * 1.1 + 0.05)]  # gain and zero off
    cal = fit_ec([EcPoint(s, r, 25.0) for s, r in probe], true, per_us=1.0, temp_coefficient=None)
    for s, r in probe:
        assert polyval(cal.poly, r) == pytest.approx(s)
    with pytest.raises(ProbeRefused, match="reads 2.50 times the standard"):
        fit_ec([EcPoint(1413.0, 1.413 * 2.5, 25.0)], true, per_us=1.0, temp_coefficient=None)
    with pytest.raises(ProbeRefused, match="zero moved"):
        fit_ec([EcPoint(1413.0, 3.0, 25.0), EcPoint(12880.0, 14.4, 25.0)], true, per_us=1.0,
               temp_coefficient=None)
    with pytest.raises(ProbeCalibrationError, match="reads nothing"):
        fit_ec([EcPoint(1413.0, 0.0, 25.0)], true, per_us=1.0, temp_coefficient=None)


# --- stable ----------------------------------------------------------------------------------


def test_a_reading_is_stable_once_it_stops_drifting() -> None:
    stability = Stability(10.0, 0.0003)  # 0.3 mV in volts
    t, value = 0.0, 0.0
    taken = None
    while taken is None and t < 120.0:
        value = 0.177 * (1 - math.exp(-t / 5.0))  # a probe settling into a buffer
        stability.add(t, value)
        taken = stability.stable()
        t += 0.2
    assert taken is not None and abs(taken - 0.177) < 0.0005
    assert 20.0 < t < 60.0
    noisy = Stability(10.0, 0.003, relative=True)
    for i in range(100):
        noisy.add(i * 0.2, 700.0 + (3.0 if i % 2 else -3.0))
    assert noisy.stable() == pytest.approx(700.0, abs=0.1)
