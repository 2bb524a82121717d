"""Issue 13 end to end: a real gateway, simulated nodes over TCP, the real commands.

- an A:B tank brought to its EC setpoint, the parts dosed in ratio and never
  at the same moment;
- a pump 25 % off its configured flow: the first cycle overshoots, `hydrogate
  pump calibrate` measures it, the next cycle does not;
- a guided pH calibration against a simulated probe of known slope and offset
  recovers them; a worn probe is refused and changes nothing; an EC probe's
  gain is corrected with a standard;
- an old calibration raises an `info` severity.

The simulated tanks mix in about a second and the nodes' timings are scaled
to match, so each test takes seconds, not the minutes a real tank takes.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.probecal import PROBE_KEY
from gateway.pumpcal import PUMP_KEY
from rules.probecal import buffer_ph
from sim.node import SimNode
from sim.plant import PlantParams, Reservoir
from tests.conftest import Broker
from tests.gateway_harness import config_dict, node_entry, running_gateway, write_config
from tests.localsock import call, until
from tests.mqtt_recorder import Recorder

pytestmark = pytest.mark.slow

FAST = PlantParams(dead_time_s=0.3, lag_s=0.5, uptake_per_h=0.0, evaporation_l_per_h=0.0,
                   volume_l=2.0, capacity_l=4.0, probe_response_s=0.3)
TIMINGS = {"tds_average_s": 1, "ph_average_s": 1, "mixing_wait_s": 1, "tds_hold_s": 2,
           "ph_hold_s": 1, "max_cycle_s": 60, "part_pause_s": 1, "ph_tolerance": 2.0}


@pytest.fixture(autouse=True)
def quick_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulated probes settle in half a second: a 2 s window tells a stable reading."""
    monkeypatch.setattr("gateway.probecal.WINDOW_S", 2.0)


_COMMANDS: list[asyncio.subprocess.Process] = []


@pytest.fixture(autouse=True)
async def no_command_left() -> AsyncIterator[None]:
    """A command a failed test left waiting for its input is killed, not left behind."""
    yield
    while _COMMANDS:
        proc = _COMMANDS.pop()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def tank(name: str, url: str, *, plant: dict[str, Any] | None = None,
         **control: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"mode": "manual", "ph_setpoint": 6.0, "interval": 0, **TIMINGS}
    settings.update(control)
    if "ec_setpoint" not in settings and "tds_setpoint" not in settings:
        settings["tds_setpoint"] = 800
    entry = node_entry(name, url, control=settings)
    entry["poll_interval"] = 0.1
    entry["plant"] = {"tank_volume_l": 2} if plant is None else plant
    return entry


def gateway_config(tmp_path: Path, *nodes: dict[str, Any], **top: Any) -> dict[str, Any]:
    data = config_dict(tmp_path / "gw.sqlite", list(nodes))
    data["gateway"]["socket"] = str(tmp_path / "gw.sock")
    data.update(top)
    return data


async def serve(node: SimNode) -> str:
    return f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"


async def hydrogate(*args: str | Path) -> asyncio.subprocess.Process:
    """The real `hydrogate` command in a subprocess (stdin, stdout and stderr piped)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *map(str, args), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _COMMANDS.append(proc)
    return proc


async def line_with(proc: asyncio.subprocess.Process, text: str, seen: list[str],
                    timeout: float = 60.0) -> str:
    """Read the command's output up to a line holding ``text`` (kept in ``seen``)."""
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"{text!r} never came; output: {''.join(seen)}")
            seen.append(line)
            if text in line:
                return line


async def answer(proc: asyncio.subprocess.Process, text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text.encode() + b"\n")
    await proc.stdin.drain()


async def finished(proc: asyncio.subprocess.Process, seen: list[str],
                   timeout: float = 60.0) -> tuple[int, str, str]:
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, "".join(seen) + out.decode(), err.decode()


async def rows(gw: Any, device: str) -> list[dict[str, Any]]:
    await gw.store.flush()
    return [json.loads(r.entry)["values"] for r in await gw.store.peek(100_000)
            if r.device == device]


