"""`hydrogate demo`: three simulated tanks, the real gateway, a live terminal view.

Nothing is faked on the gateway side: the tanks are `sim` nodes on real
loopback sockets and a real pseudo-terminal, and the gateway polls,
calibrates, controls and buffers exactly as in the field. With no broker the
buffer simply fills, as it would during an internet outage; `--broker` points
it at a local MQTT broker instead.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from gateway.config import Config, parse_config
from gateway.daemon import Gateway

#: tank-a: raw probe voltages calibrated at the gateway, fuzzy control to lettuce.
#: tank-b: engineering values, rule-based control. tank-c: serial, monitored only.
DEMO_TANKS: tuple[dict[str, Any], ...] = (
    {"name": "tank-a", "transport": "tcp", "raw": True, "tds": 430.0, "ph": 6.9},
    {"name": "tank-b", "transport": "tcp", "raw": False, "tds": 910.0, "ph": 5.4},
    {"name": "tank-c", "transport": "serial", "raw": False, "tds": 760.0, "ph": 6.2},
)

SHOWN_KEYS = ("tds", "ph", "water_temp", "water_level", "air_temp", "humidity")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hydrogate demo`."""
    parser.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (default: Ctrl-C)"
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
        "--poll", type=float, default=2.0, help="poll interval of the simulated nodes (s)"
    )


def demo_config(urls: dict[str, str], storage: Path, broker: str | None, poll: float) -> Config:
    """The embedded demo configuration, validated like any user's file."""
    nodes: list[dict[str, Any]] = []
    for tank in DEMO_TANKS:
        node: dict[str, Any] = {
            "name": tank["name"], "url": urls[tank["name"]], "poll_interval": poll,
        }
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
            node["control"] = {"controller": "fuzzy", "crop": "lettuce", "interval": 30}
        elif tank["name"] == "tank-b":
            node["control"] = {
                "controller": "rb", "tds_setpoint": 700, "ph_setpoint": 6.0, "interval": 30,
            }
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


async def run_demo(args: argparse.Namespace) -> int:
    """Start the tanks and the gateway, show them until Ctrl-C or --duration."""
    # Imported here: `hydrogate run` builds this command's parser too and must
    # not load the simulator (and numpy) into the daemon.
    from sim.node import SimNode
    from sim.plant import Reservoir

    with contextlib.ExitStack() as stack:
        storage: Path = args.storage or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="hydrogate-demo-"))
        ) / "demo.sqlite"
        sims: list[SimNode] = []
        urls: dict[str, str] = {}
        try:
            for seed, tank in enumerate(DEMO_TANKS, start=1):
                plant = Reservoir.from_state(tds=tank["tds"], ph=tank["ph"], seed=seed)
                sim = SimNode(tank["name"], plant, raw=tank["raw"])
                sims.append(sim)
                if tank["transport"] == "tcp":
                    port = await sim.serve_tcp("127.0.0.1", 0)
                    urls[tank["name"]] = f"tcp://127.0.0.1:{port}"
                else:
                    urls[tank["name"]] = f"serial://{sim.open_pty()}?baud=115200"
            config = demo_config(urls, storage, args.broker, args.poll)
            gateway = Gateway(config)
            return await _run(gateway, args)
        finally:
            for sim in sims:
                await sim.close()


async def _run(gateway: Gateway, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, gateway.request_stop)
    started = time.monotonic()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(gateway.run(), name="gateway")
            await gateway.ready.wait()
            screen = Screen(sys.stdout)
            while not gateway.stopping:
                screen.show(render(gateway, time.monotonic() - started) + screen.log_tail())
                if args.duration and time.monotonic() - started >= args.duration:
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


class Screen:
    """Redraws in place on a terminal; prints plain snapshots when piped.

    On a terminal the latest log lines are shown under the table instead of
    scrolling it away.
    """

    def __init__(self, out: TextIO, log_lines: int = 8) -> None:
        self._out = out
        self._tty = out.isatty()
        self._log: collections.deque[str] = collections.deque(maxlen=log_lines)
        if self._tty:
            root = logging.getLogger()
            for handler in list(root.handlers):
                root.removeHandler(handler)
            root.addHandler(_TailHandler(self._log))

    def log_tail(self) -> str:
        if not self._log:
            return ""
        return "\nrecent log:\n" + "\n".join(self._log) + "\n"

    def show(self, text: str) -> None:
        if self._tty:
            self._out.write("\x1b[H\x1b[J" + text)
        else:
            self._out.write(text + "\n")
        self._out.flush()


class _TailHandler(logging.Handler):
    def __init__(self, lines: collections.deque[str]) -> None:
        super().__init__()
        self._lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.append(self.format(record))


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def render(gateway: Gateway, uptime: float) -> str:
    """One screen: each tank's live values and state, then the gateway's."""
    lines = [
        f"hydrogate demo - {len(gateway.runners)} simulated tanks - up {uptime:.0f} s"
        " - Ctrl-C to stop",
        "",
        f"{'node':8} {'link':5} " + " ".join(f"{k:>11}" for k in SHOWN_KEYS)
        + f" {'severity':9} {'cycle':6} {'mode':7} last dose",
    ]
    for name, runner in gateway.runners.items():
        state = runner.state()
        values = state["values"]
        dose = runner.control.last_dose_text or "-"
        lines.append(
            f"{name:8} {state['link']:5} "
            + " ".join(f"{_fmt(values.get(k)):>11}" for k in SHOWN_KEYS)
            + f" {state.get('severity', '-'):9} {state.get('cycle', 'idle'):6}"
            f" {state.get('mode', 'monitor'):7} {dose}"
        )
        reason = state.get("severity_reason")
        if reason and state.get("severity") not in (None, "none"):
            lines.append(f"{'':14}{reason}")
    store = gateway.store
    lines.append("")
    if store is not None:
        s = store.stats
        lines.append(
            f"buffer: {s.depth} readings waiting, {s.received} received,"
            f" {s.forwarded} forwarded, {s.evicted} evicted - {store.path}"
        )
    uplink = gateway.uplink
    if uplink is None:
        lines.append("uplink: offline (no ThingsBoard configured): readings are buffered")
    else:
        lines.append(f"uplink: {'connected' if uplink.connected else 'disconnected'}")
    errors = {n: r.stats.total_errors() for n, r in gateway.runners.items()}
    lines.append("link errors: " + ", ".join(f"{n} {e}" for n, e in errors.items()))
    return "\n".join(lines) + "\n"
