"""NodeControl on its own: driven through a fake `NodePort`, never a NodeRunner.

Control is handed a port (gateway/ports.py): what it may read of its node and
do to it. Here the port is a small fake that records what control sends
(``actuate``, ``stop``) and the entries it records; the store is a real
SQLite file, the clock an injected one that moves only when the test says.
RPCs go through the one table (gateway/rpc.py), as ThingsBoard's and the
local socket's do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.config import CalibrationMap, NodeConfig, parse_config
from gateway.control import NodeControl
from gateway.errors import CommandError
from gateway.ports import NodePort
from gateway.rpc import answer_node
from gateway.store import Store
from rules.controller import ACTUATORS
from tests.conftest import FakeClock

NODE = "tank-a"
PUMPS = ACTUATORS
TANK = {"tds": 500.0, "ph": 6.0, "water_level": 9.0, "water_temp": 21.0}


class FakeNode:
    """A `NodePort` that records what control does; the link is up until the test drops it."""

    def __init__(self, config: NodeConfig) -> None:
        self.name = config.name
        self.config = config
        self.actuators: tuple[str, ...] = PUMPS
        self.latest: dict[str, float] = {}
        self.up = True  # serving readings
        self.session = True  # a session is open (enough for stop)
        self.confirms_stop = True
        self.sent: list[tuple[str, int, int]] = []
        self.stops = 0
        self.records: list[dict[str, Any]] = []
        self.maps: dict[str, CalibrationMap | None] = {}

    def require_link(self) -> None:
        if not self.up:
            raise CommandError(f"node {self.name} link is down (test: dropped)")

    def require_connected(self) -> None:
        if not self.session:
            raise CommandError(f"node {self.name} link is down (test: dropped)")

    async def send_actuate(self, actuator: str, duty: int, ms: int) -> None:
        self.require_link()
        self.sent.append((actuator, duty, ms))

    async def send_stop(self, *, within: float) -> bool:
        if not self.session:
            return False
        self.stops += 1
        return self.confirms_stop

    def record(self, ts: int, values: Mapping[str, Any]) -> None:
        self.records.append(dict(values))

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        coro.close()
        raise CommandError("no tasks in these tests")

    def calibration_map(self, key: str) -> CalibrationMap | None:
        return self.maps.get(key, self.config.calibration.get(key))

    def set_calibration(self, key: str, measured: CalibrationMap | None) -> None:
        self.maps[key] = measured


class Target:
    """What an RPC acts on (gateway/rpc.py's NodeTarget): the fake node and its control."""

    def __init__(self, node: FakeNode, control: NodeControl) -> None:
        self.name = node.name
        self.node = node
        self.control = control

    def state(self) -> dict[str, Any]:
        return {"values": dict(self.node.latest), **self.control.state()}


def node_config(control: dict[str, Any] | None = None) -> NodeConfig:
    entry: dict[str, Any] = {
        "name": NODE,
        "url": "tcp://127.0.0.1:9",
        "plant": {"tank_volume_l": 10, "flow_ml_s": {p: 1.0 for p in PUMPS}},
        "safety": {"max_actuation_ms": 5000},
    }
    if control is not None:
        entry["control"] = control
    data = {"gateway": {"name": "gw"}, "storage": {"path": "unused.sqlite"}, "nodes": [entry]}
    return parse_config(data).nodes[0]


AUTO = {"mode": "auto", "controller": "rb", "tds_setpoint": 800, "ph_setpoint": 6.0,
        "interval": 3600, "tds_average_s": 1, "mixing_wait_s": 1, "ph_average_s": 1}


@asynccontextmanager
async def control_of(
    tmp_path: Path, config: NodeConfig
) -> AsyncIterator[tuple[NodeControl, FakeNode, FakeClock, Target]]:
    """A node's control as the node task starts it, on a fake port and a real store."""
    clock = FakeClock()
    async with Store.open(tmp_path / "buffer.sqlite", max_rows=None, max_bytes=None) as store:
        node = FakeNode(config)
        port: NodePort = node  # the fake must be a port, as the runner is
        control = NodeControl(port, store=store, clock=clock)
        await control.load_settings()
        control.announced(node.actuators)
        try:
            yield control, node, clock, Target(node, control)
        finally:
            control.close()


def reading(control: NodeControl, node: FakeNode, **values: float) -> None:
    """A calibrated reading reaches control, as the node task hands it over."""
    node.latest.update({**TANK, **values})
    control.observe(dict(node.latest))


async def test_a_manual_dose_runs_once_within_the_limits(tmp_path: Path) -> None:
    async with control_of(tmp_path, node_config()) as (control, node, clock, target):
        reading(control, node)
        reply = await answer_node(target, "actuate", {"actuator": "nutrient", "ms": 1500})
        assert reply == {"success": True, "actuator": "nutrient", "ms": 1500, "duty": 255}
        assert node.sent == [("nutrient", 255, 1500)]
        assert {"nutrient_ms": 1500, "nutrient_duty": 255, "controller": "manual"} in node.records
        assert control.last_dose is not None and control.last_dose["ms"] == 1500


async def test_a_manual_dose_beyond_the_limits_is_refused_and_nothing_sent(
    tmp_path: Path,
) -> None:
    async with control_of(tmp_path, node_config()) as (control, node, clock, target):
        reading(control, node)
        too_long = await answer_node(target, "actuate", {"actuator": "nutrient", "ms": 6000})
        assert too_long["success"] is False
        assert too_long["error"].startswith("refused by safety: nutrient")
        unknown = await answer_node(target, "actuate", {"actuator": "valve", "ms": 10})
        assert unknown["success"] is False and "unknown_actuator" in unknown["error"]
        clock.advance(120)  # the tank's reading is now older than stale_after_s
        stale = await answer_node(target, "actuate", {"actuator": "nutrient", "ms": 100})
        assert stale["success"] is False and stale["error"].startswith("refused by safety")
        assert node.sent == []
        assert [r for r in node.records if "safety_refused" in r] != []
        assert control.last_refusal is not None


async def test_an_auto_cycle_doses_through_the_port_and_the_guard(tmp_path: Path) -> None:
    async with control_of(tmp_path, node_config(AUTO)) as (control, node, clock, target):
        assert control.automatic
        for _ in range(30):  # bounded: a few seconds of simulated time
            reading(control, node)
            await control.tick()
            if node.sent:
                break
            clock.advance(0.5)
        assert node.sent, "the cycle never dosed"
        actuator, duty, ms = node.sent[0]
        assert actuator == "nutrient"  # TDS 500 ppm under a setpoint of 800
        assert 0 < ms <= 5000 and 0 < duty <= 255
        dosed = [r for r in node.records if "nutrient_ms" in r]
        assert dosed and dosed[0]["controller"] == "rb"
        assert control.guard.running(clock.monotonic()) == {"nutrient"}
        assert control.state()["cycle"] != "idle"


async def test_link_loss_ends_the_cycle_and_nothing_more_is_sent(tmp_path: Path) -> None:
    async with control_of(tmp_path, node_config(AUTO)) as (control, node, clock, target):
        reading(control, node)
        started = await answer_node(target, "force_on", None)
        assert started == {"success": True, "cycle": "tds"}
        node.up = node.session = False
        control.link_lost()
        assert control.state()["cycle"] == "idle"
        for _ in range(5):
            reading(control, node)
            await control.tick()
            clock.advance(1.0)
        manual = await answer_node(target, "actuate", {"actuator": "nutrient", "ms": 100})
        assert manual == {"success": False, "error": f"node {NODE} link is down (test: dropped)"}
        stop = await answer_node(target, "stop", None)
        assert stop == {"success": False, "error": f"node {NODE} link is down (test: dropped)"}
        assert node.sent == [] and node.stops == 0


async def test_a_failing_control_step_stops_the_pumps(tmp_path: Path) -> None:
    async with control_of(tmp_path, node_config(AUTO)) as (control, node, clock, target):
        reading(control, node)
        await answer_node(target, "force_on", None)

        async def broken() -> None:
            raise RuntimeError("controller bug")

        control.tick = broken  # type: ignore[method-assign]
        event = asyncio.Event()
        event.set()
        task = asyncio.create_task(control.run(event))
        try:
            async with asyncio.timeout(5):
                while node.stops == 0:
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert control.state()["cycle"] == "idle"
        assert {"control_error": "RuntimeError: controller bug"} in node.records


async def test_stop_and_force_stop_command_every_actuator_off(tmp_path: Path) -> None:
    async with control_of(tmp_path, node_config(AUTO)) as (control, node, clock, target):
        reading(control, node)
        await answer_node(target, "actuate", {"actuator": "refill", "ms": 4000})
        assert control.guard.running(clock.monotonic()) == {"refill"}
        assert await answer_node(target, "stop", {}) == {"success": True}
        assert node.stops == 1 and control.guard.running(clock.monotonic()) == set()
        await answer_node(target, "force_on", None)
        assert await answer_node(target, "force_stop", None) == {"success": True, "cycle": "idle"}
        node.confirms_stop = False
        refused = await answer_node(target, "force_stop", None)
        assert refused == {"success": False,
                           "error": "cycle aborted, but the node did not confirm stop"}


@pytest.mark.parametrize(("method", "params", "error"), [
    ("actuate", None, "params must be an object with actuator, ms and optional duty"),
    ("actuate", {"actuator": "nutrient", "ms": float("nan")},
     "params.ms must be a finite integer, not nan"),
    ("actuate", {"actuator": "nutrient", "ms": 1.5}, "params.ms must be a finite integer, not 1.5"),
    ("actuate", {"actuator": "nutrient", "ms": True}, "params.ms must be an integer between 1 "
     "and 600000"),
    ("actuate", {"actuator": "nutrient", "ms": 10, "duty": 256},
     "params.duty must be between 0 and 255"),
    ("actuate", {"actuator": "", "ms": 10},
     "params.actuator must be an actuator name of at most 64 characters"),
    ("set_mode", {"mode": "sometimes"}, None),
    ("titrate", {"actuator": "nutrient"}, "params.actuator must be one of ph_up, ph_down"),
    ("pump_calibrate", [], "params must be an object with actuator and ms (or ml)"),
    ("probe_calibrate", {"probe": "orp"}, "params.probe must be ph or ec"),
    ("reboot", None, "unknown method 'reboot'"),
])
async def test_an_rpc_with_bad_params_gets_success_false(
    tmp_path: Path, method: str, params: Any, error: str | None
) -> None:
    async with control_of(tmp_path, node_config(AUTO)) as (control, node, clock, target):
        reading(control, node)
        reply = await answer_node(target, method, params)
        assert reply["success"] is False
        if error is not None:
            assert reply["error"] == error
        else:
            assert "mode" in reply["error"]
        assert node.sent == []
        assert control.settings is not None and control.settings.mode == "auto"


async def test_a_node_without_control_refuses_the_cycle_methods(tmp_path: Path) -> None:
    async with control_of(tmp_path, node_config()) as (control, node, clock, target):
        assert not control.automatic
        for method in ("force_on", "force_stop", "set_mode"):
            reply = await answer_node(target, method, {"mode": "manual"})
            assert reply == {"success": False, "error": f"node {NODE} has no control section"}
        # Manual doses, stop and get_state work on every node.
        reading(control, node)
        assert (await answer_node(target, "get_state", None))["success"] is True
        assert (await answer_node(target, "acknowledge", None)) == {"success": True,
                                                                    "released": False}


async def test_set_mode_is_a_run_time_setting(tmp_path: Path) -> None:
    async with control_of(tmp_path, node_config(AUTO)) as (control, node, clock, target):
        assert await answer_node(target, "set_mode", {"mode": "manual"}) == {
            "success": True, "mode": "manual"}
        assert control.settings_from()["mode"] == "rpc"
        assert await answer_node(target, "set_mode", "auto") == {"success": True, "mode": "auto"}