def overlaps(switches: list[tuple[float, str, int]], pumps: set[str]) -> list[str]:
    """Moments two of ``pumps`` were on at once on the node, from its own switch log."""
    on: dict[str, float] = {}
    problems = []
    for t, name, duty in switches:
        if name not in pumps:
            continue
        if duty:
            others = sorted(p for p in on if p != name)
            if others:
                problems.append(f"{name} on at {t:.3f} while {others} ran")
            on[name] = t
        else:
            on.pop(name, None)
    return problems


# --- multi-part nutrients in EC ----------------------------------------------------------------


async def test_an_ab_tank_reaches_its_ec_setpoint_with_the_parts_in_ratio(tmp_path: Path) -> None:
    params = replace(FAST, nutrient_a_flow_ml_s=30.0, nutrient_b_flow_ml_s=20.0)
    node = SimNode("tank-a", Reservoir.from_state(tds=300, ph=6.0, params=params, seed=4),
                   actuators=("nutrient_a", "nutrient_b", "refill", "ph_up", "ph_down"))
    try:
        # 1:1 of part A (12,000 ppm) and part B (8,000 ppm) is a feed of 10,000 ppm (500 scale).
        plant = {"tank_volume_l": 2, "stock_ppm": 10000,
                 "flow_ml_s": {"nutrient_a": 30.0, "nutrient_b": 20.0},
                 "nutrient_ratio": {"nutrient_a": 1, "nutrient_b": 1}}
        data = gateway_config(
            tmp_path, tank("tank-a", await serve(node), plant=plant, ec_setpoint=1.6,
                           controller="adaptive"),
            units={"conductivity": "ec"})
        sock = tmp_path / "gw.sock"
        async with running_gateway(data) as gw:
            await until(lambda: "tds" in gw.runners["tank-a"].latest, what="a reading")
            state = await call(sock, "get_state", device="tank-a")
            assert state["values"]["ec"] == pytest.approx(0.6, abs=0.02)  # mS/cm, not ppm
            assert "tds" not in state["values"] and state["ec_setpoint"] == 1.6
            assert state["tds_setpoint"] == 800.0 and state["conductivity"] == "ec"
            assert (await call(sock, "force_on", device="tank-a"))["success"]
            await until(lambda: gw.runners["tank-a"].control.state()["cycle"] == "idle",
                        timeout=90, what="the cycle to end")
            truth = node.plant.truth(at_probe=True)["tds"]
            assert abs(truth - 800.0) <= 0.05 * 800.0, truth  # on target: 1.6 mS/cm ± 5 %
            dosed = node.plant.dosed_ml
            assert dosed["nutrient_a"] > 10 and dosed["nutrient"] == 0.0
            assert dosed["nutrient_a"] / dosed["nutrient_b"] == pytest.approx(1.0, rel=0.02)
            mg = node.plant.parts_mg()
            assert mg["nutrient_a"] / mg["nutrient_b"] == pytest.approx(12 / 8, rel=0.02)
            assert overlaps(node.switches, {"nutrient_a", "nutrient_b"}) == []
            runs = [s for s in node.switches if s[1] in ("nutrient_a", "nutrient_b")]
            assert [s[1] for s in runs[:4]] == ["nutrient_a", "nutrient_a", "nutrient_b",
                                                "nutrient_b"]  # A, then B, never B first
            entries = await rows(gw, "tank-a")
            assert not any("tds" in e for e in entries), "conductivity goes as ec (mS/cm)"
            assert any(e.get("ec", 0) > 1.5 for e in entries)
            assert any("nutrient_a_ms" in e for e in entries)
            assert any("nutrient_b_ms" in e for e in entries)
    finally:
        await node.close()


# --- pump calibration --------------------------------------------------------------------------


