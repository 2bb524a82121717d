"""The uplink's retry policy: about once a second for the network, patiently for a refusal."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from drivers.backoff import Backoff
from gateway.config import ThingsBoardConfig
from gateway.reconnect import PATIENT_MAX_S, RETRY_MAX_S, RetryPolicy, patience_reason
from gateway.store import Store
from gateway.uplink import Uplink
from tests.conftest import MOSQUITTO, free_port, wait_port


@pytest.fixture(autouse=True)
async def shutdown_default_executor() -> AsyncIterator[None]:
    """aiomqtt connects in the loop's default executor; stop its thread after each test."""
    yield
    await asyncio.get_running_loop().shutdown_default_executor()


def policy() -> RetryPolicy:
    rng = random.Random(1)
    return RetryPolicy(
        soon=Backoff(initial=0.2, maximum=RETRY_MAX_S, rng=rng),
        patient=Backoff(initial=2.0, maximum=PATIENT_MAX_S, rng=rng),
    )


def wrapped(exc: OSError) -> aiomqtt.MqttError:
    """What aiomqtt raises when the connect call fails: MqttError ``from None``."""
    try:
        try:
            raise exc
        except OSError as inner:
            raise aiomqtt.MqttError(str(inner)) from None
    except aiomqtt.MqttError as outer:
        return outer


def test_network_failures_are_retried_about_once_a_second_forever() -> None:
    p = policy()
    errors: list[BaseException] = [
        wrapped(ConnectionRefusedError(111, "Connection refused")),
        wrapped(ConnectionResetError(104, "reset")),
        wrapped(TimeoutError("timed out")),
        aiomqtt.MqttError("Operation timed out"),
        MqttConnectError(3),  # server unavailable: a retry may fix it
        MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=0x88)),
    ]
    delays = [p.delay(errors[i % len(errors)]) for i in range(5000)]
    assert max(delays) <= RETRY_MAX_S * 1.2
    assert delays[0] <= 0.25  # the first retry comes at once


@pytest.mark.parametrize(
    "error",
    [
        MqttConnectError(4),
        MqttConnectError(5),
        MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=0x86)),
        MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=0x87)),
        wrapped(socket.gaierror(-2, "Name or service not known")),
    ],
)
def test_refusals_and_dns_failures_back_off(error: BaseException) -> None:
    assert patience_reason(error) is not None
    p = policy()
    delays = [p.delay(error) for _ in range(12)]
    assert delays[0] >= 1.5
    assert delays == sorted(delays[:6]) + delays[6:]  # grows first
    assert PATIENT_MAX_S * 0.8 <= delays[-1] <= PATIENT_MAX_S * 1.2
    # Once the network is the problem again, retries are quick at once.
    assert p.delay(wrapped(ConnectionRefusedError(111, "refused"))) <= 0.25


def _uplink(store: Store, port: int, token: str = "tok") -> Uplink:
    class Quiet:
        def on_attributes(self, device: str, data: Any, *, response: bool = False) -> None:
            pass

        async def on_rpc(self, device: str, method: str, params: Any) -> dict[str, Any]:
            return {"success": False}

        def shared_attribute_keys(self, device: str) -> list[str]:
            return []

    config = ThingsBoardConfig(host="127.0.0.1", port=port, access_token=token, keepalive=5)
    return Uplink(config, gateway_name="gw", store=store, handler=Quiet(),
                  devices=lambda: ["tank-a"], health_interval=0)


@pytest.fixture
def closed_broker(tmp_path: Path) -> Iterator[int]:
    """A Mosquitto that refuses every client: no anonymous access, no password file."""
    port = free_port()
    conf = tmp_path / "closed.conf"
    conf.write_text(f"user root\nlistener {port} 127.0.0.1\nallow_anonymous false\n"
                    "log_type error\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def attempts_within(uplink: Uplink, seconds: float) -> int:
    task = asyncio.create_task(uplink.run())
    try:
        await asyncio.sleep(seconds)
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    return uplink.stats.attempts


async def test_a_refusing_port_is_tried_about_every_second_a_bad_token_rarely(
    closed_broker: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="hydrogate.uplink")
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        nothing_there = await attempts_within(_uplink(store, free_port()), 4.0)
        refused_token = _uplink(store, closed_broker, token="bad-token")
        refusals = await attempts_within(refused_token, 4.0)
    assert nothing_there >= 5  # 0.2 + 0.4 + 0.8 + 1 + 1 ... s apart
    assert refusals <= 3  # 2 s, then 4 s apart
    assert refused_token.stats.last_error is not None
    assert "authori" in refused_token.stats.last_error.lower()
    messages = [r.getMessage() for r in caplog.records]
    assert any("refused the connection" in m for m in messages), messages
    assert sum("cannot reach ThingsBoard" in m for m in messages) == 2  # once per cause
