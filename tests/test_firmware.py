"""The firmware under CPython, piece by piece: safety duties on an injected clock, sensors, config.

The protocol core takes time as integer milliseconds, so the real 30 s
watchdog is tested here without waiting. The hardware layer (firmware/hw.py)
runs on the fake machine modules of tests/fakeboard.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from drivers.nodelink import Event, Reply, decode, encode
from tests.mpy_runtime import FIRMWARE

FAKEBOARD = FIRMWARE.parent / "tests" / "fakeboard"
FIRMWARE_MODULES = ("nlframe", "nlnode", "nlconfig", "nlsense", "hw", "net", "app",
                    "machine", "network", "onewire", "ds18x20", "dht")


@pytest.fixture
def fw() -> Iterator[dict[str, ModuleType]]:
    """The firmware's modules (and the fake board) imported by their bare names, then removed."""
    sys.path[:0] = [str(FIRMWARE), str(FAKEBOARD)]
    try:
        yield {name: importlib.import_module(name) for name in ("nlnode", "nlconfig", "nlframe")}
    finally:
        sys.path.remove(str(FIRMWARE))
        sys.path.remove(str(FAKEBOARD))
        for name in FIRMWARE_MODULES:
            sys.modules.pop(name, None)


class Out:
    def __init__(self) -> None:
        self.duty: int | None = None
        self.history: list[int] = []

    def set(self, duty: int) -> None:
        self.duty = duty
        self.history.append(duty)


def make_node(fw: dict[str, ModuleType], **kw: Any) -> tuple[Any, dict[str, Out]]:
    outs = {name: Out() for name in ("nutrient", "ph_up", "ph_down", "refill")}
    node = fw["nlnode"].Node("tank-a", "t-1", ["tds_v"], list(outs.items()),
                             lambda: [("tds_v", 1.12)], 0, **kw)
    return node, outs


def ask(node: Any, now: int, op: str, rid: int = 1, **fields: Any) -> Reply:
    reply = node.handle(encode({"id": rid, "op": op, **fields})[:-1], now)
    msg = decode(reply[:-1])
    assert isinstance(msg, Reply)
    return msg


def test_every_output_is_off_at_boot(fw: dict[str, ModuleType]) -> None:
    _, outs = make_node(fw)
    assert all(o.history == [0] for o in outs.values())


def test_the_real_watchdog_is_30_s_on_the_nodes_clock(fw: dict[str, ModuleType]) -> None:
    assert fw["nlnode"].WATCHDOG_MS == 30000
    node, outs = make_node(fw)
    assert ask(node, 1000, "actuate", actuator="refill", duty=255, ms=600000).ok
    node.tick(30999)
    assert outs["refill"].duty == 255
    ask(node, 20000, "ping")  # a valid frame restarts the 30 s
    node.tick(49999)
    assert outs["refill"].duty == 255
    node.tick(50000)
    assert outs["refill"].duty == 0
    events = [decode(f[:-1]) for f in node.take_events()]
    assert events[-1] == Event("actuator", {"event": "actuator", "actuator": "refill", "on": 0})


def test_a_timed_run_ends_at_its_deadline_however_late_the_tick(fw: dict[str, ModuleType]) -> None:
    node, outs = make_node(fw)
    ask(node, 0, "actuate", actuator="nutrient", duty=204, ms=1000)
    node.tick(999)
    assert outs["nutrient"].duty == 204
    node.tick(5000)
    assert outs["nutrient"].duty == 0
    assert ask(node, 5001, "state").body["actuators"]["nutrient"] == 0


def test_hello_carries_the_config_errors(fw: dict[str, ModuleType]) -> None:
    node, _ = make_node(fw, error="sensors[1]: pin: GPIO 2 is a strapping pin")
    body = ask(node, 0, "hello").body
    assert body["error"] == "sensors[1]: pin: GPIO 2 is a strapping pin" and body["ok"] is True
    clean, _ = make_node(fw)
    assert "error" not in ask(clean, 0, "hello").body


def test_push_report_is_a_valid_event(fw: dict[str, ModuleType]) -> None:
    node, _ = make_node(fw)
    msg = decode(node.report(1234)[:-1])
    assert msg == Event("report", {"event": "report", "uptime_ms": 1234, "values": {"tds_v": 1.12}})


def test_the_boot_event_names_the_node(fw: dict[str, ModuleType]) -> None:
    node, _ = make_node(fw)
    assert decode(node.boot()[:-1]) == Event("boot", {"event": "boot", "node": "tank-a", "fw": "t-1"})


def test_frames_never_exceed_1024_bytes(fw: dict[str, ModuleType]) -> None:
    frame = fw["nlframe"].frame
    with pytest.raises(fw["nlframe"].FrameError):
        frame([("x", "y" * 1100)])
    assert len(frame([("x", "y" * 1010)])) <= 1024


@pytest.fixture
def board(fw: dict[str, ModuleType]) -> Iterator[tuple[ModuleType, ModuleType]]:
    import time

    added = []
    for name, fn in (("ticks_ms", lambda: 0), ("sleep_us", lambda us: None)):
        if not hasattr(time, name):
            setattr(time, name, fn)
            added.append(name)
    machine = importlib.import_module("machine")
    machine.WORLD.clear()
    machine.LOG.clear()
    try:
        yield importlib.import_module("hw"), machine
    finally:
        for name in added:
            delattr(time, name)


