"""The ThingsBoard kit (thingsboard/): the files load and are well formed, every key, attribute
and RPC method in them is one a real gateway sends or serves (collected from a run on
Mosquitto), and the traffic its buttons and inputs produce is handled by the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
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

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "thingsboard"
#: Attributes ThingsBoard keeps itself (device activity), not the gateway.
THINGSBOARD_OWN = {"active"}
SEVERITIES = {"CRITICAL", "MAJOR", "MINOR", "WARNING", "INDETERMINATE"}
OPERATIONS = {
    "STRING": {"EQUAL", "NOT_EQUAL", "STARTS_WITH", "ENDS_WITH", "CONTAINS", "NOT_CONTAINS",
               "IN", "NOT_IN"},
    "NUMERIC": {"EQUAL", "NOT_EQUAL", "GREATER", "LESS", "GREATER_OR_EQUAL", "LESS_OR_EQUAL"},
    "BOOLEAN": {"EQUAL", "NOT_EQUAL"},
}


def make() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tb_make", KIT / "make.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str) -> dict[str, Any]:
    data = json.loads((KIT / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_the_files_are_what_make_py_writes() -> None:
    m = make()
    assert load("hydrogate-dashboard.json") == json.loads(json.dumps(m.dashboard()))
    assert load("hydro-node-profile.json") == json.loads(json.dumps(m.node_profile()))
    assert load("hydrogate-gateway-profile.json") == json.loads(json.dumps(m.gateway_profile()))


# ----------------------------------------------------------------- well formed
def widgets() -> dict[str, dict[str, Any]]:
    return load("hydrogate-dashboard.json")["configuration"]["widgets"]  # type: ignore[no-any-return]


def test_dashboard_aliases_widgets_states_and_actions_are_well_formed() -> None:
    dash = load("hydrogate-dashboard.json")
    assert dash["title"] and set(dash) >= {"title", "configuration"}
    conf = dash["configuration"]
    aliases, states, all_widgets = conf["entityAliases"], conf["states"], conf["widgets"]
    types = make().WIDGET_TYPES
    for aid, alias in aliases.items():
        assert alias["id"] == aid and alias["alias"]
        kind = alias["filter"]["type"]
        assert kind in {"deviceType", "stateEntity", "relationsQuery"}
        if kind == "relationsQuery":
            f = alias["filter"]
            assert f["rootStateEntity"] is True and f["direction"] == "FROM"
            assert f["filters"] == [{"relationType": "Created", "entityTypes": ["DEVICE"]}]
    roots = [name for name, s in states.items() if s["root"]]
    assert roots == ["default"]
    placed: set[str] = set()
    for state in states.values():
        for wid, where in state["layouts"]["main"]["widgets"].items():
            assert wid in all_widgets, wid
            assert (where["sizeX"], where["sizeY"]) == (all_widgets[wid]["sizeX"],
                                                        all_widgets[wid]["sizeY"])
            assert where["col"] + where["sizeX"] <= 24
            placed.add(wid)
    assert placed == set(all_widgets), "every widget is on a state"
    for wid, w in all_widgets.items():
        assert w["id"] == wid
        assert w["typeFullFqn"] in types and w["type"] == types[w["typeFullFqn"]], wid
        config = w["config"]
        for ds in config["datasources"]:
            assert ds["type"] == "entity" and ds["entityAliasId"] in aliases
            assert ds["dataKeys"], wid
            for k in ds["dataKeys"]:
                assert k["name"] and k["label"]
                assert k["type"] in {"timeseries", "attribute"}, (wid, k)
        if w["type"] == "rpc":
            assert config["targetDeviceAliasIds"], wid
            assert set(config["targetDeviceAliasIds"]) <= set(aliases)
            assert config["datasources"] == []
        elif w["type"] == "alarm":
            assert config["alarmSource"]["entityAliasId"] in aliases
            assert {k["type"] for k in config["alarmSource"]["dataKeys"]} == {"alarm"}
        else:
            assert config["datasources"], wid
        for actions in config.get("actions", {}).values():
            for action in actions:
                assert action["type"] == "openDashboardState"
                assert action["targetDashboardStateId"] in states and action["setEntityId"]
    # A state that shows "the selected" entity is only reached by a click that sets it.
    state_aliases = {aid for aid, a in aliases.items() if a["filter"]["type"] == "stateEntity"}
    root_widgets = states["default"]["layouts"]["main"]["widgets"]
    for wid in root_widgets:
        used = {ds["entityAliasId"] for ds in all_widgets[wid]["config"]["datasources"]}
        assert not used & state_aliases


def test_device_profiles_alarm_rules_are_well_formed_and_clear_themselves() -> None:
    for name, profile_name in (("hydro-node-profile.json", "hydro-node"),
                               ("hydrogate-gateway-profile.json", "hydrogate-gateway")):
        profile = load(name)
        assert profile["name"] == profile_name and profile["type"] == "DEFAULT"
        data = profile["profileData"]
        assert data["configuration"] == {"type": "DEFAULT"}
        alarms = data["alarms"]
        assert len({a["id"] for a in alarms}) == len(alarms)
        for alarm in alarms:
            assert set(alarm["createRules"]) <= SEVERITIES and alarm["createRules"]
            assert alarm["clearRule"] is not None, f"{alarm['alarmType']} clears itself"
            for rule in (*alarm["createRules"].values(), alarm["clearRule"]):
                assert rule["condition"]["spec"] == {"type": "SIMPLE"}
                for c in rule["condition"]["condition"]:
                    assert c["key"]["type"] in {"TIME_SERIES", "ATTRIBUTE"}
                    kind = c["valueType"]
                    assert c["predicate"]["type"] == kind
                    assert c["predicate"]["operation"] in OPERATIONS[kind]
                    assert "defaultValue" in c["predicate"]["value"]
                if rule["alarmDetails"]:
                    used = {c["key"]["key"] for c in rule["condition"]["condition"]}
                    for ref in _placeholders(rule["alarmDetails"]):
                        assert ref in used, "only condition keys are substituted in details"
    node_alarms = {a["alarmType"] for a in load("hydro-node-profile.json")["profileData"][
        "alarms"]}
    assert {"Tank severity", "Node link down"} <= node_alarms
    assert any(a.startswith("No data") for a in node_alarms)


def _placeholders(text: str) -> Iterator[str]:
    while "${" in text:
        text = text.split("${", 1)[1]
        name, _, text = text.partition("}")
        yield name


# ------------------------------------------------------- what the kit refers to
def kit_references() -> dict[str, set[str]]:
    """Keys by what they are on which device, and the RPC methods, that the kit uses."""
    m = make()
    alias_device = {m._id("alias", a): ("gateway" if a.startswith("gateway") else "tank")
                    for a in m.ALIASES}
    refs: dict[str, set[str]] = {f"{d}_{k}": set() for d in ("tank", "gateway")
                                 for k in ("timeseries", "attribute", "shared")}
    refs["rpc"] = set()
    for w in widgets().values():
        config = w["config"]
        for ds in config["datasources"]:
            device = alias_device[ds["entityAliasId"]]
            for k in ds["dataKeys"]:
                kind = k["type"]
                if kind == "attribute" and k["settings"].get("dataKeyType") == "shared":
                    kind = "shared"
                refs[f"{device}_{kind}"].add(k["name"])
        if w["typeFullFqn"] == "system.control_widgets.rpcbutton":
            refs["rpc"].add(config["settings"]["methodName"])
    for name, device in (("hydro-node-profile.json", "tank"),
                         ("hydrogate-gateway-profile.json", "gateway")):
        for alarm in load(name)["profileData"]["alarms"]:
            for rule in (*alarm["createRules"].values(), alarm["clearRule"]):
                for c in rule["condition"]["condition"]:
                    kind = "timeseries" if c["key"]["type"] == "TIME_SERIES" else "attribute"
                    refs[f"{device}_{kind}"].add(c["key"]["key"])
    return refs


def button_traffic() -> list[tuple[str, str, Any]]:
    """(label, method, params) of every RPC button, as the widget sends them."""
    out = []
    for w in widgets().values():
        if w["typeFullFqn"] == "system.control_widgets.rpcbutton":
            s = w["config"]["settings"]
            out.append((s["buttonText"], s["methodName"], json.loads(s["methodParams"])))
    return out


def input_traffic() -> list[tuple[str, Any]]:
    """(key, value) saves the settings inputs can make: each choice, the ends of each range."""
    out: list[tuple[str, Any]] = []
    for w in widgets().values():
        if w["typeFullFqn"] != "system.input_widgets.update_multiple_attributes":
            continue
        for k in w["config"]["datasources"][0]["dataKeys"]:
            s = k["settings"]
            assert s["dataKeyType"] == "shared"
            kind = s["dataKeyValueType"]
            if kind == "select":
                out += [(k["name"], o["value"]) for o in s["selectOptions"]]
            elif kind == "double":
                out += [(k["name"], float(s["minValue"])), (k["name"], float(s["maxValue"]))]
            elif kind == "integer":
                out += [(k["name"], int(s["minValue"])), (k["name"], int(s["maxValue"]))]
            else:  # a text field: what its label asks for
                assert kind == "string" and "HH:MM" in k["label"]
                out.append((k["name"], "08:00,20:00"))
    return out


# ------------------------------------------------------------------ end to end
REASON = "automatic pH dosing stopped after 2 overshoots in a row (kit test)"


async def seed_lock(path: Path) -> None:
    """A pH lock left by an earlier run: the gateway reports it, the acknowledge button frees it."""
    envelope = PhEnvelope(PlantConstants())
    envelope.locked = REASON
    envelope.overshoots = 2
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        await store.save_learned("tank-a", ENVELOPE_KEY, envelope.learned(),
                                 plant_fingerprint(PlantConstants()))


@pytest.mark.slow
async def test_a_real_gateway_serves_everything_the_kit_uses(
    broker: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "gw.sqlite"
    await seed_lock(db)
    a = SimNode("tank-a", Reservoir.from_state(tds=420, ph=6.0, seed=5))
    b = SimNode("tank-b")
    try:
        control = {"mode": "manual", "controller": "rb", "tds_setpoint": 800,
                   "ph_setpoint": 6.0, "interval": 0, "tds_average_s": 1, "ph_average_s": 1,
                   "mixing_wait_s": 2}
        nodes = [
            node_entry("tank-a", f"tcp://127.0.0.1:{await a.serve_tcp('127.0.0.1', 0)}",
                       control=control,
                       safety={"max_actuation_ms": 12_000, "max_ms_per_hour": 15_000}),
            node_entry("tank-b", f"tcp://127.0.0.1:{await b.serve_tcp('127.0.0.1', 0)}"),
        ]
        data = config_dict(db, nodes, broker.port)
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            tank = gw.runners["tank-a"]
            await rec.wait_for(lambda: tank.link_up and gw.runners["tank-b"].link_up,
                               what="links up")
            replies: dict[str, dict[str, Any]] = {}
            rid = 100
            # Every button of the tank state, as ThingsBoard sends it: doses first, then a
            # cycle (whose dose the hour budget shortens), abort, stop, acknowledge.
            order = {"actuate": 0, "force_on": 1, "force_stop": 2, "stop": 3, "acknowledge": 4}
            for label, method, params in sorted(button_traffic(), key=lambda t: order[t[1]]):
                rid += 1
                if method == "force_on":
                    await asyncio.sleep(1.5)
                reply = await rec.rpc("tank-a", rid, method, params)
                replies[label] = reply["data"]
                assert reply["data"]["success"], (label, reply["data"])
                if method == "actuate":  # then "Stop every pump": one pump at a time
                    await asyncio.sleep(0.3)
                    rid += 1
                    assert (await rec.rpc("tank-a", rid, "stop"))["data"]["success"]
                if method == "force_on":
                    await rec.wait_for(lambda: any(
                        e["values"].get("controller") == "rb"
                        for e in rec.entries().get("tank-a", [])), what="the cycle's dose")
            # What the RPC terminal lets a grower type, refused by safety.
            refused = await rec.rpc("tank-a", 200, "actuate", {"actuator": "nutrient",
                                                               "ms": 60_000})
            assert not refused["data"]["success"]
            # Every save the settings inputs can make, as ThingsBoard pushes it.
            for n, (name, value) in enumerate(input_traffic()):
                await rec.publish("v1/gateway/attributes",
                                  {"device": "tank-a", "data": {name: value}})

                def applied(name: str = name, value: Any = value) -> bool:
                    mine = [m.payload["tank-a"] for m in rec.on("v1/gateway/attributes")
                            if "device" not in m.payload and "tank-a" in m.payload]
                    return bool(mine) and mine[-1].get(f"effective_{name}") == value
                await rec.wait_for(applied, what=f"save {n}: {name} = {value!r} in force")
            await rec.publish("v1/gateway/attributes", {"device": "tank-a",
                                                        "data": {"ph_setpoint": 42}})
            await rec.wait_for(lambda: any(
                m.payload["tank-a"].get("settings_refused") for m in rec.on(
                    "v1/gateway/attributes") if "tank-a" in m.payload), what="a refusal")
            await b.close()
            await rec.wait_for(lambda: any(e["values"].get("link") == "down"
                                           for e in rec.entries().get("tank-b", [])),
                               what="tank-b link down")
            await rec.wait_for(lambda: len(rec.on("v1/devices/me/telemetry")) >= 2,
                               what="health")
    finally:
        await a.close()
        await b.close()
    assert replies["Acknowledge (pH lock)"]["released"] is True

    served = collect(rec)
    refs = kit_references()
    for what in ("tank_timeseries", "gateway_timeseries", "tank_attribute", "tank_shared",
                 "gateway_attribute", "gateway_shared", "rpc"):
        missing = refs[what] - served[what] - THINGSBOARD_OWN
        assert not missing, f"the kit uses {what} the gateway never sent or served: {missing}"


def collect(rec: Recorder) -> dict[str, set[str]]:
    """What the gateway sent or served in the run, by the same categories as kit_references."""
    served: dict[str, set[str]] = {k: set() for k in (
        "tank_timeseries", "gateway_timeseries", "tank_attribute", "gateway_attribute",
        "tank_shared", "gateway_shared", "rpc")}
    for entries in rec.entries().values():
        for e in entries:
            served["tank_timeseries"].update(e["values"])
    for m in rec.on("v1/devices/me/telemetry"):
        served["gateway_timeseries"].update(m.payload)
    for m in rec.on("v1/gateway/attributes"):
        if isinstance(m.payload, dict) and "device" not in m.payload:  # ours
            for attrs in m.payload.values():
                served["tank_attribute"].update(attrs)
    for m in rec.on("v1/gateway/attributes/request"):
        served["tank_shared"].update(m.payload["keys"])
    requests = {(m.payload["device"], m.payload["data"]["id"]): m.payload["data"]["method"]
                for m in rec.on("v1/gateway/rpc")
                if isinstance(m.payload, dict) and "method" in m.payload.get("data", {})}
    for m in rec.on("v1/gateway/rpc"):
        p = m.payload
        if isinstance(p, dict) and "id" in p and "success" in p.get("data", {}):
            method = requests.get((p["device"], p["id"]))
            error = str(p["data"].get("error", ""))
            if method is not None and "unknown method" not in error:
                served["rpc"].add(method)
    return served


def test_adding_a_reading_or_an_actuator_is_one_line() -> None:
    """Issue 13's EC keys and nutrient parts: the tables of make.py drive every widget."""
    m = make()
    with _patched(m, READINGS=(*m.READINGS, ("ec", "EC", "mS/cm", 2, (0, 5))),
                  ACTUATORS=(*m.ACTUATORS, "nutrient_a")):
        text = json.dumps(m.dashboard())
    assert '"name": "ec"' in text and '"name": "nutrient_a_ms"' in text
    assert '"name": "nutrient_a_on"' in text


@contextlib.contextmanager
def _patched(module: ModuleType, **values: Any) -> Iterator[None]:
    old = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)
