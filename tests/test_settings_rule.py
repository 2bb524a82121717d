"""Who wins, the config file or ThingsBoard (gateway/settings.py), across restarts and SIGHUP
reloads, on a real broker; and what is in force, published back as client attributes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import FILE, RPC, THINGSBOARD, SettingsState
from sim.node import SimNode
from tests.conftest import Broker
from tests.gateway_harness import config_dict, node_entry, running_gateway, write_config
from tests.mqtt_recorder import Recorder

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------- the rule itself
def test_the_newer_wins_key_by_key() -> None:
    state = SettingsState()
    assert state.see_file({"mode": "manual", "tds_setpoint": 800}, mtime=100.0) == []
    state.set({"tds_setpoint": 900}, ts=200.0, source=THINGSBOARD)
    state.set({"mode": "auto"}, ts=210.0, source=RPC)
    assert state.winners() == {"tds_setpoint": 900, "mode": "auto"}
    # The file's tds_setpoint is edited at 300, after both run-time values.
    assert state.see_file({"mode": "manual", "tds_setpoint": 750}, mtime=300.0) == [
        "tds_setpoint"
    ]
    assert state.winners() == {"mode": "auto"}  # the edit left mode alone
    assert state.sources() == {"mode": RPC, "tds_setpoint": FILE}
    # A value set after the edit wins again.
    state.set({"tds_setpoint": 820}, ts=400.0, source=THINGSBOARD)
    assert state.winners()["tds_setpoint"] == 820
    # The same file seen again (a restart without an edit) dates nothing.
    assert state.see_file({"mode": "manual", "tds_setpoint": 750}, mtime=500.0) == []
    assert state.winners()["tds_setpoint"] == 820


def test_a_stale_response_is_not_new_but_a_push_always_is() -> None:
    state = SettingsState()
    state.see_file({"tds_setpoint": 800}, mtime=0.0)
    state.heard({"tds_setpoint": 900})
    assert state.news({"tds_setpoint": 900}, response=True) == {}
    assert state.news({"tds_setpoint": 910}, response=True) == {"tds_setpoint": 910}
    assert state.news({"tds_setpoint": 900}, response=False) == {"tds_setpoint": 900}
    state.set({"tds_setpoint": 900}, ts=1.0, source=THINGSBOARD)
    assert state.deleted(["tds_setpoint"]) == ["tds_setpoint"]
    assert state.winners() == {}


def test_saved_state_round_trips_and_the_old_format_migrates() -> None:
    state = SettingsState()
    state.see_file({"mode": "manual", "tds_setpoint": 800}, mtime=1.0)
    state.set({"tds_setpoint": 900}, ts=2.0, source=THINGSBOARD)
    state.heard({"tds_setpoint": 900})
    again = SettingsState.restore(json.loads(json.dumps(state.to_saved())))
    assert again == state
    # Format 1: {"base": file, "current": in force}: run-time values won, unless edited.
    old = SettingsState.restore({"base": {"mode": "manual", "tds_setpoint": 800},
                                 "current": {"mode": "manual", "tds_setpoint": 900}})
    assert old.winners() == {"tds_setpoint": 900}
    assert old.news({"tds_setpoint": 900}, response=True) == {}  # what it had is not new
    old.see_file({"mode": "manual", "tds_setpoint": 750}, mtime=10.0)
    assert old.winners() == {}
    with pytest.raises(ValueError):
        SettingsState.restore({"something": "else"})


# ------------------------------------------------------------------ end to end
class Server:
    """ThingsBoard's part: holds shared attributes, answers the gateway's requests for them."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.shared: dict[str, dict[str, Any]] = {}
        self._answered = 0

    async def run(self) -> None:
        while True:
            requests = self.rec.on("v1/gateway/attributes/request")
            for m in requests[self._answered:]:
                req = m.payload
                values = {k: v for k, v in self.shared.get(req["device"], {}).items()
                          if k in req["keys"]}
                await self.rec.publish("v1/gateway/attributes/response",
                                       {"id": req["id"], "device": req["device"],
                                        "values": values})
            self._answered = len(requests)
            await asyncio.sleep(0.05)

    async def set(self, device: str, **values: Any) -> None:
        """Someone saves shared attributes: kept, and pushed to the gateway."""
        self.shared.setdefault(device, {}).update(values)
        await self.rec.publish("v1/gateway/attributes", {"device": device, "data": values})


def published(rec: Recorder, device: str) -> list[dict[str, Any]]:
    """The client attributes the gateway published for ``device``, in order."""
    return [m.payload[device] for m in rec.on("v1/gateway/attributes")
            if isinstance(m.payload, dict) and device in m.payload]



def edit(path: Path, data: dict[str, Any]) -> None:
    """Write the config file; its modification time is the edit's date."""
    time.sleep(0.02)
    write_config(path, data)
    os.utime(path)


