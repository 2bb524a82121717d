"""Opening a serial port must not reset an ESP32 dev board (DTR/RTS), tested on a real pty.

A pty has no modem lines (TIOCMGET/TIOCMBIS fail with ENOTTY), so the lines
cannot be read back, and pyserial stops setting them at the first refusal.
What is checked, on the real pty and with the real pyserial, is the sequence
of DTR/RTS changes the gateway asks the kernel for: every TIOCMBIS/TIOCMBIC
ioctl is recorded and answered as a USB adapter's driver would (accepted);
every other ioctl goes to the pty.
Starting from what Linux does on open (both asserted), the lines must reach
the target and never pass through "RTS asserted, DTR released" -- the state
in which the usual two-transistor circuit pulls EN low and resets the chip.
"""

from __future__ import annotations

import asyncio
import os
import termios
import tty
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import serial.serialposix

from drivers.serial import SerialOptions, open_port, serial_options
from drivers.transport import open_transport
from gateway.config import node_url

Lines = tuple[int, int]  # (dtr, rts)


@pytest.fixture
def pty() -> Iterator[tuple[int, str]]:
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


@pytest.fixture
def modem_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every DTR/RTS change pyserial asks for, in order: ("set"|"clear", TIOCM bits)."""
    calls: list[tuple[str, int]] = []
    real = serial.serialposix.fcntl.ioctl

    def ioctl(fd: int, request: int, arg: Any = 0, *rest: Any) -> Any:
        if request in (termios.TIOCMBIS, termios.TIOCMBIC):
            bits = int.from_bytes(arg, "little") if isinstance(arg, bytes) else int(arg)
            calls.append(("set" if request == termios.TIOCMBIS else "clear", bits))
            return arg
        return real(fd, request, arg, *rest)

    monkeypatch.setattr(serial.serialposix.fcntl, "ioctl", ioctl)
    return calls


def replay(calls: list[tuple[str, int]]) -> list[Lines]:
    """The line states, starting from Linux's open (both asserted)."""
    dtr, rts = 1, 1
    states = [(dtr, rts)]
    for action, bits in calls:
        level = 1 if action == "set" else 0
        if bits & termios.TIOCM_DTR:
            dtr = level
        if bits & termios.TIOCM_RTS:
            rts = level
        states.append((dtr, rts))
    return states


RESET: Lines = (0, 1)  # RTS asserted, DTR released: EN pulled low


@pytest.mark.parametrize(
    ("query", "target"),
    [("", (0, 0)), ("?dtr=1&rts=1", (1, 1)), ("?dtr=1", (1, 0)), ("?rts=0&dtr=0", (0, 0))],
)
def test_opening_never_passes_through_the_reset_state(
    pty: tuple[int, str], modem_calls: list[tuple[str, int]], query: str, target: Lines
) -> None:
    master, path = pty
    port = open_port(path, serial_options(urlsplit(f"serial://{path}{query}")))
    try:
        states = replay(modem_calls)
        assert states[-1] == target, states
        assert RESET not in states, states
        assert modem_calls, "pyserial set the lines explicitly"
        assert (port.dtr, port.rts) == tuple(map(bool, target))
        os.write(master, b"ping\n")  # the port works after the lines were set
        for _ in range(100):
            if port.in_waiting:
                break
            import time

            time.sleep(0.01)
        assert port.read(5) == b"ping\n"
    finally:
        port.close()


def test_plain_pyserial_would_pass_through_the_reset_state(
    pty: tuple[int, str], modem_calls: list[tuple[str, int]]
) -> None:
    """Why the order matters: DTR then RTS released, as pyserial does by itself."""
    _, path = pty
    port = serial.Serial()
    port.port = path
    port.dtr = False
    port.rts = False
    port.open()
    port.close()
    assert RESET in replay(modem_calls)


async def test_the_gateway_transport_opens_a_pty_without_the_reset_state(
    pty: tuple[int, str], modem_calls: list[tuple[str, int]]
) -> None:
    master, path = pty
    reader, writer = await open_transport(f"serial://{path}?baud=115200")
    try:
        assert RESET not in replay(modem_calls) and replay(modem_calls)[-1] == (0, 0)
        os.write(master, b"hello\n")
        async with asyncio.timeout(5):
            assert await reader.readline() == b"hello\n"
    finally:
        writer.close()


def test_serial_options_and_their_errors() -> None:
    def opts(q: str) -> SerialOptions:
        return serial_options(urlsplit("serial:///dev/ttyUSB0" + q))

    assert opts("") == SerialOptions(115200, False, False)
    assert opts("?baud=9600&dtr=1") == SerialOptions(9600, True, False)
    for bad, message in [("?dtr=yes", "dtr must be 0"), ("?rts=1&rts=0", "rts must be 0"),
                         ("?dts=1", "unknown serial option")]:
        with pytest.raises(ValueError, match=message):
            opts(bad)


def test_config_normalises_the_line_options() -> None:
    assert node_url("serial:///dev/ttyUSB0") == "serial:///dev/ttyUSB0?baud=115200"
    assert node_url("serial:///dev/ttyUSB0?rts=1&dtr=0") == "serial:///dev/ttyUSB0?baud=115200&rts=1"
    with pytest.raises(Exception, match="dtr must be 0"):
        node_url("serial:///dev/ttyUSB0?dtr=2")
