"""A stand-in for MicroPython's ``machine`` module, for running the firmware under CPython.

Test-only. ``WORLD`` says what the sensors read and where the UART is
(``uart_fd``: a pty master the test opened); every change of an output pin
or PWM duty is appended to ``LOG`` and, when ``WORLD["pin_log"]`` names a
file, written there as one JSON line with ``time.monotonic()`` so another
process can tell how long a pump really ran.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

WORLD: dict[str, Any] = {}
LOG: list[tuple[float, int, str, int]] = []  # (monotonic, pin, kind, value)


def load_world(path: str) -> None:
    with open(path) as f:
        WORLD.clear()
        WORLD.update(json.load(f))


def _log(pin: int, kind: str, value: int) -> None:
    now = time.monotonic()
    LOG.append((now, pin, kind, value))
    path = WORLD.get("pin_log")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"t": now, "pin": pin, "kind": kind, "value": value}) + "\n")


def _refused(pin: int) -> None:
    if pin in WORLD.get("broken_pins", ()):
        raise ValueError(f"invalid pin {pin}")


class Pin:
    IN = 0
    OUT = 1
    OPEN_DRAIN = 2
    PULL_UP = 1
    PULL_DOWN = 2

    def __init__(self, pin: int, mode: int = -1, pull: int | None = None, *, value: int | None = None) -> None:
        _refused(pin)
        self.id = pin
        self.mode = mode
        self._value = 0
        if value is not None:
            self.value(value)

    def value(self, v: int | None = None) -> int | None:
        if v is None:
            return int(WORLD.get("inputs", {}).get(str(self.id), self._value))
        self._value = 1 if v else 0
        _log(self.id, "level", self._value)
        return None

    def on(self) -> None:
        self.value(1)

    def off(self) -> None:
        self.value(0)


class PWM:
    _duty: int

    def __init__(self, pin: Pin, freq: int = 1000, duty_u16: int = 0) -> None:
        self.pin = pin
        self.freq = freq
        self.duty_u16(duty_u16)

    def duty_u16(self, value: int | None = None) -> int | None:
        if value is None:
            return self._duty
        if not 0 <= value <= 65535:
            raise ValueError("duty out of range")
        self._duty = value
        _log(self.pin.id, "duty_u16", value)
        return None


class ADC:
    ATTN_0DB = 0
    ATTN_11DB = 3

    def __init__(self, pin: Pin, atten: int = 0) -> None:
        self.pin = pin.id
        self.reads = 0

    def read_uv(self) -> int:
        self.reads += 1
        return int(WORLD["adc_uv"][str(self.pin)])

    def read_u16(self) -> int:
        self.reads += 1
        return int(WORLD["adc_u16"][str(self.pin)])


class UART:
    """A UART on a pty master: ``WORLD["uart_fd"]``, non-blocking like ``timeout=0``."""

    def __init__(self, uart_id: int, baudrate: int = 115200, tx: int = -1, rx: int = -1,
                 timeout: int = 0, rxbuf: int = 256) -> None:
        self.fd = int(WORLD["uart_fd"])
        os.set_blocking(self.fd, False)

    def fileno(self) -> int:
        return self.fd

    def read(self, n: int = 4096) -> bytes | None:
        try:
            return os.read(self.fd, n) or None
        except BlockingIOError:
            return None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            view = view[written:]
        return len(data)


class I2C:
    def __init__(self, bus: int, sda: Pin, scl: Pin, freq: int = 400000) -> None:
        self.started = False

    def writeto(self, addr: int, data: bytes) -> None:
        if "sht3x" not in WORLD:
            raise OSError(19, "ENODEV")
        self.started = True

    def readfrom(self, addr: int, n: int) -> bytes:
        temp, rh = WORLD["sht3x"]
        words = [round((temp + 45) * 65535 / 175), round(rh * 65535 / 100)]
        out = b""
        for w in words:
            pair = bytes([w >> 8, w & 0xFF])
            out += pair + bytes([_crc8(pair)])
        return out


def _crc8(data: bytes) -> int:
    crc = 0xFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def time_pulse_us(pin: Pin, level: int, timeout_us: int = 1000000) -> int:
    return int(WORLD.get("echo_us", -1))