async def dose_once(gw: Any, sock: Path, node: SimNode, start: float, setpoint: float) -> float:
    """One cycle's first nutrient dose: the overshoot of the step it causes, in %."""
    assert (await call(sock, "force_on", device="tank-a"))["success"]
    await until(lambda: node.plant.pumps["nutrient"] > 0, timeout=20, what="a dose")
    peak = start
    quiet = 0
    async with asyncio.timeout(30):
        while quiet < 20:  # 2 s without a new peak after the pump stopped
            await asyncio.sleep(0.1)
            value = node.plant.truth(at_probe=True)["tds"]
            if value > peak + 0.5 or node.plant.pumps["nutrient"]:
                peak, quiet = max(peak, value), 0
            else:
                quiet += 1
    assert (await call(sock, "force_stop", device="tank-a"))["success"]
    return max(0.0, 100.0 * (peak - setpoint) / (setpoint - start))


async def test_a_pump_25_percent_off_is_calibrated_and_stops_overshooting(tmp_path: Path) -> None:
    params = replace(FAST, nutrient_flow_ml_s=25.0)  # the label says 20 ml/s
    node = SimNode("tank-a", Reservoir.from_state(tds=300, ph=6.0, params=params, seed=6))
    try:
        plant = {"tank_volume_l": 2, "flow_ml_s": {"nutrient": 20.0}}
        # rb to the target trusts the flow: it doses exactly what the mass balance says.
        data = gateway_config(tmp_path, tank("tank-a", await serve(node), plant=plant,
                                             controller="rb", rb_variant="target"))
        config = write_config(tmp_path / "gw.yaml", data)
        sock = tmp_path / "gw.sock"
        async with running_gateway(data) as gw:
            await until(lambda: "tds" in gw.runners["tank-a"].latest, what="a reading")
            before = await dose_once(gw, sock, node, 300.0, 800.0)
            assert before > 10.0, f"the uncalibrated pump overshoots: {before:.1f} %"

            # In auto mode, refused unless forced (the command's exit code 4, with the reason).
            await call(sock, "set_mode", {"mode": "auto"}, device="tank-a")
            code, _, err = await finished(await hydrogate(
                "pump", "calibrate", "tank-a", "nutrient", "--ms", "1000", "--ml", "25", "--yes",
                "-c", config), [])
            assert code == 4 and "auto mode" in err and "force" in err, err
            await call(sock, "set_mode", {"mode": "manual"}, device="tank-a")
            unknown = await call(sock, "pump_calibrate", {"actuator": "nutrient_b", "ms": 2000},
                                 device="tank-a")
            assert not unknown["success"] and "did not announce" in unknown["error"]
            early = await call(sock, "pump_calibrate", {"actuator": "nutrient", "ml": 40},
                               device="tank-a")
            assert not early["success"] and "run it first" in early["error"]

            # The grower's cup: the command runs the pump, asks, takes the answer.
            cup = node.plant.dosed_ml["nutrient"]
            seen: list[str] = []
            cli = await hydrogate("pump", "calibrate", "tank-a", "nutrient", "--ms", "1000",
                                  "-c", config)
            await line_with(cli, "Press Enter to start", seen)
            await answer(cli, "")
            await line_with(cli, "How many ml came out?", seen)
            measured = node.plant.dosed_ml["nutrient"] - cup
            assert measured == pytest.approx(25.0, rel=0.01)
            await answer(cli, "2.5")  # a typo: ten times too little is refused ...
            await line_with(cli, "How many ml came out?", seen)
            await answer(cli, f"{measured:.1f}")  # ... and asked again
            code, out, err = await finished(cli, seen)
            assert code == 0, (out, err)
            assert "check the number" in err
            assert "nutrient: 25 ml/s (was 20, +25.0 %)" in out, out
            assert "flow_ml_s: {nutrient: 25}" in out
            state = await call(sock, "get_state", device="tank-a")
            assert state["flow_ml_s"]["nutrient"] == 25.0
            assert state["pump_flows"]["nutrient"]["flow_ml_s"] == 25.0
            assert state["pump_calibration"]["state"] == "done"

            # The next cycle, on fresh water: on target without overshoot.
            node.plant = Reservoir.from_state(tds=300, ph=6.0, params=params, seed=7)
            await asyncio.sleep(0.5)
            after = await dose_once(gw, sock, node, 300.0, 800.0)
            assert after <= 5.0, f"overshoot after the calibration: {after:.1f} %"
            entries = await rows(gw, "tank-a")
            assert any(e.get("nutrient_flow_ml_s") == 25.0 for e in entries)
            assert any(e.get("controller") == "calibration" and "nutrient_ms" in e
                       for e in entries)

        # Kept across a restart, until the file's flow of that pump is edited.
        async with running_gateway(data) as gw:
            await until(lambda: gw.runners["tank-a"].link_up, what="link up")
            assert gw.runners["tank-a"].control.plant.flow_ml_s["nutrient"] == 25.0
        plant["flow_ml_s"] = {"nutrient": 24.0}
        async with running_gateway(data) as gw:
            await until(lambda: gw.runners["tank-a"].link_up, what="link up")
            assert gw.runners["tank-a"].control.plant.flow_ml_s["nutrient"] == 24.0
            assert gw.store is not None and await gw.store.load_learned("tank-a", PUMP_KEY) is None
    finally:
        await node.close()


