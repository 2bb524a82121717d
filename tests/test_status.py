"""`hydrogate status` against a running gateway, its exit codes, and systemd's STATUS= line."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.status import Sampler, backlog_text, summary
from sim.node import SimNode
from tests.conftest import Broker
from tests.gateway_harness import config_dict, hydrogate, node_entry, running_gateway, write_config
from tests.mqtt_recorder import Recorder

pytestmark = pytest.mark.slow




async def until(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_status_shows_nodes_uplink_and_buffer_with_exit_codes(
    broker: Broker, tmp_path: Path
) -> None:
    a, b = SimNode("tank-a"), SimNode("tank-b")
    try:
        nodes = [
            node_entry("tank-a", f"tcp://127.0.0.1:{await a.serve_tcp('127.0.0.1', 0)}",
                       control={"mode": "manual", "tds_setpoint": 800, "ph_setpoint": 6.0,
                                "interval": 0}),
            node_entry("tank-b", f"tcp://127.0.0.1:{await b.serve_tcp('127.0.0.1', 0)}"),
        ]
        path = write_config(tmp_path / "config.yaml",
                            config_dict(tmp_path / "gw.sqlite", nodes, broker.port))
        async with Recorder(broker.port) as rec, running_gateway(path, connected=False, serving=True) as gw:
            await until(lambda: all(r.link_up for r in gw.runners.values()), "links up")
            reply = await rec.rpc("tank-a", 1, "actuate", {"actuator": "nutrient", "ms": 100})
            assert reply["data"]["success"]
            refused = await rec.rpc("tank-a", 2, "actuate", {"actuator": "nutrient",
                                                             "ms": 600_000})
            assert not refused["data"]["success"]
            await asyncio.sleep(1.2)  # a second sample of the counters: a drain rate

            code, out, err = await hydrogate("status", "-c", str(path), "--json")
            assert code == 0, err
            status = json.loads(out)
            node = {n["name"]: n for n in status["nodes"]}
            assert node["tank-a"]["link"] == "up" and node["tank-b"]["link"] == "up"
            assert abs(node["tank-a"]["link_since"] - time.time() * 1000) < 60_000
            assert {"tds", "ph"} <= set(node["tank-a"]["values"])
            assert node["tank-a"]["age_s"] < 5
            assert node["tank-a"]["mode"] == "manual" and node["tank-a"]["cycle"] == "idle"
            assert node["tank-a"]["last_dose"]["actuator"] == "nutrient"
            assert node["tank-a"]["last_dose"]["controller"] == "manual"
            assert "max_actuation" in node["tank-a"]["last_refusal"]["reason"]
            assert node["tank-a"]["settings_from"]["tds_setpoint"] == "file"
            assert node["tank-b"]["mode"] is None  # monitored only
            assert status["uplink"]["connected"] is True
            assert status["uplink"]["host"] == f"127.0.0.1:{broker.port}"
            buffer = status["buffer"]
            assert buffer["received"] > 0 and buffer["forwarded"] > 0
            assert buffer["drain_per_s"] is not None and buffer["drain_per_s"] > 0
            assert {"backlog", "oldest_age_s", "evicted", "history_readings"} <= set(buffer)

            code, out, _ = await hydrogate("status", "-c", str(path))
            assert code == 0
            assert "tank-a   up" in out and "last dose nutrient 100 ms (manual)" in out
            assert "last refused" in out and "uplink: connected" in out
            assert "buffer: backlog" in out

            broker.stop()
            await until(lambda: gw.uplink is not None and not gw.uplink.connected, "outage")
            code, out, _ = await hydrogate("status", "-c", str(path), "--json")
            assert code == 6  # every node up, ThingsBoard not connected
            assert json.loads(out)["uplink"]["connected"] is False

            await b.close()
            await until(lambda: not gw.runners["tank-b"].link_up, "tank-b down")
            code, out, _ = await hydrogate("status", "-c", str(path))
            assert code == 5
            assert "tank-b   down" in out and "link down since" in out
            broker.start()
        code, _, err = await hydrogate("status", "-c", str(path))
        assert code == 3 and "not reachable" in err
    finally:
        await a.close()
        await b.close()


async def test_watch_redraws_until_interrupted(tmp_path: Path) -> None:
    node = SimNode("tank-a")
    try:
        entry = node_entry("tank-a", f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}")
        path = write_config(tmp_path / "config.yaml",
                            config_dict(tmp_path / "gw.sqlite", [entry]))
        async with running_gateway(path, connected=False, serving=True) as gw:
            await until(lambda: gw.runners["tank-a"].link_up, "link up")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "status", "-c", str(path), "--watch",
                "--interval", "0.3", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(2.5)
            proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(10):
                out, _ = await proc.communicate()
        screens = out.decode().count("hydrogate gw-test - ")
        assert screens >= 3, out.decode()
        assert proc.returncode == 0  # the last status shown: everything up, no ThingsBoard
        assert "offline (no ThingsBoard configured)" in out.decode()
    finally:
        await node.close()


class NotifySocket:
    """What systemd would receive on NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def statuses(self) -> list[tuple[float, str]]:
        while True:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except BlockingIOError:
                break
        return [(t, line.split("STATUS=", 1)[1].split("\n")[0])
                for t, line in self.messages if "STATUS=" in line]


async def test_systemd_status_line_follows_the_facts_without_flooding(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    a, b = SimNode("tank-a"), SimNode("tank-b")
    try:
        nodes = [node_entry(n.name, f"tcp://127.0.0.1:{await n.serve_tcp('127.0.0.1', 0)}")
                 for n in (a, b)]
        path = write_config(tmp_path / "config.yaml",
                            config_dict(tmp_path / "gw.sqlite", nodes, broker.port))
        async with running_gateway(path, connected=False, serving=True):
            await until(lambda: any(s.startswith("2/2 nodes up") and s.endswith(
                "ThingsBoard connected") for _, s in sock.statuses()), "2/2 up, connected")
            # Steady state, readings flowing: the line is not re-sent every second.
            calm = time.monotonic()
            await asyncio.sleep(4)
            assert len([t for t, _ in sock.statuses() if t >= calm]) <= 1
            await b.close()
            await until(lambda: sock.statuses()[-1][1].startswith("1/2 nodes up"), "1/2 up")
            broker.stop()
            await until(lambda: sock.statuses()[-1][1].endswith("ThingsBoard disconnected"),
                        "disconnected")
            broker.start()
            await until(lambda: sock.statuses()[-1][1].endswith("ThingsBoard connected"),
                        "connected again", timeout=30)
    finally:
        sock.sock.close()
        await a.close()
        await b.close()


def test_summary_and_rates() -> None:
    status: dict[str, Any] = {
        "nodes": [{"link": "up"}, {"link": "up"}, {"link": "down"}],
        "uplink": {"configured": True, "connected": True},
        "buffer": {"backlog": 0, "storage": "ok"},
    }
    assert summary(status) == "2/3 nodes up · backlog 0 · ThingsBoard connected"
    status["buffer"] = {"backlog": 123_456, "storage": "full"}
    status["reload_refused"] = "nodes[0].poll_interval: must be more than 0"
    assert summary(status) == ("reload refused: nodes[0].poll_interval: must be more than 0"
                               " · 2/3 nodes up · backlog 123k · storage full"
                               " · ThingsBoard connected")
    assert [backlog_text(n) for n in (5, 999, 1500, 12_345, 2_500_000)] == [
        "5", "999", "1.5k", "12k", "2.5M"]
    sampler = Sampler(window_s=10)
    assert sampler.rate() is None
    for t in range(30):
        sampler.add(float(t), t * 4)
    assert sampler.rate() == pytest.approx(4.0)
