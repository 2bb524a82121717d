"""`hydrogate node probe URL`: NodeLink v1 conformance of any node firmware.

The probe talks to the node over a raw transport (the gateway's own openers,
so a serial port is opened the same non-resetting way), because it must also
send what the gateway never sends: a bad CRC, a lowercase CRC, an over-long
line, invalid JSON, bad ids. Frames the node sends are cut and decoded with
the gateway's codec (drivers/nodelink.py); anything the codec refuses is
kept with its raw bytes so that a failing case can show the exact frame.

Each case is a small coroutine that raises ``CaseFailed`` with the frame that
broke it; ``Skip`` marks a case that does not apply (no pH pair announced, a
node that does not push). Timed cases dose with duty 1 by default: the node
must treat any duty > 0 as running, and a real pump barely turns.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

from drivers.nodelink import (
    Event,
    FrameError,
    LineSplitter,
    Reply,
    check_reply,
    clean_values,
    decode,
)
from drivers.transport import open_transport
from rules.controller import PH_PUMPS

WATCHDOG_S: Final = 30.0
SETTLE_S: Final = 0.3  # quiet time after connecting, for a boot event to arrive


class CaseFailed(Exception):
    """A case failed; ``frame`` is the frame (sent or received) that shows it."""

    def __init__(self, reason: str, frame: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.frame = frame


class Skip(Exception):
    """The case does not apply to this node."""


@dataclass(frozen=True, slots=True)
class Received:
    """One line from the node: when it came, its bytes, and what it decoded to."""

    at: float
    raw: bytes
    msg: Reply | Event | None
    error: str | None  # the codec's reason when msg is None


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    status: str  # pass | FAIL | skip
    detail: str = ""
    frame: bytes | None = None


@dataclass(frozen=True, slots=True)
class ProbeOptions:
    timeout: float = 1.0
    run_ms: int = 1000
    duty: int = 1
    actuator: str | None = None
    watchdog: bool = False
    watchdog_s: float = WATCHDOG_S
    push_wait: float = 0.0


def frame(body: bytes, *, crc: str | None = None, lower: bool = False) -> bytes:
    """``body*CRC\\n`` with the right CRC, a given CRC text, or the right one in lower case."""
    text = crc if crc is not None else f"{binascii.crc_hqx(body, 0xFFFF):04X}"
    return body + b"*" + (text.lower() if lower else text).encode() + b"\n"


def request(rid: int, op: str, **fields: Any) -> bytes:
    return frame(json.dumps({"id": rid, "op": op, **fields}, separators=(",", ":")).encode())


class RawLink:
    """The probe's side of a connection: raw frames out, every line in, kept in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.lines: list[Received] = []
        self.overlong = 0
        self._new = asyncio.Condition()
        self._next_id = 100
        self.closed = False

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def read_loop(self) -> None:
        splitter = LineSplitter()
        while True:
            data = await self._reader.read(65536)
            if not data:
                self.closed = True
                async with self._new:
                    self._new.notify_all()
                return
            lines = splitter.feed(data)
            self.overlong = splitter.overlong
            now = time.monotonic()
            async with self._new:
                for line in lines:
                    try:
                        self.lines.append(Received(now, line, decode(line), None))
                    except FrameError as exc:
                        self.lines.append(Received(now, line, None, str(exc)))
                self._new.notify_all()

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def wait_for(
        self, match: Callable[[Received], bool], within: float, start: int = 0
    ) -> Received | None:
        """The first line from index ``start`` on that matches, waiting up to ``within`` s."""
        try:
            async with asyncio.timeout(within), self._new:
                while True:
                    for rec in self.lines[start:]:
                        if match(rec):
                            return rec
                    start = len(self.lines)
                    if self.closed:
                        return None
                    await self._new.wait()
        except TimeoutError:
            return None

    def events(self, kind: str) -> list[Received]:
        return [r for r in self.lines if type(r.msg) is Event and r.msg.event == kind]


def _is_reply(rid: int) -> Callable[[Received], bool]:
    return lambda r: type(r.msg) is Reply and r.msg.id == rid


