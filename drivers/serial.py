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
import difflib
import errno
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, parse_qsl

import serial
import serial_asyncio

from .transport import Streams, register

DEFAULT_BAUD: Final = 115200
#: The baud rates a node URL may name: the usual UART rates (a typo such as 11520 is
#: refused rather than opening a port that only reads garbage).
STANDARD_BAUDS: Final = (
    1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600
)
OPTIONS: Final = ("baud", "dtr", "rts")
_NO_MODEM_LINES: Final = (errno.EINVAL, errno.ENOTTY)


@dataclass(frozen=True, slots=True)
class SerialOptions:
    """The query options of a serial URL: baud rate and the modem lines to hold."""

    baud: int = DEFAULT_BAUD
    dtr: bool = False
    rts: bool = False


def _hint(word: str) -> str:
    close = difflib.get_close_matches(word, OPTIONS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def serial_options(parts: SplitResult) -> SerialOptions:
    """``baud`` (one of :data:`STANDARD_BAUDS`, default 115200), ``dtr`` and ``rts`` (0 or 1,
    default 0); ``ValueError`` saying what is wrong."""
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ValueError(f"malformed query ({exc})") from exc
    values: dict[str, list[str]] = {}
    for key, value in query:
        values.setdefault(key, []).append(value)
    for key in values:
        if key not in OPTIONS:
            raise ValueError(f"unknown serial option {key!r}{_hint(key)}")
    baud = values.get("baud", [str(DEFAULT_BAUD)])
    if len(baud) != 1 or not re.fullmatch("[0-9]{1,7}", baud[0]) or (
        int(baud[0]) not in STANDARD_BAUDS
    ):
        bauds = ", ".join(map(str, STANDARD_BAUDS))
        raise ValueError(f"baud must be one of {bauds}; not {','.join(baud)!r}")
    lines = {}
    for name in ("dtr", "rts"):
        level = values.get(name, ["0"])
        if len(level) != 1 or level[0] not in ("0", "1"):
            raise ValueError(
                f"{name} must be 0 (released, the default) or 1 (asserted); not {','.join(level)!r}"
            )
        lines[name] = level[0] == "1"
    return SerialOptions(int(baud[0]), lines["dtr"], lines["rts"])


def serial_baud(parts: SplitResult) -> int:
    """The ``baud`` query parameter (default 115200); ``ValueError`` if the query is bad."""
    return serial_options(parts).baud


def check_serial_url(parts: SplitResult) -> str:
    """An absolute device path, no host, valid options: ``serial:///dev/X?baud=N`` in full.

    The modem lines appear only when held asserted (``&dtr=1``, ``&rts=1``).
    """
    if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
        raise ValueError("needs an absolute device path: serial:///dev/ttyUSB0 (three slashes)")
    if parts.fragment:
        raise ValueError("takes no fragment: serial:///dev/<device>?baud=N")
    options = serial_options(parts)
    url = f"serial://{parts.path}?baud={options.baud}"
    if options.dtr:
        url += "&dtr=1"
    if options.rts:
        url += "&rts=1"
    return url


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
