"""Serial transport: ``serial:///dev/ttyUSB0?baud=115200[&dtr=0&rts=0]``, 8N1, no flow control.

pyserial-asyncio drives the port from the event loop's selector on POSIX, so
no thread is involved.

Opening a USB serial port must not reset the node. On most ESP32 dev boards
the adapter's RTS line drives EN (reset) and DTR drives IO0 (boot mode)
through two transistors: the chip resets while RTS is asserted and DTR is
not. Linux asserts both as it opens the port (no reset), and pyserial would
then set DTR before RTS, passing through exactly that state. So the port is
built unopened with DTR asserted and RTS at its target, opened, and only then
is DTR set to its target: the lines go (1,1) -> (1,rts) -> (dtr,rts) and never
through DTR released with RTS asserted. The default target, DTR and RTS both
released (``dtr=0&rts=0``: EN high, IO0 high), is the running state of such a
board; ``dtr=1``/``rts=1`` are for adapters wired otherwise. A port without
modem lines (a pty, some adapters) refuses the ioctl, which is ignored.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, parse_qsl

import serial
import serial_asyncio

from .transport import Streams, register

DEFAULT_BAUD: Final = 115200
OPTIONS: Final = ("baud", "dtr", "rts")
_NO_MODEM_LINES: Final = (errno.EINVAL, errno.ENOTTY)


@dataclass(frozen=True, slots=True)
class SerialOptions:
    """The query options of a serial URL: baud rate and the modem lines to hold."""

    baud: int = DEFAULT_BAUD
    dtr: bool = False
    rts: bool = False


def serial_options(parts: SplitResult) -> SerialOptions:
    """``baud`` (default 115200), ``dtr`` and ``rts`` (0 or 1, default 0); ``ValueError`` if bad."""
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ValueError(f"malformed query ({exc})") from exc
    unknown = sorted({key for key, _ in query} - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown serial option(s) {', '.join(unknown)}")
    values: dict[str, str] = {}
    twice: set[str] = set()
    for key, value in query:
        if key in values:
            twice.add(key)
        values[key] = value
    text = values.get("baud", str(DEFAULT_BAUD))
    if "baud" in twice or not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise ValueError("baud must be one positive integer, e.g. ?baud=115200")
    lines = {}
    for name in ("dtr", "rts"):
        level = values.get(name, "0")
        if name in twice or level not in ("0", "1"):
            raise ValueError(f"{name} must be 0 (released) or 1 (asserted), not {level!r}")
        lines[name] = level == "1"
    return SerialOptions(int(text), lines["dtr"], lines["rts"])


def serial_baud(parts: SplitResult) -> int:
    """The ``baud`` query parameter (default 115200); ``ValueError`` if the query is bad."""
    return serial_options(parts).baud


def check_serial_url(parts: SplitResult) -> None:
    """An absolute device path, no host, and valid ``baud``/``dtr``/``rts`` options."""
    if parts.netloc or not parts.path.startswith("/"):
        raise ValueError("serial URL needs a device path, e.g. serial:///dev/ttyUSB0")
    if parts.fragment:
        raise ValueError("serial URL takes no fragment")
    serial_options(parts)


def open_port(path: str, options: SerialOptions) -> serial.Serial:
    """Open ``path`` 8N1 without flow control, moving DTR/RTS without a reset pulse."""
    port = serial.Serial()
    port.port = path
    port.baudrate = options.baud
    port.bytesize = serial.EIGHTBITS
    port.parity = serial.PARITY_NONE
    port.stopbits = serial.STOPBITS_ONE
    port.xonxoff = port.rtscts = port.dsrdtr = False
    port.timeout = 0
    port.dtr = True  # applied first by open(): DTR stays as Linux raised it
    port.rts = options.rts  # then RTS goes to its target while DTR is still asserted
    port.open()
    try:
        port.dtr = options.dtr
    except OSError as exc:
        if exc.errno not in _NO_MODEM_LINES:
            port.close()
            raise
    port.reset_input_buffer()  # drop bytes left from a previous session
    return port


@register("serial", check=check_serial_url)
async def open_serial(parts: SplitResult) -> Streams:
    """Open the port (see the module doc for DTR/RTS) and wrap it in asyncio streams."""
    loop = asyncio.get_running_loop()
    port = open_port(parts.path, serial_options(parts))
    reader = asyncio.StreamReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await serial_asyncio.connection_for_serial(loop, lambda: protocol, port)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer
