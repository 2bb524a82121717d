"""Test helpers for the daemon's local socket: raw requests over a real Unix socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


async def exchange(path: Path, *lines: bytes, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Send raw request lines on one connection; the reply lines, parsed, until it closes
    or one reply per line has come."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    replies: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            for line in lines:
                writer.write(line)
                await writer.drain()
                reply = await reader.readline()
                if not reply:
                    break
                replies.append(json.loads(reply))
    finally:
        writer.close()
    return replies


async def call(
    path: Path, method: str, params: Any = None, *, device: str | None = None
) -> dict[str, Any]:
    """One request, one reply."""
    request: dict[str, Any] = {"method": method}
    if device is not None:
        request["device"] = device
    if params is not None:
        request["params"] = params
    (reply,) = await exchange(path, json.dumps(request).encode() + b"\n")
    return reply


async def until(
    check: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition"
) -> Any:
    """Poll ``check`` (sync) until it is truthy; its value."""
    async with asyncio.timeout(timeout):
        while True:
            value = check()
            if value:
                return value
            await asyncio.sleep(0.05)
    raise AssertionError(what)  # pragma: no cover - the timeout raises first


async def titration_end(
    path: Path, device: str, *, timeout: float = 120.0
) -> dict[str, Any]:
    """Poll get_state through the socket until the titration is done, failed or cancelled."""
    async with asyncio.timeout(timeout):
        while True:
            state = await call(path, "get_state", device=device)
            status = state.get("titration") or {}
            if status.get("state") in ("done", "failed", "cancelled"):
                return dict(status)
            await asyncio.sleep(0.2)