async def test_file_edits_and_later_attributes_across_reloads_and_restarts(
    broker: Broker, tmp_path: Path
) -> None:
    node = SimNode("tank-a")
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        control = {"mode": "manual", "controller": "rb", "tds_setpoint": 800,
                   "ph_setpoint": 6.0, "interval": 0}
        data = config_dict(tmp_path / "gw.sqlite", [node_entry("tank-a", url, control=control)],
                           broker.port)
        path = write_config(tmp_path / "config.yaml", data)
        async with Recorder(broker.port) as rec:
            server = Server(rec)
            answering = asyncio.create_task(server.run())
            try:
                async with running_gateway(path) as gw:
                    ctl = gw.runners["tank-a"].control
                    await rec.wait_for(lambda: published(rec, "tank-a"), what="first publish")
                    first = published(rec, "tank-a")[-1]
                    assert first["effective_tds_setpoint"] == 800
                    assert first["settings_source"] == "config file"
                    # 1. An attribute set in ThingsBoard wins over the file.
                    await server.set("tank-a", tds_setpoint=900)
                    await rec.wait_for(lambda: published(rec, "tank-a")[-1].get(
                        "effective_tds_setpoint") == 900, what="900 in force, published")
                    assert "tds_setpoint (thingsboard)" in published(rec, "tank-a")[-1][
                        "settings_source"]
                    # 2. The file is edited afterwards, and reloaded: the edit wins.
                    control["tds_setpoint"] = 750
                    edit(path, data)
                    gw.request_reload()
                    await rec.wait_for(lambda: gw.runners["tank-a"].control.settings is not None
                                       and gw.runners["tank-a"].control.settings.tds_setpoint
                                       == 750, what="the reloaded file in force")
                    await rec.wait_for(lambda: published(rec, "tank-a")[-1].get(
                        "effective_tds_setpoint") == 750, what="750 published")
                    assert published(rec, "tank-a")[-1]["settings_source"] == "config file"
                    del ctl
                # 3. A restart: ThingsBoard answers the request with the stale 900 again.
                requests = len(rec.on("v1/gateway/attributes/request"))
                async with running_gateway(path) as gw:
                    await rec.wait_for(
                        lambda: len(rec.on("v1/gateway/attributes/request")) > requests,
                        what="the attribute request of the new session")
                    await asyncio.sleep(0.5)  # the response is in and handled
                    settings = gw.runners["tank-a"].control.settings
                    assert settings is not None and settings.tds_setpoint == 750
                    # 4. A later attribute wins over the file again, here written in mS/cm
                    # (the same setting; kept under the node's unit's key); an RPC too.
                    await server.set("tank-a", ec_setpoint=1.64)
                    await rec.wait_for(lambda: published(rec, "tank-a")[-1].get(
                        "effective_tds_setpoint") == 820, what="820 in force")
                    assert published(rec, "tank-a")[-1]["effective_ec_setpoint"] == 1.64
                    reply = await rec.rpc("tank-a", 1, "set_mode", {"mode": "auto"})
                    assert reply["data"]["success"]
                    # 5. A refused update is published with its reason; nothing changes.
                    await server.set("tank-a", ph_setpoint=42)
                    await rec.wait_for(lambda: published(rec, "tank-a")[-1].get(
                        "settings_refused"), what="the refusal published")
                    refusal = published(rec, "tank-a")[-1]
                    assert "ph_setpoint" in refusal["settings_refused"]
                    assert refusal["effective_ph_setpoint"] == 6.0
                    server.shared["tank-a"].pop("ph_setpoint")  # the grower fixes it
                # 6. Edit only mode in the file, restart: mode from the file, tds stays 820.
                control["mode"] = "manual"
                control["interval"] = 60
                edit(path, data)
                async with running_gateway(path) as gw:
                    await asyncio.sleep(1.0)
                    state = (await rec.rpc("tank-a", 2, "get_state"))["data"]
                    # The file's mode is unchanged (manual) so the later RPC (auto) still wins;
                    # interval was edited, and comes from the file.
                    assert state["tds_setpoint"] == 820 and state["mode"] == "auto"
                    assert state["interval"] == 60
                    sources = gw.runners["tank-a"].control.settings_from()
                    assert sources["tds_setpoint"] == THINGSBOARD
                    assert sources["mode"] == RPC and sources["interval"] == FILE
            finally:
                answering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await answering
        for m in rec.on("v1/gateway/attributes"):
            if "device" not in m.payload:  # ours, not the server's pushes
                assert m.qos == 1 and not m.retain and len(m.raw) <= 65536
                [(device, attrs)] = m.payload.items()
                assert device == "tank-a" and None not in attrs.values()
    finally:
        await node.close()


async def test_what_is_in_force_is_published_again_after_an_outage(
    broker: Broker, tmp_path: Path
) -> None:
    node = SimNode("tank-a")
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        control = {"mode": "manual", "tds_setpoint": 800, "ph_setpoint": 6.0, "interval": 0}
        data = config_dict(tmp_path / "gw.sqlite", [node_entry("tank-a", url, control=control)],
                           broker.port)
        path = write_config(tmp_path / "config.yaml", data)
        async with Recorder(broker.port) as rec, running_gateway(path) as gw:
            await rec.wait_for(lambda: published(rec, "tank-a"), what="first publish")
            broker.stop()
            await rec.wait_for(lambda: gw.uplink is not None and not gw.uplink.connected,
                               what="the outage")
            control["tds_setpoint"] = 650  # edited and reloaded while ThingsBoard is away
            edit(path, data)
            gw.request_reload()
            await rec.wait_for(lambda: gw.runners["tank-a"].control.settings is not None
                               and gw.runners["tank-a"].control.settings.tds_setpoint == 650,
                               what="the reload")
            broker.start()
            await rec.wait_for(lambda: published(rec, "tank-a")[-1].get(
                "effective_tds_setpoint") == 650, timeout=30, what="650 published after it")
    finally:
        await node.close()
