"""Fault loops: SIGKILLs, broker outages and disk faults, counting every committed reading.

    python -m bench.faults kill [--rounds 100]      # SIGKILL the gateway, the broker up and down
    python -m bench.faults outage [--rounds 50]     # cut the gateway's link to the broker
    python -m bench.faults disk [--rounds 20]       # fill a small tmpfs up and free it (root)

Push-mode nodes (``bench.producer``) number every reading (``seq``); a
subscriber stands in for ThingsBoard (QoS 1, persistent session) and
records every ``(node, seq)`` that arrives. Each loop is bounded.

- ``kill``: the gateway runs 1-3 s and is SIGKILLed; after each kill the
  buffer file (as the kill left it) is read: every reading in it was
  committed. Every fourth round the broker is stopped for two rounds. At the
  end the gateway drains everything; **lost** = readings that were committed
  at some kill (or acknowledged by the broker) and never arrived.
- ``outage``: one gateway runs throughout; bench.gate drops its connection to
  the broker for 1-5 s, then lets it through for 1-5 s. At the end every
  reading the nodes sent must have arrived (the gateway never stopped); also
  the time from each return of the link to the next delivery.
- ``disk``: the buffer is on a 4 MiB tmpfs (``max_rows`` 3000 keeps it from
  filling by itself); a filler file takes all the space for 2-5 s, then is
  removed, while readings flow offline. Committed readings must all be in
  the file at the end (but for the oldest, evicted by retention); readings
  that could not be kept are counted by the gateway (``unstored``), not
  claimed; one error line per episode.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import ROOT, Broker, Gateway, config_data, until, write_config
from bench.throughput import free_port, free_port_block
from gateway import storefile


class Seen:
    """A QoS 1 subscriber with a persistent session: every (node, seq) that arrives, and when."""

    def __init__(self, port: int) -> None:
        self.seen: set[tuple[str, int]] = set()
        self.arrivals: list[float] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-faults",
                                  clean_session=False)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("v1/gateway/telemetry", qos=1)
        # Seconds as floats: paho annotates int but only adds and compares them.
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = json.loads(msg.payload)
        with self.lock:
            for device, entries in payload.items():
                for e in entries:
                    if "seq" in e["values"]:
                        self.seen.add((device, int(e["values"]["seq"])))
            self.arrivals.append(time.monotonic())

    def snapshot(self) -> set[tuple[str, int]]:
        with self.lock:
            return set(self.seen)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Producer:
    """bench.producer: push-mode nodes at ``rate`` readings/s in all."""

    def __init__(self, nodes: int, rate: float) -> None:
        self.base = free_port_block(nodes)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.producer", "--nodes", str(nodes),
             "--base-port", str(self.base)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.nodes = [(f"bench-{i:03d}", f"tcp://127.0.0.1:{self.base + i}") for i in range(nodes)]
        self.say(f"rate {rate}")

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> dict[str, int]:
        """Stop; the last seq each node sent."""
        assert self.proc.stdout is not None
        self.say("quit")
        last: dict[str, int] = json.loads(self.proc.stdout.readline())
        self.proc.wait(10)
        return last


def outbox(db: Path) -> set[tuple[str, int]]:
    """(node, seq) of every reading in a copy of the files at ``db`` (as a kill left them)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / db.name
        for suffix in ("", "-wal"):
            if Path(f"{db}{suffix}").exists():
                shutil.copyfile(f"{db}{suffix}", f"{copy}{suffix}")
        if not copy.exists():
            return set()
        conn = sqlite3.connect(copy)
        try:
            out = set()
            for _, device, _, values in storefile.outbox_values(conn):
                seq = values.get("seq")
                if seq is not None:
                    out.add((device, int(seq)))
            return out
        finally:
            conn.close()


def drain(seen: Seen, db: Path, config: Path, timeout: float = 120.0) -> None:
    """Run a gateway until the outbox is empty and nothing new arrives for 2 s."""
    gw = Gateway(config, level="WARNING")
    try:
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            time.sleep(2.0)
            n = len(seen.snapshot())
            if n == last and not outbox(db):
                break
            last = n
    finally:
        gw.stop()


def kill_loop(rounds: int, work: Path, rng: random.Random) -> dict[str, Any]:
    """SIGKILLs with the broker up and down; committed readings that never arrived."""
    broker = Broker(work)
    broker.start()
    seen = Seen(broker.port)
    producer = Producer(4, 200)
    db = work / "gw.sqlite"
    config = write_config(work / "gw.yaml", config_data(
        db, producer.nodes, broker_port=broker.port, poll=30.0, clock_sync_wait=0))
    committed: set[tuple[str, int]] = set()
    broker_up = True
    try:
        for i in range(rounds):
            if i % 4 == 3:  # the broker goes away for two rounds, then comes back
                broker.stop() if broker_up else broker.start()
                broker_up = not broker_up
            gw = Gateway(config, level="WARNING")
            try:
                if not gw.wait_open(db):
                    raise RuntimeError(f"the gateway never opened {db}: see {gw.log}")
                time.sleep(rng.uniform(1.0, 3.0))
            finally:
                gw.kill()
            at_kill = outbox(db)
            committed |= at_kill
            print(f"kill {i + 1:3}: broker {'up' if broker_up else 'down'},"
                  f" {len(at_kill)} committed in the buffer, {len(seen.snapshot())} delivered",
                  flush=True)
        producer.say("rate 0")
        if not broker_up:
            broker.start()
        committed |= seen.snapshot()  # acknowledged before it was written: committed upstream
        drain(seen, db, config)
        delivered = seen.snapshot()
        producer.finish()
    finally:
        if producer.proc.poll() is None:
            producer.proc.kill()
        seen.stop()
        broker.stop()
    lost = committed - delivered
    return {"kills": rounds, "committed": len(committed), "delivered": len(delivered),
            "lost": len(lost)}


