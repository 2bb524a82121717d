"""The guided titration on the real daemon: real socket, simulated nodes over TCP, known chemistry.

The simulated tanks mix in seconds (dead time 1 s, lag 1.5 s) and the nodes'
timings are scaled to match (pH windows of 1 s, a 3 s mixing wait), so a
titration takes seconds, not the quarter of an hour it takes on a real tank.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.titration import TITRATION_KEY
from rules.envelope import STEEPEST_GAIN
from sim.node import SimNode
from sim.plant import PlantParams, Reservoir
from tests.gateway_harness import config_dict, node_entry, running_gateway, write_config
from tests.localsock import call, titration_end, until

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fast_tanks(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tanks' dead time is half a second: a dose with no visible effect is watched 2 s,
    not the minute a real tank needs (rules/titration.py, ``min_watch_s``)."""
    monkeypatch.setattr("gateway.titration.MIN_WATCH_S", 2.0)

FAST = PlantParams(dead_time_s=0.5, lag_s=0.8, uptake_per_h=0.0, evaporation_l_per_h=0.0)
STRONG = replace(FAST, ph_up_mol_l=1.0, ph_down_mol_l=1.0)
TIMINGS = {"ph_average_s": 1, "tds_average_s": 1, "mixing_wait_s": 2}


def tank(name: str, url: str, *, plant: dict[str, Any] | None = None, **control: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"mode": "manual", "tds_setpoint": 800, "ph_setpoint": 6.0,
                                "interval": 0, **TIMINGS}
    settings.update(control)
    entry = node_entry(name, url, control=settings)
    entry["poll_interval"] = 0.1
    if plant is not None:
        entry["plant"] = plant
    return entry


def gateway_config(tmp_path: Path, *nodes: dict[str, Any]) -> dict[str, Any]:
    data = config_dict(tmp_path / "gw.sqlite", list(nodes))
    data["gateway"]["socket"] = str(tmp_path / "gw.sock")
    return data


async def serve(node: SimNode) -> str:
    return f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"


def true_strength(node: SimNode, result: dict[str, Any]) -> float:
    """The plant's own ml/L per pH unit over the span the titration reports."""
    pump, low, high = result["actuator"], result["ph_from"], result["ph_to"]
    return node.plant.titration_ml_per_l(pump, low, high) / abs(float(high) - float(low))


def strength_near(params: PlantParams, pump: str, ph: float = 6.0) -> float:
    sign = 1.0 if pump == "ph_up" else -1.0
    probe = Reservoir.from_state(tds=800, ph=ph, params=params)
    return probe.titration_ml_per_l(pump, ph, ph + 0.1 * sign) / 0.1


