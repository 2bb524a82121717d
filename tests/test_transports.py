"""Transports: URL validation, the registry, TCP options, serial over a real pty; Backoff."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import tty
from collections.abc import AsyncIterator
from typing import Any, TypedDict
from urllib.parse import SplitResult

import pytest
from test_link import ok, parse_request

from drivers.backoff import Backoff
from drivers.errors import LinkDown, TransportError
from drivers.link import LinkStats, open_link
from drivers.nodelink import LineSplitter, encode
from drivers.transport import Streams, TransportRegistry, open_transport, parse_url

# --- URL validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "where"),
    [
        ("tcp://192.168.1.50:3333", "tcp", "192.168.1.50"),
        ("tcp://node-a.local", "tcp", "node-a.local"),
        ("tcp://[::1]:4000/", "tcp", "::1"),
        ("serial:///dev/ttyUSB0?baud=115200", "serial", "/dev/ttyUSB0"),
        ("serial:///dev/ttyAMA0", "serial", "/dev/ttyAMA0"),
        ("serial:///dev/serial/by-id/usb-Espressif-if00?baud=921600", "serial", None),
    ],
)
def test_parse_url_accepts(url: str, scheme: str, where: str | None) -> None:
    parts = parse_url(url)
    assert parts.scheme == scheme
    if where is not None:
        assert where in (parts.hostname, parts.path)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("udp://10.0.0.1:3333", "unknown transport scheme (known: serial://, tcp://)"),
        ("/dev/ttyUSB0", "unknown transport scheme"),
        ("tcp://:3333", "needs a host"),
        ("tcp://", "needs a host"),
        ("tcp://host:notaport", "bad port"),
        ("tcp://host:70000", "bad port"),
        ("tcp://host:0", "port must be between 1 and 65535, not 0"),
        ("tcp://host:3333/path", "tcp://host:port with nothing else"),
        ("tcp://host:3333?baud=9600", "tcp://host:port with nothing else"),
        ("tcp://user@host", "tcp://host:port with nothing else"),
        ("serial://dev/ttyUSB0", "needs an absolute device path"),
        ("serial:dev/ttyUSB0", "needs an absolute device path"),
        ("serial:///dev/ttyUSB0?baud=fast", "baud must be one of 1200, "),
        ("serial:///dev/ttyUSB0?baud=0", "not '0'"),
        ("serial:///dev/ttyUSB0?baud=-9600", "not '-9600'"),
        ("serial:///dev/ttyUSB0?baud=74880", "; not '74880'"),
        ("serial:///dev/ttyUSB0?baud=9600&baud=115200", "not '9600,115200'"),
        ("serial:///dev/ttyUSB0?baud", "malformed query"),
        ("serial:///dev/ttyUSB0?parity=E", "unknown serial option 'parity'"),
        ("serial:///dev/ttyUSB0#x", "no fragment"),
    ],
)
def test_parse_url_refuses_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(TransportError) as info:
        parse_url(url)
    assert message in str(info.value)
    assert repr(url) in str(info.value)


# --- the registry ---------------------------------------------------------------------------


async def test_registry_direct_and_decorator_forms() -> None:
    registry = TransportRegistry()
    opened: list[SplitResult] = []

    async def via_socketpair(parts: SplitResult) -> Streams:
        opened.append(parts)
        ours, theirs = socket.socketpair()
        theirs.close()
        return await asyncio.open_connection(sock=ours)

    assert registry.register("pair", via_socketpair) is via_socketpair

    @registry.register("REFUSE", check=lambda parts: parts.geturl())
    async def refuse(parts: SplitResult) -> Streams:
        raise ConnectionRefusedError(111, "refused")

    assert registry.schemes() == ["pair", "refuse"]
    reader, writer = await registry.open("pair://x")
    assert opened[0].netloc == "x" and await reader.read(10) == b""  # the other end closed
    writer.close()
    await writer.wait_closed()
    with pytest.raises(TransportError, match="refused") as info:
        await registry.open("refuse://x")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("pair", refuse)
    registry.register("pair", via_socketpair)  # the same opener again is harmless
    with pytest.raises(TransportError, match="unknown transport scheme"):
        await registry.open("tcp://127.0.0.1:1")  # a separate registry knows only its own


# --- TCP -------------------------------------------------------------------------------------


async def test_tcp_opener_disables_nagle() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await open_transport(f"tcp://127.0.0.1:{port}")
        sock = writer.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        writer.write(b"echo\n")
        assert await reader.readline() == b"echo\n"
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


async def test_tcp_connection_refused_is_a_transport_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connecting is refused
        with pytest.raises(TransportError, match="cannot open"):
            await open_transport(f"tcp://127.0.0.1:{port}")


# --- serial over a real pseudo-terminal ---------------------------------------------------------


class PtyNode:
    """A fake node on the master side of a pty; the gateway opens the slave as its serial port."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.requests: list[dict[str, Any]] = []
        self._splitter = LineSplitter()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.master, self._readable)
        self._open = True

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except BlockingIOError:
            return
        for line in self._splitter.feed(data):
            request = parse_request(line)
            self.requests.append(request)
            os.write(self.master, encode(ok(request)))

    def send(self, message: dict[str, Any]) -> None:
        os.write(self.master, encode(message))

    def unplug(self) -> None:
        """Close the master side, as if the USB adapter were pulled."""
        if self._open:
            self._open = False
            self._loop.remove_reader(self.master)
            os.close(self.master)

    def close(self) -> None:
        self.unplug()
        os.close(self.slave)