def outage_loop(rounds: int, work: Path, rng: random.Random) -> dict[str, Any]:
    """Outages of the gateway's link to the broker; every reading sent must arrive."""
    broker = Broker(work)
    broker.start()
    seen = Seen(broker.port)
    producer = Producer(4, 200)
    gate_port = free_port()
    gate = subprocess.Popen(
        [sys.executable, "-m", "bench.gate", "--listen", str(gate_port), "--to", str(broker.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    assert gate.stdin is not None and gate.stdout is not None
    assert gate.stdout.readline().strip() == "ready"

    def gate_says(command: str) -> None:
        assert gate.stdin is not None and gate.stdout is not None
        gate.stdin.write(command + "\n")
        gate.stdin.flush()
        assert gate.stdout.readline().strip() == command

    db = work / "gw.sqlite"
    config = write_config(work / "gw.yaml", config_data(
        db, producer.nodes, broker_port=gate_port, poll=30.0, clock_sync_wait=0))
    gw = Gateway(config, level="WARNING")
    resumes: list[float] = []
    try:
        until(lambda: len(seen.snapshot()) > 0, 30, "first delivery")
        for i in range(rounds):
            gate_says("down")
            time.sleep(rng.uniform(1.0, 5.0))
            with seen.lock:
                n = len(seen.arrivals)
            gate_says("up")
            back = time.monotonic()
            deadline = back + rng.uniform(1.0, 5.0)
            resumed = None
            while time.monotonic() < deadline:
                with seen.lock:
                    if len(seen.arrivals) > n:
                        resumed = seen.arrivals[n] - back
                        break
                time.sleep(0.01)
            time.sleep(max(0.0, deadline - time.monotonic()))
            if resumed is not None:
                resumes.append(resumed)
            print(f"outage {i + 1:3}: delivery resumed"
                  f" {'not within the up-window' if resumed is None else f'{resumed:.2f} s'}"
                  f" after the link came back", flush=True)
        last = producer.finish()
        expected = {(node, s) for node, top in last.items() for s in range(1, top + 1)}
        until(lambda: expected <= seen.snapshot(), 120, "every reading to arrive")
    except TimeoutError:
        pass
    finally:
        gw.stop()
        if producer.proc.poll() is None:
            producer.proc.kill()
        gate.kill()
        gate.wait()
        seen.stop()
        broker.stop()
    lost = expected - seen.snapshot()
    return {"outages": rounds, "sent": len(expected), "lost": len(lost),
            "resumed_in_window": len(resumes),
            "resume_p50_s": statistics.median(resumes) if resumes else None,
            "resume_max_s": max(resumes) if resumes else None}


def disk_loop(rounds: int, work: Path, rng: random.Random) -> dict[str, Any]:
    """A small tmpfs filled up and freed while readings flow offline."""
    disk = work / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    producer = Producer(4, 200)
    db = disk / "gw.sqlite"
    config = write_config(work / "gw.yaml", config_data(  # retention keeps the file small
        db, producer.nodes, poll=30.0, clock_sync_wait=0, max_rows=3000))
    gw = Gateway(config, log=work / "gw.log")
    committed: set[tuple[str, int]] = set()
    recoveries: list[float] = []
    episodes = 0
    try:
        until(lambda: "running" in gw.log_text(), 30, "the gateway to start")
        for i in range(rounds):
            time.sleep(rng.uniform(1.0, 3.0))
            committed |= outbox(db)
            filler = disk / "filler"
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
            time.sleep(rng.uniform(2.0, 5.0))
            before = gw.log_text().count("writable again")
            refused = gw.log_text().count("storage full") > episodes
            filler.unlink()
            freed = time.monotonic()
            if not refused:  # the file and its WAL had room enough: nothing was refused
                print(f"disk fault {i + 1:3}: no write refused while full", flush=True)
                continue
            episodes += 1
            def recovered(before: int = before) -> bool:
                return gw.log_text().count("writable again") > before

            until(recovered, 30, "recovery")
            recoveries.append(time.monotonic() - freed)
            print(f"disk fault {i + 1:3}: recovered {recoveries[-1]:.1f} s after space came back",
                  flush=True)
        producer.say("rate 0")
        time.sleep(2.0)
        code = gw.stop()
        final = outbox(db)
    finally:
        if gw.proc.poll() is None:
            gw.kill()
        if producer.proc.poll() is None:
            producer.proc.kill()
        subprocess.run(["umount", "-l", str(disk)], check=False)
    text = gw.log_text()
    # Retention (max_rows) evicts the oldest readings: only those newer than each node's
    # oldest one left can be missing by loss.
    oldest: dict[str, int] = {}
    for node, seq in final:
        oldest[node] = min(seq, oldest.get(node, seq))
    lost = {(n, q) for n, q in committed - final if q >= oldest.get(n, 1 << 62)}
    return {"faults": rounds, "refused_episodes": episodes, "committed": len(committed),
            "lost": len(lost), "full_errors_logged": text.count("storage full"),
            "recovery_max_s": max(recoveries, default=None), "exit": code,
            "tracebacks": text.count("Traceback")}


LOOPS = {"kill": (kill_loop, 100), "outage": (outage_loop, 50), "disk": (disk_loop, 20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loop", choices=sorted(LOOPS))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    fn, default = LOOPS[args.loop]
    with tempfile.TemporaryDirectory(prefix=f"hydrogate-{args.loop}-") as tmp:
        result = fn(args.rounds or default, Path(tmp), random.Random(args.seed))
    print(json.dumps(result))
    sys.exit(1 if result.get("lost") else 0)


if __name__ == "__main__":
    main()
