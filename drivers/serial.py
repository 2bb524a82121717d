"""Serial transport: ``serial:///dev/ttyUSB0?baud=115200``, 8N1, no flow control.

pyserial-asyncio drives the port from the event loop's selector on POSIX, so
no thread is involved.
"""

from __future__ import annotations

from typing import Final, cast
from urllib.parse import SplitResult, parse_qsl

import serial_asyncio

from .transport import Streams, register

DEFAULT_BAUD: Final = 115200


def serial_baud(parts: SplitResult) -> int:
    """The ``baud`` query parameter (default 115200); ``ValueError`` if malformed."""
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ValueError(f"malformed query ({exc})") from exc
    unknown = sorted({key for key, _ in query} - {"baud"})
    if unknown:
        raise ValueError(f"unknown serial option(s) {', '.join(unknown)}")
    if not query:
        return DEFAULT_BAUD
    text = query[-1][1]
    if len(query) > 1 or not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise ValueError("baud must be one positive integer, e.g. ?baud=115200")
    return int(text)


def check_serial_url(parts: SplitResult) -> None:
    """An absolute device path, no host, and at most a valid ``baud``."""
    if parts.netloc or not parts.path.startswith("/"):
        raise ValueError("serial URL needs a device path, e.g. serial:///dev/ttyUSB0")
    if parts.fragment:
        raise ValueError("serial URL takes no fragment")
    serial_baud(parts)


@register("serial", check=check_serial_url)
async def open_serial(parts: SplitResult) -> Streams:
    """Open the port 8N1 without flow control and drop bytes left from a previous session."""
    streams = await serial_asyncio.open_serial_connection(
        url=parts.path,
        baudrate=serial_baud(parts),
        bytesize=8,
        parity="N",
        stopbits=1,
        xonxoff=False,
        rtscts=False,
        dsrdtr=False,
    )
    reader, writer = cast(Streams, streams)
    port = getattr(writer.transport, "serial", None)  # pyserial-asyncio's SerialTransport
    if port is not None:
        port.reset_input_buffer()
    return reader, writer
