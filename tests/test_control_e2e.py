"""Control over the real broker: RPCs, shared attributes, persistence, safety refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sim.node import SimNode
from tests.conftest import Broker
from tests.gateway_harness import config_dict, node_entry, running_gateway
from tests.mqtt_recorder import Recorder

pytestmark = pytest.mark.slow


def controlled(url: str, **control: Any) -> dict[str, Any]:
    settings = {"mode": "manual", "controller": "fuzzy", "tds_setpoint": 800, "ph_setpoint": 6.0,
                "interval": 0}
    settings.update(control)
    return node_entry("tank-a", url, control=settings,
                      safety={"max_actuation_ms": 5000, "max_ms_per_hour": 6000})


async def test_rpc_methods_and_their_refusals(broker: Broker, tmp_path: Path) -> None:
    node = SimNode("tank-a")
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        data = config_dict(tmp_path / "gw.sqlite", [controlled(url)], broker.port)
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            await rec.wait_for(lambda: gw.runners["tank-a"].latest, what="first reading")
            ok = await rec.rpc("tank-a", 1, "actuate", {"actuator": "nutrient", "ms": 1500})
            assert ok["data"] == {"success": True, "actuator": "nutrient", "ms": 1500, "duty": 255}
            assert node.requests.get("actuate", 0) == 1
            await rec.wait_for(
                lambda: any("nutrient_ms" in e["values"] for e in rec.entries().get("tank-a", [])),
                what="actuation telemetry",
            )
            entry = next(e for e in rec.entries()["tank-a"] if "nutrient_ms" in e["values"])
            assert entry["values"] == {"nutrient_ms": 1500, "nutrient_duty": 255,
                                       "controller": "manual"}

            refusals = {
                2: ("actuate", {"actuator": "nutrient", "ms": 9000}),  # > max_actuation_ms
                3: ("actuate", {"actuator": "co2_valve", "ms": 100}),  # not announced
                4: ("actuate", {"actuator": "nutrient"}),  # ms missing
                5: ("actuate", "nutrient"),  # params not an object
                6: ("reboot", None),  # unknown method
                7: ("set_mode", {"mode": "turbo"}),
            }
            for rpc_id, (method, params) in refusals.items():
                reply = await rec.rpc("tank-a", rpc_id, method, params)
                assert reply["data"]["success"] is False, (method, params)
                assert reply["data"]["error"]
            # The hour budget (6000 ms): after 1500, 5000 more do not fit, 4000 do.
            await asyncio.sleep(1.6)  # the first dose is over
            over = await rec.rpc("tank-a", 8, "actuate", {"actuator": "nutrient", "ms": 5000})
            assert over["data"]["success"] is False
            assert "hour_budget" in over["data"]["error"]
            assert (await rec.rpc("tank-a", 9, "actuate",
                                  {"actuator": "nutrient", "ms": 4000}))["data"]["success"]
            assert node.requests.get("actuate", 0) == 2, "refused doses never reach the node"
            await rec.wait_for(
                lambda: any("safety_refused" in e["values"] for e in rec.entries()["tank-a"]),
                what="refusal telemetry",
            )
            unknown = await rec.rpc("tank-z", 10, "get_state")
            assert unknown["data"]["success"] is False

            stops = node.requests.get("stop", 0)
            assert (await rec.rpc("tank-a", 11, "stop"))["data"]["success"]
            assert node.requests.get("stop", 0) == stops + 1

            state = (await rec.rpc("tank-a", 12, "get_state"))["data"]
            assert state["success"] and state["link"] == "up" and state["cycle"] == "idle"
            assert state["mode"] == "manual" and state["tds_setpoint"] == 800
            assert "ph" in state["values"] and isinstance(state["ts"], int)
            assert set(state["actuators"]) == {"ph_up", "ph_down", "nutrient", "refill"}
    finally:
        await node.close()


async def test_attributes_and_set_mode_apply_whole_and_persist(
    broker: Broker, tmp_path: Path
) -> None:
    node = SimNode("tank-a")
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        data = config_dict(tmp_path / "gw.sqlite", [controlled(url)], broker.port)
        async with Recorder(broker.port) as rec:
            async with running_gateway(data) as gw:
                control = gw.runners["tank-a"].control
                assert control.settings is not None
                await rec.wait_for(lambda: rec.on("v1/gateway/attributes/request"),
                                   what="shared attributes requested")
                request = rec.on("v1/gateway/attributes/request")[0].payload
                assert request["device"] == "tank-a" and request["client"] is False
                assert "tds_setpoint" in request["keys"]

                await rec.publish("v1/gateway/attributes",
                                  {"device": "tank-a", "data": {"tds_setpoint": 900,
                                                                "schedule": "09:00,21:00"}})
                await rec.wait_for(lambda: control.settings.tds_setpoint == 900,
                                   what="attribute applied")
                # A bad value refuses the whole update: tds_setpoint stays 900.
                await rec.publish("v1/gateway/attributes",
                                  {"device": "tank-a", "data": {"tds_setpoint": 1000,
                                                                "ph_setpoint": 42}})
                await asyncio.sleep(0.5)
                assert control.settings.tds_setpoint == 900
                reply = await rec.rpc("tank-a", 1, "set_mode", {"mode": "auto"})
                assert reply["data"] == {"success": True, "mode": "auto"}
            # A restart keeps what was set at run time.
            async with running_gateway(data) as gw:
                state = (await rec.rpc("tank-a", 2, "get_state"))["data"]
                assert state["tds_setpoint"] == 900
                assert state["mode"] == "auto"
                assert state["schedule"] == ["09:00", "21:00"]
            # Editing a key of the config file wins over the run-time value set before;
            # the keys the edit left alone keep their run-time values (gateway/settings.py).
            data["nodes"][0]["control"]["tds_setpoint"] = 750
            async with running_gateway(data) as gw:
                state = (await rec.rpc("tank-a", 3, "get_state"))["data"]
                assert state["tds_setpoint"] == 750 and state["mode"] == "auto"
    finally:
        await node.close()


async def test_force_on_doses_and_force_stop_aborts(broker: Broker, tmp_path: Path) -> None:
    from sim.plant import Reservoir

    node = SimNode("tank-a", Reservoir.from_state(tds=400, ph=6.0, seed=3))
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        entry = controlled(url, tds_average_s=1, ph_average_s=1, mixing_wait_s=5)
        entry["safety"] = {}
        data = config_dict(tmp_path / "gw.sqlite", [entry], broker.port)
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            await rec.wait_for(lambda: gw.runners["tank-a"].latest, what="first reading")
            reply = await rec.rpc("tank-a", 1, "force_on")
            assert reply["data"]["success"] and reply["data"]["cycle"] == "tds"
            await rec.wait_for(lambda: node.requests.get("actuate", 0) >= 1, timeout=15,
                               what="the cycle doses nutrient")
            entries = rec.entries()["tank-a"]
            await rec.wait_for(
                lambda: any(e["values"].get("controller") == "fuzzy"
                            for e in rec.entries()["tank-a"]), what="controller telemetry")
            entries = rec.entries()["tank-a"]
            assert any("nutrient_ms" in e["values"] for e in entries)
            stops = node.requests.get("stop", 0)
            reply = await rec.rpc("tank-a", 2, "force_stop")
            assert reply["data"] == {"success": True, "cycle": "idle"}
            assert node.requests.get("stop", 0) == stops + 1
            assert not any(node.running.values())
    finally:
        await node.close()


def test_every_controller_the_config_accepts_is_registered() -> None:
    from gateway.config import CONTROLLER_NAMES
    from rules.controller import ControllerOptions, create, names

    assert set(names()) == set(CONTROLLER_NAMES)
    for name in CONTROLLER_NAMES:
        controller = create(name, ControllerOptions())
        try:
            assert controller.name == name
        finally:
            controller.close()


def test_rules_dataclasses_take_the_config_defaults() -> None:
    """rules/ repeats some config fields; their defaults must not drift apart."""
    import dataclasses

    from gateway.config import ControlConfig, SafetyConfig
    from gateway.control import from_config
    from rules.cycle import CycleSettings
    from rules.safety import SafetyLimits

    def defaults(cls: type) -> dict[str, object]:
        return {
            f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING
        }

    for rules_cls, config_cls in ((SafetyLimits, SafetyConfig), (CycleSettings, ControlConfig)):
        ours, theirs = defaults(rules_cls), defaults(config_cls)
        shared = set(ours) & set(theirs)
        assert shared, rules_cls
        assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}, rules_cls
    assert from_config(SafetyLimits, SafetyConfig()) == SafetyLimits()
    control = ControlConfig(tds_setpoint=800, ph_setpoint=6.0)
    assert from_config(CycleSettings, control) == CycleSettings(tds_setpoint=800, ph_setpoint=6.0)


async def test_a_failing_controller_stops_dosing_but_not_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A controller fault aborts the cycle and stops the pumps; polling goes on."""
    import json

    import gateway.control as control_module
    from rules.controller import ControllerError, ControllerOptions, Decision, DecisionContext

    class Broken:
        name = "fuzzy"

        async def decide(self, ctx: DecisionContext) -> Decision:
            raise ControllerError("model exploded")

        def close(self) -> None:
            pass

    def create(name: str, options: ControllerOptions) -> Broken:
        return Broken()

    monkeypatch.setattr(control_module, "create", create)
    node = SimNode("tank-a")
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        entry = controlled(url, tds_average_s=1, ph_average_s=1, mode="auto", interval=1)
        data = config_dict(tmp_path / "gw.sqlite", [entry])
        async with running_gateway(data) as gw:
            runner = gw.runners["tank-a"]
            assert gw.store is not None
            stops = node.requests.get("stop", 0)
            for _ in range(200):
                await gw.store.flush()
                rows = await gw.store.peek(10_000)
                if any("control_error" in json.loads(r.entry)["values"] for r in rows):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("no control_error telemetry")
            before = runner.readings
            await asyncio.sleep(1.0)
            assert runner.readings > before, "the node is still polled"
            assert runner.link_up
            assert node.requests.get("stop", 0) > stops
            assert node.requests.get("actuate", 0) == 0
    finally:
        await node.close()