class Prober:
    """Runs the cases against one connected node."""

    def __init__(self, link: RawLink, options: ProbeOptions) -> None:
        self.link = link
        self.opt = options
        self.hello: dict[str, Any] = {}

    async def call(self, op: str, **fields: Any) -> Reply:
        """A well-formed request; its reply, or CaseFailed naming what came instead."""
        rid = self.link.new_id()
        sent = request(rid, op, **fields)
        return await self.exchange(rid, sent)

    async def exchange(self, rid: int, sent: bytes) -> Reply:
        start = len(self.link.lines)
        await self.link.send(sent)
        rec = await self.link.wait_for(_is_reply(rid), self.opt.timeout, start)
        if rec is None:
            bad = next((r for r in self.link.lines[start:] if r.msg is None), None)
            if bad is not None:
                raise CaseFailed(f"no valid reply; the node sent a bad frame ({bad.error})",
                                 bad.raw)
            raise CaseFailed(f"no reply within {self.opt.timeout:g} s", sent)
        assert type(rec.msg) is Reply
        return rec.msg

    async def ok(self, op: str, **fields: Any) -> Reply:
        reply = await self.call(op, **fields)
        if not reply.ok:
            raise CaseFailed(f"refused: {reply.error}", _raw(reply))
        try:
            check_reply(op, reply)
        except FrameError as exc:
            raise CaseFailed(str(exc), _raw(reply)) from exc
        return reply

    async def refused(self, op: str, **fields: Any) -> None:
        reply = await self.call(op, **fields)
        if reply.ok:
            raise CaseFailed(f"accepted {op} {fields}", request(reply.id, op, **fields))

    async def dropped(self, sent: bytes, rid: int) -> None:
        """``sent`` must get no reply, and the link must still answer a ping after it."""
        start = len(self.link.lines)
        await self.link.send(sent)
        await self.ok("ping")
        if any(_is_reply(rid)(r) for r in self.link.lines[start:]):
            raise CaseFailed("the node answered a frame it must drop", sent)

    async def state(self) -> dict[str, Any]:
        reply = await self.ok("state")
        states = reply.body["actuators"]
        return {k: v for k, v in states.items()}

    def actuators(self) -> list[str]:
        return list(self.hello.get("actuators", []))

    def pump(self) -> str:
        if self.opt.actuator is not None:
            if self.opt.actuator not in self.actuators():
                raise CaseFailed(f"actuator {self.opt.actuator!r} is not announced in hello")
            return self.opt.actuator
        names = self.actuators()
        if not names:
            raise Skip("the node announces no actuator")
        return names[0]

    async def run_for(self, name: str, ms: int) -> None:
        await self.ok("actuate", actuator=name, duty=self.opt.duty, ms=ms)

    async def expect_running(self, name: str, on: int, when: str) -> None:
        states = await self.state()
        if states.get(name) != on:
            raise CaseFailed(f"{name} is {states.get(name)!r} {when}, expected {on}",
                             json.dumps({"actuators": states}).encode())


def _raw(reply: Reply) -> bytes:
    return json.dumps(reply.body, separators=(",", ":")).encode()


Case = Callable[[Prober], Awaitable[str | None]]
CASES: list[tuple[str, Case, bool]] = []  # (name, case, needs --watchdog)


def case(name: str, *, watchdog: bool = False) -> Callable[[Case], Case]:
    def add(func: Case) -> Case:
        CASES.append((name, func, watchdog))
        return func

    return add


@case("hello")
async def _hello(p: Prober) -> str | None:
    reply = await p.ok("hello")
    if reply.body["proto"] != 1:
        raise CaseFailed(f"proto is {reply.body['proto']!r}, not 1", _raw(reply))
    p.hello = reply.body
    note = f"node {reply.body['node']!r}, fw {reply.body['fw']!r}"
    if isinstance(reply.body.get("error"), str) and reply.body["error"]:
        note += f"; the node reports: {reply.body['error']}"
    return note


@case("read")
async def _read(p: Prober) -> str | None:
    reply = await p.ok("read")
    values = reply.body["values"]
    _, dropped = clean_values(values)
    if dropped:
        raise CaseFailed("a value is neither a finite number nor null", _raw(reply))
    missing = [k for k in p.hello.get("sensors", []) if k not in values]
    if missing:
        raise CaseFailed(f"announced sensors missing from values: {missing}", _raw(reply))
    return f"{len(values)} value(s)"


@case("ping")
async def _ping(p: Prober) -> str | None:
    await p.ok("ping")
    return None


@case("state")
async def _state(p: Prober) -> str | None:
    states = await p.state()
    for name in p.actuators():
        if states.get(name) not in (0, 1) or type(states.get(name)) is not int:
            raise CaseFailed(f"state of {name} is {states.get(name)!r}, not 0 or 1")
    return None


@case("lowercase CRC accepted")
async def _lower(p: Prober) -> str | None:
    rid = p.link.new_id()
    body = json.dumps({"id": rid, "op": "ping"}, separators=(",", ":")).encode()
    while not any(c in "ABCDEF" for c in f"{binascii.crc_hqx(body, 0xFFFF):04X}"):
        rid = p.link.new_id()
        body = json.dumps({"id": rid, "op": "ping"}, separators=(",", ":")).encode()
    reply = await p.exchange(rid, frame(body, lower=True))
    if not reply.ok:
        raise CaseFailed(f"refused: {reply.error}", frame(body, lower=True))
    return None