def test_analog_probe_is_the_median_of_its_samples(board: tuple[ModuleType, ModuleType]) -> None:
    hw, machine = board
    machine.WORLD.update({"adc_uv": {"34": 1120000}, "adc_u16": {"35": 1152 << 4}})
    cfg, errors = importlib.import_module("nlconfig").validate({"sensors": [
        {"type": "tds", "pin": 34, "samples": 9}, {"type": "ph", "pin": 35, "key": "ph_adc"}]})
    assert errors == []
    sensors = hw.Sensors(cfg["sensors"], errors)
    sensors.step(0)
    values = {k: getattr(v, "text", v) for k, v in sensors.pairs()}
    assert values == {"tds_v": "1.12", "ph_adc": 1152}
    assert sensors.all[0].adc.reads == 9


def test_ds18b20_converts_in_the_background(board: tuple[ModuleType, ModuleType]) -> None:
    hw, machine = board
    ds18x20 = importlib.import_module("ds18x20")
    ds18x20.CONVERSIONS.clear()
    machine.WORLD["ds18b20"] = 24.5
    sensor = hw.DS18B20({"keys": ("water_temp",), "period_ms": 2000, "pin": 4})
    sensor.step(0)
    assert len(ds18x20.CONVERSIONS) == 1 and sensor.values == [None]  # started, not waited for
    sensor.step(749)
    assert sensor.values == [None]
    sensor.step(750)
    assert sensor.values[0].text == "24.5"
    machine.WORLD["ds18b20"] = None  # the sensor fails: null after three failures, never a stale value
    sensors = hw.Sensors([], [])
    sensors.all = [sensor]
    for t in (2000, 2750, 4000, 4750, 6000, 6750):
        sensors.step(t)
    assert sensor.values == [None]


def test_a_sensor_the_port_refuses_is_reported_and_the_rest_works(
    board: tuple[ModuleType, ModuleType],
) -> None:
    hw, machine = board
    machine.WORLD.update({"broken_pins": [13], "adc_uv": {"34": 500000}})
    errors: list[str] = []
    sensors = hw.Sensors([{"type": "dht22", "keys": ("air_temp", "humidity"), "period_ms": 2000, "pin": 13},
                          {"type": "tds", "keys": ("tds_v",), "period_ms": 1000, "pin": 34,
                           "samples": 3, "scale": 1.0}], errors)
    assert errors == ["sensors[0]: cannot set up dht22: invalid pin 13"]
    sensors.step(0)
    assert [k for k, _ in sensors.pairs()] == ["tds_v"]


def test_active_low_pump_is_off_high_from_the_start(board: tuple[ModuleType, ModuleType]) -> None:
    hw, machine = board
    out = hw.Output({"pin": 13, "freq": 1000, "pwm": True, "active_low": True})
    assert machine.LOG[0][1:] == (13, "level", 1)  # the pin is driven off before PWM starts
    assert machine.LOG[-1][1:] == (13, "duty_u16", 65535)
    out.set(255)
    assert machine.LOG[-1][1:] == (13, "duty_u16", 0)
    plain = hw.Output({"pin": 14, "freq": 1000, "pwm": False, "active_low": False})
    plain.set(1)
    assert machine.LOG[-1][1:] == (14, "level", 1)


def test_sht3x_and_ultrasonic(board: tuple[ModuleType, ModuleType]) -> None:
    hw, machine = board
    machine.WORLD.update({"sht3x": (21.5, 48.0), "echo_us": 1160})
    sht = hw.SHT3x({"keys": ("air_temp", "humidity"), "period_ms": 2000, "sda": 21, "scl": 22, "addr": 0x44})
    sht.step(0)
    assert sht.values == [None, None]
    sht.step(20)
    assert [v.text for v in sht.values] == ["21.5", "48"]
    sonar = hw.Ultrasonic({"keys": ("water_level",), "period_ms": 1000, "trig": 18, "echo": 19,
                           "empty_cm": 40.0, "l_per_cm": 0.5, "max_l": None})
    sonar.step(0)
    assert sonar.values[0].text == "10"  # 1160 us = 20 cm; (40 - 20) * 0.5 L


def test_config_errors_name_their_path(fw: dict[str, ModuleType]) -> None:
    cfg, errors = fw["nlconfig"].validate({
        "name": "tank-a", "wifi": {"ssid": "farm", "password": "pw"},
        "sensors": [{"type": "ph", "pin": 25}, {"type": "tds", "pin": 34}],
        "actuators": [{"name": "ph_up", "pin": 0}, {"name": "nutrient", "pin": 14},
                      {"name": "refill", "pin": 26}],
    })
    assert errors == [
        "sensors[0]: pin: GPIO 25 is on ADC2, which does not work while Wi-Fi is on; "
        "use an ADC1 pin: 32, 33, 34, 35, 36, 37, 38, 39",
        "actuators[0]: pin: GPIO 0 is a strapping pin (it decides how the chip boots)",
        "actuators[1]: pin: GPIO 14 toggles while the chip boots; a pump would twitch",
    ]
    assert [s["keys"] for s in cfg["sensors"]] == [("tds_v",)]
    assert [a["name"] for a in cfg["actuators"]] == ["refill"]
    _, ok = fw["nlconfig"].validate({"sensors": [{"type": "ph", "pin": 25}]})  # no Wi-Fi: ADC2 is fine
    assert ok == []
