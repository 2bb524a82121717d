"""The pH lock on the real daemon: urgent severity, kept across a restart, released by the grower."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.control import ENVELOPE_KEY, plant_fingerprint
from gateway.store import Store
from rules.controller import PlantConstants
from rules.envelope import PhEnvelope
from sim.node import SimNode
from sim.plant import Reservoir
from tests.conftest import Broker
from tests.gateway_harness import config_dict, node_entry, running_gateway
from tests.mqtt_recorder import Recorder

pytestmark = pytest.mark.slow

REASON = "automatic pH dosing stopped after 2 overshoots in a row (test)"


async def seed_lock(path: Path) -> None:
    """What the daemon saves when its envelope locks, as a crash right after would leave it."""
    envelope = PhEnvelope(PlantConstants())
    envelope.locked = REASON
    envelope.overshoots = 2
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        await store.save_learned(
            "tank-a", ENVELOPE_KEY, envelope.learned(), plant_fingerprint(PlantConstants())
        )


def urgent_with_lock(rec: Recorder) -> bool:
    return any(
        e["values"].get("severity") == "urgent" and REASON in e["values"].get("severity_reason", "")
        for e in rec.entries().get("tank-a", [])
    )


def config(path: Path, url: str, port: int) -> dict[str, Any]:
    control = {"mode": "auto", "tds_setpoint": 800, "ph_setpoint": 6.0, "interval": 1,
               "mixing_wait_s": 1, "ph_average_s": 1, "tds_average_s": 1}
    return config_dict(path, [node_entry("tank-a", url, control=control)], port)


async def test_a_lock_is_urgent_survives_a_restart_and_an_rpc_releases_it(
    broker: Broker, tmp_path: Path
) -> None:
    node = SimNode("tank-a", plant=Reservoir.from_state(tds=800.0, ph=7.2))
    path = tmp_path / "gw.sqlite"
    await seed_lock(path)
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        data = config(path, url, broker.port)
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            await rec.wait_for(lambda: urgent_with_lock(rec), what="urgent severity")
            state = (await rec.rpc("tank-a", 1, "get_state"))["data"]
            assert state["ph_lock"] == REASON
            # The pH is far off (7.2 for 6.0), but no automatic pH dose is made.
            await rec.wait_for(lambda: gw.runners["tank-a"].readings > 20, what="readings")
            assert node.requests.get("actuate", 0) == 0
        async with Recorder(broker.port) as rec:
            async with running_gateway(data):  # a restart keeps the lock
                await rec.wait_for(lambda: urgent_with_lock(rec), what="urgent after a restart")
                reply = await rec.rpc("tank-a", 2, "acknowledge")
                assert reply["data"] == {"success": True, "released": True}
                await rec.wait_for(
                    lambda: any(e["values"].get("ph_lock") == "released"
                                for e in rec.entries()["tank-a"]),
                    what="released telemetry",
                )
                state = (await rec.rpc("tank-a", 3, "get_state"))["data"]
                assert state["ph_lock"] is None
                # Automatic pH dosing resumes, from a small first dose (nothing measured).
                await rec.wait_for(
                    lambda: any("ph_down_ms" in e["values"] for e in rec.entries()["tank-a"]),
                    what="a pH dose after the release",
                )
                first = next(e["values"] for e in rec.entries()["tank-a"]
                             if "ph_down_ms" in e["values"])
                assert first["controller"] == "adaptive" and first["ph_down_ms"] < 100
            async with running_gateway(data):
                state = (await rec.rpc("tank-a", 4, "get_state"))["data"]
                assert state["ph_lock"] is None, "the release was saved"
    finally:
        await node.close()


async def test_the_acknowledge_attribute_releases_a_lock(broker: Broker, tmp_path: Path) -> None:
    node = SimNode("tank-a")
    path = tmp_path / "gw.sqlite"
    await seed_lock(path)
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        async with Recorder(broker.port) as rec, running_gateway(config(path, url, broker.port)):
            await rec.wait_for(lambda: urgent_with_lock(rec), what="urgent severity")
            request = rec.on("v1/gateway/attributes/request")[0].payload
            assert "acknowledge" not in request["keys"], "an event, never requested"
            await rec.publish(
                "v1/gateway/attributes",
                {"device": "tank-a", "data": {"acknowledge": 1764600000}},
            )
            await rec.wait_for(
                lambda: any(e["values"].get("ph_lock") == "released"
                            for e in rec.entries()["tank-a"]),
                what="released by the attribute",
            )
    finally:
        await node.close()
