"""`hydrogate demo`: three simulated tanks, the real gateway, a live terminal view, time-compressed.

Nothing is faked on the gateway side: the tanks are `sim` nodes on real
loopback sockets and a real pseudo-terminal, and the gateway polls,
calibrates, controls and buffers exactly as in the field. With no broker the
buffer simply fills, as it would during an internet outage; `--broker` points
it at a local MQTT broker instead.

The plants run ``--speed`` times faster than the clock (20 by default), so
that control can be watched: within two minutes tank-a's TDS and pH walk to
lettuce's setpoints under the adaptive controller, tank-b's under the
rule-based one, and tank-c, whose water is too low to dose, has its doses
refused by the safety layer. Everything the gateway times is scaled to
match: the poll interval, the control cycle (averaging windows, mixing wait,
hold times, the interval between evaluations), the longest single dose and
how old a reading may be before it is stale; the pumps are declared
``--speed`` times stronger, because a pump running one second of the clock
runs ``--speed`` seconds of plant time. The screen is the one `hydrogate
status --watch` shows for the real daemon (gateway/statusview.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Config, parse_config
from gateway.daemon import Gateway
from gateway.status import collect
from gateway.statusview import Screen, render
from rules.controller import ACTUATORS

#: tank-a: raw probe voltages calibrated at the gateway, adaptive control to lettuce.
#: tank-b: engineering values, rule-based control. tank-c: serial, water too low to dose.
#: Both controlled tanks start short of nutrient and off in pH, in opposite directions.
DEMO_TANKS: tuple[dict[str, Any], ...] = (
    {"name": "tank-a", "transport": "tcp", "raw": True, "tds": 430.0, "ph": 6.9},
    {"name": "tank-b", "transport": "tcp", "raw": False, "tds": 540.0, "ph": 5.6},
    {"name": "tank-c", "transport": "serial", "raw": False, "tds": 520.0, "ph": 6.2,
     "volume_l": 0.8},
)
#: Plant seconds between two polls of a tank.
PLANT_POLL_S = 5.0
#: The cycle's timings (seconds) in plant time, scaled by 1/--speed, with the config's floors.
CYCLE_S = {"tds_average_s": (10.0, 1.0), "ph_average_s": (30.0, 1.0),
           "mixing_wait_s": (60.0, 0.0), "tds_hold_s": (180.0, 0.0), "ph_hold_s": (300.0, 0.0),
           "max_cycle_s": (3600.0, 60.0), "interval": (30.0, 0.0)}
#: Nominal pump flow (ml/s at duty 255) of the simulated plant.
FLOW_ML_S = 1.58


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hydrogate demo`."""
    parser.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (default: Ctrl-C)"
    )
    parser.add_argument(
        "--speed", type=float, default=20.0,
        help="plant time per second of the clock (default 20; 1 is real time)",
    )
    parser.add_argument(
        "--storage", type=Path, default=None, help="SQLite buffer file (default: a temporary one)"
    )
    parser.add_argument(
        "--broker", default=None, metavar="HOST:PORT",
        help="forward to this MQTT broker (no token) instead of buffering only",
    )
    parser.add_argument("--refresh", type=float, default=1.0, help="screen refresh period (s)")
    parser.add_argument(
        "--poll", type=float, default=None,
        help=f"poll interval of the simulated nodes (s; default {PLANT_POLL_S:g} s of plant time)",
    )


def demo_config(
    urls: dict[str, str],
    storage: Path,
    broker: str | None,
    poll: float,
    *,
    speed: float = 1.0,
    strengths: dict[str, dict[str, float]] | None = None,
) -> Config:
    """The embedded demo configuration at ``speed``, validated like any user's file.

    ``strengths``: each tank's pH solutions' measured strength
    (``plant.ph_ml_per_l_per_unit``), as a titration would have found it.
    """
    cycle = {key: round(max(floor, plant / speed), 3) for key, (plant, floor) in CYCLE_S.items()}
    cycle["max_cycle_s"] = max(cycle["max_cycle_s"], cycle["tds_hold_s"] + cycle["ph_hold_s"])
    safety = {
        "max_actuation_ms": max(1000, round(120_000 / speed)),
        "stale_after_s": max(2.0 * poll + 0.5, 60.0 / speed),
        "stuck_after_s": max(5.0 * poll, 900.0 / speed),
    }
    nodes: list[dict[str, Any]] = []
    for tank in DEMO_TANKS:
        node: dict[str, Any] = {
            "name": tank["name"], "url": urls[tank["name"]], "poll_interval": poll,
            "safety": dict(safety),
            # One second of the clock runs `speed` seconds of plant time, pumps included.
            "plant": {"flow_ml_s": {a: round(FLOW_ML_S * speed, 3)
                                    for a in ACTUATORS}},
        }
        if strengths and strengths.get(tank["name"]):
            node["plant"]["ph_ml_per_l_per_unit"] = strengths[tank["name"]]
        if tank["raw"]:
            node["calibration"] = {
                "tds": {
                    "source": "tds_v",
                    "poly": [913.98, -2556.2, 2437, -416.27, 69.331],
                    "valid": [0.04, 1.58],
                    "temp_coefficient": 0.02,
                },
                "ph": {"source": "ph_adc", "poly": [0.0025, 3.9926]},
            }
        if tank["name"] == "tank-a":
            node["control"] = {"controller": "adaptive", "crop": "lettuce", **cycle}
        elif tank["name"] == "tank-b":
            node["control"] = {"controller": "rb", "tds_setpoint": 700, "ph_setpoint": 6.0,
                               **cycle}
        else:
            node["control"] = {"controller": "rb", "tds_setpoint": 800, "ph_setpoint": 6.0,
                               **cycle}
        nodes.append(node)
    data: dict[str, Any] = {
        "gateway": {"name": "hydrogate-demo"},
        # A demo forwards at once, whatever the machine's NTP says.
        "storage": {"path": str(storage), "clock_sync_wait": 0},
        "nodes": nodes,
    }
    if broker:
        host, _, port = broker.rpartition(":")
        data["thingsboard"] = {
            "host": host or "127.0.0.1", "port": int(port), "access_token": "demo",
        }
    return parse_config(data)


