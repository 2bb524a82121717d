"""Stand-in for MicroPython's ``ds18x20`` (test-only): ``WORLD["ds18b20"]`` is the temperature.

``CONVERSIONS`` records when each conversion started so tests can check that
a value is collected only 750 ms later, in a later step.
"""

from __future__ import annotations

import time

import machine

CONVERSIONS: list[float] = []


class DS18X20:
    def __init__(self, bus: object) -> None:
        self.bus = bus

    def scan(self) -> list[bytes]:
        return [b"\x28\x01\x02\x03\x04\x05\x06\x07"] if "ds18b20" in machine.WORLD else []

    def convert_temp(self) -> None:
        CONVERSIONS.append(time.monotonic())

    def read_temp(self, rom: bytes) -> float:
        value = machine.WORLD.get("ds18b20")
        if value is None:
            import onewire

            raise onewire.OneWireError("CRC error")
        return float(value)
