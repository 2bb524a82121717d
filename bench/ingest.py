"""Micro-benchmark of the gateway's per-reading path, without sockets.

    python -m bench.ingest [--readings 100000] [--repeat 5]

Feeds pre-framed NodeLink `report` lines through the real pieces the node
task uses (LineSplitter -> decode -> NodeRunner._on_event -> calibration,
safety watch, severity, Store.append) and waits for the store to commit
them. Reports the median readings/s of the event loop's thread while it
feeds them, and until they are committed (the writer thread's work
included: it competes for the same GIL), and readings per CPU-second of the
process up to the commit (what a busy, shared machine disturbs least), each
with calibration off and on, so a change to the hot path can be judged in
isolation from the noise of a full end-to-end run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.producer import frame
from drivers.nodelink import Event, LineSplitter, decode
from gateway.clock import SystemClock
from gateway.config import parse_config
from gateway.node import NodeRunner
from gateway.store import Store


def lines(n: int, raw: bool) -> bytes:
    t = time.time() * 1000
    key = '"tds_v":1.12,"ph_adc":802' if raw else '"tds":801.5,"ph":6.02'
    return b"".join(
        frame(f'{{"event":"report","uptime_ms":{i},"values":{{"seq":{i},"t":{t:.3f},'
              f'{key},"water_temp":24.1}}}}')
        for i in range(1, n + 1)
    )


async def one(n: int, raw: bool, workdir: Path) -> tuple[float, float, float]:
    node: dict[str, object] = {"name": "tank-a", "url": "tcp://127.0.0.1:3333"}
    if raw:
        node["calibration"] = {
            "tds": {"source": "tds_v", "poly": [913.98, -2556.2, 2437, -416.27, 69.331],
                    "valid": [0.04, 1.58], "temp_coefficient": 0.02},
            "ph": {"source": "ph_adc", "poly": [0.0025, 3.9926]},
        }
    config = parse_config({"gateway": {"name": "gw"}, "storage": {"path": str(workdir / "s.db")},
                           "nodes": [node]})
    data = lines(n, raw)
    async with Store.open(workdir / f"ingest-{raw}-{time.monotonic_ns()}.sqlite",
                          max_rows=None, max_bytes=None) as store:
        runner = NodeRunner(config.nodes[0], store=store, clock=SystemClock())
        splitter = LineSplitter()
        t0, c0 = time.perf_counter(), time.process_time()
        for start in range(0, len(data), 65536):
            for line in splitter.feed(data[start:start + 65536]):
                event = decode(line)
                assert isinstance(event, Event)  # the producer writes events only
                runner._on_event(event)  # noqa: SLF001 - the node task's own entry point
        loop_s = time.perf_counter() - t0
        await store.flush()
        total_s = time.perf_counter() - t0
        cpu_s = time.process_time() - c0  # every thread of this process: less noisy
        assert store.stats.received >= n
    return n / loop_s, n / total_s, n / cpu_s


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for raw in (False, True):
            runs = [await one(args.readings, raw, Path(tmp)) for _ in range(args.repeat)]
            label = "calibrated (raw tds_v, ph_adc)" if raw else "engineering values"
            for what, i in (("loop", 0), ("committed", 1), ("per cpu-s", 2)):
                rates = [r[i] for r in runs]
                print(f"{label:34} {what:9} median {statistics.median(rates):9.0f} readings/s"
                      f" (min {min(rates):.0f}, max {max(rates):.0f}, {args.repeat} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
