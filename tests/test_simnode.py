"""SimNode driven as a gateway would: raw sockets and a real pty, with our own encoder."""

from __future__ import annotations

import asyncio
import binascii
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import serial_asyncio

from sim.__main__ import consecutive_name
from sim.node import Faults, NodeError, SimNode, parse_request
from sim.plant import PlantParams, Reservoir
from tests.conftest import FakeClock

ROOT = Path(__file__).resolve().parent.parent
QUIET = PlantParams(uptake_per_h=0.0, evaporation_l_per_h=0.0)
WAIT = 2.0  # seconds any single expected line may take to arrive


def frame(msg: dict[str, Any], *, crc: int | None = None) -> bytes:
    """Our own NodeLink encoder, independent of drivers.nodelink."""
    body = json.dumps(msg, separators=(",", ":")).encode()
    value = binascii.crc_hqx(body, 0xFFFF) if crc is None else crc
    return body + b"*%04X\n" % value


def unframe(line: bytes) -> dict[str, Any]:
    body, _, crc = line.rstrip(b"\n").rpartition(b"*")
    assert int(crc, 16) == binascii.crc_hqx(body, 0xFFFF), line
    obj = json.loads(body)
    assert isinstance(obj, dict)
    return obj


def crc_ok(line: bytes) -> bool:
    body, star, crc = line.rstrip(b"\n").rpartition(b"*")
    try:
        return bool(star) and int(crc, 16) == binascii.crc_hqx(body, 0xFFFF)
    except ValueError:
        return False