# --- guided probe calibration -------------------------------------------------------------------

PH_SENSORS = ("tds", "ph_v", "water_temp", "water_level")


async def put_in(node: SimNode, nominal: float, temp: float) -> None:
    value = buffer_ph(nominal, temp)
    assert value is not None
    node.plant.immerse("ph", value, temp)
    await asyncio.sleep(0.2)


async def test_guided_ph_calibration_recovers_the_probe(tmp_path: Path) -> None:
    # A probe of 92 % slope and +14 mV offset; the room (and the buffers) at 21.5 °C.
    params = replace(FAST, ph_probe_slope_pct=92.0, ph_probe_offset_mv=14.0)
    node = SimNode("tank-a", Reservoir.from_state(tds=800, ph=6.1, params=params, seed=9),
                   sensors=PH_SENSORS)
    try:
        data = gateway_config(tmp_path, tank("tank-a", await serve(node)))
        config = write_config(tmp_path / "gw.yaml", data)
        sock = tmp_path / "gw.sock"
        async with running_gateway(data) as gw:
            runner = gw.runners["tank-a"]
            await until(lambda: "ph_v" in runner.latest, what="a raw pH reading")
            assert "ph" not in runner.latest, "a new probe: no map yet"
            seen: list[str] = []
            cli = await hydrogate("calibrate", "tank-a", "ph", "--buffers", "7.00,4.01,10.01",
                                  "-c", config)
            for nominal in (7.00, 4.01, 10.01):
                await line_with(cli, f"pH {nominal:.2f} buffer; press Enter", seen)
                await put_in(node, nominal, 21.5)
                state = await call(sock, "get_state", device="tank-a")
                assert state["probe_calibration"]["state"] == "waiting"
                assert state["cycle"] == "idle"
                await answer(cli, "")
            code, out, err = await finished(cli, seen)
            assert code == 0, (out, err)
            result = (await call(sock, "get_state", device="tank-a"))["probe_calibration"][
                "result"]
            assert result["slope_pct"] == pytest.approx(92.0, rel=0.01), result
            assert result["offset_mv"] == pytest.approx(14.0, abs=2.0), result
            assert result["temp_c"] == pytest.approx(21.5, abs=0.2)
            assert f"slope {result['slope_pct']:.1f} % of Nernst" in out
            assert "ph: {source: ph_v, poly: [" in out
            # Applied at once: back in the tank, the reading is the tank's pH.
            node.plant.withdraw("ph")
            await asyncio.sleep(1.0)
            truth = node.plant.truth(at_probe=True)["ph"]
            await until(lambda: abs(runner.latest.get("ph", 0.0) - truth) < 0.05,
                        what="a calibrated pH")
            entries = await rows(gw, "tank-a")
            assert any(e.get("ph_flag") is None and e.get("probe_calibration") == "done"
                       for e in entries)
            assert any(e.get("ph_slope_pct") == pytest.approx(92.0, rel=0.01) for e in entries)
            kept = await gw.store.load_learned("tank-a", PROBE_KEY)  # type: ignore[union-attr]
            assert kept is not None and kept[0]["probes"]["ph"]["source"] == "ph_v"
        async with running_gateway(data) as gw:  # kept across a restart
            await until(lambda: "ph" in gw.runners["tank-a"].latest, what="a calibrated pH")
            state = await call(sock, "get_state", device="tank-a")
            assert state["probe_calibrated"]["ph"]["slope_pct"] == result["slope_pct"]
    finally:
        await node.close()