@pytest.fixture
async def pty_node() -> AsyncIterator[PtyNode]:
    node = PtyNode()
    try:
        yield node
    finally:
        node.close()


async def test_serial_opener_is_8n1_without_flow_control(pty_node: PtyNode) -> None:
    reader, writer = await open_transport(f"serial://{pty_node.path}?baud=57600")
    try:
        port = writer.transport.serial  # type: ignore[attr-defined]
        assert port.baudrate == 57600
        assert (port.bytesize, port.parity, port.stopbits) == (8, "N", 1)
        assert not (port.xonxoff or port.rtscts or port.dsrdtr)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_link_over_a_pty(pty_node: PtyNode) -> None:
    stats = LinkStats()
    events: list[str] = []
    url = f"serial://{pty_node.path}?baud=115200"
    async with open_link(url, stats=stats, on_event=lambda e: events.append(e.event)) as link:
        hello = await link.request("hello")
        assert hello.body["node"] == "tank-a"
        pty_node.send({"event": "boot", "node": "tank-a", "fw": "1.0"})
        read = await link.request("read")
        assert read.body["values"]["ph"] == 6.1
        await link.request("actuate", actuator="ph_up", duty=127, ms=2500)
    assert [r["op"] for r in pty_node.requests] == ["hello", "read", "actuate"]
    assert events == ["boot"]
    assert stats.total_errors() == 0 and stats["frames_in"] == 4


async def test_unplugged_serial_port_takes_the_link_down(pty_node: PtyNode) -> None:
    stats = LinkStats()
    async with open_link(f"serial://{pty_node.path}", stats=stats, timeout=5) as link:
        assert (await link.request("ping")).ok
        pty_node.unplug()
        await asyncio.wait_for(link.wait_down(), 2)
        with pytest.raises(LinkDown):
            await link.request("read")
        # At once: the link is known down, nothing waits for the 5 s timeout.
        assert (stats["timeout"], stats["retry"]) == (0, 0)
    assert stats["link_down"] == 1


async def test_missing_serial_device_is_a_transport_error(tmp_path: Any) -> None:
    with pytest.raises(TransportError, match="cannot open"):
        await open_transport(f"serial://{tmp_path}/ttyNONE")


# --- Backoff ----------------------------------------------------------------------------------


def test_backoff_grows_caps_and_resets_without_jitter() -> None:
    b = Backoff(initial=0.5, maximum=5.0, factor=2.0, jitter=0.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    b.reset()
    assert b.next() == 0.5


def test_backoff_jitter_is_seeded_and_bounded() -> None:
    a = Backoff(jitter=0.2, rng=random.Random(42))
    b = Backoff(jitter=0.2, rng=random.Random(42))
    delays = [a.next() for _ in range(20)]
    assert delays == [b.next() for _ in range(20)]
    bases = [min(0.5 * 2.0**n, 30.0) for n in range(20)]
    assert all(0.8 * base <= d <= 1.2 * base for d, base in zip(delays, bases, strict=True))
    assert len({round(d / base, 6) for d, base in zip(delays, bases, strict=True)}) > 10
    assert len(set(delays[-5:])) == 5  # jitter applies at the cap too


class BackoffArgs(TypedDict, total=False):
    """Keyword arguments of `Backoff` (the numeric ones)."""

    initial: float
    maximum: float
    factor: float
    jitter: float


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0},
        {"initial": 5, "maximum": 1},
        {"factor": 0.5},
        {"jitter": 1.0},
        {"jitter": -0.1},
    ],
)
def test_backoff_refuses_nonsense(kwargs: BackoffArgs) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)