@case("bad CRC dropped")
async def _bad_crc(p: Prober) -> str | None:
    rid = p.link.new_id()
    body = json.dumps({"id": rid, "op": "ping"}, separators=(",", ":")).encode()
    wrong = "%04X" % (binascii.crc_hqx(body, 0xFFFF) ^ 0x5A5A)
    await p.dropped(frame(body, crc=wrong), rid)
    return None


@case("invalid JSON dropped")
async def _bad_json(p: Prober) -> str | None:
    rid = p.link.new_id()
    await p.dropped(frame(b'{"id":%d,"op":"ping",}' % rid), rid)
    await p.dropped(frame(b'[%d,"ping"]' % rid), rid)
    return None


@case("bad id dropped")
async def _bad_id(p: Prober) -> str | None:
    for bad in (b'"7"', b"0", b"2147483648", b"7.5", b"true"):
        await p.dropped(frame(b'{"id":' + bad + b',"op":"ping"}'), 7)
    return None


@case("over-long line dropped")
async def _overlong(p: Prober) -> str | None:
    rid = p.link.new_id()
    body = json.dumps({"id": rid, "op": "ping", "pad": "x" * 1100}, separators=(",", ":"))
    await p.dropped(frame(body.encode()), rid)
    return None


@case("unknown op refused")
async def _unknown_op(p: Prober) -> str | None:
    reply = await p.call("selfdestruct")
    if reply.ok or not reply.error:
        raise CaseFailed("an unknown op must get ok:false with an error", _raw(reply))
    return f"error {reply.error!r}"


@case("unknown fields ignored")
async def _unknown_fields(p: Prober) -> str | None:
    await p.ok("ping", future={"nested": [1, 2.5, None]}, flag=True)
    await p.ok("read", note="é")
    return None


@case("actuate field validation")
async def _validation(p: Prober) -> str | None:
    name = p.pump()
    await p.refused("actuate", actuator="no-such-pump", duty=1, ms=100)
    for duty, ms in ((256, 100), (-1, 100), (1.5, 100), (True, 100), (1, 0), (1, 600001),
                     (1, 1.5), ("1", 100)):
        await p.refused("actuate", actuator=name, duty=duty, ms=ms)
    await p.refused("actuate", actuator=name, duty=1)
    await p.expect_running(name, 0, "after refused actuates")
    return None


@case("timed run")
async def _timed(p: Prober) -> str | None:
    name, ms = p.pump(), p.opt.run_ms
    start = len(p.link.lines)
    await p.run_for(name, ms)
    await asyncio.sleep(ms / 2000)
    await p.expect_running(name, 1, f"{ms / 2:g} ms into a {ms} ms run")
    await asyncio.sleep(ms / 2000 + 0.5)
    await p.expect_running(name, 0, f"{ms + 500} ms after a {ms} ms run")
    events = [r.msg.body.get("on") for r in p.link.lines[start:]
              if type(r.msg) is Event and r.msg.event == "actuator"
              and r.msg.body.get("actuator") == name]
    if events[:2] != [1, 0]:
        raise CaseFailed(f"actuator events for {name} were {events}, expected on then off")
    return f"{name} on, then off on the node's clock"


@case("second actuate restarts the timer")
async def _restart(p: Prober) -> str | None:
    name, ms = p.pump(), p.opt.run_ms
    await p.run_for(name, ms)
    await asyncio.sleep(0.6 * ms / 1000)
    await p.run_for(name, ms)
    await asyncio.sleep(0.6 * ms / 1000)
    await p.expect_running(name, 1, "after the first run's end, within the second")
    await asyncio.sleep(0.5 * ms / 1000 + 0.5)
    await p.expect_running(name, 0, "after the second run's end")
    return None


@case("stop")
async def _stop(p: Prober) -> str | None:
    name = p.pump()
    await p.run_for(name, 60000)
    await p.expect_running(name, 1, "after actuate")
    await p.ok("stop")
    states = await p.state()
    if any(states.values()):
        raise CaseFailed(f"still running after stop: {states}")
    return None


@case("ph_up and ph_down never together")
async def _exclusive(p: Prober) -> str | None:
    if not set(PH_PUMPS) <= set(p.actuators()):
        raise Skip("the node does not announce both ph_up and ph_down")
    try:
        await p.run_for("ph_up", 5000)
        await p.call("actuate", actuator="ph_down", duty=p.opt.duty, ms=5000)
        states = await p.state()
        if states.get("ph_up") and states.get("ph_down"):
            raise CaseFailed("ph_up and ph_down both run", json.dumps(states).encode())
    finally:
        await p.call("stop")
    return None


