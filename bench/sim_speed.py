"""How fast the simulator runs: the plant model's steps, and a push-mode node's reports.

    python -m bench.sim_speed [--repeat 5]

The evaluation and the ML training data step `sim.plant.Reservoir` millions of
times, and the throughput benchmark needs simulated nodes that push thousands
of reports a second without eating the cores the gateway is measured on. Two
figures, each the median of ``--repeat`` runs:

- plant: wall seconds for one simulated hour at 0.5 s steps (7,200 steps, a
  sensor reading after each), with a nutrient pump running;
- push: reports a second that one `sim.node.SimNode` pushing every 0.2 ms
  delivers over TCP to a reader in the same process during one second, and
  the CPU seconds that node and reader used for it together (process time).

These were asserted as timings in tests/test_plant.py and tests/test_simnode.py
(under a second; at least 4,000 reports at under 0.9 CPU-seconds); on a loaded
machine a timing says more about the neighbours than about the code, so they
are measured here instead and the tests check what the code does.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from sim.node import SimNode
from sim.plant import Reservoir

PUSH_INTERVAL_S = 0.0002
PUSH_SECONDS = 1.0


def plant_hour() -> float:
    """Wall seconds for an hour of the plant at 0.5 s steps."""
    r = Reservoir()
    r.set_pump("nutrient", 255)
    start = time.perf_counter()
    for _ in range(7200):
        r.step(0.5)
        r.sensors()
    return time.perf_counter() - start


async def push_second() -> tuple[float, float]:
    """(reports a second received, CPU seconds used) for one fast-pushing node."""
    async with SimNode("bench", push_interval=PUSH_INTERVAL_S, seq=True) as node:
        port = await node.serve_tcp()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await reader.readline()  # boot
            cpu0, wall0 = time.process_time(), time.monotonic()
            count = 0
            while time.monotonic() - wall0 < PUSH_SECONDS:
                async with asyncio.timeout(5):
                    await reader.readline()
                count += 1
            wall = time.monotonic() - wall0
            cpu = time.process_time() - cpu0
        finally:
            writer.close()
            await writer.wait_closed()
    return count / wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    hours = [plant_hour() for _ in range(args.repeat)]
    pushes = [asyncio.run(push_second()) for _ in range(args.repeat)]
    rates = [rate for rate, _ in pushes]
    cpus = [cpu for _, cpu in pushes]
    print(f"plant: one hour at 0.5 s steps in {statistics.median(hours):.3f} s "
          f"(median of {args.repeat}: {', '.join(f'{h:.3f}' for h in hours)})")
    print(f"push: {statistics.median(rates):,.0f} reports/s at "
          f"{statistics.median(cpus):.2f} CPU-s per second "
          f"(median of {args.repeat}; rates {', '.join(f'{r:,.0f}' for r in rates)}; "
          f"CPU {', '.join(f'{c:.2f}' for c in cpus)})")


if __name__ == "__main__":
    main()
