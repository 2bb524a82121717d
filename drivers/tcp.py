"""TCP transport: ``tcp://host[:port]`` (default port 3333); the node listens."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import Final
from urllib.parse import SplitResult

from .transport import Streams, register

DEFAULT_PORT: Final = 3333


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def check_host(host: str) -> str:
    """A DNS name or an IP address (no scheme, no port); an address in its canonical form.

    Raises ``ValueError`` saying what is wrong. The config's host names
    (``thingsboard.host``) are checked by this too.
    """
    if "://" in host:
        raise ValueError(f"must be a host name, not a URL: {host!r}")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is not None:
        return str(address)
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"must be a host name or IP address, not {host!r}")
    return host


def check_tcp_url(parts: SplitResult) -> str:
    """A host, an optional port in 1..65535, and nothing else: ``tcp://host:port`` in full."""
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"has a bad port: {exc}") from exc
    if port is None and parts.netloc.endswith(":"):
        raise ValueError("has an empty port")
    if not parts.hostname:
        raise ValueError("needs a host: tcp://host:port")
    if parts.username is not None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be tcp://host:port with nothing else")
    port = DEFAULT_PORT if port is None else port
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, not {port}")
    host = check_host(parts.hostname)
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


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
