"""The outside edge never kills the daemon: hostile RPCs, attributes and node input.

Each test runs the real gateway against a real Mosquitto and a simulated
node, sends what once stopped the daemon (issue 12), and then checks that it
still answers, that what could be answered was answered, and that nothing
was logged with a traceback (every such input is handled by validation, not
by the last-resort nets).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway import tbmsg
from gateway.daemon import Gateway
from sim.node import Faults, SimNode
from tests.conftest import Broker
from tests.gateway_harness import config_dict, node_entry, running_gateway
from tests.mqtt_recorder import Recorder

pytestmark = pytest.mark.slow


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info]


async def alive(rec: Recorder, gw: Gateway, rpc_id: int) -> dict[str, Any]:
    """The daemon still answers an RPC (so its uplink and node tasks still run)."""
    reply = await rec.rpc("tank-a", rpc_id, "get_state")
    assert reply["data"]["success"] is True
    assert gw.uplink is not None and gw.uplink.connected
    return dict(reply["data"])


def replies(rec: Recorder) -> dict[int, dict[str, Any]]:
    return {
        m.payload["id"]: m.payload
        for m in rec.on(tbmsg.RPC)
        if isinstance(m.payload, dict) and "id" in m.payload
    }


async def test_rpcs_that_once_killed_the_daemon(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    node = SimNode("tank-a")
    try:
        port = await node.serve_tcp("127.0.0.1", 0)
        data = config_dict(
            tmp_path / "gw.sqlite", [node_entry("tank-a", f"tcp://127.0.0.1:{port}")], broker.port
        )
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            await alive(rec, gw, 1)
            unaddressable: list[Any] = ["", " ", "\t", 5, None, ["tank-a"], "x" * 300]
            for i, device in enumerate(unaddressable):
                # A readable method, and one without: both once raised in the reply builder.
                for body in ({"id": 100 + i, "method": "get_state"}, {"id": 200 + i}):
                    await rec.publish(tbmsg.RPC, {"device": device, "data": body})
            # Ids a reply could not carry back to ThingsBoard (a Java int there).
            await rec.publish(tbmsg.RPC, {"device": "tank-a", "data": {"id": 2**40,
                                                                      "method": "get_state"}})
            await rec.publish(tbmsg.RPC, b'{"device":"tank-a","data":{"id":1e3,"method":"stop"}}')
            # Answerable but bad: a method name of 70 kB, params nested 1000 deep.
            await rec.publish(tbmsg.RPC, {"device": "tank-a",
                                          "data": {"id": 300, "method": "m" * 70_000}})
            deep = "[" * 1000 + "]" * 1000
            await rec.publish(tbmsg.RPC, ('{"device":"tank-a","data":{"id":301,"method":"actuate",'
                                          f'"params":{deep}}}}}').encode())
            shallow_deep = "[" * 500 + "]" * 500
            await rec.publish(tbmsg.RPC, ('{"device":"tank-a","data":{"id":302,"method":"actuate",'
                                          f'"params":{shallow_deep}}}}}').encode())
            state = await alive(rec, gw, 2)
            got = replies(rec)
            for rid in (300, 302):
                assert got[rid]["data"]["success"] is False, got[rid]
            assert len(json.dumps(got[300])) < 1000  # the error quotes no 70 kB name
            # 301 could not be parsed at all (JSON nested beyond Python's limit): dropped.
            assert not set(got) & {*range(100, 108), *range(200, 208), 2**40, 1000, 301}
            assert gw.uplink is not None
            assert gw.uplink.stats.malformed >= 2 * len(unaddressable) + 3
            assert state["link"] == "up"
            assert gw.faults.failures == 0
    finally:
        await node.close()
    assert tracebacks(caplog) == []


async def test_deep_and_huge_attribute_updates_are_refused_whole(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    node = SimNode("tank-a")
    try:
        port = await node.serve_tcp("127.0.0.1", 0)
        entry = node_entry("tank-a", f"tcp://127.0.0.1:{port}",
                           control={"tds_setpoint": 800, "ph_setpoint": 6.0, "mode": "manual",
                                    "interval": 0})
        data = config_dict(tmp_path / "gw.sqlite", [entry], broker.port)
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            await alive(rec, gw, 1)
            deep_text = "[" * 1000 + "]" * 1000
            updates: list[bytes] = [
                # schedule as a JSON string nested 1000 deep: once an uncaught RecursionError.
                json.dumps({"device": "tank-a", "data": {"schedule": deep_text}}).encode(),
                # ... and as a real nested list, 900 and 5000 deep.
                ('{"device":"tank-a","data":{"schedule":' + "[" * 900 + "]" * 900 + "}}").encode(),
                ('{"device":"tank-a","data":{"schedule":' + "[" * 5000 + "]" * 5000 + "}}").encode(),
                json.dumps({"device": "tank-a", "data": {"schedule": "9" * 60_000}}).encode(),
                json.dumps({"device": "tank-a", "data": {"tds_setpoint": "NaN"}}).encode(),
                b'{"device":"tank-a","data":{"tds_setpoint":NaN,"ph_setpoint":Infinity}}',
                b'{"device":"tank-a","data":{"interval":1e400}}',
                json.dumps({"device": " ", "data": {"mode": "auto"}}).encode(),
                json.dumps({"device": "tank-a", "data": {"mode": ["auto"] * 10_000}}).encode(),
            ]
            for payload in updates:
                await rec.publish(tbmsg.ATTRIBUTES, payload)
            await rec.publish(tbmsg.ATTRIBUTES, {"device": "tank-a", "data": {"tds_setpoint": 900}})
            runner = gw.runners["tank-a"]
            await rec.wait_for(
                lambda: runner.control.settings is not None
                and runner.control.settings.tds_setpoint == 900,
                what="the good update applied after the bad ones",
            )
            state = await alive(rec, gw, 2)
            assert state["schedule"] == [] and state["ph_setpoint"] == 6.0
            assert state["interval"] == 0
            assert gw.faults.failures == 0
    finally:
        await node.close()
    assert tracebacks(caplog) == []
    # No log line quotes a whole 60 kB value.
    assert max(len(r.getMessage()) for r in caplog.records) < 2000


async def test_non_finite_and_out_of_range_numbers_get_a_clear_refusal(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    node = SimNode("tank-a")
    try:
        port = await node.serve_tcp("127.0.0.1", 0)
        data = config_dict(
            tmp_path / "gw.sqlite", [node_entry("tank-a", f"tcp://127.0.0.1:{port}")], broker.port
        )
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            await alive(rec, gw, 1)
            raw = [
                '{"actuator":"refill","ms":NaN}',
                '{"actuator":"refill","ms":Infinity}',
                '{"actuator":"refill","ms":-Infinity}',
                '{"actuator":"refill","ms":1e400}',
                '{"actuator":"refill","ms":1000,"duty":NaN}',
                '{"actuator":"refill","ms":2.5}',
                '{"actuator":"refill","ms":true}',
                '{"actuator":"refill","ms":10000000000000000000000000000000}',
                '{"actuator":"' + "p" * 5000 + '","ms":100}',
            ]
            for i, params in enumerate(raw):
                payload = ('{"device":"tank-a","data":{"id":' + str(10 + i)
                           + ',"method":"actuate","params":' + params + "}}")
                await rec.publish(tbmsg.RPC, payload.encode())
            await rec.wait_for(lambda: set(range(10, 10 + len(raw))) <= set(replies(rec)),
                               what="a reply to each")
            got = replies(rec)
            for i in range(len(raw)):
                reply = got[10 + i]["data"]
                assert reply["success"] is False, reply
                assert reply["error"].startswith("params."), reply
                assert "internal" not in reply["error"]
            assert node.requests.get("actuate", 0) == 0
            await alive(rec, gw, 2)
            assert gw.faults.failures == 0
    finally:
        await node.close()
    assert tracebacks(caplog) == []


async def test_duty_zero_is_a_stop_and_every_duty_meets_the_limits(
    broker: Broker, tmp_path: Path
) -> None:
    node = SimNode("tank-a")
    try:
        port = await node.serve_tcp("127.0.0.1", 0)
        entry = node_entry("tank-a", f"tcp://127.0.0.1:{port}",
                           safety={"max_actuation_ms": 3000, "max_ms_per_hour": 10000})
        data = config_dict(tmp_path / "gw.sqlite", [entry], broker.port)
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            await alive(rec, gw, 1)
            reply = await rec.rpc("tank-a", 2, "actuate", {"actuator": "refill", "ms": 2000,
                                                          "duty": 200})
            assert reply["data"]["success"] is True
            assert node.running == {"refill": 200}
            stops = node.requests.get("stop", 0)
            actuates = node.requests.get("actuate", 0)
            reply = await rec.rpc("tank-a", 3, "actuate", {"actuator": "refill", "ms": 600000,
                                                          "duty": 0})
            assert reply["data"]["success"] is True, reply
            assert reply["data"]["duty"] == 0 and reply["data"]["ms"] == 0
            # Carried out as NodeLink stop; no actuate with a run time reached the node.
            assert node.requests.get("stop", 0) == stops + 1
            assert node.requests.get("actuate", 0) == actuates
            assert node.running == {}
            state = await alive(rec, gw, 4)
            assert state["actuators"]["refill"] == 0
            # Every duty above 0 meets every limit: 600000 ms at duty 1 is refused.
            for rid, duty in ((5, 1), (6, 255)):
                reply = await rec.rpc("tank-a", rid, "actuate",
                                      {"actuator": "refill", "ms": 600000, "duty": duty})
                assert reply["data"]["success"] is False
                assert "max_actuation" in reply["data"]["error"]
            # A duty-0 stop of an actuator the node never announced is refused.
            reply = await rec.rpc("tank-a", 7, "actuate", {"actuator": "nope", "ms": 5,
                                                          "duty": 0})
            assert reply["data"]["success"] is False
            assert "unknown_actuator" in reply["data"]["error"]
            assert gw.faults.failures == 0
    finally:
        await node.close()


async def test_get_state_of_a_node_with_thousands_of_keys_fits_the_limit(
    broker: Broker, tmp_path: Path
) -> None:
    node = SimNode("tank-a", push_interval=0.01, faults=Faults(fresh_keys=50))
    try:
        port = await node.serve_tcp("127.0.0.1", 0)
        data = config_dict(
            tmp_path / "gw.sqlite",
            [node_entry("tank-a", f"tcp://127.0.0.1:{port}", poll_interval=30)],
            broker.port,
        )
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            runner = gw.runners["tank-a"]
            await rec.wait_for(lambda: len(runner.latest) > 10_000, what="10k keys", timeout=30)
            node.faults.fresh_keys = 0
            untrimmed = tbmsg.rpc_reply("tank-a", 9, {"success": True, **runner.state()})
            assert len(untrimmed) > 100_000  # what once went out and closed the session
            reply = await rec.rpc("tank-a", 9, "get_state")
            raw = next(m.raw for m in rec.on(tbmsg.RPC)
                       if isinstance(m.payload, dict) and m.payload.get("id") == 9)
            assert len(raw) <= tbmsg.payload_limit(65536, tbmsg.RPC)
            data_ = reply["data"]
            assert data_["success"] is True
            assert "values" in data_["trimmed"] and "max_payload_bytes" in data_["trimmed"]
            # The node's own keys came first and are kept; the rest is cut, not the answer.
            assert {"tds", "ph", "water_temp"} <= set(data_["values"])
            assert data_["link"] == "up" and "actuators" in data_
            assert gw.uplink is not None and gw.uplink.stats.rpc_trimmed == 1
    finally:
        await node.close()


async def test_a_reading_with_bad_keys_keeps_its_good_values(
    broker: Broker, tmp_path: Path
) -> None:
    faults = Faults(extra_values={"": 1.0, "huge": 2**63 + 5, " ": 2.0, "k\x00": 3.0, "ok": 4})
    node = SimNode("tank-a", seq=True, faults=faults)
    try:
        port = await node.serve_tcp("127.0.0.1", 0)
        data = config_dict(
            tmp_path / "gw.sqlite", [node_entry("tank-a", f"tcp://127.0.0.1:{port}")], broker.port
        )
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            await rec.wait_for(lambda: len(rec.seqs("tank-a")) >= 5, what="readings")
            runner = gw.runners["tank-a"]
            assert runner.stats["bad_value"] >= 4 * 5, (runner.stats.as_dict(), rec.entries())
            assert runner.stats["invalid_reading"] == 0
    finally:
        await node.close()
    readings = [e["values"] for e in rec.entries()["tank-a"] if "seq" in e["values"]]
    assert len(readings) >= 5
    for values in readings:
        assert values["ok"] == 4 and "tds" in values and "ph" in values
        assert not {"", "huge", " ", "k\x00"} & set(values)


async def test_a_node_that_answers_nothing_is_down_until_it_serves_a_reading(
    broker: Broker, tmp_path: Path
) -> None:
    # Hung in its sensor code: answers hello, stop and ping, never read.
    node = SimNode("tank-a", faults=Faults(unanswered=frozenset({"read"})))
    try:
        port = await node.serve_tcp("127.0.0.1", 0)
        data = config_dict(
            tmp_path / "gw.sqlite",
            [node_entry("tank-a", f"tcp://127.0.0.1:{port}", timeout=0.3, retries=0)],
            broker.port,
        )
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            runner = gw.runners["tank-a"]
            await rec.wait_for(lambda: node.requests.get("hello", 0) >= 2, what="reconnects")
            assert not runner.link_up
            assert runner.readings == 0
            reply = await rec.rpc("tank-a", 1, "get_state")
            assert reply["data"]["link"] == "down"
            health = [m.payload for m in rec.on("v1/devices/me/telemetry")]
            assert all(h.get("tank-a_link") != "up" for h in health)
            # It recovers: up with its first reading.
            node.faults.unanswered = frozenset()
            await rec.wait_for(lambda: runner.link_up, what="up after a reading")
            assert runner.readings >= 1
            # It hangs again: down at the first unanswered read, still connected.
            node.faults.unanswered = frozenset({"read"})
            hellos = node.requests.get("hello", 0)
            await rec.wait_for(lambda: not runner.link_up, what="down again")
            assert node.requests.get("hello", 0) == hellos  # no reconnect was needed to see it
            assert "no answer to read" in runner.link_reason
            # Stop still reaches a connected node that serves no readings.
            reply = await rec.rpc("tank-a", 2, "stop")
            assert reply["data"]["success"] is True
    finally:
        await node.close()


async def test_node_input_errors_are_counted_not_fatal(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug met on one reading costs that reading: counted, logged once, polling goes on."""
    node = SimNode("tank-a", seq=True)
    try:
        port = await node.serve_tcp("127.0.0.1", 0)
        data = config_dict(
            tmp_path / "gw.sqlite", [node_entry("tank-a", f"tcp://127.0.0.1:{port}")], broker.port
        )
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            runner = gw.runners["tank-a"]
            await rec.wait_for(lambda: runner.link_up, what="link up")

            class Broken:
                def observe(self, values: Any) -> None:
                    raise ZeroDivisionError("planted bug")

                def __getattr__(self, name: str) -> Any:
                    return getattr(real, name)

            real = runner.control
            runner.control = Broken()  # type: ignore[assignment]
            await rec.wait_for(lambda: runner.stats["handler_error"] >= 5, what="failures")
            runner.control = real
            before = len(rec.seqs("tank-a"))
            await rec.wait_for(lambda: len(rec.seqs("tank-a")) > before + 3, what="goes on")
            assert gw.faults.failures >= 5
    finally:
        await node.close()
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1  # once per kind
    assert "ZeroDivisionError" in logged[0].getMessage()