async def test_a_worn_probe_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    params = replace(FAST, ph_probe_slope_pct=80.0, ph_probe_offset_mv=-36.0)
    node = SimNode("tank-a", Reservoir.from_state(tds=800, ph=6.1, params=params, seed=10),
                   sensors=PH_SENSORS)
    try:
        ideal = [-1000.0 / 59.16, 7.0]  # the map of a perfect probe, from the datasheet
        entry = tank("tank-a", await serve(node))
        entry["calibration"] = {"ph": {"source": "ph_v", "poly": ideal}}
        data = gateway_config(tmp_path, entry)
        sock = tmp_path / "gw.sock"
        async with running_gateway(data) as gw:
            runner = gw.runners["tank-a"]
            await until(lambda: "ph" in runner.latest, what="a pH reading")
            # Through the RPC, as a dashboard drives it.
            reply = await call(sock, "probe_calibrate", {"probe": "ph"}, device="tank-a")
            assert reply["success"], reply
            assert reply["probe_calibration"]["steps"] == [7.0, 4.01]
            for nominal in (7.00, 4.01):
                await put_in(node, nominal, 24.0)
                assert (await call(sock, "probe_calibrate", {"probe": "ph", "step": "read"},
                                   device="tank-a"))["success"]
                await until(lambda: runner.control.probes.state()["state"] != "reading",  # type: ignore[index]
                            what="a stable reading")
                readings = [e for e in await rows(gw, "tank-a") if "ph" in e]
                assert readings[-1].get("ph_flag") == "calibrating"  # a buffer's pH, not the tank's
            status = (await call(sock, "get_state", device="tank-a"))["probe_calibration"]
            assert status["state"] == "refused", status
            assert "% of Nernst (usable: 85–105 %)" in status["error"]
            assert "worn out" in status["error"] and "(usable: within ±30 mV)" in status["error"]
            assert status["result"]["slope_pct"] == pytest.approx(80.0, rel=0.01)
            assert runner.calibration_map("ph").poly == tuple(ideal)  # type: ignore[union-attr]
            assert gw.store is not None and await gw.store.load_learned("tank-a", PROBE_KEY) \
                is None
            # A session can be left: cancel, and the flags end.
            await call(sock, "probe_calibrate", {"probe": "ph"}, device="tank-a")
            await call(sock, "probe_calibrate", {"probe": "ph", "step": "cancel"},
                       device="tank-a")
            assert runner.control.calibrating is None
    finally:
        await node.close()


async def test_an_ec_probe_reading_high_is_corrected_with_one_standard(tmp_path: Path) -> None:
    params = replace(FAST, tds_probe_gain=1.15)
    node = SimNode("tank-a", Reservoir.from_state(tds=800, ph=6.1, params=params, seed=12),
                   sensors=("tds_v", "ph", "water_temp", "water_level"))
    try:
        entry = tank("tank-a", await serve(node))
        entry["calibration"] = {"tds": {
            "source": "tds_v", "poly": [913.98, -2556.2, 2437, -416.27, 69.331],
            "valid": [0.04, 1.58], "temp_coefficient": 0.02}}
        data = gateway_config(tmp_path, entry, units={"conductivity": "ppm700"})
        config = write_config(tmp_path / "gw.yaml", data)
        async with running_gateway(data) as gw:
            runner = gw.runners["tank-a"]
            await until(lambda: "tds" in runner.latest, what="a reading")
            assert runner.latest["tds"] == pytest.approx(920.0, rel=0.03)  # 15 % high
            node.plant.immerse("ec", 1413.0, 23.0)
            code, out, err = await finished(await hydrogate(
                "calibrate", "tank-a", "ec", "--yes", "-c", config), [])
            assert code == 0, (out, err)
            assert "the probe read 1.1" in out and "temp_coefficient: 0.02" in out
            node.plant.withdraw("ec")
            truth = node.plant.truth(at_probe=True)["tds"]
            await until(lambda: abs(runner.latest.get("tds", 0) / truth - 1) < 0.02,
                        timeout=10, what="a corrected reading")
            state = await call(tmp_path / "gw.sock", "get_state", device="tank-a")
            assert state["values"]["tds_700"] == pytest.approx(truth * 1.4, rel=0.03)
    finally:
        await node.close()


