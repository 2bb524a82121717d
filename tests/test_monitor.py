"""A node's severity (gateway/monitor.py): its bands, and when a new one is told."""

from __future__ import annotations

import pytest

from gateway.config import ControlConfig, parse_config
from gateway.monitor import SEVERITY_PERIOD_S, NodeMonitor, severity_bands

GOOD = {"ph": 6.0, "tds": 700.0, "water_level": 9.0}


def settings(**control: object) -> ControlConfig:
    entry = {"name": "tank-a", "url": "tcp://127.0.0.1:9",
             "control": {"mode": "manual", **control}}
    data = {"gateway": {"name": "gw"}, "storage": {"path": "x.sqlite"}, "nodes": [entry]}
    section = parse_config(data).nodes[0].control
    assert section is not None
    return section


def test_the_water_level_band_is_scaled_to_the_tank() -> None:
    bands = severity_bands(10.0, None, "ppm500")
    level = bands["water_level"]
    assert (level.low, level.high, level.critical_low) == pytest.approx((5.04, 10.5, 4.2))


def test_the_crop_bands_and_the_unit_come_from_the_settings() -> None:
    control = settings(crop="lettuce")
    assert control.tds_band is not None and control.ph_band == (6.0, 7.0)
    bands = severity_bands(10.0, control, "ec")
    assert (bands["tds"].low, bands["tds"].high) == control.tds_band
    assert (bands["ph"].low, bands["ph"].high) == (6.0, 7.0)
    assert bands["tds"].scale != 1.0  # the reason reads in mS/cm


def test_a_severity_is_told_when_it_changes_and_at_most_once_a_period() -> None:
    monitor = NodeMonitor("tank-a")
    bands = severity_bands(10.0, None, "ppm500")
    assert monitor.update(0.0, GOOD, bands) == {"severity": "none", "severity_reason": "all normal"}
    assert monitor.update(SEVERITY_PERIOD_S, GOOD, bands) is None  # nothing new
    low = {**GOOD, "ph": 4.5}
    assert monitor.update(SEVERITY_PERIOD_S + 0.5, low, bands) is None  # too soon
    told = monitor.update(2 * SEVERITY_PERIOD_S, low, bands)
    assert told is not None and told["severity"] == "urgent"
    assert monitor.severity is not None and monitor.severity.level == "urgent"


def test_a_probe_in_a_buffer_is_left_out_and_a_lock_or_a_reminder_is_told() -> None:
    bands = severity_bands(10.0, None, "ppm500")
    monitor = NodeMonitor("tank-a")
    buffered = {**GOOD, "ph": 4.01}
    assert monitor.update(0.0, buffered, bands, calibrating="ph") == {
        "severity": "none", "severity_reason": "all normal"}
    locked = monitor.update(1.0, GOOD, bands, alarm="pH lock: the tank did not answer")
    assert locked is not None and locked["severity"] == "urgent"
    assert locked["severity_reason"].startswith("pH lock")
    due = monitor.update(2.0, GOOD, bands, reminders=["ph probe calibrated 40 days ago"])
    assert due == {"severity": "info", "severity_reason": "ph probe calibrated 40 days ago"}
