"""A flapping uplink: how soon after each return of the broker the gateway is back.

    python -m bench.flap [--rounds 50] [--outage 1 5] [--window 1 5] [--seed 1]
                         [--gateway-dir DIR]

A real `hydrogate run` (its own process) polls a simulated push-mode node
and forwards to a real Mosquitto through `TapGate`, a TCP proxy that this
script shuts (refusing connections and cutting the open one: the site's link
is down) and opens again, ``--rounds`` times, for outages and up-windows of
random length. The gate reads the MQTT packets it carries, so for every
return it times, from the moment connections are accepted again:

- back: the first PUBACK the broker sends the gateway (its session works);
- telemetry: the first PUBACK of a ``v1/gateway/telemetry`` message.

A window with no telemetry PUBACK is a missed window. A subscriber on the
broker then checks that every reading (``seq``) arrived. ``--gateway-dir``
runs the daemon from another checkout (a baseline in the same session).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import yaml

from gateway.tasks import cancel_and_wait
from sim.node import SimNode

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PUBLISH, PUBACK = 3, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MqttTap:
    """Cuts one direction of an MQTT 3.1.1 stream into packets: (type, flags, body)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buf += data
        out: list[tuple[int, int, bytes]] = []
        while len(self._buf) >= 2:
            length, shift, i = 0, 0, 1
            while True:
                if i >= len(self._buf):
                    return out
                byte = self._buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if not byte & 0x80:
                    break
            if len(self._buf) < i + length:
                return out
            head = self._buf[0]
            out.append((head >> 4, head & 0x0F, bytes(self._buf[i : i + length])))
            del self._buf[: i + length]
        return out


@dataclass
class TapGate:
    """A TCP proxy to the broker that can be shut, and that times PUBACKs by topic."""

    target: int
    port: int = field(default_factory=free_port)
    acks: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, topic)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def up(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        await self.down()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        self._writers |= {writer, up_writer}
        topics: dict[int, str] = {}  # packet id -> topic of the gateway's QoS 1 publishes

        def outgoing(ptype: int, flags: int, body: bytes) -> None:
            if ptype == PUBLISH and flags & 0x06:
                n = int.from_bytes(body[:2], "big")
                topics[int.from_bytes(body[2 + n : 4 + n], "big")] = body[2 : 2 + n].decode()

        def incoming(ptype: int, flags: int, body: bytes) -> None:
            if ptype == PUBACK:
                self.acks.append((time.monotonic(), topics.pop(int.from_bytes(body[:2], "big"),
                                                               "?")))

        await asyncio.gather(self._pipe(reader, up_writer, outgoing),
                             self._pipe(up_reader, writer, incoming), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()
        self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Any) -> None:
        tap = MqttTap()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                for packet in tap.feed(data):
                    seen(*packet)
                writer.write(data)
                await writer.drain()
        writer.close()


@dataclass
class Round:
    outage_s: float
    window_s: float
    back_s: float | None  # first PUBACK after the return
    telemetry_s: float | None  # first telemetry PUBACK after the return


async def flap(gate: TapGate, rounds: int, outage: tuple[float, float],
               window: tuple[float, float], rng: random.Random) -> list[Round]:
    """Shut and open the gate ``rounds`` times; time the gateway's return each time."""
    out = []
    for _ in range(rounds):
        down_s, up_s = rng.uniform(*outage), rng.uniform(*window)
        await gate.down()
        await asyncio.sleep(down_s)
        seen = len(gate.acks)
        await gate.up()
        back = time.monotonic()
        await asyncio.sleep(up_s)
        acks = gate.acks[seen:]
        first = next((t - back for t, _ in acks), None)
        tele = next((t - back for t, topic in acks if topic == "v1/gateway/telemetry"), None)
        out.append(Round(down_s, up_s, first, tele))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(rounds: list[Round]) -> dict[str, Any]:
    back = [r.back_s for r in rounds if r.back_s is not None]
    tele = [r.telemetry_s for r in rounds if r.telemetry_s is not None]
    result: dict[str, Any] = {
        "rounds": len(rounds),
        "missed_windows": sum(r.telemetry_s is None for r in rounds),
    }
    for name, values in (("back", back), ("telemetry", tele)):
        if values:
            result[f"{name}_p50_s"] = round(statistics.median(values), 3)
            result[f"{name}_p99_s"] = round(percentile(values, 0.99), 3)
            result[f"{name}_max_s"] = round(max(values), 3)
    return result


@contextlib.contextmanager
def mosquitto(workdir: Path) -> Any:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                    "max_queued_messages 0\nlog_type error\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def until(predicate: Any, seconds: float) -> None:
    """Poll ``predicate`` until true or ``seconds`` passed."""
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:  # noqa: ASYNC110 - a bounded poll
        await asyncio.sleep(0.1)


async def collect_seqs(port: int, seqs: set[int], ready: asyncio.Event) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier="flap-sub") as client:
        await client.subscribe("v1/gateway/telemetry", qos=1)
        ready.set()
        async for msg in client.messages:
            payload = json.loads(msg.payload)
            for entries in payload.values():
                seqs.update(int(e["values"]["seq"]) for e in entries if "seq" in e["values"])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp, mosquitto(Path(tmp)) as broker:
        node = SimNode("tank-a", seq=True, push_interval=args.push)
        gate = TapGate(broker)
        await gate.up()
        seqs: set[int] = set()
        ready = asyncio.Event()
        sub = asyncio.create_task(collect_seqs(broker, seqs, ready))
        await ready.wait()
        node_port = await node.serve_tcp("127.0.0.1", 0)
        cfg = {
            "gateway": {"name": "gw-flap", "health_interval": 60},
            "storage": {"path": str(Path(tmp) / "gw.sqlite")},
            "thingsboard": {"host": "127.0.0.1", "port": gate.port, "access_token": "bench"},
            "nodes": [{"name": "tank-a", "url": f"tcp://127.0.0.1:{node_port}",
                       "poll_interval": 5}],
        }
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONPATH": str(args.gateway_dir)}
        log = Path(tmp) / "daemon.log"
        daemon = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
            [sys.executable, "-m", "gateway.cli", "run", "-c", str(Path(tmp) / "config.yaml")],
            cwd=args.gateway_dir, env=env, stderr=log.open("wb"))  # noqa: SIM115, ASYNC230
        try:
            await until(lambda: bool(seqs), 30)
            rounds = await flap(gate, args.rounds, tuple(args.outage), tuple(args.window), rng)
            await node.close()
            last = node.last_seq
            await until(lambda: set(range(1, last + 1)) <= seqs, 120)
            lost = len(set(range(1, last + 1)) - seqs)
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=15)
            await node.close()
            await cancel_and_wait(sub)  # bounded: aiomqtt's exit may need a second cancel
            await gate.close()
        result = summary(rounds)
        result.update(readings=last, lost=lost, daemon_exit=code,
                      tracebacks=log.read_text().count("Traceback"))
        if args.verbose:
            for r in rounds:
                print(r, file=sys.stderr)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--outage", type=float, nargs=2, default=(1.0, 5.0))
    parser.add_argument("--window", type=float, nargs=2, default=(1.0, 5.0))
    parser.add_argument("--push", type=float, default=0.05, help="seconds between readings")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gateway-dir", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=1))


if __name__ == "__main__":
    main()
