"""The firmware's real main loop against the real gateway: `hydrogate run` polls it over a pty and TCP.

The firmware runs under CPython with the fake machine/network modules of
tests/fakeboard (a pty master as its UART, a real listening socket for
Wi-Fi TCP, pins that log every change with the system's monotonic clock).
The gateway is a `hydrogate run` subprocess forwarding to a real Mosquitto;
RPCs come from the test as ThingsBoard would send them. The link watchdog is
cut to 3 s for the SIGKILL case (the real 30 s is in tests/test_firmware.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import tty
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Broker
from tests.firmware_proc import PUMP_PINS, TANK_CONFIG, TANK_WORLD, FirmwareNode, firmware_node
from tests.gateway_harness import config_dict, node_entry, write_config
from tests.mqtt_recorder import Recorder

pytestmark = pytest.mark.slow

TDS_POLY = [913.98, -2556.2, 2437, -416.27, 69.331]
WATCHDOG_MS = 3000


def runs(node: FirmwareNode, pin: int, *, active_low: bool = False) -> list[tuple[float, float | None]]:
    """(on, off) times of a pump pin from the fake board's log; off None while still on."""
    out: list[tuple[float, float | None]] = []
    on_at: float | None = None
    for ev in node.pin_events():
        if ev["pin"] != pin or ev["kind"] != "duty_u16":
            continue
        on = (ev["value"] < 65535) if active_low else (ev["value"] > 0)
        if on and on_at is None:
            on_at = ev["t"]
        elif not on and on_at is not None:
            out.append((on_at, ev["t"]))
            on_at = None
    if on_at is not None:
        out.append((on_at, None))
    return out


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_gateway_polls_doses_and_stops_the_firmware(broker: Broker, tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bad = {"type": "dht22", "pin": 2}  # a strapping pin: refused, reported, the rest still works
    config_a = {**TANK_CONFIG, "sensors": [*TANK_CONFIG["sensors"], bad]}
    config_b = {"name": "tank-b", "uart": {"tx": 17, "rx": 16},
                "sensors": [{"type": "tds", "pin": 34}], "actuators": [{"name": "nutrient", "pin": 25}]}
    calib = {"tds": {"source": "tds_v", "poly": TDS_POLY, "valid": [0.04, 1.58],
                     "temp_coefficient": 0.02},
             "ph": {"source": "ph_adc", "poly": [0.0025, 3.9926]}}
    with firmware_node(tmp_path / "a", config_a, TANK_WORLD, watchdog_ms=WATCHDOG_MS) as a, \
            firmware_node(tmp_path / "b", config_b, {"adc_uv": {"34": 860000}}, tcp=False,
                          uart_fd=master) as b:
        cfg = write_config(tmp_path / "gw.yaml", config_dict(
            tmp_path / "gw.sqlite",
            [node_entry("tank-a", f"tcp://127.0.0.1:{a.port}", poll_interval=0.5, keepalive=1,
                        calibration=calib),
             node_entry("tank-b", f"serial://{os.ttyname(slave)}", poll_interval=0.5,
                        calibration={"tds": calib["tds"]})],
            broker.port))
        log = open(tmp_path / "gateway.log", "w")  # noqa: SIM115 -- closed in the finally below
        gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)],
                              stderr=log)
        try:
            async with Recorder(broker.port) as rec:
                def full(e: dict[str, Any]) -> bool:  # the DS18B20's first value comes 750 ms late
                    return {"tds", "water_temp"} <= set(e["values"])

                await rec.wait_for(lambda: any(map(full, rec.entries().get("tank-a", [])))
                                   and any("tds" in e["values"] for e in rec.entries().get("tank-b", [])),
                                   timeout=30, what="calibrated readings from both nodes")
                reading = next(e["values"] for e in rec.entries()["tank-a"] if full(e))
                raw_tds = float(np.polyval(TDS_POLY, 1.12))
                assert reading["tds"] == pytest.approx(raw_tds / (1 + 0.02 * (24.5 - 25)), rel=1e-6)
                assert reading["ph"] == pytest.approx(0.0025 * 1152 + 3.9926)
                assert reading["water_temp"] == 24.5 and reading["tds_v"] == 1.12
                b_reading = next(e["values"] for e in rec.entries()["tank-b"] if "tds" in e["values"])
                assert b_reading["tds"] == pytest.approx(float(np.polyval(TDS_POLY, 0.86)), rel=1e-6)

                # A dose reaches the pin for the commanded time, on the node's own clock.
                reply = await rec.rpc("tank-a", 1, "actuate", {"actuator": "nutrient", "ms": 1500, "duty": 200})
                assert reply["data"]["success"] is True, reply
                await wait_until(lambda: any(off for _, off in runs(a, 25)), 10, "the dose to end")
                on, off = runs(a, 25)[0]
                # Never short; late only by the node's loop being descheduled (a loaded machine).
                assert off is not None and 1.5 - 0.02 <= off - on <= 1.5 + 1.0
                assert {e["value"] for e in a.pin_events() if e["pin"] == 25} == {0, 200 * 257}

                # Over the serial line too.
                reply = await rec.rpc("tank-b", 2, "actuate", {"actuator": "nutrient", "ms": 800})
                assert reply["data"]["success"] is True, reply
                await wait_until(lambda: any(off for _, off in runs(b, 25)), 10, "the serial dose")
                on, off = runs(b, 25)[0]
                assert off is not None and 0.8 - 0.02 <= off - on <= 0.8 + 1.0

                # `stop` turns a long run off at once (refill is active-low).
                reply = await rec.rpc("tank-a", 3, "actuate", {"actuator": "refill", "ms": 60000})
                assert reply["data"]["success"] is True, reply
                await wait_until(lambda: runs(a, 13, active_low=True), 5, "refill on")
                stop_sent = time.monotonic()
                reply = await rec.rpc("tank-a", 4, "stop")
                replied = time.monotonic()
                assert reply["data"]["success"] is True, reply
                await wait_until(lambda: runs(a, 13, active_low=True)[-1][1] is not None, 5, "refill off")
                # At once: the pin went off between the RPC and its reply (the firmware
                # switches off before it answers; one monotonic clock for both processes).
                off = runs(a, 13, active_low=True)[-1][1]
                assert off is not None and stop_sent <= off <= replied

                # The watchdog stops the pumps when the gateway dies mid-dose.
                reply = await rec.rpc("tank-a", 5, "actuate", {"actuator": "ph_up", "ms": 60000})
                assert reply["data"]["success"] is True, reply
                await wait_until(lambda: runs(a, PUMP_PINS["ph_up"]), 5, "ph_up on")
                gw.send_signal(signal.SIGKILL)
                gw.wait(timeout=10)
                killed = time.monotonic()
                await wait_until(lambda: runs(a, 26)[-1][1] is not None, 10, "the watchdog")
                off = runs(a, 26)[-1][1]
                assert off is not None
                # The last frame left at most one poll (0.5 s) before the kill; the
                # watchdog, not the end of the 60 s run, stopped it (a generous bound
                # above: the node's loop may be descheduled on a loaded machine).
                assert WATCHDOG_MS / 1000 - 0.7 <= off - killed <= WATCHDOG_MS / 1000 + 10.0
        finally:
            if gw.poll() is None:
                gw.terminate()
                gw.wait(timeout=15)
            log.close()
            os.close(master)
            os.close(slave)
        assert "config error: sensors[3]: pin: GPIO 2 is a strapping pin" in a.output()
    gateway_log = (tmp_path / "gateway.log").read_text()
    assert "node tank-a reports a problem: sensors[3]: pin: GPIO 2 is a strapping pin" in gateway_log
