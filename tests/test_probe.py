"""`hydrogate node probe`: passes on the simulator and on our firmware, fails naming the case on broken nodes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from drivers.nodelink import crc16, encode
from gateway.nodetool.probe import ProbeOptions, Result, probe, table
from sim.node import SimNode
from tests.firmware_proc import TANK_CONFIG, TANK_WORLD, firmware_node

FAST = ProbeOptions(timeout=0.5, run_ms=400, watchdog=True, watchdog_s=1.5)


def by_name(results: list[Result]) -> dict[str, Result]:
    return {r.name: r for r in results}


def failed(results: list[Result]) -> dict[str, Result]:
    return {r.name: r for r in results if r.status == "FAIL"}


async def probe_sim(node: SimNode, options: ProbeOptions = FAST) -> list[Result]:
    port = await node.serve_tcp("127.0.0.1", 0)
    return await probe(f"tcp://127.0.0.1:{port}", options)


async def test_the_simulator_passes_every_case() -> None:
    async with SimNode("tank-a", watchdog_s=1.5) as node:
        results = await probe_sim(node)
    assert failed(results) == {}, table(results)
    statuses = by_name(results)
    assert statuses["link watchdog"].status == "pass"
    assert statuses["ph_up and ph_down never together"].status == "pass"
    assert statuses["push reports"].status == "skip"


async def test_a_pushing_simulator_passes_the_push_case() -> None:
    async with SimNode("tank-a", push_interval=0.2) as node:
        results = await probe_sim(node, ProbeOptions(timeout=0.5, run_ms=400, push_wait=1.0))
    assert failed(results) == {}, table(results)
    assert by_name(results)["push reports"].status == "pass"


class LowercaseCrcNode(SimNode):
    """Writes its CRCs in lower case (the spec says upper)."""

    def _frame(self, msg: Mapping[str, Any], lenient: bool = False) -> bytes:
        line = super()._frame(msg, lenient)
        return line[:-5] + line[-5:].lower()


class NoIdNode(SimNode):
    """Forgets the id in its replies."""

    def _frame(self, msg: Mapping[str, Any], lenient: bool = False) -> bytes:
        body = {k: v for k, v in msg.items() if k != "id"}
        if "event" not in body:
            text = json.dumps(body, separators=(",", ":")).encode()
            return b"%b*%04X\n" % (text, crc16(text))
        return encode(body)


class ActuateAnythingNode(SimNode):
    """Accepts any duty and ms, and runs both pH pumps together."""

    def _actuate(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        name = msg.get("actuator")
        if name not in self.actuators:
            return {"ok": False, "error": "unknown actuator"}
        self._set(str(name), 1, 500)
        return {"ok": True}


async def test_lowercase_crc_is_named() -> None:
    async with LowercaseCrcNode("tank-a") as node:
        results = await probe_sim(node, ProbeOptions(timeout=0.5, run_ms=400))
    bad = failed(results)
    assert list(bad) == ["frames sent by the node"], table(results)
    assert "upper case" in bad["frames sent by the node"].detail
    assert bad["frames sent by the node"].frame is not None


async def test_wrong_crc_is_named_with_the_frame() -> None:
    from sim.node import Faults

    async with SimNode("tank-a", faults=Faults(corrupt_crc_every=1)) as node:
        results = await probe_sim(node, ProbeOptions(timeout=0.3, run_ms=400))
    bad = failed(results)
    assert "hello" in bad and "crc" in bad["hello"].detail.lower()
    assert bad["hello"].frame is not None and b'"node":"tank-a"' in bad["hello"].frame
    assert "frames sent by the node" in bad


async def test_a_node_without_watchdog_fails_the_watchdog_case() -> None:
    async with SimNode("tank-a", watchdog_s=1e6) as node:
        results = await probe_sim(node)
    assert list(failed(results)) == ["link watchdog"], table(results)
    assert "without a frame" in failed(results)["link watchdog"].detail


async def test_replies_without_id_are_named() -> None:
    async with NoIdNode("tank-a") as node:
        results = await probe_sim(node, ProbeOptions(timeout=0.3, run_ms=400))
    bad = failed(results)
    assert "hello" in bad
    assert "neither an integer 'id'" in bad["hello"].detail
    frame = bad["hello"].frame
    assert frame is not None
    assert frame == b'{"ok":true,"node":"tank-a","fw":"sim-1.0.0","proto":1,' \
        b'"sensors":["tds","ph","water_temp","water_level","air_temp","humidity"],' \
        b'"actuators":["ph_up","ph_down","nutrient","refill"]}*' + \
        b"%04X" % crc16(frame.split(b"*")[0])


async def test_missing_validation_and_interlock_are_named() -> None:
    async with ActuateAnythingNode("tank-a") as node:
        results = await probe_sim(node, ProbeOptions(timeout=0.3, run_ms=400))
    bad = failed(results)
    assert "actuate field validation" in bad
    assert "ph_up and ph_down never together" in bad


async def test_our_firmware_passes_every_case(tmp_path: Path) -> None:
    config = {**TANK_CONFIG, "push_ms": 300}
    with firmware_node(tmp_path, config, TANK_WORLD, watchdog_ms=1500) as fw:
        results = await probe(f"tcp://127.0.0.1:{fw.port}", FAST)
    assert failed(results) == {}, table(results) + "\n" + fw.output()
    assert by_name(results)["push reports"].status == "pass"
    assert by_name(results)["link watchdog"].status == "pass"


def test_the_cli_prints_the_table_and_exits_1_on_a_failure(tmp_path: Path) -> None:
    async def serve() -> tuple[SimNode, int]:
        node = LowercaseCrcNode("tank-a")
        return node, await node.serve_tcp("127.0.0.1", 0)

    async def main() -> subprocess.CompletedProcess[str]:
        node, port = await serve()
        try:
            cmd = [sys.executable, "-m", "gateway.cli", "node", "probe",
                   f"tcp://127.0.0.1:{port}", "--run-ms", "300", "--timeout", "0.5"]
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            return subprocess.CompletedProcess(cmd, proc.returncode or 0, out.decode(), "")
        finally:
            await node.close()

    done = asyncio.run(main())
    assert done.returncode == 1
    assert "frames sent by the node" in done.stdout and "FAIL" in done.stdout
    assert "frame: {" in done.stdout
    assert "link watchdog" in done.stdout and "skip" in done.stdout


def test_the_cli_exits_0_when_all_pass_and_1_when_nothing_listens() -> None:
    async def main() -> tuple[int, int]:
        async with SimNode("tank-a") as node:
            port = await node.serve_tcp("127.0.0.1", 0)
            cmd = [sys.executable, "-m", "gateway.cli", "node", "probe",
                   f"tcp://127.0.0.1:{port}", "--run-ms", "300"]
            proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL)
            ok = await proc.wait()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "node", "probe", f"tcp://127.0.0.1:{port}",
            stderr=asyncio.subprocess.DEVNULL)
        return ok, await proc.wait()

    assert asyncio.run(main()) == (0, 1)


@pytest.mark.parametrize("duty", ["0", "300"])
def test_the_cli_refuses_a_bad_duty(duty: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "node", "probe", "tcp://127.0.0.1:1",
                           "--duty", duty], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
