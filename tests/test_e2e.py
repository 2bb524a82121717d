"""End to end: simulated nodes on real sockets and a pty -> gateway -> real Mosquitto.

These are the acceptance checks of the gateway core: the documented Gateway
API shape, nothing lost across a broker outage or a SIGKILL, and a gateway
that keeps working while nodes misbehave.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import storefile
from sim.node import Faults, SimNode
from tests.conftest import Broker
from tests.gateway_harness import config_dict, node_entry, running_gateway, write_config
from tests.mqtt_recorder import Recorder

pytestmark = pytest.mark.slow


async def test_three_nodes_reach_the_broker_in_the_documented_shape(
    broker: Broker, tmp_path: Path
) -> None:
    a = SimNode("tank-a", seq=True)
    b = SimNode("tank-b", seq=True)
    c = SimNode("tank-c", seq=True)
    try:
        urls = {
            "tank-a": f"tcp://127.0.0.1:{await a.serve_tcp('127.0.0.1', 0)}",
            "tank-b": f"tcp://127.0.0.1:{await b.serve_tcp('127.0.0.1', 0)}",
            "tank-c": f"serial://{c.open_pty()}?baud=115200",
        }
        data = config_dict(
            tmp_path / "gw.sqlite",
            [node_entry(name, url) for name, url in urls.items()],
            broker.port,
        )
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            started_ms = time.time() * 1000
            await rec.wait_for(
                lambda: all(len(rec.entries().get(n, [])) >= 5 for n in urls),
                what="5 readings from each node",
            )
            await rec.wait_for(lambda: rec.on("v1/devices/me/telemetry"), what="health")
            assert all(r.link_up for r in gw.runners.values())
    finally:
        for node in (a, b, c):
            await node.close()

    for m in rec.messages:
        assert m.qos == 1 and not m.retain, m.topic
    # Every device is announced before any of its telemetry.
    order = [(m.topic, m.payload) for m in rec.messages]
    for name in urls:
        connect_at = next(
            i for i, (t, p) in enumerate(order) if t == "v1/gateway/connect" and p["device"] == name
        )
        first_data = next(
            i for i, (t, p) in enumerate(order) if t == "v1/gateway/telemetry" and name in p
        )
        assert connect_at < first_data
    for m in rec.on("v1/gateway/telemetry"):
        assert isinstance(m.payload, dict) and m.payload
        assert len(m.raw) <= 65536
        for device, entries in m.payload.items():
            assert device in urls
            assert isinstance(entries, list) and entries
            for e in entries:
                assert set(e) == {"ts", "values"}
                assert isinstance(e["ts"], int) and abs(e["ts"] - started_ms) < 60_000
                assert e["values"] and None not in e["values"].values()
    for name in urls:
        entries = rec.entries()[name]
        readings = [e for e in entries if "seq" in e["values"]]
        assert {"tds", "ph", "water_temp", "water_level"} <= set(readings[0]["values"])
        ts = [e["ts"] for e in entries]
        assert len(set(ts)) == len(ts), "every entry of a device has its own ts"
    health = rec.on("v1/devices/me/telemetry")[-1].payload
    values = health.get("values", health)
    for key in ("buffer_depth", "forwarded", "evicted", "uptime_s", "tank-a_link_errors"):
        assert key in values


async def test_broker_outage_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    node = SimNode("tank-a", seq=True, push_interval=0.02)
    try:
        port = await node.serve_tcp("127.0.0.1", 0)
        data = config_dict(
            tmp_path / "gw.sqlite",
            [node_entry("tank-a", f"tcp://127.0.0.1:{port}", poll_interval=30)],
            broker.port,
        )
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            await rec.wait_for(lambda: len(rec.seqs("tank-a")) >= 20, what="first readings")
            broker.stop()
            await asyncio.sleep(3.0)
            assert gw.store is not None and gw.store.stats.depth > 50, "buffered meanwhile"
            assert gw.uplink is not None
            broker.start()
            attempts_before = gw.uplink.stats.attempts
            before = len(rec.messages)
            await rec.wait_for(lambda: len(rec.messages) > before + 5, what="delivery resumes")
            attempts_to_resume = gw.uplink.stats.attempts - attempts_before
            await asyncio.sleep(0.5)
            await node.close()
            last = node.seq
            await rec.wait_for(
                lambda: set(range(1, last + 1)) <= set(rec.seqs("tank-a")),
                timeout=30,
                what=f"every seq 1..{last}",
            )
    finally:
        await node.close()
    seqs = rec.seqs("tank-a")
    duplicates = sum(n - 1 for n in seqs.values())
    print(f"outage: {last} readings, resumed after {attempts_to_resume} attempts, "
          f"{duplicates} duplicates")
    # The attempt under way when the broker came back, or the next one, got through.
    assert attempts_to_resume <= 2


def _committed_seqs(db: Path) -> set[int]:
    conn = sqlite3.connect(db)
    try:
        rows = list(storefile.outbox_values(conn))
    except sqlite3.OperationalError:  # the gateway is still creating the schema
        return set()
    finally:
        conn.close()
    return {int(values["seq"]) for _, _, _, values in rows if "seq" in values}


async def test_sigkill_during_outage_loses_no_committed_reading(
    broker: Broker, tmp_path: Path
) -> None:
    node = SimNode("tank-a", seq=True, push_interval=0.02)
    db = tmp_path / "gw.sqlite"
    try:
        port = await node.serve_tcp("127.0.0.1", 0)
        cfg = write_config(
            tmp_path / "config.yaml",
            config_dict(db, [node_entry("tank-a", f"tcp://127.0.0.1:{port}", poll_interval=30)],
                        broker.port),
        )
        broker.stop()
        cmd = [sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (not db.exists() or len(_committed_seqs(db)) < 50):
                await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        committed = _committed_seqs(db)
        assert len(committed) >= 50
        broker.start()
        async with Recorder(broker.port) as rec:
            proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
            try:
                await rec.wait_for(lambda: committed <= set(rec.seqs("tank-a")), timeout=30,
                                   what="every committed reading after the SIGKILL")
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=15) == 0
    finally:
        await node.close()


async def test_misbehaving_nodes_are_counted_and_do_not_stop_the_gateway(
    broker: Broker, tmp_path: Path
) -> None:
    faulty = SimNode("faulty", seq=True, faults=Faults(corrupt_crc_every=3, garbage_every=4,
                                                       overlong_every=5, bad_value=True))
    silent = SimNode("silent", faults=Faults(silent=True))
    good = SimNode("good", seq=True)
    nodes = (faulty, silent, good)
    try:
        urls = {n.name: f"tcp://127.0.0.1:{await n.serve_tcp('127.0.0.1', 0)}" for n in nodes}
        data = config_dict(
            tmp_path / "gw.sqlite",
            [node_entry(name, url) for name, url in urls.items()],
            broker.port,
        )
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            await rec.wait_for(lambda: len(rec.seqs("good")) >= 10, what="good node readings")
            await rec.wait_for(lambda: len(rec.seqs("faulty")) >= 3, what="faulty node readings")
            await rec.wait_for(
                lambda: gw.runners["silent"].stats.as_dict().get("timeout", 0) >= 3,
                what="silent node timeouts",
            )
            stats = gw.runners["faulty"].stats.as_dict()
            # Garbage lines fail the CRC before anything else looks at them.
            assert stats.get("crc", 0) >= 2
            assert stats.get("too_long", 0) > 0
            assert stats.get("bad_value", 0) > 0
            assert gw.runners["good"].link_up
            assert not gw.runners["silent"].link_up
            reply = await rec.rpc("silent", 1, "get_state")
            assert reply["data"]["success"] is True
            assert reply["data"]["link"] == "down"
    finally:
        for n in nodes:
            await n.close()


async def test_sigterm_stops_cleanly_and_commands_pumps_off(tmp_path: Path) -> None:
    import socket

    node = SimNode("tank-a")
    sock_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.settimeout(20)
    try:
        port = await node.serve_tcp("127.0.0.1", 0)
        cfg = write_config(
            tmp_path / "config.yaml",
            config_dict(tmp_path / "gw.sqlite", [node_entry("tank-a", f"tcp://127.0.0.1:{port}")]),
        )
        env = {**os.environ, "NOTIFY_SOCKET": sock_path}
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)], env=env,
            stderr=subprocess.PIPE,
        )
        try:
            ready = await asyncio.to_thread(notify.recv, 4096)
            assert b"READY=1" in ready
            deadline = time.monotonic() + 10
            while node.requests.get("read", 0) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            stops_before = node.requests.get("stop", 0)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = await asyncio.to_thread(proc.wait, 15)
            assert code == 0
            assert time.monotonic() - started < 10
            assert node.requests.get("stop", 0) > stops_before
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()
    finally:
        notify.close()
        await node.close()
