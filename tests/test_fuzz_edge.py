"""Fuzzing the outside interfaces of a running daemon (`hydrogate run`) on Mosquitto.

Hypothesis publishes mutated RPCs and shared-attribute updates (bench/hostile.py)
as a broken or hostile server could; a hostile node floods the NodeLink link
with fuzzed frames. The daemon must stay up, answer every RPC that can be
answered, send only messages ThingsBoard accepts, and log no traceback. The
long runs are `python -m bench.fuzz`; these are bounded to a few seconds each.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from bench.hostile import FakeServer, HostileNode, Rpc, attribute_payloads, rpc_payloads
from gateway import tbmsg
from tests.conftest import Broker
from tests.gateway_harness import config_dict, node_entry, write_config

pytestmark = pytest.mark.slow


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log: Path

    def assert_healthy(self) -> None:
        assert self.proc.poll() is None, f"daemon exited:\n{self.log.read_text()[-3000:]}"

    def assert_no_tracebacks(self) -> None:
        text = self.log.read_text()
        assert "Traceback" not in text, text[-5000:]
        assert "Logging error" not in text, text[-5000:]


def start_daemon(tmp_path: Path, broker_port: int, node_url: str) -> Daemon:
    entry = node_entry("tank-a", node_url, poll_interval=0.5,
                       control={"tds_setpoint": 800, "ph_setpoint": 6.0, "mode": "manual",
                                "interval": 0})
    cfg = write_config(tmp_path / "config.yaml",
                       config_dict(tmp_path / "gw.sqlite", [entry], broker_port))
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "-c", str(cfg)],
                            stderr=log.open("wb"), stdout=subprocess.DEVNULL)
    return Daemon(proc, log)


def stop_daemon(daemon: Daemon) -> int:
    daemon.proc.terminate()
    try:
        return daemon.proc.wait(timeout=15)
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


@pytest.fixture
def sim_node() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "sim", "--tcp", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().split()  # "tank-a tcp 127.0.0.1:PORT"
        yield f"tcp://{line[2]}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def check_sent(server: FakeServer) -> None:
    """Everything the gateway published is something ThingsBoard accepts."""
    limit = tbmsg.payload_limit(65536, tbmsg.RPC)
    for topic, raw in server.messages:
        if topic != tbmsg.RPC or b'"success"' not in raw:
            continue
        msg = json.loads(raw)
        if set(msg) != {"device", "id", "data"}:
            continue  # a request the test published itself
        assert len(raw) <= limit
        tbmsg.check_device(msg["device"])
        assert type(msg["id"]) is int and -(2**31) <= msg["id"] < 2**31
        assert isinstance(msg["data"]["success"], bool)


def test_fuzzed_rpcs_and_attributes_never_stop_the_daemon(
    broker: Broker, tmp_path: Path, sim_node: str
) -> None:
    server = FakeServer(broker.port)
    daemon = start_daemon(tmp_path, broker.port, sim_node)
    counter = itertools.count(1)
    stats = {"rpc": 0, "answered": 0, "attributes": 0}
    try:
        server.wait(lambda: True if any(t == tbmsg.ATTRIBUTES_REQUEST
                                        for t, _ in server.messages) else None, timeout=20)

        @settings(max_examples=250, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(rpc_payloads(ids=lambda: next(counter)))
        def rpcs(rpc: Rpc) -> None:
            server.publish(tbmsg.RPC, rpc.payload)
            stats["rpc"] += 1
            if rpc.answerable:
                reply = server.reply(rpc.device, rpc.id)
                assert isinstance(reply["data"]["success"], bool)
                stats["answered"] += 1
            daemon.assert_healthy()

        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(attribute_payloads())
        def attributes(payload: bytes) -> None:
            server.publish(tbmsg.ATTRIBUTES, payload)
            stats["attributes"] += 1
            daemon.assert_healthy()

        rpcs()
        attributes()
        rid = 2**31 - 1
        server.publish(tbmsg.RPC, json.dumps(
            {"device": "tank-a", "data": {"id": rid, "method": "get_state"}}).encode())
        final = server.reply("tank-a", rid)
        assert final["data"]["success"] is True and final["data"]["link"] == "up"
        daemon.assert_healthy()
        check_sent(server)
    finally:
        code = stop_daemon(daemon)
        server.close()
    assert code == 0
    daemon.assert_no_tracebacks()
    assert stats["answered"] >= 50 and stats["attributes"] >= 100, stats


async def test_fuzzed_nodelink_frames_never_stop_the_daemon(
    broker: Broker, tmp_path: Path
) -> None:
    hostile = HostileNode(seed=12, flood=20_000)
    port = await hostile.serve()
    daemon = start_daemon(tmp_path, broker.port, f"tcp://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while not hostile.flooded.is_set() and time.monotonic() < deadline:
            daemon.assert_healthy()
            await asyncio.sleep(0.2)
        assert hostile.flooded.is_set(), "the daemon stopped reading the flood"
        # It still polls the node and answers the server.
        requests = hostile.requests
        await asyncio.sleep(1.5)
        assert hostile.requests > requests
        daemon.assert_healthy()
    finally:
        await hostile.close()
        code = stop_daemon(daemon)
    assert code == 0
    daemon.assert_no_tracebacks()
    assert hostile.sent >= 20_000
