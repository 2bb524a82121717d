"""The reservoir model: mass balance, chemistry direction, mixing lag, determinism, robustness."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.plant import (
    PUMPS,
    TDS_POLY,
    PlantError,
    PlantParams,
    Reservoir,
    ph_to_adc,
    tds_to_volts,
)

QUIET = PlantParams(
    uptake_per_h=0.0,
    evaporation_l_per_h=0.0,
    air_temp_amplitude=0.0,
    humidity_amplitude=0.0,
)
"""No slow processes, so a test sees only what it doses."""


def dose(r: Reservoir, pump: str, seconds: float, duty: int = 255) -> None:
    r.set_pump(pump, duty)
    r.step(seconds)
    r.set_pump(pump, 0)


def test_from_state_starts_where_asked_and_probe_agrees() -> None:
    r = Reservoir.from_state(tds=300.0, ph=5.0, volume_l=8.0, params=QUIET)
    tank, probe = r.truth(), r.truth(at_probe=True)
    assert tank["tds"] == pytest.approx(300.0)
    assert tank["ph"] == pytest.approx(5.0, abs=1e-6)
    assert tank["water_level"] == pytest.approx(8.0)
    assert probe["tds"] == pytest.approx(300.0)
    assert probe["ph"] == pytest.approx(5.0, abs=1e-6)


def test_mass_balance_of_a_stock_dose() -> None:
    # 10 s at duty 255 is 15.8 ml of 10,000 ppm stock into 10 L of fresh water.
    r = Reservoir.from_state(tds=0.0, ph=7.0, params=QUIET)
    dose(r, "nutrient", 10.0)
    r.step(600.0)
    added_ml = 15.8
    assert r.dosed_ml["nutrient"] == pytest.approx(added_ml)
    expected = 10_000.0 * added_ml / 1000.0 / (10.0 + added_ml / 1000.0)
    assert r.truth()["tds"] == pytest.approx(expected, rel=1e-9)
    assert r.truth(at_probe=True)["tds"] == pytest.approx(expected, rel=1e-4)
    assert r.truth()["water_level"] == pytest.approx(10.0158)


def test_flow_is_proportional_to_duty() -> None:
    r = Reservoir(QUIET)
    dose(r, "refill", 20.0, duty=102)
    assert r.dosed_ml["refill"] == pytest.approx(1.58 * 20.0 * 102 / 255)


def test_dilution_with_fresh_water() -> None:
    r = Reservoir.from_state(tds=1000.0, ph=6.0, params=QUIET)
    dose(r, "refill", 100.0)  # 158 ml
    assert r.truth()["tds"] == pytest.approx(1000.0 * 10.0 / 10.158)


@pytest.mark.parametrize(("pump", "direction"), [("ph_up", +1), ("ph_down", -1), ("nutrient", -1)])
@pytest.mark.parametrize("start", [5.0, 6.0, 6.5])
def test_ph_moves_the_right_way(pump: str, direction: int, start: float) -> None:
    r = Reservoir.from_state(tds=700.0, ph=start, params=QUIET)
    dose(r, pump, 20.0)
    assert (r.truth()["ph"] - start) * direction > 0.01


def test_fresh_water_pulls_ph_toward_its_own() -> None:
    for start in (5.0, 6.0):
        r = Reservoir.from_state(tds=700.0, ph=start, params=QUIET)
        dose(r, "refill", 600.0)  # ~0.95 L of pH 7.0 water
        assert start + 0.005 < r.truth()["ph"] < 7.0


def test_buffer_region_resists_more_than_the_edges() -> None:
    """The same base dose moves pH less near the carbonate pKa than at pH 5."""
    moves = {}
    for start in (5.0, 6.3):
        r = Reservoir.from_state(tds=700.0, ph=start, params=QUIET)
        dose(r, "ph_up", 5.0)
        moves[start] = r.truth()["ph"] - start
    assert moves[5.0] > 2 * moves[6.3] > 0


def test_mixing_delays_and_lags_the_reading() -> None:
    p = QUIET
    r = Reservoir.from_state(tds=300.0, ph=6.0, params=p)
    dose(r, "nutrient", 20.0)
    tank = r.truth()["tds"]
    assert tank > 330.0
    # Within the dead time the probe has not moved at all.
    r.step(p.dead_time_s - 20.0 - 1.0)
    assert r.truth(at_probe=True)["tds"] == pytest.approx(300.0)
    # One lag constant after the dose has arrived: about 1 - 1/e of the way there.
    r.step(1.0 + 20.0 + p.lag_s)
    seen = r.truth(at_probe=True)["tds"] - 300.0
    assert 0.5 < seen / (tank - 300.0) < 0.75
    r.step(20 * p.lag_s)
    assert r.truth(at_probe=True)["tds"] == pytest.approx(tank, rel=1e-6)


def test_evaporation_concentrates_and_is_faster_in_dry_heat() -> None:
    def after_a_day(temp: float, rh: float) -> Reservoir:
        params = PlantParams(
            uptake_per_h=0.0,
            air_temp_mean=temp,
            air_temp_amplitude=0.0,
            humidity_mean=rh,
            humidity_amplitude=0.0,
        )
        r = Reservoir.from_state(tds=700.0, ph=6.0, params=params)
        r.step(86_400.0)
        return r

    humid, dry = after_a_day(22.0, 80.0).truth(), after_a_day(32.0, 35.0).truth()
    assert dry["water_level"] < humid["water_level"] < 10.0
    assert dry["tds"] > humid["tds"] > 700.0
    # Evaporation takes water only: mass is conserved.
    assert dry["tds"] * dry["water_level"] == pytest.approx(7000.0)


def test_uptake_lowers_tds_and_raises_ph() -> None:
    params = PlantParams(evaporation_l_per_h=0.0, uptake_per_h=0.01)
    r = Reservoir.from_state(tds=700.0, ph=6.0, params=params)
    r.step(24 * 3600.0)
    truth = r.truth()
    assert truth["tds"] < 700.0 * 0.9
    assert truth["ph"] > 6.05


def test_water_temperature_follows_air_with_a_lag() -> None:
    params = PlantParams(air_temp_mean=30.0, air_temp_amplitude=0.0, initial_water_temp=20.0)
    r = Reservoir(params)
    r.step(600.0)
    early = r.truth()["water_temp"]
    r.step(6 * 3600.0)
    late = r.truth()["water_temp"]
    assert 20.0 < early < 25.0
    assert late == pytest.approx(30.0, abs=0.1)


def test_diurnal_cycle_warms_the_afternoon() -> None:
    r = Reservoir(PlantParams(start_hour=4.0))  # coolest around 02:00, warmest at 14:00
    dawn = r.truth()["air_temp"]
    r.step(10 * 3600.0)
    afternoon = r.truth()
    assert afternoon["air_temp"] > dawn + 5.0
    assert afternoon["humidity"] < 60.0


def test_same_seed_same_numbers_other_seed_other_noise() -> None:
    def trace(seed: int) -> list[dict[str, float]]:
        r = Reservoir(seed=seed)
        out = []
        for i in range(50):
            if i == 10:
                r.set_pump("nutrient", 200)
            if i == 14:
                r.set_pump("nutrient", 0)
            r.step(1.3)
            out.append(r.sensors())
        return out

    assert trace(7) == trace(7)
    assert trace(7) != trace(8)


def test_sensors_keys_noise_and_raw_values_invert_the_calibration() -> None:
    r = Reservoir.from_state(tds=700.0, ph=6.0, water_temp=25.0, params=QUIET)
    readings = [r.sensors() for _ in range(200)]
    assert set(readings[0]) == {
        "tds",
        "ph",
        "water_temp",
        "water_level",
        "air_temp",
        "humidity",
        "tds_v",
        "ph_adc",
        "ph_v",
    }
    tds = np.array([s["tds"] for s in readings])
    assert tds.std() > 0.5  # noisy ...
    assert abs(tds.mean() - 700.0) < 1.0  # ... around the truth
    for s in readings[:20]:
        # At 25 °C the compensation is neutral: the calibration map gives tds back.
        assert float(np.polyval(TDS_POLY, s["tds_v"])) == pytest.approx(s["tds"], abs=1.5)
        assert 0.0025 * s["ph_adc"] + 3.9926 == pytest.approx(s["ph"], abs=0.0013)


def test_raw_tds_is_uncompensated_so_the_gateway_compensation_recovers_it() -> None:
    r = Reservoir.from_state(tds=700.0, ph=6.0, water_temp=30.0, params=QUIET)
    s = r.sensors()
    measured = float(np.polyval(TDS_POLY, s["tds_v"]))
    assert measured > 740.0
    assert measured / (1 + 0.02 * (s["water_temp"] - 25.0)) == pytest.approx(s["tds"], abs=2.0)


@pytest.mark.parametrize("ppm", [49.7, 57.0, 198.0, 401.0, 700.0, 1100.0, 2000.0])
def test_tds_to_volts_inverts_the_polynomial(ppm: float) -> None:
    assert float(np.polyval(TDS_POLY, tds_to_volts(ppm))) == pytest.approx(ppm, abs=1e-6)


def test_tds_to_volts_outside_the_map() -> None:
    assert tds_to_volts(0.0) == 0.0
    assert 0.0 < tds_to_volts(10.0) < 0.04  # below the fitted range: the gateway flags it
    assert tds_to_volts(1200.0) > 1.58
    assert tds_to_volts(1e6) == 3.3  # the ADC clips
    assert ph_to_adc(1.0) == 0
    assert ph_to_adc(14.0) == 4003
    assert ph_to_adc(16.0) == 4095


def test_bad_inputs_are_refused() -> None:
    r = Reservoir()
    with pytest.raises(PlantError):
        r.set_pump("fan", 255)
    with pytest.raises(PlantError):
        r.set_pump("nutrient", 256)
    with pytest.raises(PlantError):
        r.set_pump("nutrient", True)
    with pytest.raises(PlantError):
        r.step(-1.0)
    with pytest.raises(PlantError):
        r.step(math.nan)
    with pytest.raises(PlantError):
        Reservoir(PlantParams(volume_l=0.0))




def test_thesis_rig_constant_steps_overshoot_noticeably() -> None:
    """The thesis's close-loop controller (255 for 2 s after 10 s of averaging) overshoots."""
    r = Reservoir.from_state(tds=300.0, ph=6.0, params=PlantParams.thesis_rig(), seed=3)
    peak = 0.0
    for _ in range(250):  # 250 cycles of 12 s
        samples = []
        for _ in range(10):
            r.step(1.0)
            samples.append(r.sensors()["tds"])
        avg = sum(samples) / len(samples)
        peak = max(peak, avg)
        dose(r, "nutrient" if avg <= 700.0 else "refill", 2.0)
    assert (peak - 700.0) / 400.0 > 0.15


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(PUMPS), st.integers(0, 255), st.floats(0.0, 900.0)),
        max_size=25,
    ),
    st.floats(0.0, 3000.0),
    st.floats(2.0, 10.0),
)
def test_no_nan_over_random_pump_sequences(
    moves: list[tuple[str, int, float]], tds: float, ph: float
) -> None:
    r = Reservoir.from_state(tds=tds, ph=ph, params=PlantParams(capacity_l=12.0))
    for pump, duty, seconds in moves:
        r.set_pump(pump, duty)
        r.step(seconds)
        for values in (r.truth(), r.truth(at_probe=True), r.sensors()):
            assert all(math.isfinite(v) for v in values.values()), values
            assert -1.0 <= values["ph"] <= 15.0
            assert values["tds"] >= 0.0
            assert 0.0 < values["water_level"] <= 12.0 + 0.1