class Peer:
    """The gateway side of a connection: send frames, read lines, pair replies with ids."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.events: list[dict[str, Any]] = []
        self.next_id = 0

    @classmethod
    async def tcp(cls, port: int) -> Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self, timeout: float = WAIT) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.readline()

    async def message(self, timeout: float = WAIT) -> dict[str, Any]:
        return unframe(await self.line(timeout))

    async def event(self, name: str) -> dict[str, Any]:
        for i, ev in enumerate(self.events):
            if ev["event"] == name:
                return self.events.pop(i)
        for _ in range(100):
            msg = await self.message()
            if msg.get("event") == name:
                return msg
            if "event" in msg:
                self.events.append(msg)
        raise AssertionError(f"no {name} event")

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.send_raw(frame({"id": self.next_id, "op": op, **fields}))
        for _ in range(100):
            msg = await self.message()
            if "event" in msg:
                self.events.append(msg)
                continue
            assert msg["id"] == self.next_id
            return msg
        raise AssertionError("no reply")

    async def nothing_for(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(seconds):
                line = await self.reader.readline()
                raise AssertionError(f"unexpected line {line!r}")

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def connect(node: SimNode) -> Peer:
    port = await node.serve_tcp()
    peer = await Peer.tcp(port)
    boot = await peer.message()
    assert boot == {"event": "boot", "node": node.name, "fw": node.fw}
    return peer


# --- ops ---------------------------------------------------------------------


async def test_every_op_over_tcp() -> None:
    async with SimNode("tank-a", Reservoir(QUIET)) as node:
        peer = await connect(node)
        hello = await peer.request("hello")
        assert hello == {
            "id": 1,
            "ok": True,
            "node": "tank-a",
            "fw": "sim-1.0.0",
            "proto": 1,
            "sensors": ["tds", "ph", "water_temp", "water_level", "air_temp", "humidity"],
            "actuators": ["ph_up", "ph_down", "nutrient", "refill"],
        }
        read = await peer.request("read")
        assert read["ok"] is True
        assert isinstance(read["uptime_ms"], int)
        assert set(read["values"]) == set(hello["sensors"])
        assert read["values"]["tds"] == pytest.approx(700.0, abs=15.0)
        assert await peer.request("ping") == {"id": 3, "ok": True}
        assert (await peer.request("actuate", actuator="ph_up", duty=128, ms=60_000))["ok"]
        assert await peer.event("actuator") == {
            "event": "actuator",
            "actuator": "ph_up",
            "on": 1,
            "duty": 128,
        }
        state = await peer.request("state")
        assert state["actuators"] == {"ph_up": 1, "ph_down": 0, "nutrient": 0, "refill": 0}
        assert node.plant.pumps["ph_up"] == 128
        assert (await peer.request("stop"))["ok"]
        assert (await peer.event("actuator"))["on"] == 0
        assert (await peer.request("state"))["actuators"]["ph_up"] == 0
        assert await peer.request("dance") == {"id": 8, "ok": False, "error": "unknown op"}
        assert node.requests == {
            "hello": 1,
            "read": 1,
            "ping": 1,
            "actuate": 1,
            "state": 2,
            "stop": 1,
            "dance": 1,
        }
        await peer.close()


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"actuator": "fan", "duty": 10, "ms": 10}, "unknown actuator"),
        ({"duty": 10, "ms": 10}, "unknown actuator"),
        ({"actuator": "nutrient", "duty": 256, "ms": 10}, "duty"),
        ({"actuator": "nutrient", "duty": -1, "ms": 10}, "duty"),
        ({"actuator": "nutrient", "duty": 1.5, "ms": 10}, "duty"),
        ({"actuator": "nutrient", "duty": True, "ms": 10}, "duty"),
        ({"actuator": "nutrient", "duty": "255", "ms": 10}, "duty"),
        ({"actuator": "nutrient", "duty": 255, "ms": 0}, "ms"),
        ({"actuator": "nutrient", "duty": 255, "ms": 600_001}, "ms"),
        ({"actuator": "nutrient", "duty": 255, "ms": 100.0}, "ms"),
        ({"actuator": "nutrient", "duty": 255}, "ms"),
    ],
)
async def test_actuate_bad_params_are_refused(fields: dict[str, Any], error: str) -> None:
    async with SimNode("n") as node:
        peer = await connect(node)
        reply = await peer.request("actuate", **fields)
        assert reply["ok"] is False
        assert error in reply["error"]
        assert node.running == {}
        await peer.close()


async def test_actuate_duty_zero_switches_off() -> None:
    async with SimNode("n") as node:
        peer = await connect(node)
        await peer.request("actuate", actuator="refill", duty=255, ms=5000)
        assert node.running == {"refill": 255}
        assert (await peer.request("actuate", actuator="refill", duty=0, ms=1))["ok"]
        assert node.running == {}
        assert [(await peer.event("actuator"))["on"] for _ in range(2)] == [1, 0]
        await peer.close()


# --- node clock: timers and watchdog ----------------------------------------


async def test_actuator_stops_on_the_node_clock_with_an_exact_dose() -> None:
    clock = FakeClock()
    plant = Reservoir(QUIET)
    async with SimNode("n", plant, clock=clock.monotonic) as node:
        peer = await connect(node)
        await peer.request("actuate", actuator="nutrient", duty=204, ms=1500)
        clock.advance(1.0)
        node.tick()
        assert node.running == {"nutrient": 204}
        clock.advance(7.0)  # far past the deadline: the dose is still exactly 1.5 s
        node.tick()
        assert node.running == {}
        assert plant.dosed_ml["nutrient"] == pytest.approx(1.58 * 1.5 * 204 / 255)
        assert plant.time_s == pytest.approx(8.0)
        assert (await peer.event("actuator"))["on"] == 1
        assert (await peer.event("actuator")) == {
            "event": "actuator",
            "actuator": "nutrient",
            "on": 0,
        }
        await peer.close()


async def test_background_tick_stops_the_actuator_without_help() -> None:
    clock = FakeClock()
    async with SimNode("n", clock=clock.monotonic, tick_s=0.01) as node:
        peer = await connect(node)
        await peer.request("actuate", actuator="ph_down", duty=255, ms=100)
        clock.advance(0.2)
        assert (await peer.event("actuator"))["on"] == 1
        assert (await peer.event("actuator"))["on"] == 0
        assert node.running == {}
        await peer.close()


async def test_actuate_on_a_running_actuator_restarts_its_timer() -> None:
    clock = FakeClock()
    async with SimNode("n", clock=clock.monotonic) as node:
        peer = await connect(node)
        await peer.request("actuate", actuator="ph_up", duty=100, ms=1000)
        clock.advance(0.8)
        await peer.request("actuate", actuator="ph_up", duty=200, ms=1000)
        clock.advance(0.7)  # 1.5 s after the first command, 0.7 s after the second
        node.tick()
        assert node.running == {"ph_up": 200}
        clock.advance(0.4)
        node.tick()
        assert node.running == {}
        # One "on" (the restart is not an on/off change), one "off".
        assert [(await peer.event("actuator"))["on"] for _ in range(2)] == [1, 0]
        await peer.nothing_for(0.1)
        await peer.close()


async def test_watchdog_stops_everything_without_valid_frames() -> None:
    clock = FakeClock()
    async with SimNode("n", clock=clock.monotonic, watchdog_s=30.0) as node:
        peer = await connect(node)
        await peer.request("actuate", actuator="refill", duty=255, ms=600_000)
        await peer.request("actuate", actuator="nutrient", duty=255, ms=600_000)
        clock.advance(20.0)
        await peer.request("ping")  # a valid frame feeds the watchdog
        clock.advance(20.0)
        node.tick()
        assert set(node.running) == {"refill", "nutrient"}
        # Frames with a bad CRC do not feed it.
        await peer.send_raw(frame({"id": 99, "op": "ping"}, crc=0x1234))
        await peer.send_raw(b"garbage\n")
        await peer.nothing_for(0.1)
        assert node.bad_frames == {"crc": 2}
        clock.advance(10.5)
        node.tick()
        assert node.running == {}
        offs = [await peer.event("actuator") for _ in range(4)]
        assert sorted((e["actuator"], e["on"]) for e in offs) == [
            ("nutrient", 0),
            ("nutrient", 1),
            ("refill", 0),
            ("refill", 1),
        ]
        await peer.close()


async def test_uptime_follows_the_node_clock() -> None:
    clock = FakeClock()
    async with SimNode("n", clock=clock.monotonic) as node:
        peer = await connect(node)
        clock.advance(81.234)
        assert (await peer.request("read"))["uptime_ms"] == 81234
        await peer.close()


# --- connections -------------------------------------------------------------


async def test_second_connection_replaces_the_first() -> None:
    async with SimNode("n") as node:
        port = await node.serve_tcp()
        first = await Peer.tcp(port)
        assert (await first.message())["event"] == "boot"
        second = await Peer.tcp(port)
        async with asyncio.timeout(WAIT):
            assert await first.reader.read() == b""  # closed by the node
        assert (await second.request("hello"))["node"] == "n"  # no boot on the second
        await first.close()
        await second.close()
        # The node keeps listening after its client leaves.
        third = await Peer.tcp(port)
        assert (await third.request("ping"))["ok"]
        await third.close()


async def test_close_stops_actuators_and_the_connection() -> None:
    node = SimNode("n")
    peer = await connect(node)
    await peer.request("actuate", actuator="ph_up", duty=255, ms=60_000)
    await node.close()
    assert node.running == {}
    assert node.plant.pumps["ph_up"] == 0
    async with asyncio.timeout(WAIT):
        rest = await peer.reader.read()
    events = peer.events + [unframe(x) for x in rest.splitlines(keepends=True)]
    assert [e["on"] for e in events] == [1, 0]
    await peer.close()
    with pytest.raises(NodeError):
        await node.serve_tcp()
    await node.close()  # idempotent


# --- readings ------------------------------------------------------------------


async def test_raw_mode_sends_tds_v_and_ph_adc() -> None:
    async with SimNode("n", raw=True) as node:
        peer = await connect(node)
        hello = await peer.request("hello")
        assert hello["sensors"][:2] == ["tds_v", "ph_adc"]
        values = (await peer.request("read"))["values"]
        assert 1.2 < values["tds_v"] < 1.6
        assert isinstance(values["ph_adc"], int)
        assert values["ph_adc"] * 0.0025 + 3.9926 == pytest.approx(6.0, abs=0.1)
        assert "tds" not in values
        await peer.close()


async def test_a_sensor_the_plant_lacks_reads_null() -> None:
    async with SimNode("n", sensors=("tds", "co2")) as node:
        peer = await connect(node)
        values = (await peer.request("read"))["values"]
        assert values["co2"] is None
        await peer.close()


async def test_push_reports_carry_consecutive_seq() -> None:
    async with SimNode("n", push_interval=0.01, seq=True) as node:
        peer = await connect(node)
        seqs: list[int] = []
        while len(seqs) < 60:
            msg = await peer.message()
            assert msg["event"] == "report"
            assert isinstance(msg["uptime_ms"], int)
            seqs.append(msg["values"]["seq"])
        assert seqs == list(range(seqs[0], seqs[0] + 60))
        # A read shares the counter: nothing is skipped or repeated.
        await peer.send_raw(frame({"id": 1, "op": "read"}))
        for _ in range(200):
            msg = await peer.message()
            seqs.append(msg["values"]["seq"])
            if "id" in msg:
                break
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        await peer.close()


async def test_fast_push_batches_reports_and_loses_none() -> None:
    """Reports due every 0.2 ms go out in batches, one write and one node uptime each, and
    none is lost. A batch after one of the node's sleeps (2 ms at least) holds ten reports
    or more; one written while the node is behind holds what fell due meanwhile, so sizes
    depend on the machine's load. The rate and its CPU cost are measured by
    bench.sim_speed (docs/benchmarks.md)."""
    async with SimNode("bench", push_interval=0.0002, seq=True) as node:
        peer = await connect(node)
        reports = [await peer.message() for _ in range(2000)]
        await peer.close()
    assert all(r["event"] == "report" for r in reports)
    seqs = [r["values"]["seq"] for r in reports]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    batches = Counter(r["uptime_ms"] for r in reports)
    # Unbatched, a report every 0.2 ms would share its millisecond with four others at most.
    assert max(batches.values()) >= 10, batches


# --- faults --------------------------------------------------------------------


async def test_fault_corrupt_crc_every_second_frame() -> None:
    async with SimNode("n", faults=Faults(corrupt_crc_every=2)) as node:
        port = await node.serve_tcp()
        peer = await Peer.tcp(port)
        lines = [await peer.line()]  # boot, frame 1: good
        for i in range(4):
            await peer.send_raw(frame({"id": i + 1, "op": "ping"}))
            lines.append(await peer.line())
        assert [crc_ok(x) for x in lines] == [True, False, True, False, True]
        await peer.close()


async def test_fault_garbage_and_overlong_lines_precede_good_frames() -> None:
    faults = Faults(garbage_every=1, overlong_every=2)
    async with SimNode("n", faults=faults) as node:
        port = await node.serve_tcp()
        peer = await Peer.tcp(port)  # asyncio's 64 KiB line limit: the 2000-byte line fits
        got = [await peer.line() for _ in range(2)]  # boot (frame 1): garbage, boot
        await peer.send_raw(frame({"id": 1, "op": "ping"}))
        got += [await peer.line() for _ in range(3)]  # frame 2: garbage, overlong, reply
        assert [crc_ok(x) for x in got] == [False, True, False, False, True]
        assert len(got[3]) == 2000
        with pytest.raises(ValueError):
            json.loads(got[0].split(b"*")[0] if b"*" in got[0] else got[0])
        assert unframe(got[4]) == {"id": 1, "ok": True}
        await peer.close()


async def test_fault_silent_node_counts_but_neither_acts_nor_answers() -> None:
    faults = Faults()
    async with SimNode("n", faults=faults) as node:
        peer = await connect(node)
        faults.silent = True
        await peer.send_raw(
            frame({"id": 1, "op": "actuate", "actuator": "ph_up", "duty": 9, "ms": 9})
        )
        await peer.nothing_for(0.2)
        assert node.requests == {"actuate": 1}
        assert node.running == {}
        faults.silent = False  # mutable at run time
        assert (await peer.request("ping"))["ok"]
        await peer.close()


async def test_fault_dropped_reply_still_executes_once() -> None:
    faults = Faults(drop_reply_probability=1.0)
    async with SimNode("n", faults=faults) as node:
        peer = await connect(node)
        await peer.send_raw(
            frame({"id": 5, "op": "actuate", "actuator": "ph_up", "duty": 9, "ms": 9000})
        )
        assert (await peer.event("actuator"))["on"] == 1  # the event is not a reply
        await peer.nothing_for(0.2)
        assert node.requests["actuate"] == 1
        assert node.replies_dropped == 1
        assert node.running == {"ph_up": 9}
        await peer.close()


async def test_fault_delayed_reply() -> None:
    async with SimNode("n", faults=Faults(delay_reply_s=0.3)) as node:
        peer = await connect(node)
        start = time.monotonic()
        assert (await peer.request("ping"))["ok"]
        assert time.monotonic() - start >= 0.3
        await peer.close()


@pytest.mark.parametrize(
    ("bad", "token"),
    [
        ("NaN", b'"tds":"NaN"'),
        (math.inf, b'"tds":Infinity'),
        (math.nan, b'"tds":NaN'),
        (True, b'"tds":true'),
    ],
)
async def test_fault_bad_value_in_a_reading(bad: object, token: bytes) -> None:
    async with SimNode("n", faults=Faults(bad_value=bad)) as node:
        peer = await connect(node)
        await peer.send_raw(frame({"id": 1, "op": "read"}))
        line = await peer.line()
        assert crc_ok(line)
        assert token in line
        values = json.loads(line.rpartition(b"*")[0])["values"]  # Python's json takes NaN
        assert values["ph"] > 5.0  # the rest of the reading is intact
        assert len(values) == 6
        await peer.close()


async def test_bad_frames_received_are_counted_and_never_fatal() -> None:
    async with SimNode("n") as node:
        peer = await connect(node)
        await peer.send_raw(frame({"id": 1, "op": "ping"}, crc=0))
        await peer.send_raw(b"not json*%04X\n" % binascii.crc_hqx(b"not json", 0xFFFF))
        await peer.send_raw(frame([1, 2]))  # type: ignore[arg-type]
        await peer.send_raw(b"x" * 2000 + b"\n")
        await peer.send_raw(frame({"op": "ping"}))  # no id: nothing to reply to
        await peer.send_raw(frame({"id": 0, "op": "ping"}))
        await peer.send_raw(b"\xff\xfe*%04X\n" % binascii.crc_hqx(b"\xff\xfe", 0xFFFF))
        await peer.send_raw(frame({"id": 2, "op": "ping"})[:-1] + b"\r\n")  # CRLF is fine
        assert await peer.message() == {"id": 2, "ok": True}
        assert node.bad_frames == {
            "crc": 1,
            "json": 1,
            "not_object": 1,
            "too_long": 1,
            "field": 2,
            "encoding": 1,
        }
        await peer.close()


def test_parse_request_accepts_lowercase_crc() -> None:
    line = frame({"id": 3, "op": "read"})[:-1].lower()
    assert parse_request(line) == {"id": 3, "op": "read"}


# --- pty -----------------------------------------------------------------------


async def test_pty_serving_with_pyserial() -> None:
    async with SimNode("tank-p") as node:
        path = node.open_pty()
        assert os.path.exists(path)
        reader, writer = await serial_asyncio.open_serial_connection(url=path, baudrate=115200)
        peer = Peer(reader, writer)
        try:
            assert await peer.message() == {"event": "boot", "node": "tank-p", "fw": "sim-1.0.0"}
            assert (await peer.request("hello"))["node"] == "tank-p"
            assert (await peer.request("actuate", actuator="refill", duty=255, ms=50))["ok"]
            assert [(await peer.event("actuator"))["on"] for _ in range(2)] == [1, 0]
            values = (await peer.request("read"))["values"]
            assert values["water_level"] == pytest.approx(10.0, abs=0.1)
        finally:
            writer.close()


# --- python -m sim -------------------------------------------------------------


def test_consecutive_names() -> None:
    assert [consecutive_name("tank-a", i) for i in range(3)] == ["tank-a", "tank-b", "tank-c"]
    assert consecutive_name("node09", 2) == "node11"
    assert consecutive_name("Tank", 1) == "Tank-2"
    assert consecutive_name("tank_y", 2) == "tank_y-3"


def test_command_line_runs_several_nodes_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sim",
            "--tcp",
            "127.0.0.1:0",
            "--tcp",
            "127.0.0.1:0",
            "--seed",
            "4",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().decode().split() for _ in range(2)]
        assert [(name, kind) for name, kind, _ in lines] == [("tank-a", "tcp"), ("tank-b", "tcp")]
        for name, _, address in lines:
            host, port = address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=WAIT) as sock:
                stream = sock.makefile("rwb")
                assert unframe(stream.readline())["event"] == "boot"
                stream.write(frame({"id": 1, "op": "hello"}))
                stream.flush()
                assert unframe(stream.readline())["node"] == name
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
