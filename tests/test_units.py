"""rules/units.py: EC and the ppm scales, converted in one place; the edges of a reading."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import ConfigError, apply_control_update, control_settings, parse_config
from gateway.crops import find_crop
from rules import units

NAMES = tuple(units.UNITS)
values = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(values, st.sampled_from(NAMES), st.sampled_from(NAMES))
def test_round_trip_through_any_scale(value: float, a: str, b: str) -> None:
    back = units.convert(units.convert(value, a, b), b, a)
    assert math.isclose(back, value, rel_tol=1e-11)


@given(values, st.sampled_from(NAMES), st.sampled_from(NAMES), st.sampled_from(NAMES))
def test_conversions_compose(value: float, a: str, b: str, c: str) -> None:
    direct = units.convert(value, a, c)
    assert math.isclose(units.convert(units.convert(value, a, b), b, c), direct, rel_tol=1e-11)


@given(values)
def test_the_scales_are_fixed_multiples_of_ec(ec: float) -> None:
    for name, factor in (("ppm500", 500), ("ppm640", 640), ("ppm700", 700)):
        assert math.isclose(units.convert(ec, "ec", name), ec * factor, rel_tol=1e-11)
    assert math.isclose(units.to_internal(ec, "ec"), ec * 500, rel_tol=1e-11)


def test_a_grower_s_numbers() -> None:
    # 1.6 mS/cm is 800 ppm on a Hanna (500) meter and 1120 on a 700 meter: exactly.
    assert units.convert(1.6, "ec", "ppm700") == 1120.0
    assert units.convert(1120, "ppm700", "ppm500") == 800.0
    assert units.convert(800, "ppm500", "ppm640") == 1024.0
    assert units.from_internal(800, "ec") == 1.6
    assert units.unit("ppm700").text(1120) == "1120 ppm (700 scale)"
    assert units.unit("ec").text(1.6) == "1.60 mS/cm"
    with pytest.raises(units.UnitsError, match="known: ec, ppm500"):
        units.unit("ppm1000")


def test_inbound_turns_nodelink_ec_into_the_internal_tds() -> None:
    # NodeLink's ec is µS/cm: 1600 µS/cm is 800 ppm (500 scale); it wins over a node's tds.
    assert units.inbound({"ec": 1600.0, "tds": 1100.0, "ph": 6.0}) == {"tds": 800.0, "ph": 6.0}
    assert units.inbound({"ec": None, "tds": 700.0}) == {"tds": 700.0}
    assert units.inbound({"ph": 6.0}) == {"ph": 6.0}
    # A calibration map made tds from something else: ec stays, as the raw value it is.
    assert units.inbound({"ec": 1600.0, "tds": 790.0}, calibrated={"tds"}) == {
        "tds": 790.0, "ec_us": 1600.0}


@pytest.mark.parametrize(
    ("unit", "key", "value"),
    [("ppm500", "tds", 800.0), ("ppm640", "tds_640", 1024.0), ("ppm700", "tds_700", 1120.0),
     ("ec", "ec", 1.6)],
)
def test_outbound_names_the_reading_by_its_unit(unit: str, key: str, value: float) -> None:
    out = units.outbound({"tds": 800.0, "tds_flag": "uncompensated", "ph": 6.1}, unit)
    assert out == {key: value, f"{key}_flag": "uncompensated", "ph": 6.1}
    # One conductivity key leaves: a node's own key under that name is not passed off as ours.
    if unit != "ppm500":
        assert key not in units.outbound({"ph": 6.0, key: 1.0}, unit)


# --- the config's edges --------------------------------------------------------------------


def config(units_: str | None = None, **control: object) -> dict[str, object]:
    data: dict[str, object] = {
        "gateway": {"name": "gw"},
        "storage": {"path": "/tmp/x.sqlite"},
        "nodes": [{"name": "tank-a", "url": "tcp://127.0.0.1:1",
                   "control": {"ph_setpoint": 6.0, **control}}],
    }
    if units_ is not None:
        data["units"] = {"conductivity": units_}
    return data


def test_setpoints_in_every_unit_are_one_internal_value() -> None:
    for data in (config(tds_setpoint=800), config("ppm700", tds_setpoint=1120),
                 config("ppm640", tds_setpoint=1024), config("ec", ec_setpoint=1.6),
                 config("ppm700", ec_setpoint=1.6), config("ec", tds_setpoint=800)):
        node = parse_config(data).nodes[0]
        assert node.control is not None and node.control.tds_setpoint == 800.0, data
    node = parse_config(config("ppm700", ec_setpoint=1.6)).nodes[0]
    assert node.conductivity == "ppm700"


def test_setpoint_errors_name_the_key_and_unit() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config("ec"))
    assert ("nodes[0].control.ec_setpoint", "is required (or tds_setpoint, or give a crop)") \
        in info.value.errors
    with pytest.raises(ConfigError) as info:
        parse_config(config(tds_setpoint=800, ec_setpoint=1.6))
    assert info.value.errors == [("nodes[0].control.ec_setpoint",
                                  "give tds_setpoint or ec_setpoint, not both")]
    data = config("ppm700", ec_setpoint=9.5)
    data["nodes"][0]["safety"] = {"tds_range": [0, 5600]}  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.errors == [("nodes[0].control.ec_setpoint",
                                  "9.50 mS/cm is outside safety.tds_range [0, 5600]")]
    with pytest.raises(ConfigError) as info:
        parse_config(config("ppm800", tds_setpoint=800))
    assert info.value.errors[0][0] == "units.conductivity"


def test_stock_and_tds_range_are_on_the_file_s_scale() -> None:
    data = config("ppm700", tds_setpoint=1120)
    data["nodes"][0]["plant"] = {"stock_ppm": 14000}  # type: ignore[index]
    data["nodes"][0]["safety"] = {"tds_range": [0, 7000]}  # type: ignore[index]
    node = parse_config(data).nodes[0]
    assert node.plant is not None and node.plant.stock_ppm == 10000.0
    assert node.safety.tds_range == (0.0, 5000.0)


def test_runtime_updates_in_either_key_and_settings_in_the_node_s_unit() -> None:
    control = parse_config(config("ppm700", tds_setpoint=1120)).nodes[0].control
    assert control is not None
    assert apply_control_update(control, {"ec_setpoint": 2.0}).tds_setpoint == 1000.0
    assert apply_control_update(control, {"tds_setpoint": 1400}).tds_setpoint == 1000.0
    both = apply_control_update(control, {"tds_setpoint": 1400, "ec_setpoint": 2.0})
    assert both.tds_setpoint == 1000.0
    with pytest.raises(ConfigError, match="disagrees with tds_setpoint"):
        apply_control_update(control, {"tds_setpoint": 1400, "ec_setpoint": 1.8})
    assert control_settings(control)["tds_setpoint"] == 1120.0
    in_ec = parse_config(config("ec", ec_setpoint=1.6)).nodes[0].control
    assert in_ec is not None and control_settings(in_ec)["ec_setpoint"] == 1.6
    # What control_settings gives, apply_control_update takes back (persisted settings).
    assert apply_control_update(in_ec, control_settings(in_ec)) == in_ec
    assert apply_control_update(control, control_settings(control)) == control


def test_crop_presets_state_ec_and_every_ppm_scale() -> None:
    lettuce = find_crop("lettuce")
    assert lettuce is not None
    assert lettuce.ec == (0.8, 1.2) and lettuce.ec_setpoint == 1.0
    assert lettuce.ppm("ppm700") == (560.0, 840.0)  # as the reference table writes it
    assert lettuce.ppm("ppm500") == lettuce.tds_band == (400.0, 600.0)
    node = parse_config(config("ec", crop="lettuce")).nodes[0]
    assert node.control is not None and node.control.tds_setpoint == 500.0
