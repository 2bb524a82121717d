"""Start the firmware's real main loop under CPython on the fake board (tests/fakeboard)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "fakeboard" / "run_node.py"


@dataclass
class FirmwareNode:
    proc: subprocess.Popen[str]
    port: int | None
    pin_log: Path
    out: Path

    def pin_events(self) -> list[dict[str, Any]]:
        if not self.pin_log.exists():
            return []
        return [json.loads(line) for line in self.pin_log.read_text().splitlines()]

    def output(self) -> str:
        return self.out.read_text()


@contextmanager
def firmware_node(
    tmp: Path,
    config: dict[str, Any],
    world: dict[str, Any] | None = None,
    *,
    tcp: bool = True,
    uart_fd: int | None = None,
    watchdog_ms: int | None = None,
) -> Iterator[FirmwareNode]:
    """The firmware in a subprocess; TCP on a free loopback port unless ``tcp`` is False."""
    port = free_port() if tcp else None
    cfg = dict(config)
    if tcp:
        cfg.setdefault("wifi", {"ssid": "test", "password": "secret"})
        cfg["tcp"] = {"port": port, "bind": "127.0.0.1"}
    w = dict(world or {})
    w["pin_log"] = str(tmp / "pins.jsonl")
    if uart_fd is not None:
        w["uart_fd"] = uart_fd
    (tmp / "world.json").write_text(json.dumps(w))
    (tmp / "config.json").write_text(json.dumps(cfg))
    out = tmp / "node.out"
    cmd = [sys.executable, str(RUNNER), str(tmp / "world.json"), str(tmp / "config.json")]
    if watchdog_ms is not None:
        cmd.append(str(watchdog_ms))
    with open(out, "w") as stdout:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, text=True,
                                pass_fds=() if uart_fd is None else (uart_fd,),
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    node = FirmwareNode(proc, port, tmp / "pins.jsonl", out)
    try:
        if port is not None:
            wait_port(port)
        else:
            deadline = time.monotonic() + 10
            while " up: " not in out.read_text() and time.monotonic() < deadline:
                time.sleep(0.02)
        yield node
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


TANK_CONFIG: dict[str, Any] = {
    "name": "tank-a",
    "uart": False,
    "sensors": [
        {"type": "tds", "pin": 34},
        {"type": "ph", "pin": 35, "key": "ph_adc"},
        {"type": "ds18b20", "pin": 4},
    ],
    "actuators": [
        {"name": "nutrient", "pin": 25},
        {"name": "ph_up", "pin": 26},
        {"name": "ph_down", "pin": 27},
        {"name": "refill", "pin": 13, "active_low": True},
    ],
}
TANK_WORLD: dict[str, Any] = {
    "adc_uv": {"34": 1120000},
    "adc_u16": {"35": 1152 << 4},
    "ds18b20": 24.5,
}
PUMP_PINS = {"nutrient": 25, "ph_up": 26, "ph_down": 27, "refill": 13}