async def hydrogate(*args: str | Path) -> asyncio.subprocess.Process:
    """The real `hydrogate` command in a subprocess (stdout and stderr piped)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *map(str, args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def finished(proc: asyncio.subprocess.Process, timeout: float = 120.0) -> tuple[int, str, str]:
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def rows(gw: Any, device: str) -> list[dict[str, Any]]:
    await gw.store.flush()
    return [json.loads(r.entry)["values"] for r in await gw.store.peek(100_000)
            if r.device == device]


async def test_two_chemistries_measured_within_15_percent(tmp_path: Path) -> None:
    """Nothing known of tank-a (dilute 0.15 M); tank-b (1 M) told a cautious half of the truth.

    tank-a is titrated by RPC through the socket, tank-b by `hydrogate titrate`, at once.
    """
    a = SimNode("tank-a", Reservoir.from_state(tds=800, ph=6.0, params=FAST, seed=11))
    b = SimNode("tank-b", Reservoir.from_state(tds=800, ph=6.0, params=STRONG, seed=12))
    try:
        guess = 0.5 * strength_near(STRONG, "ph_up")
        data = gateway_config(
            tmp_path, tank("tank-a", await serve(a)),
            tank("tank-b", await serve(b), plant={"ph_ml_per_l_per_unit": {"ph_up": guess}}),
        )
        sock = tmp_path / "gw.sock"
        config = write_config(tmp_path / "gw.yaml", data)
        async with running_gateway(data) as gw:
            for name in ("tank-a", "tank-b"):
                def has_ph(name: str = name) -> bool:
                    return "ph" in gw.runners[name].latest

                await until(has_ph, what="pH")
            reply = await call(sock, "titrate", {"actuator": "ph_down"}, device="tank-a")
            assert reply["success"], reply
            assert isinstance(reply["started"], int)
            assert reply["titration"]["state"] == "settling"
            cli = await hydrogate("titrate", "tank-b", "ph_up", "-c", config, "--move", "0.1")
            ends = await asyncio.gather(titration_end(sock, "tank-a"),
                                        titration_end(sock, "tank-b"))
            code, out, err = await finished(cli)
            assert code == 0, (out, err)
            value = ends[1]["result"]["ml_per_l_per_unit"]
            assert f"tank-b ph_up: {value:g} ml per litre of tank per pH unit" in out
            assert f"ph_ml_per_l_per_unit: {{ph_up: {value:g}}}" in out
            assert "mixing_wait_s" in out and "dose" in out
            for node, status in zip((a, b), ends, strict=True):
                assert status["state"] == "done", status
                result = status["result"]
                error = result["ml_per_l_per_unit"] / true_strength(node, result) - 1.0
                assert abs(error) <= 0.15, (node.name, error, result)
                assert result["applied"] is True
                assert 0.05 <= abs(result["ph_to"] - result["ph_from"]) <= 0.3
                assert result["mixing_wait_s"] is not None
            assert ends[0]["result"]["doses"] >= 3, "tank-a started from the steepest curve"
            assert ends[1]["result"]["doses"] <= 3
            # Applied at once: the plant constant, and the envelope's bound near it.
            for name, status in zip(("tank-a", "tank-b"), ends, strict=True):
                control = gw.runners[name].control
                pump = status["actuator"]
                value = status["result"]["ml_per_l_per_unit"]
                assert control.plant.ph_ml_per_l_per_unit[pump] == value
                assert control.envelope.learned()["anchors"][pump], "a measured anchor"
                assert control.envelope.gain_bound(pump, 6.0, 6.0) < STEEPEST_GAIN / 10
                state = await call(sock, "get_state", device=name)
                assert state["ph_ml_per_l_per_unit"][pump] == value
            entries = await rows(gw, "tank-a")
            assert any(e.get("controller") == "titration" and "ph_down_ms" in e for e in entries)
            assert any(e.get("titration") == "done" for e in entries)
            assert any("ph_down_ml_per_l_per_unit" in e for e in entries)
            assert any("titration_ph" in e for e in entries)
            assert gw.store is not None
            stored = await gw.store.load_learned("tank-a", TITRATION_KEY)
            assert stored is not None and "ph_down" in stored[0]["results"]
    finally:
        await a.close()
        await b.close()


async def test_refusals_force_and_cancel_by_stop(tmp_path: Path) -> None:
    full = SimNode("tank-a", Reservoir.from_state(tds=800, ph=6.0, params=FAST, seed=3))
    blind = SimNode("tank-b", Reservoir.from_state(tds=800, ph=6.0, params=FAST),
                    sensors=("tds", "water_temp", "water_level"))
    acid_only = SimNode("tank-c", Reservoir.from_state(tds=800, ph=6.0, params=FAST),
                        actuators=("nutrient", "refill", "ph_down"))
    try:
        data = gateway_config(tmp_path, tank("tank-a", await serve(full)),
                              tank("tank-b", await serve(blind)),
                              tank("tank-c", await serve(acid_only)))
        sock = tmp_path / "gw.sock"
        async with running_gateway(data) as gw:
            await until(lambda: all(gw.runners[n].link_up and gw.runners[n].latest
                                    for n in ("tank-a", "tank-b", "tank-c")), what="links")
            await until(lambda: "ph" in gw.runners["tank-a"].latest, what="pH")

            async def refused(device: str, params: Any) -> str:
                reply = await call(sock, "titrate", params, device=device)
                assert reply["success"] is False, reply
                return str(reply["error"])

            assert "pH reading" in await refused("tank-b", {"actuator": "ph_down"})
            assert "did not announce ph_up" in await refused("tank-c", {"actuator": "ph_up"})
            assert "actuator" in await refused("tank-a", {"actuator": "nutrient"})
            assert "move" in await refused("tank-a", {"actuator": "ph_up", "move": 1.0})
            assert "move" in await refused("tank-a", {"actuator": "ph_up", "move": "0.1"})
            assert "force" in await refused("tank-a", {"actuator": "ph_up", "force": "yes"})
            assert "unknown params" in await refused("tank-a", {"actuator": "ph_up", "x": 1})
            assert "params" in await refused("tank-a", "ph_up")
            unknown = await call(sock, "titrate", {"actuator": "ph_up"}, device="tank-z")
            assert unknown["success"] is False and "unknown device" in unknown["error"]

            # A control cycle runs: refused, unless forced (which aborts it).
            assert (await call(sock, "force_on", device="tank-a"))["cycle"] == "tds"
            assert "control cycle is running" in await refused("tank-a", {"actuator": "ph_up"})
            stops = full.requests.get("stop", 0)
            forced = await call(sock, "titrate", {"actuator": "ph_up", "force": True},
                                device="tank-a")
            assert forced["success"], forced
            assert full.requests.get("stop", 0) > stops
            state = await call(sock, "get_state", device="tank-a")
            assert state["cycle"] == "idle" and state["titration"]["state"] == "settling"
            # While it runs: no second one, no manual dose, no cycle.
            assert "already running" in await refused("tank-a", {"actuator": "ph_down"})
            for method, params in (("actuate", {"actuator": "ph_up", "ms": 100}),
                                   ("force_on", None)):
                reply = await call(sock, method, params, device="tank-a")
                assert reply["success"] is False and "titration is running" in reply["error"]

            # Nothing known of the tank: it doses small first; cancel it midway with stop.
            await until(lambda: full.requests.get("actuate", 0) >= 2, what="doses")
            reply = await call(sock, "stop", device="tank-a")
            assert reply["success"], reply
            state = await call(sock, "get_state", device="tank-a")
            assert state["titration"]["state"] == "cancelled"
            assert state["titration"]["error"] == "stop"
            assert not any(full.running.values())
            doses = full.requests.get("actuate", 0)
            await asyncio.sleep(2.5)  # the task is gone: nothing more is dosed
            assert full.requests.get("actuate", 0) == doses
            assert (await call(sock, "force_on", device="tank-a"))["success"], "cycles resume"
            entries = await rows(gw, "tank-a")
            assert any(e.get("titration") == "cancelled" for e in entries)
    finally:
        for node in (full, blind, acid_only):
            await node.close()


async def test_result_survives_a_restart_until_the_plant_section_is_edited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = SimNode("tank-a", Reservoir.from_state(tds=800, ph=6.0, params=STRONG, seed=5))
    try:
        guess = round(0.8 * strength_near(STRONG, "ph_down"), 3)
        plant = {"tank_volume_l": 10, "ph_ml_per_l_per_unit": {"ph_down": guess}}
        data = gateway_config(tmp_path, tank("tank-a", await serve(node), plant=plant))
        sock = tmp_path / "gw.sock"
        async with running_gateway(data) as gw:
            await until(lambda: "ph" in gw.runners["tank-a"].latest, what="pH")
            # Keeping the result takes a while (a slow SD card): a reader polling get_state
            # meanwhile must not see "done" before the result is there.
            control = gw.runners["tank-a"].control
            save = control.save_knowledge

            async def slow_save(*, envelope: bool = False) -> None:
                await asyncio.sleep(1.0)
                await save(envelope=envelope)

            monkeypatch.setattr(control, "save_knowledge", slow_save)
            assert (await call(sock, "titrate", {"actuator": "ph_down"}, device="tank-a"))[
                "success"]
            status = await titration_end(sock, "tank-a")
            assert status["state"] == "done", status
            measured = status["result"]["ml_per_l_per_unit"]
            assert measured != guess
            anchors = gw.runners["tank-a"].control.envelope.learned()["anchors"]["ph_down"]
        # A restart: the measured value still wins over the file's guess, and the envelope
        # keeps its measured anchor (the plant constants it was kept under are the same).
        async with running_gateway(data) as gw:
            await until(lambda: gw.runners["tank-a"].link_up, what="restored, link up")
            control = gw.runners["tank-a"].control
            assert control.plant.ph_ml_per_l_per_unit["ph_down"] == measured
            assert control.envelope.learned()["anchors"]["ph_down"] == anchors
            state = await call(sock, "get_state", device="tank-a")
            assert state["ph_ml_per_l_per_unit"] == {"ph_down": measured}
            assert state["titration"] is None, "no titration since this start"
            kept = state["ph_titrated"]["ph_down"]
            assert kept["ml_per_l_per_unit"] == measured and kept["applied"] is True
            assert isinstance(kept["measured_at"], int)
        # The grower copies the printed line into the file: an edit of the plant section, so
        # the file wins and the measurement is dropped; with the same value nothing learned
        # is lost (any other edit drops the envelope's knowledge with the measurement).
        plant["ph_ml_per_l_per_unit"] = {"ph_down": measured}
        async with running_gateway(data) as gw:
            await until(lambda: gw.runners["tank-a"].link_up, what="restored, link up")
            control = gw.runners["tank-a"].control
            assert control.plant.ph_ml_per_l_per_unit["ph_down"] == measured
            assert control.envelope.learned()["anchors"]["ph_down"] == anchors
            assert gw.store is not None
            assert await gw.store.load_learned("tank-a", TITRATION_KEY) is None
    finally:
        await node.close()


async def test_cli_exit_codes_json_and_ctrl_c(tmp_path: Path) -> None:
    node = SimNode("tank-a", Reservoir.from_state(tds=800, ph=6.0, params=FAST, seed=8))
    try:
        data = gateway_config(tmp_path, tank("tank-a", await serve(node)))
        config = write_config(tmp_path / "gw.yaml", data)
        sock = tmp_path / "gw.sock"
        # No daemon: 3, and it says so.
        code, _, err = await finished(await hydrogate("titrate", "tank-a", "ph_up", "-c", config))
        assert code == 3 and "not reachable" in err and "no socket" in err
        bad = write_config(tmp_path / "bad.yaml", {**data, "storage": {}})
        code, _, err = await finished(await hydrogate("titrate", "tank-a", "ph_up", "-c", bad))
        assert code == 2 and "storage.path" in err
        async with running_gateway(data) as gw:
            await until(lambda: "ph" in gw.runners["tank-a"].latest, what="pH")
            # Refused: 4, with the reason (also as JSON).
            code, _, err = await finished(await hydrogate(
                "titrate", "tank-a", "ph_up", "-c", config, "--move", "0.9"))
            assert code == 4 and "move must be between" in err
            code, out, _ = await finished(await hydrogate(
                "titrate", "tank-z", "ph_up", "--socket", sock, "--json"))
            assert code == 4
            assert json.loads(out) == {"node": "tank-z", "success": False,
                                       "error": "unknown device 'tank-z'"}
            # Ctrl-C: the titration is cancelled and the node's pumps stopped: 130.
            cli = await hydrogate("titrate", "tank-a", "ph_up", "-c", config, "--json")
            await until(lambda: node.requests.get("actuate", 0) >= 1, what="a dose")
            cli.send_signal(signal.SIGINT)
            code, out, err = await finished(cli)
            assert code == 130 and "cancelled" in err, (out, err)
            state = await call(sock, "get_state", device="tank-a")
            assert state["titration"]["state"] == "cancelled"
            assert not any(node.running.values())
    finally:
        await node.close()


async def test_kept_results_against_the_config_file(tmp_path: Path) -> None:
    """Without titrating: a kept result applies while the plant section is the one it was
    measured under; any edit of it (here the volume), or a damaged row, leaves the file's."""
    node = SimNode("tank-a", Reservoir.from_state(tds=800, ph=6.0, params=FAST))
    try:
        plant: dict[str, Any] = {"tank_volume_l": 10, "ph_ml_per_l_per_unit": {"ph_up": 1.5}}
        data = gateway_config(tmp_path, tank("tank-a", await serve(node), plant=plant))
        async with running_gateway(data) as gw:
            await until(lambda: gw.runners["tank-a"].link_up, what="link up")
            base = gw.runners["tank-a"].control.config_plant()
            result = {"ml_per_l_per_unit": 4.2, "applied": True, "base": base,
                      "measured_at": 1, "ph_from": 6.0, "ph_to": 5.9}
            assert gw.store is not None
            await gw.store.save_learned("tank-a", TITRATION_KEY,
                                        {"version": 1, "results": {"ph_down": result}}, base)
        async with running_gateway(data) as gw:
            await until(lambda: gw.runners["tank-a"].link_up, what="link up")
            assert gw.runners["tank-a"].control.plant.ph_ml_per_l_per_unit == {
                "ph_up": 1.5, "ph_down": 4.2}
        plant["tank_volume_l"] = 10.5
        async with running_gateway(data) as gw:
            await until(lambda: gw.runners["tank-a"].link_up, what="link up")
            assert gw.runners["tank-a"].control.plant.ph_ml_per_l_per_unit == {"ph_up": 1.5}
            assert gw.store is not None
            assert await gw.store.load_learned("tank-a", TITRATION_KEY) is None
            await gw.store.save_learned("tank-a", TITRATION_KEY,
                                        {"version": 1, "results": {"ph_down": {"x": 1}}}, {})
        async with running_gateway(data) as gw:
            await until(lambda: gw.runners["tank-a"].link_up, what="link up")
            assert gw.runners["tank-a"].control.plant.ph_ml_per_l_per_unit == {"ph_up": 1.5}
    finally:
        await node.close()
