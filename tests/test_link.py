"""drivers.link over real loopback sockets, against a tiny fake node that can misbehave."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from drivers.errors import LinkDown, NodeRefused, RequestTimeout, TransportError
from drivers.link import COUNTERS, LinkStats, open_link
from drivers.nodelink import ID_MAX, Event, FrameError, LineSplitter, crc16, encode
from tests.conftest import FakeClock

HELLO = {"node": "tank-a", "fw": "1.0", "proto": 1, "sensors": ["ph"], "actuators": ["ph_up"]}
FIELDS: dict[str, dict[str, Any]] = {
    "hello": HELLO,
    "read": {"uptime_ms": 1234, "values": {"ph": 6.1, "tds_v": 1.1}},
    "state": {"actuators": {"ph_up": 0}},
}

Behaviour = Callable[["FakeNode", dict[str, Any]], Awaitable[None]]


def parse_request(line: bytes) -> dict[str, Any]:
    """What a node does with a gateway line: check the CRC, parse the JSON."""
    body, star, crc = line.rpartition(b"*")
    assert star and crc == b"%04X" % crc16(body), line
    request: dict[str, Any] = json.loads(body)
    return request


def ok(request: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ok reply a well-behaved node gives to ``request``."""
    return {"id": request["id"], "ok": True, **FIELDS.get(request["op"], {}), **extra}


async def answer(node: FakeNode, request: dict[str, Any]) -> None:
    await node.send(ok(request))


