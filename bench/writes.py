"""Bytes written to storage and fsyncs per reading, at a gateway's everyday load.

    python -m bench.writes [--nodes 10] [--seconds 120] [--warmup 20] [--case offline|online|both]
                           [--code DIR ...]

10 simulated nodes (``python -m sim``) polled at 1 Hz = 10 readings/s. The
gateway is a real ``hydrogate run`` under ``strace -f -e trace=fsync,fdatasync``
(seccomp-filtered, so only those calls stop it); its buffer is on this
machine's disk (not tmpfs: a tmpfs writes nothing to storage). After
``--warmup`` seconds, over ``--seconds``:

- bytes: the growth of ``write_bytes`` in ``/proc/PID/io`` (what the process
  caused to be written to storage, page-cache pages counted when dirtied);
- fsyncs: the fsync/fdatasync calls strace saw;
- readings: those that arrived in the window (stamped in it: rows in the
  outbox offline, entries a subscriber received online);
- offline, the checkpoints' share: the WAL is copied into the database file
  once it reaches 4 MiB (every ~15 min at this rate, so rarely inside the
  window). After the window the gateway stops cleanly, which checkpoints
  it; the database file's size over the rows it holds is what the
  checkpoints write per reading (each page once: the outbox only grows),
  added to the window's figure in ``with checkpoints``.

Two cases: ``offline`` (no ThingsBoard: every reading is written) and
``online`` (a local Mosquitto acknowledges each message). Each ``--code``
checkout (default: this one) is measured in both, in turn, ``--repeat``
times; medians are printed. Give an older checkout (a git worktree of
``main``) to compare with the same harness.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import ROOT, Broker, Gateway, SimNodes, config_data, write_config


class Counter:
    """Counts telemetry entries by their ``ts`` (ms), as a stand-in for ThingsBoard."""

    def __init__(self, port: int) -> None:
        self.stamps: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-writes")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("v1/gateway/telemetry", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = json.loads(msg.payload)
        with self.lock:
            for device, entries in payload.items():
                self.stamps.extend((device, int(e["ts"])) for e in entries)

    def between(self, t0: float, t1: float) -> int:
        with self.lock:
            return len({s for s in self.stamps if t0 * 1000 <= s[1] < t1 * 1000})

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def fsyncs_between(trace: Path, t0: float, t1: float) -> tuple[int, list[str]]:
    """fsync/fdatasync calls that started in [t0, t1), and the files they were on."""
    n = 0
    files: list[str] = []
    for line in trace.read_text(errors="replace").splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or not parts[2].startswith(("fsync(", "fdatasync(")):
            continue
        if t0 <= float(parts[1]) < t1:
            n += 1
            start = parts[2].find("<")
            files.append(parts[2][start + 1 : parts[2].find(">", start)])
    return n, files


def rows_between(db: Path, t0: float, t1: float) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (n,) = conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE ts >= ? AND ts < ?", (int(t0 * 1000), int(t1 * 1000))
        ).fetchone()
        return int(n)
    finally:
        conn.close()


def one_run(code: Path, online: bool, args: argparse.Namespace, work: Path) -> dict[str, float]:
    sims = SimNodes(args.nodes)
    broker = counter = None
    if online:
        broker = Broker(work)
        broker.start()
        counter = Counter(broker.port)
    db = work / "gw.sqlite"
    config = write_config(
        work / "gw.yaml",
        config_data(db, sims.nodes, broker_port=broker.port if broker else None,
                    sync_interval=args.sync_interval, clock_sync_wait=0),
        code,
    )
    trace = work / "fsync.trace"
    gw = Gateway(config, code=code, strace=trace, level="WARNING")
    try:
        time.sleep(args.warmup)
        b0, t0 = gw.write_bytes(), time.time()
        time.sleep(args.seconds)
        b1, t1 = gw.write_bytes(), time.time()
        fsyncs, files = fsyncs_between(trace, t0, t1)
        time.sleep(args.sync_interval + 1.5)  # the window's last readings committed/delivered
        readings = counter.between(t0, t1) if counter else rows_between(db, t0, t1)
    finally:
        gw.stop()
        sims.stop()
        if counter is not None:
            counter.stop()
        if broker is not None:
            broker.stop()
    conn = sqlite3.connect(db)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    (held,) = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
    conn.close()
    checkpoint = 0.0 if online else db.stat().st_size / max(held, 1)
    per_file: dict[str, int] = {}
    for f in files:
        per_file[Path(f).name] = per_file.get(Path(f).name, 0) + 1
    print(f"    {'online' if online else 'offline'}: {readings} readings, {b1 - b0} bytes,"
          f" {fsyncs} fsyncs {per_file}, page {page}"
          + ("" if online else f", checkpoints {checkpoint:.0f} B/reading"), flush=True)
    return {
        "readings_per_s": readings / (t1 - t0),
        "bytes_per_reading": (b1 - b0) / max(readings, 1),
        "fsyncs_per_s": fsyncs / (t1 - t0),
        "page_size": float(page),
        "checkpoint_bytes_per_reading": checkpoint,
        "with_checkpoints": (b1 - b0) / max(readings, 1) + checkpoint,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--sync-interval", type=float, default=1.0)
    parser.add_argument("--code", type=Path, action="append", default=[],
                        help="checkout to measure (repeatable; default: this one)")
    parser.add_argument("--case", choices=("offline", "online", "both"), default="both",
                        help="which case to run (default: both)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    codes = [c.resolve() for c in args.code] or [ROOT]
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for i in range(args.repeat):
        for code in codes:
            for online in (False, True):
                if args.case != "both" and online != (args.case == "online"):
                    continue
                case = "online" if online else "offline"
                print(f"run {i + 1} {code} {case}", flush=True)
                with tempfile.TemporaryDirectory(prefix="hydrogate-writes-", dir="/var/tmp") as d:
                    r = one_run(code, online, args, Path(d))
                results.setdefault(str(code), {}).setdefault(case, []).append(r)
    print(f"\nmedians of {args.repeat}, {args.nodes} nodes at 1 Hz, {args.seconds:.0f} s:")
    for code, cases in results.items():
        for case, runs in cases.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"  {code} {case:8} {med['readings_per_s']:6.2f} readings/s"
                  f"  {med['bytes_per_reading']:8.0f} B/reading"
                  f"  {med['fsyncs_per_s']:5.2f} fsync/s  page {med['page_size']:.0f}"
                  + ("" if case == "online" else
                     f"  with checkpoints {med['with_checkpoints']:.0f} B/reading"))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
