"""The uplink against a real Mosquitto: what a ThingsBoard server would see, outages, RPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway import tbmsg
from gateway.config import ThingsBoardConfig
from gateway.store import Store
from gateway.uplink import Uplink
from tests.conftest import FakeClock
from tests.mqtt_recorder import stop_task

DEVICES = ["tank-a", "tank-b"]


@pytest.fixture(autouse=True)
async def shutdown_default_executor() -> AsyncIterator[None]:
    """aiomqtt connects in the loop's default executor; stop its thread after each test."""
    yield
    await asyncio.get_running_loop().shutdown_default_executor()


class Handler:
    """Records attributes; answers RPC `echo`, raises on `boom`, refuses anything else."""

    def __init__(self) -> None:
        self.attributes: list[tuple[str, dict[str, Any]]] = []

    def on_attributes(self, device: str, data: Mapping[str, Any], *, response: bool = False) -> None:
        self.attributes.append((device, dict(data)))
        if data.get("explode"):
            raise RuntimeError("handler bug")

    async def on_rpc(self, device: str, method: str, params: Any) -> dict[str, Any]:
        if method == "echo":
            return {"success": True, "echo": params}
        if method == "boom":
            raise RuntimeError("kaput")
        return {"success": False, "error": f"unknown method {method}"}

    def shared_attribute_keys(self, device: str) -> list[str]:
        return ["tds_setpoint"] if device == "tank-a" else []