class FakeNode:
    """A NodeLink node on 127.0.0.1: answers every request unless told otherwise."""

    def __init__(self, behaviour: Behaviour = answer) -> None:
        self.behaviour = behaviour
        self.requests: list[dict[str, Any]] = []
        self.connected = asyncio.Event()
        self.got_request = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    @property
    def ops(self) -> list[str]:
        return [r["op"] for r in self.requests]

    async def __aenter__(self) -> FakeNode:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"tcp://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()  # the handler then reads EOF and returns
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writer = writer
        self._writers.append(writer)
        self.connected.set()
        splitter = LineSplitter()
        try:
            while data := await reader.read(4096):
                for line in splitter.feed(data):
                    request = parse_request(line)
                    self.requests.append(request)
                    self.got_request.set()
                    await self.behaviour(self, request)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def send_raw(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def send(self, *messages: dict[str, Any]) -> None:
        await self.send_raw(b"".join(encode(m) for m in messages))

    async def hang_up(self) -> None:
        assert self._writer is not None
        self._writer.close()


@pytest.fixture
async def node() -> AsyncIterator[FakeNode]:
    async with FakeNode() as n:
        yield n


def raw_frame(body: bytes) -> bytes:
    return body + b"*%04X\n" % crc16(body)


# --- request / reply -------------------------------------------------------------------


async def test_request_reply_for_every_op(node: FakeNode) -> None:
    stats = LinkStats()
    async with open_link(node.url, stats=stats) as link:
        hello = await link.request("hello")
        assert hello.ok and hello.body["node"] == "tank-a"
        read = await link.request("read")
        assert read.body["values"] == {"ph": 6.1, "tds_v": 1.1}
        state = await link.request("state")
        assert state.body["actuators"] == {"ph_up": 0}
        await link.request("actuate", actuator="ph_up", duty=204, ms=1000)
        await link.request("stop")
        await link.request("ping")
        assert link.last_rx is not None and link.last_rx <= time.monotonic()
    assert node.ops == ["hello", "read", "state", "actuate", "stop", "ping"]
    assert [r["id"] for r in node.requests] == [1, 2, 3, 4, 5, 6]
    assert node.requests[3] == {
        "id": 4,
        "op": "actuate",
        "actuator": "ph_up",
        "duty": 204,
        "ms": 1000,
    }
    assert stats["frames_out"] == 6 and stats["frames_in"] == 6
    assert stats.total_errors() == 0
    assert not link.is_up
    with pytest.raises(LinkDown):
        await link.request("ping")  # a link used after its context ended
    assert stats["link_down"] == 0  # closing our own link is not a fault


async def test_ids_wrap_within_1_to_2_pow_31_minus_1(node: FakeNode) -> None:
    async with open_link(node.url, stats=LinkStats(), first_id=ID_MAX - 1) as link:
        for _ in range(3):
            await link.request("ping")
    assert [r["id"] for r in node.requests] == [ID_MAX - 1, ID_MAX, 1]


async def test_ok_false_raises_node_refused_with_the_node_text() -> None:
    async def refuse_actuate(node: FakeNode, request: dict[str, Any]) -> None:
        if request["op"] == "actuate":
            await node.send({"id": request["id"], "ok": False, "error": "no such actuator"})
        else:
            await answer(node, request)

    async with FakeNode(refuse_actuate) as node, open_link(node.url, stats=LinkStats()) as link:
        with pytest.raises(NodeRefused) as info:
            await link.request("actuate", actuator="pump9", duty=1, ms=1)
        assert info.value.error == "no such actuator"
        assert (await link.request("read")).ok


async def test_request_refuses_reserved_fields_and_oversized_frames(node: FakeNode) -> None:
    async with open_link(node.url, stats=LinkStats()) as link:
        with pytest.raises(ValueError):
            await link.request("read", id=5)
        with pytest.raises(FrameError):
            await link.request("actuate", actuator="x" * 2000, duty=1, ms=1)
        assert (await link.request("ping")).ok


# --- timeouts, retries, late and unknown replies -------------------------------------------


async def test_timeouts_are_retried_except_actuate() -> None:
    async def mute(node: FakeNode, request: dict[str, Any]) -> None:
        if request["op"] not in ("read", "actuate"):
            await answer(node, request)

    stats = LinkStats()
    async with (
        FakeNode(mute) as node,
        open_link(node.url, stats=stats, timeout=0.1, retries=2) as link,
    ):
        with pytest.raises(RequestTimeout) as info:
            await link.request("read")
        assert info.value.attempts == 3
        assert stats["timeout"] == 3 and stats["retry"] == 2
        with pytest.raises(RequestTimeout):
            await link.request("actuate", actuator="ph_up", duty=255, ms=500)
        assert stats["timeout"] == 4 and stats["retry"] == 2
        assert (await link.request("state")).ok  # the link is still fine
    assert node.ops == ["read", "read", "read", "actuate", "state"]
    assert node.ops.count("actuate") == 1
    assert len({r["id"] for r in node.requests}) == 5  # each attempt has its own id


async def test_late_reply_is_dropped_and_counted() -> None:
    held: list[dict[str, Any]] = []

    async def late_first(node: FakeNode, request: dict[str, Any]) -> None:
        if not held:
            held.append(request)  # answer only once the retry has arrived
            return
        await node.send(ok(held[0], uptime_ms=1), ok(request, uptime_ms=2))

    stats = LinkStats()
    async with FakeNode(late_first) as node, open_link(node.url, stats=stats, timeout=0.2) as link:
        reply = await link.request("read")
        assert reply.id == 2 and reply.body["uptime_ms"] == 2
    assert stats["timeout"] == 1 and stats["retry"] == 1 and stats["late_reply"] == 1
    assert stats["unknown_id"] == 0


async def test_unknown_id_is_dropped_and_counted() -> None:
    async def stray_first(node: FakeNode, request: dict[str, Any]) -> None:
        await node.send({"id": 999, "ok": True}, ok(request))

    stats = LinkStats()
    async with FakeNode(stray_first) as node, open_link(node.url, stats=stats) as link:
        assert (await link.request("read")).id == 1
    assert stats["unknown_id"] == 1 and stats["late_reply"] == 0


async def test_reply_cancelled_by_the_caller_arrives_late() -> None:
    release = asyncio.Event()

    async def slow(node: FakeNode, request: dict[str, Any]) -> None:
        if request["op"] == "read":
            await release.wait()
        await answer(node, request)

    stats = LinkStats()
    async with FakeNode(slow) as node, open_link(node.url, stats=stats, timeout=5) as link:
        pending = asyncio.create_task(link.request("read"))
        await node.got_request.wait()
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        release.set()
        assert (await link.request("ping")).id == 2
    assert stats["late_reply"] == 1


# --- bad frames are counted and never hurt the next request -----------------------------------

JUNK: list[tuple[bytes, str]] = [
    (b'{"id":1,"ok":true}*0000\n', "crc"),
    (b"\x00\xff\xfe random garbage \x07\n", "crc"),
    (raw_frame(b'{"id":1,"ok":true,"x":"\xff"}'), "encoding"),
    (raw_frame(b"{not json"), "json"),
    (raw_frame(b"[1,2,3]"), "not_object"),
    (raw_frame(b'{"id":"1","ok":true}'), "field"),
    (b"x" * 2000 + b"\n", "too_long"),
]


@pytest.mark.parametrize(("junk", "reason"), JUNK)
async def test_bad_frame_is_counted_and_the_next_request_succeeds(junk: bytes, reason: str) -> None:
    async def junk_first(node: FakeNode, request: dict[str, Any]) -> None:
        await node.send_raw(junk)
        await answer(node, request)

    stats = LinkStats()
    async with FakeNode(junk_first) as node, open_link(node.url, stats=stats) as link:
        assert (await link.request("read")).ok
        assert (await link.request("read")).ok
    assert stats[reason] == 2
    assert stats.total_errors() == 2


async def test_overlong_line_split_over_many_writes() -> None:
    async def dribble(node: FakeNode, request: dict[str, Any]) -> None:
        for _ in range(10):
            await node.send_raw(b"y" * 700)
        await node.send_raw(b"tail\n" + encode(ok(request)))

    stats = LinkStats()
    async with FakeNode(dribble) as node, open_link(node.url, stats=stats) as link:
        assert (await link.request("read")).ok
    assert stats["too_long"] == 1 and stats.total_errors() == 1


async def test_reply_failing_its_op_check_is_treated_as_no_reply() -> None:
    async def bad_then_good(node: FakeNode, request: dict[str, Any]) -> None:
        await node.send({"id": request["id"], "ok": True, "uptime_ms": 5})  # no values
        if request["id"] > 1:
            await node.send(ok(request))

    stats = LinkStats()
    async with (
        FakeNode(bad_then_good) as node,
        open_link(node.url, stats=stats, timeout=0.2, retries=0) as link,
    ):
        with pytest.raises(RequestTimeout):
            await link.request("read")
        assert (await link.request("read")).body["values"]["ph"] == 6.1
    assert stats["field"] == 2 and stats["timeout"] == 1


# --- events --------------------------------------------------------------------------------


async def test_events_are_delivered_in_order_between_replies() -> None:
    def report(n: int) -> dict[str, Any]:
        return {"event": "report", "uptime_ms": n, "values": {"ph": 6.0 + n / 10}}

    async def chatty(node: FakeNode, request: dict[str, Any]) -> None:
        await node.send(report(1), ok(request), report(2))

    events: list[Event] = []
    async with (
        FakeNode(chatty) as node,
        open_link(node.url, stats=LinkStats(), on_event=events.append) as link,
    ):
        await node.connected.wait()
        await node.send({"event": "boot", "node": "tank-a", "fw": "1.2.0"})
        await link.request("read")
        await link.request("ping")
    kinds = [(e.event, e.body.get("uptime_ms")) for e in events]
    assert kinds == [("boot", None), ("report", 1), ("report", 2), ("report", 1), ("report", 2)]


async def test_callback_errors_are_logged_once_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("bug in the node task")

    async def chatty(node: FakeNode, request: dict[str, Any]) -> None:
        await node.send({"event": "actuator", "actuator": "ph_up", "on": 1}, ok(request))

    stats = LinkStats()
    with caplog.at_level(logging.ERROR, logger="drivers.link"):
        async with (
            FakeNode(chatty) as node,
            open_link(node.url, stats=stats, on_event=broken) as link,
        ):
            for _ in range(3):
                assert (await link.request("ping")).ok
    assert stats["callback_error"] == 3
    records = [r for r in caplog.records if r.name == "drivers.link"]
    assert len(records) == 1 and node.url in records[0].getMessage()


# --- link down ------------------------------------------------------------------------------


async def test_link_down_fails_the_pending_request_at_once() -> None:
    async def hang_up_on_read(node: FakeNode, request: dict[str, Any]) -> None:
        if request["op"] == "read":
            await node.hang_up()
        else:
            await answer(node, request)

    stats = LinkStats()
    async with (
        FakeNode(hang_up_on_read) as node,
        open_link(node.url, stats=stats, timeout=5) as link,
    ):
        assert (await link.request("hello")).ok
        with pytest.raises(LinkDown):
            await link.request("read")
        # At once on the hang-up: not after the 5 s timeout, nor retried after one.
        assert (stats["timeout"], stats["retry"]) == (0, 0)
        assert not link.is_up
        await asyncio.wait_for(link.wait_down(), 1)
        with pytest.raises(LinkDown):
            await link.request("ping")
    assert stats["link_down"] == 1 and stats["timeout"] == 0
    assert node.ops == ["hello", "read"]


async def test_connection_refused_is_a_transport_error() -> None:
    async with FakeNode() as node:
        url = node.url
    with pytest.raises(TransportError):
        async with open_link(url, stats=LinkStats()):
            pass


# --- keepalive -----------------------------------------------------------------------------


async def test_keepalive_pings_an_idle_link(node: FakeNode) -> None:
    stats = LinkStats()
    async with open_link(node.url, stats=stats, keepalive=0.2) as link:
        await asyncio.wait_for(node.got_request.wait(), 2)
        assert node.ops == ["ping"]
        await link.request("read")
    assert stats["frames_out"] == 2 and stats.total_errors() == 0


async def test_keepalive_and_last_rx_follow_the_clock_the_link_is_given(node: FakeNode) -> None:
    clock = FakeClock()
    async with open_link(node.url, stats=LinkStats(), keepalive=0.2, clock=clock) as link:
        await link.request("read")
        assert link.last_rx == clock.mono
        await asyncio.sleep(0.5)  # real time passes, the link's clock stands still
        assert node.ops == ["read"]
        clock.advance(0.2)
        async with asyncio.timeout(5):
            while "ping" not in node.ops:
                await asyncio.sleep(0.01)
        assert node.ops == ["read", "ping"]


async def test_no_keepalive_while_requests_flow(node: FakeNode) -> None:
    async with open_link(node.url, stats=LinkStats(), keepalive=0.3) as link:
        for _ in range(12):
            await link.request("read")
            await asyncio.sleep(0.05)
    assert "ping" not in node.ops


# --- stats and arguments ----------------------------------------------------------------------


def test_link_stats() -> None:
    stats = LinkStats()
    assert set(stats.as_dict()) == set(COUNTERS) and not any(stats.as_dict().values())
    stats.count("crc")
    stats.count("bad_value", 3)
    stats.count("frames_in", 10)
    stats.count("retry")
    assert stats.total_errors() == 4
    assert stats.as_dict()["bad_value"] == 3
    stats.count("read_refused")  # a node task's own counter
    assert stats["read_refused"] == 1 and stats.total_errors() == 5
    assert stats["never_counted"] == 0


@pytest.mark.parametrize(
    "kwargs", [{"timeout": 0}, {"keepalive": -1}, {"retries": -1}, {"first_id": 0}]
)
async def test_open_link_refuses_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        async with open_link("tcp://127.0.0.1:1", stats=LinkStats(), **kwargs):
            pass
