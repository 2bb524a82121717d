"""Helpers to run the real gateway against simulated nodes in tests."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from gateway.config import load_config, parse_config
from gateway.daemon import Gateway
from sim.node import SimNode


def node_entry(name: str, url: str, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "url": url, "poll_interval": 0.2, "timeout": 0.5}
    entry.update(extra)
    return entry


def config_dict(
    storage: Path,
    nodes: Sequence[dict[str, Any]],
    broker_port: int | None = None,
    **tb: Any,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "gateway": {"name": "gw-test", "health_interval": 1},
        # This machine's kernel clock is not NTP-synchronised: trust it as it is
        # (tests of the clock itself set clock_sync_wait and step the clock).
        "storage": {"path": str(storage), "clock_sync_wait": 0},
        "nodes": list(nodes),
    }
    if broker_port is not None:
        data["thingsboard"] = {
            "host": "127.0.0.1", "port": broker_port, "access_token": "test-token", **tb,
        }
    return data


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def running_gateway(
    config: dict[str, Any] | Path, *, connected: bool = True, serving: bool = False
) -> AsyncIterator[Gateway]:
    """The real Gateway in this event loop; stopped cleanly on exit.

    ``config`` is config data, or a config *file* (which a SIGHUP reload reads
    again). Yielded once ready; with ``serving``, once its local socket serves;
    with ``connected``, once subscribed to the broker, as ThingsBoard would
    queue RPCs.
    """
    if isinstance(config, Path):
        gateway = Gateway(load_config(config), config_path=config)
    else:
        gateway = Gateway(parse_config(config))
    task = asyncio.create_task(gateway.run(), name="gateway-under-test")
    try:
        async with asyncio.timeout(10):
            await gateway.ready.wait()
            if serving:
                assert gateway.local is not None
                await gateway.local.serving.wait()
            while connected and gateway.uplink is not None and not gateway.uplink.connected:
                await asyncio.sleep(0.02)
        yield gateway
    finally:
        gateway.request_stop()
        async with asyncio.timeout(15):
            await task


async def hydrogate(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run the `hydrogate` command without blocking the event loop the gateway runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def sim_nodes(*nodes: SimNode) -> AsyncIterator[tuple[SimNode, ...]]:
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.close()
