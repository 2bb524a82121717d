"""A test-side MQTT client standing in for ThingsBoard: records what the gateway sends.

It keeps a persistent session (clean_session=False, QoS 1) so that a broker
restart loses nothing addressed to it, and reconnects by itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from gateway.tasks import cancel_and_wait


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Stop a task that runs an aiomqtt client, bounded; raise what it failed with.

    One cancel is not always enough: cancelled just after the broker came back,
    aiomqtt's exit can wait for a disconnect that never comes, with no time
    limit (4 hangs in 150 broker restarts here; the suite's run in CI hung where
    a test restarts its broker and ends). `cancel_and_wait` cancels again, as
    the daemon does; a task that still will not stop fails the test.
    """
    if not await cancel_and_wait(task):
        raise AssertionError(f"task {task.get_name()} did not stop")
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


@dataclass
class Message:
    topic: str
    payload: Any
    raw: bytes
    at: float
    qos: int
    retain: bool


@dataclass
class Recorder:
    """Subscribes to the Gateway API topics and keeps every message in order."""

    port: int
    topics: tuple[str, ...] = ("v1/gateway/#", "v1/devices/me/#")
    identifier: str = "test-recorder"
    messages: list[Message] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    _client: aiomqtt.Client | None = None
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        self._task = asyncio.create_task(self._run(), name="recorder")
        async with asyncio.timeout(10):
            await self.connected.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await stop_task(self._task)

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier=self.identifier, clean_session=False
                ) as client:
                    self._client = client
                    for topic in self.topics:
                        await client.subscribe(topic, qos=1)
                    self.connected.set()
                    async for msg in client.messages:
                        raw = bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else (
                            str(msg.payload).encode()
                        )
                        try:
                            payload = json.loads(raw)
                        except (ValueError, RecursionError):  # what hostile tests send
                            payload = None
                        self.messages.append(
                            Message(str(msg.topic), payload, raw, time.monotonic(), msg.qos,
                                    bool(msg.retain))
                        )
            except aiomqtt.MqttError:
                self.connected.clear()
                self._client = None
                await asyncio.sleep(0.2)

    async def publish(self, topic: str, payload: Any) -> None:
        """Publish as the server would (e.g. an RPC or an attribute update)."""
        async with asyncio.timeout(10):
            await self.connected.wait()
        assert self._client is not None
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self._client.publish(topic, data, qos=1)

    # ------------------------------------------------------------ views
    def on(self, topic: str) -> list[Message]:
        return [m for m in self.messages if m.topic == topic]

    def entries(self) -> dict[str, list[dict[str, Any]]]:
        """Every telemetry entry per device, in arrival order."""
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for m in self.on("v1/gateway/telemetry"):
            for device, entries in m.payload.items():
                out[device].extend(entries)
        return out

    def seqs(self, device: str) -> Counter[int]:
        """How many times each `seq` value of a device arrived."""
        return Counter(
            int(e["values"]["seq"]) for e in self.entries().get(device, []) if "seq" in e["values"]
        )

    async def wait_for(self, predicate: Any, timeout: float = 20.0, what: str = "") -> None:
        """Wait (bounded) until predicate() is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")

    async def rpc(self, device: str, rpc_id: int, method: str, params: Any = None,
                  timeout: float = 10.0) -> dict[str, Any]:
        """Send a server-side RPC and wait for the gateway's reply data."""
        request: dict[str, Any] = {"device": device, "data": {"id": rpc_id, "method": method}}
        if params is not None:
            request["data"]["params"] = params
        await self.publish("v1/gateway/rpc", request)

        def reply() -> dict[str, Any] | None:
            for m in self.on("v1/gateway/rpc"):
                p = m.payload
                if isinstance(p, dict) and p.get("id") == rpc_id and p.get("device") == device \
                        and "success" in (p.get("data") or {}):
                    return p
            return None

        await self.wait_for(lambda: reply() is not None, timeout, f"RPC {method} reply")
        found = reply()
        assert found is not None
        return found
