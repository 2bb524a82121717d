"""Stand-in for MicroPython's ``dht`` (test-only): ``WORLD["dht22"]`` is (temp, humidity)."""

from __future__ import annotations

import machine


class DHT22:
    def __init__(self, pin: object) -> None:
        self.pin = pin
        self._t = self._h = 0.0

    def measure(self) -> None:
        value = machine.WORLD.get("dht22")
        if value is None:
            raise OSError(116, "ETIMEDOUT")
        self._t, self._h = value

    def temperature(self) -> float:
        return self._t

    def humidity(self) -> float:
        return self._h
