"""End-to-end benchmark: push-mode nodes over TCP -> gateway -> SQLite -> Mosquitto.

    python -m bench.throughput [--nodes 20] [--rate 50000] [--seconds 10] [--repeat 3]

Everything runs on this machine, on 127.0.0.1: a Mosquitto broker, the load
generator (`bench.producer`, its own process), the gateway (`hydrogate run`,
its own process, measured with psutil) and a subscriber standing in for
ThingsBoard (paho, in this process). One run measures, in order:

0. latency below saturation: at --latency-rate (half the target), from the
   node writing a reading to the subscriber receiving it (p50/p99);
1. sustained: readings/s taken in and delivered at the target rate, the same
   latency at that rate, the gateway's CPU (% of one core) and peak RSS;
2. outage: the gateway's link to the broker is cut (bench.gate) while the
   nodes keep pushing, then restored;
   time until delivery resumes, backlog drain rate (records/s), and a check
   that every (node, seq) arrived;
3. idle: a fresh gateway with 3 nodes polled every 5 s, its RSS.

Baselines from the same session put the numbers in context: raw SQLite WAL
inserts (batched) and a plain paho publisher pushing batches of 100 readings
at QoS 1 through the same broker. Medians over --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(n: int) -> int:
    """A base port with n free consecutive ports after it."""
    for _ in range(200):
        base = free_port()
        if base + n >= 65000:
            continue
        try:
            socks = []
            for i in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + i))
                socks.append(s)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError("no block of free ports")


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


class Broker:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            "user root\n"  # started as root it would drop to a user that cannot reach tmp
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.workdir}/\nmax_queued_messages 0\n"
            "max_inflight_messages 0\nlog_type error\n"
        )
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False

        wait_for(up, 10, "mosquitto")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@dataclass
class Subscriber:
    """Counts readings per node and their latency, in a paho network thread."""

    port: int
    seen: dict[str, set[int]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    count: int = 0
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    record_latency: bool = True

    def start(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub",
                                  clean_session=False)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("v1/gateway/telemetry", qos=1)
        # Seconds as floats: paho annotates int but only adds and compares them.
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time() * 1000.0
        payload = orjson.loads(msg.payload)  # cheap: the subscriber shares the 2 cores
        n = 0
        with self.lock:
            for device, entries in payload.items():
                seen = self.seen.setdefault(device, set())
                for e in entries:
                    v = e["values"]
                    if "seq" in v:
                        seen.add(int(v["seq"]))
                        n += 1
                        if self.record_latency:
                            self.latencies.append(now - v["t"])
            self.count += n
            self.arrivals.append((time.monotonic(), n))

    def unique(self) -> int:
        with self.lock:
            return sum(len(s) for s in self.seen.values())


def gateway_config(workdir: Path, broker_port: int | None, nodes: list[tuple[str, str]],
                   poll: float) -> Path:
    data: dict[str, Any] = {
        "gateway": {"name": "bench-gw"},
        "storage": {"path": str(workdir / "gw.sqlite"), "max_rows": 20_000_000,
                    "clock_sync_wait": 0},
        "nodes": [{"name": n, "url": u, "poll_interval": poll} for n, u in nodes],
    }
    if broker_port is not None:
        data["thingsboard"] = {"host": "127.0.0.1", "port": broker_port, "access_token": "bench"}
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_gateway(config: Path) -> tuple[subprocess.Popen[bytes], psutil.Process]:
    log = open(config.parent / "gateway.log", "wb")  # noqa: SIM115 - the child keeps it open
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "--log-level", "WARNING",
                             "run", "-c", str(config)], stderr=log)
    log.close()
    return proc, psutil.Process(proc.pid)


def stop_gateway(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def one_run(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    broker = Broker(workdir)
    broker.start()
    base = free_port_block(args.nodes)
    producer = subprocess.Popen(
        [sys.executable, "-m", "bench.producer", "--nodes", str(args.nodes),
         "--base-port", str(base)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert producer.stdin is not None and producer.stdout is not None
    assert producer.stdout.readline().strip() == "ready"
    nodes = [(f"bench-{i:03d}", f"tcp://127.0.0.1:{base + i}") for i in range(args.nodes)]
    sub = Subscriber(broker.port)
    sub.start()
    gate_port = free_port()
    gate = subprocess.Popen(
        [sys.executable, "-m", "bench.gate", "--listen", str(gate_port), "--to", str(broker.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert gate.stdin is not None and gate.stdout is not None
    assert gate.stdout.readline().strip() == "ready"

    def gate_says(command: str) -> None:
        assert gate.stdin is not None and gate.stdout is not None
        gate.stdin.write(command + "\n")
        gate.stdin.flush()
        assert gate.stdout.readline().strip() == command

    gw, gw_ps = start_gateway(gateway_config(workdir, gate_port, nodes, poll=30))
    result: dict[str, float] = {}
    try:
        time.sleep(2.0)  # connect, hello, stop
        # 0. latency below saturation
        producer.stdin.write(f"rate {args.latency_rate}\n")
        producer.stdin.flush()
        time.sleep(2.0)  # warm up
        with sub.lock:
            sub.latencies.clear()
        time.sleep(args.seconds)
        with sub.lock:
            lat = list(sub.latencies)
        result["latency_rate_per_s"] = float(args.latency_rate)
        result["below_sat_p50_ms"] = pct(lat, 0.50)
        result["below_sat_p99_ms"] = pct(lat, 0.99)
        # 1. sustained
        producer.stdin.write(f"rate {args.rate}\n")
        producer.stdin.flush()
        time.sleep(2.0)  # warm up
        with sub.lock:
            sub.latencies.clear()
            c0 = sub.count
        cpu0 = sum(gw_ps.cpu_times()[:2])
        t0 = time.monotonic()
        peak = 0
        while time.monotonic() - t0 < args.seconds:
            peak = max(peak, gw_ps.memory_info().rss)
            time.sleep(0.2)
        t1 = time.monotonic()
        cpu1 = sum(gw_ps.cpu_times()[:2])
        with sub.lock:
            c1 = sub.count
            lat = list(sub.latencies)
        result["sustained_per_s"] = (c1 - c0) / (t1 - t0)
        result["offered_per_s"] = float(args.rate)
        result["full_rate_p50_ms"] = pct(lat, 0.50)
        result["full_rate_p99_ms"] = pct(lat, 0.99)
        result["cpu_pct_of_core"] = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        result["peak_rss_mb"] = peak / 2**20

        # 2. outage: the gateway's link to the broker is cut while nodes keep
        # pushing, then restored (the broker itself stays up, as ThingsBoard does)
        sub.record_latency = False
        gate_says("down")
        time.sleep(args.outage)
        producer.stdin.write("rate 0\n")
        producer.stdin.flush()
        time.sleep(0.5)
        backlog_from = sub.unique()
        gate_says("up")
        back = time.monotonic()
        n_before = len(sub.arrivals)
        wait_for(lambda: len(sub.arrivals) > n_before, 30, "delivery to resume")
        first_at = sub.arrivals[n_before][0]
        result["resume_s"] = first_at - back
        producer.stdin.write("quit\n")
        producer.stdin.flush()
        last_seq: dict[str, int] = json.loads(producer.stdout.readline())
        total = sum(last_seq.values())
        wait_for(lambda: sub.unique() >= total, args.drain_timeout, "backlog to drain")
        with sub.lock:
            done_at = sub.arrivals[-1][0]
        backlog = total - backlog_from
        result["backlog_records"] = float(backlog)
        result["drain_per_s"] = backlog / max(done_at - first_at, 1e-6)
        missing = sum(last_seq[n] - len(sub.seen.get(n, ())) for n in last_seq)
        result["lost"] = float(missing)
        result["delivered"] = float(sub.unique())
        result["duplicates"] = float(sub.count - sub.unique())
    finally:
        stop_gateway(gw)
        if producer.poll() is None:
            producer.kill()
        producer.wait()
        gate.kill()
        gate.wait()
        sub.stop()
        broker.stop()
    return result


def idle_rss(workdir: Path, seconds: float) -> float:
    """RSS of a gateway polling 3 simulated tanks every 5 s, offline."""
    sim = subprocess.Popen([sys.executable, "-m", "sim", "--tcp", "127.0.0.1:0", "--tcp",
                            "127.0.0.1:0", "--tcp", "127.0.0.1:0", "--name", "tank"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        urls = ["tcp://" + sim.stdout.readline().split()[-1] for _ in range(3)]
        nodes = [(f"tank-{i}", u) for i, u in enumerate(urls)]
        gw, ps = start_gateway(gateway_config(workdir, None, nodes, poll=5))
        try:
            time.sleep(seconds)
            return float(ps.memory_info().rss) / 2**20
        finally:
            stop_gateway(gw)
    finally:
        sim.terminate()
        sim.wait(10)


def baseline_sqlite(workdir: Path, rows: int = 300_000) -> float:
    conn = sqlite3.connect(workdir / "base.sqlite")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, device TEXT, ts INTEGER, entry TEXT)")
    entry = '{"ts":1732200000000,"values":{"seq":1,"t":1.0,"tds":801.5,"ph":6.02}}'
    t0 = time.perf_counter()
    for start in range(0, rows, 1000):
        conn.executemany("INSERT INTO t(device, ts, entry) VALUES (?,?,?)",
                         [("bench-000", start + i, entry) for i in range(1000)])
        conn.commit()
    elapsed = time.perf_counter() - t0
    conn.close()
    return rows / elapsed


def baseline_mqtt(workdir: Path, readings: int = 300_000) -> float:
    broker = Broker(workdir)
    broker.start()
    try:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-pub")
        client.max_inflight_messages_set(100)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        entry = '{"ts":1732200000000,"values":{"seq":1,"t":1.0,"tds":801.5,"ph":6.02}}'
        payload = ('{"bench-000":[' + ",".join([entry] * 100) + "]}").encode()
        t0 = time.perf_counter()
        infos = [client.publish("v1/gateway/telemetry", payload, qos=1)
                 for _ in range(readings // 100)]
        for info in infos:
            info.wait_for_publish(30)
        elapsed = time.perf_counter() - t0
        client.loop_stop()
        client.disconnect()
        return readings / elapsed
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rate", type=float, default=50_000)
    parser.add_argument("--latency-rate", type=float, default=25_000,
                        help="rate of the below-saturation latency phase")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--outage", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the medians here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    args = parser.parse_args()

    runs: list[dict[str, float]] = []
    tmp = tempfile.mkdtemp(prefix="hydrogate-bench-")
    try:
        base = Path(tmp)
        sqlite_rate = baseline_sqlite(base)
        (base / "b0").mkdir()
        mqtt_rate = baseline_mqtt(base / "b0")
        for i in range(args.repeat):
            d = base / f"run{i}"
            d.mkdir()
            runs.append(one_run(args, d))
            print(f"run {i + 1}: " + ", ".join(f"{k}={v:.1f}" for k, v in runs[-1].items()),
                  flush=True)
        d = base / "idle"
        d.mkdir()
        idle = idle_rss(d, args.idle_seconds)
    finally:
        if args.keep:
            print(f"work directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med["idle_rss_mb"] = idle
    med["baseline_sqlite_rows_per_s"] = sqlite_rate
    med["baseline_mqtt_readings_per_s"] = mqtt_rate
    print(f"\nmedians of {args.repeat} runs, {args.nodes} nodes, offered {args.rate:.0f}/s, "
          f"{os.cpu_count()} cores:")
    for k, v in med.items():
        print(f"  {k:32} {v:14.1f}")
    print(f"  {'sustained / mqtt baseline':32} {med['sustained_per_s'] / mqtt_rate:14.3f}")
    print(f"  {'drain / mqtt baseline':32} {med['drain_per_s'] / mqtt_rate:14.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "medians": med, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