def titrated(plant: Any) -> dict[str, float]:
    """What a titration of ``plant`` near pH 6 finds (ml per litre per pH unit), per pump.

    The demo's tanks come titrated, as a grower's would after `hydrogate
    titrate`: without it the pH safety envelope starts from doses of a few
    hundredths of a millilitre, less than the millisecond a pump declared 20
    times stronger can run.
    """
    return {
        "ph_up": round(plant.titration_ml_per_l("ph_up", 5.7, 6.0) / 0.3, 4),
        "ph_down": round(plant.titration_ml_per_l("ph_down", 6.6, 6.3) / 0.3, 4),
    }


async def run_demo(
    args: argparse.Namespace, until: Callable[[Gateway], bool] | None = None
) -> int:
    """Start the tanks and the gateway, show them until Ctrl-C, --duration or ``until``."""
    # Imported here: `hydrogate run` builds this command's parser too and must
    # not load the simulator (and numpy) into the daemon.
    from sim.node import SimNode
    from sim.plant import Reservoir

    speed = float(args.speed)
    if not 0 < speed <= 1000:
        print("hydrogate demo: --speed must be more than 0 and at most 1000", file=sys.stderr)
        return 2
    poll = args.poll if args.poll is not None else max(0.1, PLANT_POLL_S / speed)
    with contextlib.ExitStack() as stack:
        storage: Path = args.storage or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="hydrogate-demo-"))
        ) / "demo.sqlite"
        sims: list[SimNode] = []
        urls: dict[str, str] = {}
        try:
            for seed, tank in enumerate(DEMO_TANKS, start=1):
                plant = Reservoir.from_state(
                    tds=tank["tds"], ph=tank["ph"], volume_l=tank.get("volume_l"), seed=seed
                )
                sim = SimNode(tank["name"], plant, raw=tank["raw"], speed=speed)
                sims.append(sim)
                if tank["transport"] == "tcp":
                    port = await sim.serve_tcp("127.0.0.1", 0)
                    urls[tank["name"]] = f"tcp://127.0.0.1:{port}"
                else:
                    urls[tank["name"]] = f"serial://{sim.open_pty()}?baud=115200"
            config = demo_config(urls, storage, args.broker, poll, speed=speed,
                                 strengths={s.name: titrated(s.plant) for s in sims})
            gateway = Gateway(config)
            return await _run(gateway, args, speed, until)
        finally:
            for sim in sims:
                await sim.close()


async def _run(
    gateway: Gateway, args: argparse.Namespace, speed: float,
    until: Callable[[Gateway], bool] | None,
) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, gateway.request_stop)
    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(gateway.run(), name="gateway")
            await gateway.ready.wait()
            screen = Screen(sys.stdout, log_lines=8)
            while not gateway.stopping:
                up = time.monotonic() - started
                title = (
                    f"hydrogate demo - {len(gateway.runners)} simulated tanks at {speed:g}x"
                    f" (plant time {up * speed / 60:.0f} min) - up {up:.0f} s - Ctrl-C to stop"
                )
                status = await collect(gateway, gateway.status_watcher.sampler)
                screen.show(render(status, title=title) + screen.log_tail())
                if (args.duration and up >= args.duration) or (until and until(gateway)):
                    gateway.request_stop()
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(args.refresh):
                        await gateway.wait_stopping()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    store = gateway.store
    depth = store.stats.depth if store is not None else 0
    print(f"\ndemo stopped: {depth} readings left in the buffer, pumps commanded off.")
    return 0
