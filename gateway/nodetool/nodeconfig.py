"""`hydrogate node config`: a starting node.json for a board and a set of sensors and pumps.

Pins are handed out from per-board lists of safe pins (ADC1 for analog
probes, so they keep working with Wi-Fi on; never a strapping, flash or
console pin for anything), and the result is checked with the firmware's own
validation before it is written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from gateway.nodetool.firmware import validate
from rules.controller import ACTUATORS

SENSORS: Final = ("tds", "ph", "ds18b20", "dht22", "sht3x", "ultrasonic", "float_switch")
PUMPS: Final = ACTUATORS


@dataclass(frozen=True, slots=True)
class BoardPins:
    analog: tuple[int, ...]  # ADC1, in the order they are handed out
    general: tuple[int, ...]  # able to drive a pump or a sensor line
    i2c: tuple[int, int]  # the usual SDA, SCL


BOARD_PINS: Final = {
    "esp32": BoardPins((34, 35, 32, 33, 36, 39), (25, 26, 27, 13, 4, 18, 19, 23, 21, 22), (21, 22)),
    "esp32s3": BoardPins((1, 2, 4, 5, 6, 7), (11, 12, 13, 14, 15, 16, 21, 38, 39, 40, 41, 42),
                         (8, 9)),
    "esp32c3": BoardPins((0, 1, 3, 4), (5, 6, 7, 10, 3, 4, 0, 1), (6, 7)),
}


class NodeConfigError(ValueError):
    """The requested node cannot be built on that board."""


class _Pins:
    def __init__(self, board: str) -> None:
        self.pins = BOARD_PINS[board]
        self.taken: set[int] = set()

    def take(self, pool: Sequence[int], what: str) -> int:
        for pin in pool:
            if pin not in self.taken:
                self.taken.add(pin)
                return pin
        raise NodeConfigError(f"no free pin left for {what}")

    def analog(self, what: str) -> int:
        return self.take(self.pins.analog, what)

    def general(self, what: str) -> int:
        return self.take(self.pins.general, what)


def build(
    *,
    name: str,
    board: str = "esp32",
    sensors: Sequence[str] = ("tds", "ph", "ds18b20"),
    pumps: Sequence[str] = PUMPS,
    wifi_ssid: str | None = None,
    wifi_password: str = "",
    push_ms: int = 0,
) -> dict[str, Any]:
    """The node.json document; raises NodeConfigError when it cannot be built or is invalid."""
    if board not in BOARD_PINS:
        raise NodeConfigError(f"unknown board {board!r}; one of {', '.join(BOARD_PINS)}")
    unknown = [s for s in sensors if s not in SENSORS]
    if unknown:
        raise NodeConfigError(f"unknown sensor(s) {unknown}; known: {', '.join(SENSORS)}")
    if "dht22" in sensors and "sht3x" in sensors:
        raise NodeConfigError("dht22 and sht3x both give air_temp and humidity: pick one")
    if "ultrasonic" in sensors and "float_switch" in sensors:
        raise NodeConfigError("ultrasonic and float_switch both give water_level: pick one")
    pins = _Pins(board)
    doc: dict[str, Any] = {"name": name, "board": board}
    if wifi_ssid:
        doc["wifi"] = {"ssid": wifi_ssid, "password": wifi_password}
        doc["tcp"] = {"port": 3333}
    if push_ms:
        doc["push_ms"] = push_ms
    entries: list[dict[str, Any]] = []
    for kind in sensors:  # analog probes first: they need ADC1
        if kind in ("tds", "ph"):
            entries.append({"type": kind, "pin": pins.analog(kind),
                            "key": "tds_v" if kind == "tds" else "ph_v"})
    actuators = [{"name": p, "pin": pins.general(f"pump {p}")} for p in pumps]
    for kind in sensors:
        if kind == "ds18b20":
            entries.append({"type": kind, "pin": pins.general(kind), "key": "water_temp"})
        elif kind == "dht22":
            entries.append({"type": kind, "pin": pins.general(kind)})
        elif kind == "sht3x":
            sda, scl = (pins.take((p,), "sht3x") if p not in pins.taken else pins.general("sht3x")
                        for p in pins.pins.i2c)
            entries.append({"type": kind, "sda": sda, "scl": scl})
        elif kind == "ultrasonic":
            entries.append({"type": kind, "trig": pins.general("ultrasonic trig"),
                            "echo": pins.general("ultrasonic echo"),
                            "empty_cm": 40, "l_per_cm": 0.5})
        elif kind == "float_switch":
            entries.append({"type": kind, "pin": pins.general(kind), "on_l": 2.0, "off_l": 1.0})
    doc["sensors"] = entries
    doc["actuators"] = actuators
    _, errors = validate(json.dumps(doc).encode())
    if errors:
        raise NodeConfigError("; ".join(errors))
    return doc
