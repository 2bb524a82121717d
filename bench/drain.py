"""The store's own drain after an outage, in rows per CPU-second of the process.

    python -m bench.drain [--rows 100000] [--repeat 3] [--history-days 7]

Fills a store file with ``--rows`` readings (10 devices, 7 values each),
closes it (so nothing is left in the memory tail) and drains it as the
uplink does: peek 4,096 rows, acknowledge them in messages of 256, all in
flight together, forwarded rows moved to the history (``--history-days``,
0: deleted). The figure is rows per CPU-second of the process (loop and
writer thread) during the drain: the wall clock is set by the commit each
acknowledgement waits for. Run it from two checkouts in turn to compare
(``cd ../before && python -m bench.drain``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from gateway.store import Store


async def fill(path: Path, rows: int) -> None:
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        t0 = int(time.time() * 1000) - rows
        for i in range(rows):
            store.append(f"node{i % 10:02d}", t0 + i, {
                "tds": 700.25 + i % 7, "ph": 5.9987, "water_temp": 26.0673,
                "water_level": 10.001, "air_temp": 25.9829, "humidity": 61.294, "seq": i,
            })
            if i % 10_000 == 0:
                await asyncio.sleep(0)
        await store.flush()


async def drain(path: Path, history_days: float) -> float:
    async with Store.open(path, max_rows=None, max_bytes=None,
                          history_days=history_days) as store:
        cpu = time.process_time()
        after = n = 0
        while rows := await store.peek(4096, after):
            await asyncio.gather(*(store.ack([r.id for r in rows[k:k + 256]])
                                   for k in range(0, len(rows), 256)))
            after = rows[-1].id
            n += len(rows)
        await store.flush_history()
        return n / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--history-days", type=float, default=7.0)
    args = parser.parse_args()
    rates = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="hydrogate-drain-", dir="/var/tmp") as d:
            path = Path(d) / "s.db"
            asyncio.run(fill(path, args.rows))
            rates.append(asyncio.run(drain(path, args.history_days)))
    print(f"drain: median {statistics.median(rates):,.0f} rows per CPU-second"
          f" ({', '.join(f'{r:,.0f}' for r in rates)})")


if __name__ == "__main__":
    main()
