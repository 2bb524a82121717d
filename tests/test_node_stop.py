"""The daemon stops a node task even when a cancellation is swallowed by a link error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from drivers.errors import LinkDown
from gateway.clock import SystemClock
from gateway.config import parse_config
from gateway.node import NodeRunner
from gateway.store import Store
from gateway.tasks import cancel_and_wait


async def test_a_node_task_stops_even_if_its_link_fails_as_it_is_cancelled(
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
        stopped = await cancel_and_wait(task, attempts=5, each=2.0)
        if not stopped:

            async def end() -> None:
                raise RuntimeError("ends the runaway loop")

            monkeypatch.setattr(runner, "_session", end)
            await asyncio.wait({task}, timeout=10)
            raise AssertionError("the node task swallowed every cancellation and kept running")
        assert task.cancelled(), task.exception()
