"""Clock steps on a running gateway: every stored ``ts`` within 1 s of the true time.

    python -m bench.clocksteps [--rounds 5] [--scenario NAME ...]

The gateway (``hydrogate run``, offline, ``storage.clock_sync_wait`` on) runs
with bench/shims/clockshift.c preloaded: its wall clock is the real one plus
an offset the benchmark changes while it runs, and adjtimex reports the NTP
state the benchmark sets; its monotonic clock and sleeps are the real ones,
as when NTP steps a clock. Push-mode nodes (``bench.producer``, not shifted)
stamp every reading with the real time it was sent (``t``), so each stored
``ts`` can be compared with the truth:

- ``boot-3-days-behind``: a Raspberry Pi without RTC boots 3 days behind, NTP
  syncs after a few seconds (steps +3 days);
- ``1h-ahead-ntp`` / ``1h-behind-ntp``: a clock 1 h off, unsynchronised, then
  NTP steps it back / forward and syncs;
- ``synced-steps``: a synchronised clock stepped +1 h, then back -1 h (an
  administrator, or NTP after a long drift): the corrected clock is the
  truth after each step, so readings follow it.

For each: the largest difference between a reading's stored ``ts`` and the
truth, whether stamps stay unique per device, and whether each step was
logged once with its size. Readings sent within 0.2 s of a step of a
synchronised clock are left out (which clock stamped them is a race).
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, Gateway, config_data, until, write_config
from bench.shims import build, set_clock
from bench.throughput import free_port_block
from gateway import storefile

DAY = 86400.0
#: Readings sent this close to a step of a synchronised clock are not judged (s).
RACE_S = 0.2


@dataclass(frozen=True)
class Scenario:
    """The clock at start, then ``(after seconds, offset s, synchronised)`` changes."""

    offset: float
    synced: bool
    changes: tuple[tuple[float, float, bool], ...]
    seconds: float


SCENARIOS = {
    "boot-3-days-behind": Scenario(-3 * DAY, False, ((3.0, 0.0, True),), 6.0),
    "1h-ahead-ntp": Scenario(3600.0, False, ((3.0, 0.0, True),), 6.0),
    "1h-behind-ntp": Scenario(-3600.0, False, ((3.0, 0.0, True),), 6.0),
    "synced-steps": Scenario(0.0, True, ((2.5, 3600.0, True), (5.0, 0.0, True)), 7.5),
}


@dataclass
class Outcome:
    """What one scenario run showed."""

    readings: int
    judged: int
    max_error_ms: float
    duplicates: int
    steps_logged: list[str]
    steps_made: int
    exit_code: int

    @property
    def ok(self) -> bool:
        return (self.judged > 0 and self.max_error_ms <= 1000 and self.duplicates == 0
                and len(self.steps_logged) == self.steps_made and self.exit_code == 0)


def run_scenario(name: str, work: Path, *, nodes: int = 2, rate: float = 20.0) -> Outcome:
    """Run one scenario in ``work`` (a fresh folder) and judge it."""
    sc = SCENARIOS[name]
    shim = build("clockshift", work)
    state = work / "clock"
    set_clock(state, sc.offset, sc.synced)
    base = free_port_block(nodes)
    producer = subprocess.Popen(
        [sys.executable, "-m", "bench.producer", "--nodes", str(nodes), "--base-port", str(base)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert producer.stdin is not None and producer.stdout is not None
    assert producer.stdout.readline().strip() == "ready"
    db = work / "gw.sqlite"
    nodelist = [(f"bench-{i:03d}", f"tcp://127.0.0.1:{base + i}") for i in range(nodes)]
    config = write_config(work / "gw.yaml", config_data(
        db, nodelist, poll=30.0, sync_interval=1.0, clock_sync_wait=600))
    gw = Gateway(config, env={"LD_PRELOAD": str(shim), "CLOCKSHIFT_FILE": str(state)})
    offsets: list[tuple[float, float]] = [(0.0, sc.offset)]  # (real time from, offset)
    try:
        until(lambda: "running" in gw.log_text(), 30, "the gateway to start")
        producer.stdin.write(f"rate {rate}\n")
        producer.stdin.flush()
        start = time.time()
        for after, offset, synced in sc.changes:
            time.sleep(max(0.0, start + after - time.time()))
            set_clock(state, offset, synced)
            offsets.append((time.time(), offset))
        time.sleep(max(0.0, start + sc.seconds - time.time()))
        producer.stdin.write("rate 0\n")
        producer.stdin.flush()
        time.sleep(2.0)  # the last readings released and committed
    finally:
        code = gw.stop()
        producer.stdin.write("quit\n")
        producer.stdin.flush()
        producer.wait(10)
    conn = sqlite3.connect(db)
    try:
        rows = list(storefile.outbox_values(conn))
    finally:
        conn.close()
    judged = 0
    worst = 0.0
    changes = [at for at, _ in offsets[1:]]
    for _, _, ts, values in rows:
        if "t" not in values:  # the gateway's own entries (severity): no truth to compare
            continue
        sent = values["t"] / 1000
        if sc.synced and any(abs(sent - at) < RACE_S for at in changes):
            continue
        truth = sent + (_offset_at(offsets, sent) if sc.synced else 0.0)
        worst = max(worst, abs(ts / 1000 - truth) * 1000)
        judged += 1
    stamps = [(device, ts) for device, ts, _, _ in rows]
    logged = re.findall(r"system clock stepped by ([^(]+)\(", gw.log_text())
    return Outcome(
        readings=len(rows),
        judged=judged,
        max_error_ms=worst,
        duplicates=len(stamps) - len(set(stamps)),
        steps_logged=[s.strip() for s in logged],
        steps_made=len(sc.changes) if sc.changes else 0,
        exit_code=code,
    )


def _offset_at(offsets: list[tuple[float, float]], when: float) -> float:
    current = offsets[0][1]
    for at, offset in offsets[1:]:
        if when >= at:
            current = offset
    return current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), default=[])
    args = parser.parse_args()
    names = args.scenario or list(SCENARIOS)
    failed = 0
    worst: dict[str, float] = {}
    for i in range(args.rounds):
        for name in names:
            with tempfile.TemporaryDirectory(prefix="hydrogate-clock-") as tmp:
                out = run_scenario(name, Path(tmp))
            worst[name] = max(worst.get(name, 0.0), out.max_error_ms)
            failed += not out.ok
            print(f"round {i + 1} {name:20} {out.judged}/{out.readings} readings judged, max error"
                  f" {out.max_error_ms:7.1f} ms, {out.duplicates} duplicate stamps, steps logged"
                  f" {out.steps_logged}, exit {out.exit_code}{'' if out.ok else '  FAILED'}",
                  flush=True)
    print("\nworst error per scenario: " + ", ".join(f"{k} {v:.0f} ms" for k, v in worst.items()))
    print(f"{args.rounds * len(names)} runs, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
