"""What the local history, `hydrogate export` and `hydrogate backup` cost the daemon's ingest.

    python -m bench.history [--readings 100000] [--repeat 5]            # A: the store
    python -m bench.history --daemon [--rate 2000] [--window 10] [--repeat 3]   # B: a daemon

A (in process): readings go through the node task's real path
(LineSplitter -> decode -> NodeRunner -> Store.append) while an "uplink"
peeks and acknowledges them as fast as it can, with ``history_days`` 7 and
0 (no history) alternately, the same session. Reported: readings/s of the
event loop while it feeds them, and until every one is acknowledged (and,
with the history, written to it): medians and the ratio history/none.

B (a real daemon): ``hydrogate run`` with a Mosquitto broker, push-mode nodes
(bench.producer) at ``--rate`` readings/s and a subscriber standing in for
ThingsBoard; its file holds a pre-filled history of ``--prefill`` readings.
Windows of ``--window`` s, in turn: nothing else running (baseline), `hydrogate
export` of the whole history in a loop, `hydrogate backup` of the file in a
loop. In each: readings/s delivered, latency from the node to the subscriber
(p50, p99), the gateway's CPU; medians over ``--repeat`` rounds and ratios
against the baseline of the same round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.ingest import lines
from drivers.nodelink import Event, LineSplitter, decode
from gateway.clock import SystemClock
from gateway.config import parse_config
from gateway.node import NodeRunner
from gateway.store import Store


# ------------------------------------------------------------------------ A
async def store_run(n: int, history_days: float, workdir: Path) -> tuple[float, float]:
    """Readings/s (loop, until acknowledged and in the history) for one run."""
    config = parse_config({"gateway": {"name": "gw"}, "storage": {"path": str(workdir / "s.db")},
                           "nodes": [{"name": "tank-a", "url": "tcp://127.0.0.1:3333"}]})
    data = lines(n, raw=False)
    path = workdir / f"h-{history_days}-{time.monotonic_ns()}.sqlite"
    async with Store.open(path, max_rows=None, max_bytes=None,
                          history_days=history_days) as store:
        runner = NodeRunner(config.nodes[0], store=store, clock=SystemClock())
        acked = 0
        feeding = True

        async def uplink() -> None:
            nonlocal acked
            after = 0
            while feeding or acked < n:
                rows = await store.peek(2000, after)
                if not rows:
                    await asyncio.sleep(0.001)
                    continue
                after = rows[-1].id
                acked += await store.ack([r.id for r in rows])

        task = asyncio.create_task(uplink())
        splitter = LineSplitter()
        t0 = time.perf_counter()
        for start in range(0, len(data), 65536):
            for line in splitter.feed(data[start:start + 65536]):
                event = decode(line)
                assert isinstance(event, Event)  # the producer writes events only
                runner._on_event(event)  # noqa: SLF001 - the node task's entry point
            await asyncio.sleep(0)  # the uplink's turn, as in the daemon
        loop_s = time.perf_counter() - t0
        feeding = False
        await task
        await store.flush_history()
        total_s = time.perf_counter() - t0
        assert store.stats.forwarded >= n
        if history_days:
            assert store.stats.history_readings >= n
    return n / loop_s, n / total_s


async def store_bench(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, list[tuple[float, float]]] = {"none": [], "history": []}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        for i in range(args.repeat):  # which goes first alternates: no order effect
            order = (("none", 0.0), ("history", 7.0))
            for label, days in order if i % 2 == 0 else order[::-1]:
                runs[label].append(await store_run(args.readings, days, Path(tmp)))
    out: dict[str, Any] = {}
    for label, rs in runs.items():
        out[label] = {"loop": statistics.median(r[0] for r in rs),
                      "acknowledged": statistics.median(r[1] for r in rs)}
    for what in ("loop", "acknowledged"):
        ratio = out["history"][what] / out["none"][what]
        print(f"{what:13} none {out['none'][what]:8.0f}/s  history {out['history'][what]:8.0f}/s"
              f"  ratio {ratio:.3f}  (medians of {args.repeat})")
        out[f"ratio_{what}"] = ratio
    return out


# ------------------------------------------------------------------------ B
def prefill(db: Path, readings: int, nodes: list[str]) -> None:
    """A file whose history holds ``readings`` forwarded readings of the first node."""

    async def fill() -> None:
        base = int(time.time() * 1000) - readings * 100
        async with Store.open(db, max_rows=None, max_bytes=None, history_days=7) as store:
            rng = random.Random(1)
            for i in range(readings):  # noisy values, as probes give: they compress less
                store.append(nodes[0], base + i * 100, {
                    "seq": i, "tds": round(rng.gauss(800, 5), 2), "ph": round(rng.gauss(6, .02), 3),
                    "water_temp": round(rng.gauss(24, .1), 2)})
                if i % 20_000 == 19_999:
                    while rows := await store.peek(20_000):
                        await store.ack([r.id for r in rows])
            while rows := await store.peek(20_000):
                await store.ack([r.id for r in rows])

    asyncio.run(fill())


def daemon_bench(args: argparse.Namespace) -> dict[str, Any]:
    import psutil
    import yaml

    from bench.throughput import Broker, Subscriber, free_port_block, pct, stop_gateway

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        base_port = free_port_block(args.nodes)
        names = [f"bench-{i:03d}" for i in range(args.nodes)]
        db = work / "gw.sqlite"
        t = time.perf_counter()
        prefill(db, args.prefill, names)
        print(f"prefilled {args.prefill} readings of history in {time.perf_counter() - t:.0f} s"
              f" ({db.stat().st_size / 1048576:.1f} MiB)", flush=True)
        broker = Broker(work)
        broker.start()
        sub = Subscriber(broker.port)
        sub.start()
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({
            "gateway": {"name": "bench-gw"},
            "storage": {"path": str(db), "max_rows": 20_000_000, "clock_sync_wait": 0},
            "nodes": [{"name": n, "url": f"tcp://127.0.0.1:{base_port + i}",
                       "poll_interval": 30} for i, n in enumerate(names)],
            "thingsboard": {"host": "127.0.0.1", "port": broker.port, "access_token": "b"},
        }))
        producer = subprocess.Popen(
            [sys.executable, "-m", "bench.producer", "--nodes", str(args.nodes),
             "--base-port", str(base_port), "--rate", "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert producer.stdout is not None and producer.stdin is not None
        producer.stdout.readline()  # ready
        log = open(work / "gateway.log", "wb")  # noqa: SIM115 - the child keeps it
        gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--log-level", "WARNING",
                               "run", "-c", str(config)], stderr=log)
        proc = psutil.Process(gw.pid)
        rounds: list[dict[str, dict[str, float]]] = []
        try:
            time.sleep(3)
            producer.stdin.write(f"rate {args.rate}\n")
            producer.stdin.flush()
            time.sleep(args.window)  # warm up
            for r in range(args.repeat):
                result: dict[str, dict[str, float]] = {}
                for case in ("baseline", "export", "backup"):
                    result[case] = window(case, args, config, names[0], work, sub, proc, pct)
                    print(f"round {r + 1} {case:8} " + "  ".join(
                        f"{k} {v:.1f}" for k, v in result[case].items()), flush=True)
                rounds.append(result)
        finally:
            producer.stdin.write("quit\n")
            producer.stdin.flush()
            producer.wait(30)
            stop_gateway(gw)
            sub.stop()
            broker.stop()
    out: dict[str, Any] = {}
    for case in ("baseline", "export", "backup"):
        out[case] = {k: statistics.median(r[case][k] for r in rounds)
                     for k in rounds[0][case]}
    for case in ("export", "backup"):
        out[f"ratio_{case}"] = {
            k: statistics.median(r[case][k] / r["baseline"][k] for r in rounds
                                 if r["baseline"][k])
            for k in ("delivered_per_s", "latency_p50_ms", "latency_p99_ms", "gateway_cpu_pct")
        }
    print(json.dumps(out, indent=2))
    return out


def window(case: str, args: argparse.Namespace, config: Path, node: str, work: Path,
           sub: Any, proc: Any, pct: Any) -> dict[str, float]:
    """One window of ``--window`` s with ``case`` running beside the daemon."""
    with sub.lock:
        sub.latencies.clear()
    count0 = sub.count
    proc.cpu_percent(None)
    t0 = time.monotonic()
    runs = 0
    while time.monotonic() - t0 < args.window:
        if case == "baseline":
            time.sleep(0.1)
            continue
        target = work / "copy.sqlite"
        cmd = (["export", "-c", str(config), "--node", node, "--since", "7d", "-o", "/dev/null"]
               if case == "export" else ["backup", "--force", "-c", str(config), str(target)])
        subprocess.run([sys.executable, "-m", "gateway.cli", *cmd], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        runs += 1
    elapsed = time.monotonic() - t0
    cpu = proc.cpu_percent(None)
    with sub.lock:
        lat = list(sub.latencies)
    return {
        "delivered_per_s": (sub.count - count0) / elapsed,
        "latency_p50_ms": pct(lat, 0.5) if lat else 0.0,
        "latency_p99_ms": pct(lat, 0.99) if lat else 0.0,
        "gateway_cpu_pct": cpu,
        "runs": float(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--daemon", action="store_true", help="B: a real daemon (else A)")
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--prefill", type=int, default=300_000)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    result = daemon_bench(args) if args.daemon else asyncio.run(store_bench(args))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": result}, indent=2))


if __name__ == "__main__":
    main()