class Recorder:
    """A test client on ``v1/#`` with a persistent session, so it misses nothing across restarts."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[tuple[str, Any]] = []
        self.sizes: list[tuple[str, int]] = []
        self.changed = asyncio.Event()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier="recorder", clean_session=False
                ) as client:
                    await client.subscribe("v1/#", qos=1)
                    self.ready.set()
                    async for m in client.messages:
                        assert isinstance(m.payload, bytes)
                        try:
                            payload = json.loads(m.payload)
                        except ValueError:  # the junk the RPC test sends
                            payload = None
                        self.messages.append((m.topic.value, payload))
                        self.sizes.append((m.topic.value, len(m.payload)))
                        self.changed.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    def on(self, topic: str) -> list[Any]:
        return [payload for t, payload in self.messages if t == topic]

    def entries(self) -> list[tuple[str, int, dict[str, Any]]]:
        """(device, ts, values) of every telemetry entry received, in arrival order."""
        return [
            (device, e["ts"], e["values"])
            for msg in self.on(tbmsg.TELEMETRY)
            for device, entries in msg.items()
            for e in entries
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


class Gate:
    """A TCP proxy in front of the broker that the test can shut (refusing connections).

    Mosquitto keeps no persistent sessions across a restart here, so the
    recorder must be subscribed again before the uplink may reconnect.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.Server | None = None

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def shut(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def publish(port: int, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.publish(topic, payload, qos=1)


@contextlib.asynccontextmanager
async def running(*coros: Any) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield tasks
    finally:
        for task in tasks:
            await stop_task(task)


def make_uplink(
    broker: Any,
    store: Store,
    handler: Handler,
    *,
    max_payload_bytes: int = 65536,
    devices: list[str] | None = None,
    port: int | None = None,
    **kwargs: Any,
) -> Uplink:
    config = ThingsBoardConfig(
        host="127.0.0.1",
        access_token="test-token",
        port=broker.port if port is None else port,
        max_payload_bytes=max_payload_bytes,
        keepalive=5,
    )
    names = DEVICES if devices is None else devices
    return Uplink(
        config,
        gateway_name="gw",
        store=store,
        handler=handler,
        devices=lambda: names,
        **kwargs,
    )


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_telemetry_arrives_in_shape_after_connect(broker: Any, tmp_path: Path) -> None:
    handler = Handler()
    recorder = Recorder(broker.port)
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        for i in range(20):
            store.append(DEVICES[i % 2], 1_732_200_000_000 + i, {"tds": 800.0 + i, "ph": 6.0})
        uplink = make_uplink(broker, store, handler, health_interval=0)
        async with running(recorder.run()):
            await asyncio.wait_for(recorder.ready.wait(), 10)
            async with running(uplink.run()):
                await recorder.wait_for(lambda: len(recorder.entries()) == 20)
                await wait_until(lambda: store.stats.depth == 0)
                assert uplink.connected
        assert not uplink.connected
        assert store.stats.forwarded == 20
    entries = recorder.entries()
    for device in DEVICES:
        mine = [(ts, v) for d, ts, v in entries if d == device]
        first = 0 if device == "tank-a" else 1
        assert mine == [
            (1_732_200_000_000 + i, {"tds": 800.0 + i, "ph": 6.0}) for i in range(first, 20, 2)
        ]
    topics = [t for t, _ in recorder.messages]
    first_telemetry = topics.index(tbmsg.TELEMETRY)
    connects = [p for t, p in recorder.messages[:first_telemetry] if t == tbmsg.CONNECT]
    assert connects == [{"device": d, "type": "hydro-node"} for d in DEVICES]
    # Shared attributes are requested with a boolean client flag, for devices that want them.
    [request] = recorder.on(tbmsg.ATTRIBUTES_REQUEST)
    assert request == {
        "id": request["id"],
        "device": "tank-a",
        "client": False,
        "keys": ["tds_setpoint"],
    }
    # On a clean stop every device is disconnected.
    assert sorted(p["device"] for p in recorder.on(tbmsg.DISCONNECT)) == DEVICES


async def test_messages_stay_within_max_payload_bytes(broker: Any, tmp_path: Path) -> None:
    recorder = Recorder(broker.port)
    async with Store.open(
        tmp_path / "s.db", max_rows=None, max_bytes=None, max_payload_bytes=2048
    ) as store:
        for i in range(600):
            store.append(DEVICES[i % 2], 1000 + i, {"tds": 800.5 + i, "note": "x" * (i % 50)})
        uplink = make_uplink(broker, store, Handler(), max_payload_bytes=2048, health_interval=0)
        async with running(recorder.run()):
            await asyncio.wait_for(recorder.ready.wait(), 10)
            async with running(uplink.run()):
                await recorder.wait_for(lambda: len(recorder.entries()) == 600)
    sizes = [n for topic, n in recorder.sizes if topic == tbmsg.TELEMETRY]
    assert len(sizes) > 20
    assert max(sizes) <= tbmsg.payload_limit(2048)
    assert max(sizes) > 1500  # packed, not one entry per message
    entries = recorder.entries()
    for device in DEVICES:
        stamps = [ts for d, ts, _ in entries if d == device]
        assert stamps == sorted(stamps)
        assert len(stamps) == 300


async def test_broker_outage_loses_nothing_and_resumes_fast(broker: Any, tmp_path: Path) -> None:
    recorder = Recorder(broker.port)
    gate = Gate(broker.port)
    await gate.open()
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        uplink = make_uplink(broker, store, Handler(), health_interval=0, port=gate.port)
        async with running(recorder.run()), running(uplink.run()):
            await asyncio.wait_for(recorder.ready.wait(), 10)
            for i in range(100):
                store.append("tank-a", 1000 + i, {"v": i})
            await wait_until(lambda: store.stats.depth == 0 and store.stats.received == 100)
            await recorder.wait_for(lambda: len(recorder.entries()) == 100)
            broker.stop()
            await wait_until(lambda: not uplink.connected)
            for i in range(100, 5100):
                store.append("tank-a", 1000 + i, {"v": i})
                if i % 1000 == 0:
                    await asyncio.sleep(0)
            await store.flush()
            assert store.stats.depth == 5000  # kept while the broker is away
            await asyncio.sleep(1.0)  # a few failed attempts
            await gate.shut()
            recorder.ready.clear()
            broker.start()
            await asyncio.wait_for(recorder.ready.wait(), 10)
            attempts_before = uplink.stats.attempts
            await gate.open()
            await wait_until(lambda: store.stats.depth == 0, timeout=15)
            attempts_to_resume = uplink.stats.attempts - attempts_before
            await recorder.wait_for(lambda: len(recorder.entries()) >= 5100, timeout=15)
        assert uplink.stats.reconnects >= 1
        assert uplink.stats.last_outage_s is not None
    await gate.shut()
    # Fast: the attempt under way when the broker came back, or the next one, got
    # through (the retries had not backed off; the figure in seconds is bench.throughput's).
    assert attempts_to_resume <= 2, f"{attempts_to_resume} attempts after the broker came back"
    values = [v["v"] for _, _, v in recorder.entries()]
    assert sorted(set(values)) == list(range(5100))  # nothing lost (duplicates allowed)
    first_seen = list(dict.fromkeys(values))
    assert first_seen == list(range(5100))  # nothing reordered


async def test_rpc_round_trip_and_malformed_requests(broker: Any, tmp_path: Path) -> None:
    recorder = Recorder(broker.port)
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        uplink = make_uplink(broker, store, Handler(), health_interval=0)
        async with running(recorder.run()), running(uplink.run()):
            await asyncio.wait_for(recorder.ready.wait(), 10)
            await wait_until(lambda: uplink.connected)

            def replies() -> dict[int, Any]:
                return {p["id"]: p for p in recorder.on(tbmsg.RPC) if p and "id" in p}

            async def rpc(payload: bytes) -> None:
                await publish(broker.port, tbmsg.RPC, payload)

            await rpc(b'{"device":"tank-a","data":{"id":1,"method":"echo","params":{"x":1}}}')
            await rpc(b'{"device":"tank-a","data":{"id":2,"method":"nope","params":{}}}')
            await rpc(b'{"device":"tank-a","data":{"id":3,"method":"boom","params":{}}}')
            await rpc(b'{"device":"tank-a","data":{"id":4,"params":{}}}')  # no method
            await rpc(b"this is not json")
            await rpc(b'{"device":"tank-a","data":{"method":"echo"}}')  # no id
            await rpc(b'{"device":"tank-b","data":{"id":5,"method":"echo","params":[1]}}')
            await recorder.wait_for(lambda: len(replies()) == 5)
            got = replies()
            assert got[1] == {
                "device": "tank-a",
                "id": 1,
                "data": {"success": True, "echo": {"x": 1}},
            }
            assert got[2]["data"] == {"success": False, "error": "unknown method nope"}
            assert got[3]["data"]["success"] is False
            assert "kaput" in got[3]["data"]["error"]
            assert got[4]["data"]["success"] is False
            assert got[5] == {"device": "tank-b", "id": 5, "data": {"success": True, "echo": [1]}}
            assert uplink.stats.malformed == 3  # no method, not JSON, no id
            assert uplink.connected
            # Still forwarding after all that.
            store.append("tank-a", 1, {"v": 1})
            await recorder.wait_for(lambda: len(recorder.entries()) == 1)


async def test_attribute_updates_and_responses_reach_the_handler(
    broker: Any, tmp_path: Path
) -> None:
    handler = Handler()
    recorder = Recorder(broker.port)
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        uplink = make_uplink(broker, store, handler, health_interval=0)
        async with running(recorder.run()), running(uplink.run()):
            await asyncio.wait_for(recorder.ready.wait(), 10)
            await recorder.wait_for(lambda: bool(recorder.on(tbmsg.ATTRIBUTES_REQUEST)))
            [request] = recorder.on(tbmsg.ATTRIBUTES_REQUEST)
            port = broker.port
            await publish(port, tbmsg.ATTRIBUTES, b'{"device":"tank-a","data":{"mode":"manual"}}')
            await publish(
                port, tbmsg.ATTRIBUTES, b'{"device":"tank-a","data":{"deleted":["interval"]}}'
            )
            await publish(port, tbmsg.ATTRIBUTES, b'{"device":"tank-a","data":{"explode":1}}')
            await publish(port, tbmsg.ATTRIBUTES, b'{"device":"tank-a","data":[1]}')
            await publish(
                port,
                tbmsg.ATTRIBUTES_RESPONSE,
                json.dumps({"id": request["id"], "device": "tank-a", "value": 900}).encode(),
            )
            await publish(port, tbmsg.ATTRIBUTES_RESPONSE, b'{"id":999,"device":"tank-a"}')
            await wait_until(lambda: len(handler.attributes) == 4)
            await wait_until(lambda: uplink.stats.malformed == 2)
            assert handler.attributes == [
                ("tank-a", {"mode": "manual"}),
                ("tank-a", {"deleted": ["interval"]}),
                ("tank-a", {"explode": 1}),
                ("tank-a", {"tds_setpoint": 900}),
            ]
            assert uplink.stats.handler_errors == 1
            assert uplink.connected


async def test_health_is_published(broker: Any, tmp_path: Path) -> None:
    recorder = Recorder(broker.port)
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        store.append("tank-a", 1, {"v": 1})
        uplink = make_uplink(
            broker,
            store,
            Handler(),
            health_interval=0.1,
            health_extra=lambda: {"tank-a_link_errors": 3, "bad": float("nan")},
        )
        async with running(recorder.run()):
            await asyncio.wait_for(recorder.ready.wait(), 10)
            async with running(uplink.run()):
                await recorder.wait_for(lambda: len(recorder.on(tbmsg.GATEWAY_TELEMETRY)) >= 3)
                health = recorder.on(tbmsg.GATEWAY_TELEMETRY)[-1]
    for key in ("buffer_depth", "forwarded", "evicted", "received", "uptime_s"):
        assert key in health
    assert health["received"] == 1
    # A bad extra value is left out with the extras, never sent.
    assert "bad" not in health


async def test_health_carries_extras_and_the_uptime_of_its_clock(
    broker: Any, tmp_path: Path
) -> None:
    recorder = Recorder(broker.port)
    clock = FakeClock()
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        uplink = make_uplink(
            broker,
            store,
            Handler(),
            health_interval=10,
            health_extra=lambda: {"tank-a_link_errors": 3},
            clock=clock,
        )
        clock.advance(81.2)
        async with running(recorder.run()):
            await asyncio.wait_for(recorder.ready.wait(), 10)
            async with running(uplink.run()):
                await recorder.wait_for(lambda: bool(recorder.on(tbmsg.GATEWAY_TELEMETRY)))
    [health] = recorder.on(tbmsg.GATEWAY_TELEMETRY)
    assert health["tank-a_link_errors"] == 3
    assert health["buffer_depth"] == 0
    assert health["uptime_s"] == 81.2


async def test_devices_added_and_removed_while_connected(broker: Any, tmp_path: Path) -> None:
    recorder = Recorder(broker.port)
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        uplink = make_uplink(broker, store, Handler(), devices=["tank-a"], health_interval=0)
        async with running(recorder.run()):
            await asyncio.wait_for(recorder.ready.wait(), 10)
            async with running(uplink.run()):
                await wait_until(lambda: uplink.connected)
                await uplink.device_added("tank-c")
                await uplink.device_removed("tank-a")
                # A backlog row of a device not in the config is still announced first.
                store.append("old-tank", 5, {"v": 1})
                await recorder.wait_for(lambda: len(recorder.entries()) == 1)
                await uplink.say_goodbye()
    connects = [p["device"] for p in recorder.on(tbmsg.CONNECT)]
    assert connects == ["tank-a", "tank-c", "old-tank"]
    disconnects = [p["device"] for p in recorder.on(tbmsg.DISCONNECT)]
    assert disconnects == ["tank-a", "old-tank", "tank-c"]  # removed, then goodbye (sorted)


async def test_waits_for_a_broker_that_is_not_there_yet(
    broker: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="hydrogate.uplink")
    broker.stop()
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        store.append("tank-a", 1, {"v": 1})
        uplink = make_uplink(broker, store, Handler(), health_interval=0)
        async with running(uplink.run()):
            await asyncio.sleep(1.5)
            assert not uplink.connected
            assert uplink.stats.last_error is not None
            broker.start()
            await wait_until(lambda: store.stats.depth == 0, timeout=5)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # once when it went down, not once per attempt
    assert any("back after" in r.getMessage() for r in caplog.records)
