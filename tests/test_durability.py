"""The power-cut window, proven on a running daemon: fsyncs against arrivals, simulated cuts.

The small versions of `python -m bench.powercut` and of the fsync trace in
`python -m bench.writes`: the daemon runs offline (every reading is written)
under strace, or with the power-cut shim preloaded.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from bench.common import Gateway, SimNodes, config_data, until, write_config
from bench.powercut import run_cuts

pytestmark = pytest.mark.slow
SYNC_S = 1.0
#: Scheduling slack on a loaded 2-core machine (the writer thread needs the GIL).
SLACK_S = 0.3


def wal_syncs(trace: Path) -> list[tuple[float, float]]:
    """(start, end) of every fsync/fdatasync strace saw on the WAL or the database file."""
    out: list[tuple[float, float]] = []
    for line in trace.read_text().splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or not parts[2].startswith(("fsync(", "fdatasync(")):
            continue
        if "gw.sqlite" not in parts[2] or "= 0" not in parts[2]:
            continue
        start = float(parts[1])
        duration = float(parts[2].rsplit("<", 1)[1].rstrip(">"))
        out.append((start, start + duration))
    return out


def test_every_reading_is_synced_within_sync_interval_of_its_arrival(tmp_path: Path) -> None:
    sims = SimNodes(6)
    db = tmp_path / "gw.sqlite"
    config = write_config(tmp_path / "gw.yaml", config_data(
        db, sims.nodes, poll=0.2, sync_interval=SYNC_S, clock_sync_wait=0))
    trace = tmp_path / "fsync.trace"
    gw = Gateway(config, strace=trace)
    try:
        until(lambda: "running" in gw.log_text(), 30, "the gateway to start")
        started = time.time()
        time.sleep(6.0)
    finally:
        assert gw.stop() == 0
        sims.stop()
    conn = sqlite3.connect(db)
    arrivals = sorted(ts / 1000 for (ts,) in conn.execute("SELECT ts FROM outbox"))
    conn.close()
    syncs = wal_syncs(trace)
    assert len(arrivals) > 100
    late = []
    for arrived in arrivals:
        done = [end for start, end in syncs if start >= arrived]
        if not done or min(done) - arrived > SYNC_S + SLACK_S:
            late.append(arrived)
    assert late == [], f"{len(late)} readings not synced within {SYNC_S} s"
    # About one sync a second, not one per commit or per reading.
    during = [s for s, _ in syncs if started + 1 <= s < started + 6]
    assert 3 <= len(during) <= 7, during


def test_simulated_power_cuts_lose_nothing_older_than_sync_interval(tmp_path: Path) -> None:
    cuts = run_cuts(tmp_path, 3, nodes=4, poll=0.05, sync_interval=SYNC_S, model="both",
                    seconds=(1.5, 3.0))
    for cut in cuts:
        assert cut.integrity == "ok" and cut.opened
        assert cut.survived > 0
        assert (cut.lost_beyond, cut.phantoms, cut.holes) == (0, 0, 0), cut
        assert cut.window_s <= cut.limit_s, cut