@case("push reports")
async def _push(p: Prober) -> str | None:
    if p.opt.push_wait > 0 and not p.link.events("report"):
        await p.link.wait_for(
            lambda r: type(r.msg) is Event and r.msg.event == "report", p.opt.push_wait
        )
    reports = p.link.events("report")
    if not reports:
        raise Skip("no report event seen (the node does not push)")
    for rec in reports:
        assert type(rec.msg) is Event
        if clean_values(rec.msg.body["values"])[1]:
            raise CaseFailed("a reported value is neither a finite number nor null", rec.raw)
    return f"{len(reports)} report(s)"


@case("frames sent by the node")
async def _frames(p: Prober) -> str | None:
    for rec in p.link.lines:
        if rec.msg is None:
            raise CaseFailed(f"the node sent a bad frame ({rec.error})", rec.raw)
        crc = rec.raw.rstrip(b"\r")[-4:]
        if crc != crc.upper():
            raise CaseFailed("CRC must be written in upper case", rec.raw)
    if p.link.overlong:
        raise CaseFailed(f"the node sent {p.link.overlong} line(s) over 1024 bytes")
    return f"{len(p.link.lines)} frame(s), all valid"


@case("link watchdog", watchdog=True)
async def _watchdog(p: Prober) -> str | None:
    name = p.pump()
    await p.run_for(name, 600000)
    sent_at = time.monotonic()
    start = len(p.link.lines)
    wait = p.opt.watchdog_s
    off = await p.link.wait_for(
        lambda r: type(r.msg) is Event and r.msg.body.get("actuator") == name
        and r.msg.body.get("on") == 0,
        wait + 2.0,
        start,
    )
    if off is not None and off.at - sent_at < wait - 1.0:
        raise CaseFailed(f"{name} stopped after {off.at - sent_at:.1f} s, before the watchdog",
                         off.raw)
    await p.expect_running(name, 0, f"after {wait + 2:g} s without a frame from the gateway")
    return f"stopped after {(off.at - sent_at):.1f} s" if off else "stopped (no event seen)"


async def run_cases(link: RawLink, options: ProbeOptions) -> list[Result]:
    """Every case in order; a case that raises something unexpected fails, the rest go on."""
    prober = Prober(link, options)
    results: list[Result] = []
    for name, func, needs_watchdog in CASES:
        if needs_watchdog and not options.watchdog:
            results.append(Result(name, "skip", "run with --watchdog (waits 30 s)"))
            continue
        if link.closed:
            results.append(Result(name, "FAIL", "the node closed the connection"))
            continue
        try:
            note = await func(prober)
        except CaseFailed as exc:
            results.append(Result(name, "FAIL", exc.reason, exc.frame))
        except Skip as exc:
            results.append(Result(name, "skip", str(exc)))
        else:
            results.append(Result(name, "pass", note or ""))
    return results


@asynccontextmanager
async def connect(url: str, within: float = 10.0) -> AsyncIterator[RawLink]:
    """Open ``url`` with the gateway's transports and read from it in a task of ours."""
    async with asyncio.timeout(within):
        reader, writer = await open_transport(url)
    link = RawLink(reader, writer)
    task = asyncio.create_task(link.read_loop(), name=f"probe-read {url}")
    try:
        await asyncio.sleep(SETTLE_S)
        yield link
    finally:
        task.cancel()
        await asyncio.wait({task})
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def probe(url: str, options: ProbeOptions) -> list[Result]:
    async with connect(url) as link:
        return await run_cases(link, options)


def table(results: list[Result]) -> str:
    """The pass/fail table, with the failing frame under each failure."""
    width = max(len(r.name) for r in results)
    lines = [f"{'case':<{width}}  result  detail"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.status:<6}  {r.detail}".rstrip())
        if r.frame is not None:
            shown = r.frame.decode("utf-8", "backslashreplace").rstrip("\n")
            lines.append(f"{'':<{width}}          frame: {_cut(shown)}")
    failed = sum(r.status == "FAIL" for r in results)
    passed = sum(r.status == "pass" for r in results)
    skipped = len(results) - failed - passed
    lines.append(f"{passed} passed, {failed} failed, {skipped} skipped")
    return "\n".join(lines)


def _cut(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


__all__ = ["CASES", "CaseFailed", "ProbeOptions", "Result", "probe", "run_cases", "table"]
