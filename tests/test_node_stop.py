"""A node task always stops when cancelled, even if its link fails at that moment."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from drivers.errors import LinkDown
from gateway.clock import SystemClock
from gateway.config import parse_config
from gateway.node import NodeRunner
from gateway.store import Store


async def test_cancel_while_the_link_fails_still_stops_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's TaskGroup turns this cancellation into the child's LinkDown."""
    config = parse_config({
        "gateway": {"name": "gw"}, "storage": {"path": str(tmp_path / "x")},
        "nodes": [{"name": "tank-a", "url": "tcp://127.0.0.1:9", "poll_interval": 1}],
    })
    in_session = asyncio.Event()

    async def session() -> None:
        # What _session's TaskGroup and its `except* LinkError` do under 3.11
        # when the link fails while the task is being cancelled: the
        # cancellation comes out as the child's LinkDown.
        in_session.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise LinkDown("connection closed as the gateway stops") from None

    async with Store.open(tmp_path / "s.sqlite", max_rows=None, max_bytes=None) as store:
        runner = NodeRunner(config.nodes[0], store=store, clock=SystemClock())
        monkeypatch.setattr(runner, "_session", session)
        task = asyncio.create_task(runner.run())
        await in_session.wait()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        if not done:

            async def end() -> None:
                raise RuntimeError("ends the runaway loop")

            monkeypatch.setattr(runner, "_session", end)
            await asyncio.wait({task}, timeout=10)
            raise AssertionError("the node task swallowed its cancellation and kept running")
        assert task.cancelled(), task.exception()