async def test_an_old_calibration_raises_info(tmp_path: Path) -> None:
    node = SimNode("tank-a", Reservoir.from_state(tds=800, ph=6.0, params=FAST))
    try:
        entry = tank("tank-a", await serve(node))
        entry["recalibrate_after_days"] = {"pumps": 2, "ph": 30}
        data = gateway_config(tmp_path, entry)
        async with running_gateway(data) as gw:
            await until(lambda: gw.runners["tank-a"].link_up, what="link up")
            assert gw.store is not None
            ms = int((gw.runners["tank-a"]._clock.time() - 3 * 86400) * 1000)
            await gw.store.save_learned("tank-a", PUMP_KEY, {"version": 1, "pumps": {
                "refill": {"flow_ml_s": 1.7, "measured_at": ms, "ms": 10000, "ml": 17,
                           "base": 1.58}}}, {})
        async with running_gateway(data) as gw:
            runner = gw.runners["tank-a"]
            await until(lambda: runner.severity is not None, what="a severity")
            assert runner.control.plant.flow_ml_s["refill"] == 1.7
            assert runner.severity is not None and runner.severity.level == "info"
            assert "refill flow calibrated 3 days ago (recalibrate every 2)" in \
                runner.severity.reason
    finally:
        await node.close()


# --- units over the real broker ----------------------------------------------------------------


async def test_the_700_scale_reaches_thingsboard_named_by_its_unit(broker: Broker,
                                                                   tmp_path: Path) -> None:
    node = SimNode("tank-a", Reservoir.from_state(tds=800, ph=6.0, params=FAST, seed=2))
    try:
        data = config_dict(tmp_path / "gw.sqlite", [tank("tank-a", await serve(node),
                                                         tds_setpoint=1120)], broker.port)
        data["units"] = {"conductivity": "ppm700"}
        async with Recorder(broker.port) as rec, running_gateway(data) as gw:
            control = gw.runners["tank-a"].control
            await rec.wait_for(lambda: rec.on("v1/gateway/attributes/request"),
                               what="shared attributes requested")
            keys = rec.on("v1/gateway/attributes/request")[0].payload["keys"]
            assert "tds_setpoint" in keys and "ec_setpoint" not in keys  # the node's unit only
            assert control.settings is not None and control.settings.tds_setpoint == 800.0
            await rec.publish("v1/gateway/attributes",
                              {"device": "tank-a", "data": {"ec_setpoint": 2.0}})
            await rec.wait_for(lambda: control.settings.tds_setpoint == 1000.0,
                               what="ec_setpoint applied")
            await rec.wait_for(
                lambda: any("tds_700" in e["values"] for e in rec.entries().get("tank-a", [])),
                what="telemetry in ppm700")
            values = [e["values"] for e in rec.entries()["tank-a"] if "tds_700" in e["values"]]
            assert values[-1]["tds_700"] == pytest.approx(1120.0, rel=0.02)
            assert not any("tds" in e["values"] for e in rec.entries()["tank-a"])
            state = (await rec.rpc("tank-a", 1, "get_state"))["data"]
            assert state["tds_setpoint"] == 1400.0 and state["ec_setpoint"] == 2.0
            assert state["values"]["tds_700"] == pytest.approx(1120.0, rel=0.02)
    finally:
        await node.close()
