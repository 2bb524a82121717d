"""TCP transport: ``tcp://host[:port]`` (default port 3333); the node listens."""

from __future__ import annotations

import asyncio
import socket
from typing import Final
from urllib.parse import SplitResult

from .transport import Streams, register

DEFAULT_PORT: Final = 3333


def check_tcp_url(parts: SplitResult) -> None:
    """A host, an optional port in 1..65535, and nothing else."""
    if not parts.hostname:
        raise ValueError("TCP URL needs a host, e.g. tcp://192.168.1.50:3333")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port ({exc})") from exc
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("port must be in 1..65535")
    if parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("TCP URL takes only host and port")


@register("tcp", check=check_tcp_url)
async def open_tcp(parts: SplitResult) -> Streams:
    """Connect to the node with Nagle off: frames are small and latency matters."""
    host = parts.hostname
    assert host is not None  # guaranteed by check_tcp_url
    reader, writer = await asyncio.open_connection(host, parts.port or DEFAULT_PORT)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer
