"""Long fuzz run of every outside interface of a running daemon.

    python -m bench.fuzz [--rpcs 4000] [--attributes 2000] [--frames 100000] [--seed 0]

One `hydrogate run` process serves two nodes: a simulated tank (`python -m
sim`) and `bench.hostile.HostileNode`, which answers the gateway's requests
with replies that are sometimes mutated and floods ``--frames`` fuzzed
NodeLink frames. Meanwhile `FakeServer` publishes ``--rpcs`` mutated RPCs
and ``--attributes`` mutated shared-attribute updates (Hypothesis, from
`bench.hostile`) through a real Mosquitto, waiting for the reply to every
RPC that can be answered. A daemon that exits is counted and restarted.

Prints JSON: inputs sent, answerable RPCs and how many were answered,
daemon exits, tracebacks in the daemon's log, and the daemon's own fault
counters from its last health telemetry.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, given, settings

from bench.flap import mosquitto
from bench.hostile import FakeServer, HostileNode, Rpc, attribute_payloads, rpc_payloads


class Daemon:
    """`hydrogate run` on a config; restarted (and counted) if it ever exits."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.exits = 0
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c",
                                 str(self.config)], stderr=self.log.open("ab"))

    def check(self) -> None:
        if self.proc.poll() is not None:
            self.exits += 1
            self.proc = self._start()
            time.sleep(2)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=15)


def hostile_thread(node: HostileNode, ready: threading.Event, stop: threading.Event,
                   ports: list[int]) -> None:
    """Run the hostile node on its own event loop until ``stop`` is set."""

    async def main() -> None:
        ports.append(await node.serve())
        ready.set()
        while not stop.is_set():  # noqa: ASYNC110 - a thread's Event, not the loop's
            await asyncio.sleep(0.1)
        await node.close()

    asyncio.run(main())


def fuzz_server(server: FakeServer, daemon: Daemon, args: argparse.Namespace) -> dict[str, int]:
    counts = {"rpcs": 0, "answerable": 0, "answered": 0, "attributes": 0}
    ids = itertools.count(1)
    common = {"deadline": None, "database": None, "phases": [Phase.generate],
              "suppress_health_check": list(HealthCheck)}

    @settings(max_examples=args.rpcs, **common)  # type: ignore[arg-type]
    @given(rpc_payloads(ids=lambda: next(ids)))
    def rpcs(rpc: Rpc) -> None:
        server.publish("v1/gateway/rpc", rpc.payload)
        counts["rpcs"] += 1
        if rpc.answerable:
            counts["answerable"] += 1
            try:
                server.reply(rpc.device, rpc.id, timeout=10)
                counts["answered"] += 1
            except AssertionError:
                pass
        daemon.check()

    @settings(max_examples=args.attributes, **common)  # type: ignore[arg-type]
    @given(attribute_payloads())
    def attributes(payload: bytes) -> None:
        server.publish("v1/gateway/attributes", payload)
        counts["attributes"] += 1
        daemon.check()

    rpcs()
    attributes()
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp_name, mosquitto(Path(tmp_name)) as broker:
        tmp = Path(tmp_name)
        sim = subprocess.Popen([sys.executable, "-m", "sim", "--tcp", "127.0.0.1:0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert sim.stdout is not None
        sim_addr = sim.stdout.readline().decode().split()[2]
        hostile = HostileNode(seed=args.seed, flood=args.frames)
        ready, stop = threading.Event(), threading.Event()
        ports: list[int] = []
        thread = threading.Thread(target=hostile_thread, args=(hostile, ready, stop, ports))
        thread.start()
        ready.wait(10)
        control = {"tds_setpoint": 800, "ph_setpoint": 6.0, "mode": "manual", "interval": 0}
        cfg = {
            "gateway": {"name": "gw-fuzz", "health_interval": 1},
            "storage": {"path": str(tmp / "gw.sqlite")},
            "thingsboard": {"host": "127.0.0.1", "port": broker, "access_token": "fuzz"},
            "nodes": [
                {"name": "tank-a", "url": f"tcp://{sim_addr}", "poll_interval": 0.5,
                 "control": control},
                {"name": "hostile", "url": f"tcp://127.0.0.1:{ports[0]}", "poll_interval": 0.2,
                 "timeout": 0.5},
            ],
        }
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
        server = FakeServer(broker)
        daemon = Daemon(tmp / "config.yaml", tmp / "daemon.log")
        try:
            server.wait(lambda: True if any(t == "v1/gateway/connect"
                                            for t, _ in server.messages) else None, 30)
            counts = fuzz_server(server, daemon, args)
            deadline = time.monotonic() + 600
            while hostile.flood > 0 and time.monotonic() < deadline:
                daemon.check()
                time.sleep(0.5)
            daemon.check()
            final = {}
            for i, device in enumerate(("tank-a", "hostile")):
                rid = 2**31 - 1 - i
                server.publish("v1/gateway/rpc", json.dumps(
                    {"device": device, "data": {"id": rid, "method": "get_state"}}).encode())
                final[device] = server.reply(device, rid)["data"]["success"]
            health = [json.loads(raw) for topic, raw in server.messages
                      if topic == "v1/devices/me/telemetry"][-1]
        finally:
            code = daemon.stop()
            server.close()
            stop.set()
            thread.join(10)
            sim.terminate()
            sim.wait(10)
        text = daemon.log.read_text()
        return {
            **counts,
            "frames": hostile.sent,
            "frames_flooded": args.frames - hostile.flood,
            "node_requests_answered": hostile.requests,
            "daemon_exits": daemon.exits,
            "exit_code_on_sigterm": code,
            "tracebacks": text.count("Traceback"),
            "logging_errors": text.count("Logging error"),
            "log_lines": text.count("\n"),
            "final_get_state": final,
            "health": {k: v for k, v in health.items()
                       if k in ("input_refused", "input_faults", "malformed_in",
                                "hostile_link_errors", "tank-a_link_errors", "nodes_up")},
            "seconds": round(time.monotonic() - started, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpcs", type=int, default=4000)
    parser.add_argument("--attributes", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    print(json.dumps(run(parser.parse_args()), indent=1))


if __name__ == "__main__":
    main()
