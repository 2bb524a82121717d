"""A simulated NodeLink v1 node: the node side of the protocol, over TCP or a pty.

``SimNode`` answers the gateway's requests (hello, read, actuate, stop, state,
ping), pushes ``boot``, ``actuator`` and ``report`` events, and keeps the
node-side safety duties of docs/nodelink.md: an actuator stops on the
node's own clock after its ``ms``, and every actuator stops when no valid
frame has arrived for ``watchdog_s``. Behind it a ``Reservoir`` is stepped
with the node clock (times ``speed``), so what the gateway doses is what the
readings show, after the plant's mixing delay.

Faults (``Faults``, mutable while the node runs) make it misbehave the way a
real link does — corrupt CRCs, garbage and overlong lines, lost or late
replies, non-finite values, a mute node — so the gateway's drivers can be
tested against a real peer. The node counts what it received (``requests``
per op, ``bad_frames`` per reason) so tests can assert, for example, that
exactly one ``actuate`` arrived.

Framing comes from ``drivers.nodelink`` (crc16, encode, LineSplitter); the
request side of parsing (``parse_request``) is here, because the codec there
decodes what a *gateway* receives.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import random
import struct
import termios
import time
import tty
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Protocol, TypeGuard

from drivers.nodelink import MAX_LINE, FrameError, LineSplitter, crc16, encode
from rules.controller import NUTRIENT, PH_PUMPS, REFILL
from sim.plant import Reservoir, SimError

__all__ = [
    "DEFAULT_ACTUATORS",
    "MAX_MS",
    "PROTO",
    "RAW_KEYS",
    "DEFAULT_SENSORS",
    "Faults",
    "NodeError",
    "SimNode",
    "frame_lenient",
    "parse_request",
]

DEFAULT_SENSORS: Final = ("tds", "ph", "water_temp", "water_level", "air_temp", "humidity")
DEFAULT_ACTUATORS: Final = (*PH_PUMPS, NUTRIENT, REFILL)
RAW_KEYS: Final[Mapping[str, str]] = {"tds": "tds_v", "ph": "ph_adc"}
"""With ``raw=True`` these engineering keys are sent as their raw counterparts."""

PROTO: Final = 1
MAX_MS: Final = 600_000
_ID_MAX: Final = 2**31 - 1
_MIN_PUSH_SLEEP: Final = 0.005  # below this, reports are batched instead of slept for
_MAX_BATCH: Final = 1000
_PTY_BUFFER_CAP: Final = 1 << 16  # bytes a pty keeps while nobody reads the slave
_PTY_DRAIN_LOW: Final = 1 << 14
_TIOCPKT_DATA: Final = 0
_TIOCPKT_FLUSHREAD: Final = 1


class NodeError(SimError):
    """The simulated node was used wrongly (closed, bad arguments)."""


@dataclass
class Faults:
    """Misbehaviour to inject; tests may change the fields while the node runs.

    Every ``*_every`` counts frames the node sends (replies and events) and
    acts on each n-th one (0 = never): ``corrupt_crc_every`` sends that frame
    with a wrong CRC; ``garbage_every`` and ``overlong_every`` write a line of
    random non-JSON bytes or a 2000-byte line just before it.
    ``silent``: the node counts what arrives but neither executes nor answers
    it, sends no events, and such frames do not feed its watchdog.
    ``drop_reply_probability``: a request is executed but its reply is lost.
    ``delay_reply_s``: each reply leaves that much later (requests queue).
    ``bad_value``: put this value (e.g. ``"NaN"``, ``math.inf``, ``math.nan``,
    ``True``) in place of one reading value (``bad_value_key``, default the
    first key); non-finite floats are written as JSON's ``NaN``/``Infinity``.
    ``extra_values``: entries added to every reading as they are (an empty
    key, an integer beyond 64 bits, ...). ``fresh_keys``: that many more
    entries in every reading, under keys never sent before (a node that
    floods the gateway with keys). ``unanswered``: ops the node receives and
    ignores, as a firmware hung in its sensor code would ignore ``read``.
    """

    corrupt_crc_every: int = 0
    garbage_every: int = 0
    overlong_every: int = 0
    silent: bool = False
    drop_reply_probability: float = 0.0
    delay_reply_s: float = 0.0
    bad_value: object = None
    bad_value_key: str | None = None
    extra_values: dict[str, Any] = field(default_factory=dict)
    fresh_keys: int = 0
    unanswered: frozenset[str] = frozenset()


def parse_request(line: bytes) -> dict[str, Any]:
    """Check the framing of one received line and return its JSON object.

    Raises ``FrameError`` with reason ``too_long``, ``crc``, ``encoding``,
    ``json`` or ``not_object``. Field checks (``id``, ``op``) are the node's job.
    """
    if len(line) >= MAX_LINE:
        raise FrameError("too_long", f"line of {len(line) + 1} bytes")
    if line.endswith(b"\r"):
        line = line[:-1]
    star = len(line) - 5
    if star < 0 or line[star] != 0x2A:
        raise FrameError("crc", "no *CRC at the end of the line")
    body = line[:star]
    if line[star + 1 :].upper() != b"%04X" % crc16(body):
        raise FrameError("crc", "CRC mismatch")
    try:
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FrameError("encoding", str(exc)) from exc
    except (ValueError, RecursionError) as exc:
        raise FrameError("json", str(exc)) from exc
    if type(obj) is not dict:
        raise FrameError("not_object", type(obj).__name__)
    return obj


def frame_lenient(msg: Mapping[str, Any]) -> bytes:
    """Frame ``msg`` allowing NaN/Infinity in the JSON (only faulty nodes do this)."""
    body = json.dumps(msg, separators=(",", ":"), allow_nan=True, default=str).encode()
    return b"%b*%04X\n" % (body, crc16(body))


def _is_int(value: object) -> TypeGuard[int]:
    """An integer that is not a bool."""
    return type(value) is int


class _Sink(Protocol):
    """Where a session writes: an asyncio ``StreamWriter`` or a pty master."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


class _PtyWriter:
    """Non-blocking writer for a pty master fd, like a UART without flow control.

    Bytes that do not fit into the pty are kept (up to 64 KiB) and written when
    the fd becomes writable; beyond that they are lost, as on a UART nobody
    listens to, and counted in ``dropped_bytes``.
    """

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self._fd = fd
        self._loop = loop
        self._buffer = bytearray()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False
        self.dropped_bytes = 0

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if not self._buffer:
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                self.dropped_bytes += len(data)
                return
            data = data[written:]
            if not data:
                return
        room = _PTY_BUFFER_CAP - len(self._buffer)
        if len(data) > room:
            self.dropped_bytes += len(data) - room
            data = data[:room]
        if not self._buffer and data:
            self._loop.add_writer(self._fd, self._flush)
        self._buffer += data
        if len(self._buffer) > _PTY_DRAIN_LOW:
            self._writable.clear()

    def _flush(self) -> None:
        try:
            written = os.write(self._fd, self._buffer)
        except BlockingIOError:
            return
        except OSError:
            self.dropped_bytes += len(self._buffer)
            written = len(self._buffer)
        del self._buffer[:written]
        if not self._buffer:
            self._loop.remove_writer(self._fd)
        if len(self._buffer) <= _PTY_DRAIN_LOW:
            self._writable.set()

    async def drain(self) -> None:
        await self._writable.wait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_writer(self._fd)
            self._buffer.clear()
            self._writable.set()


class SimNode:
    """One simulated node: sensors and actuators of one reservoir, speaking NodeLink v1.

    Serve it with ``await serve_tcp()`` and/or ``open_pty()``; stop it with
    ``await close()`` or use it as an async context manager. ``clock`` is the
    node's own clock (uptime, actuator timers, watchdog, plant time);
    ``tick()`` applies timers and the watchdog at once, so tests with an
    injected clock need not wait for the background tick.
    """

    def __init__(
        self,
        name: str,
        plant: Reservoir | None = None,
        *,
        sensors: tuple[str, ...] = DEFAULT_SENSORS,
        actuators: tuple[str, ...] = DEFAULT_ACTUATORS,
        raw: bool = False,
        push_interval: float | None = None,
        fw: str = "sim-1.0.0",
        clock: Callable[[], float] = time.monotonic,
        seq: bool = False,
        faults: Faults | None = None,
        watchdog_s: float = 30.0,
        speed: float = 1.0,
        tick_s: float = 0.05,
        seed: int = 0,
    ) -> None:
        if push_interval is not None and not push_interval > 0:
            raise NodeError(f"push_interval must be > 0, got {push_interval!r}")
        if not speed > 0 or not tick_s > 0 or not watchdog_s > 0:
            raise NodeError("speed, tick_s and watchdog_s must be > 0")
        self.name = name
        self.plant = plant if plant is not None else Reservoir(seed=seed)
        self.keys = tuple(RAW_KEYS.get(k, k) if raw else k for k in sensors)
        self.actuators = tuple(actuators)
        self.push_interval = push_interval
        self.fw = fw
        self.seq = seq
        self.faults = faults if faults is not None else Faults()
        self.watchdog_s = watchdog_s
        self.speed = speed
        self.tick_s = tick_s
        self._clock = clock
        self._rng = random.Random(seed)

        #: Requests received, by op (``"?"`` when the op is not a string).
        self.requests: Counter[str] = Counter()
        #: Frames received that were refused, by reason (crc, json, field, too_long, ...).
        self.bad_frames: Counter[str] = Counter()
        #: Frames sent, by kind (a reply's op, or the event name); and replies lost on purpose.
        self.sent: Counter[str] = Counter()
        self.replies_dropped = 0
        #: Every switch of an actuator on the node's clock: (time, actuator, duty; 0 = off),
        #: so tests can tell what ran when (and that two pumps never overlapped).
        self.switches: list[tuple[float, str, int]] = []

        self._start = clock()
        self._plant_t = self._start
        self._last_valid = self._start
        self._running: dict[str, tuple[int, float]] = {}  # actuator -> (duty, deadline)
        self._seq = 0
        self._fresh = 0
        self._frames_sent = 0
        self._booted = False
        self._closed = False
        self._started = False

        self._sink: _Sink | None = None
        self._servers: list[asyncio.Server] = []
        self._tcp: tuple[asyncio.StreamWriter, asyncio.Task[None]] | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()  # asyncio's tasks running _on_tcp
        self._tasks: list[asyncio.Task[None]] = []
        self._ptys: list[tuple[int, int, _PtyWriter]] = []

    # --- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> SimNode:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _ensure_started(self) -> None:
        if self._closed:
            raise NodeError(f"node {self.name!r} is closed")
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._tick_loop(), name=f"simnode-{self.name}-tick"))
        if self.push_interval is not None:
            self._tasks.append(
                loop.create_task(
                    self._push_loop(self.push_interval), name=f"simnode-{self.name}-push"
                )
            )

    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen for the gateway on ``host:port``; return the bound port.

        One connection at a time: a new connection closes the older one. The
        ``boot`` event goes to the first connection after the start.
        """
        self._ensure_started()
        server = await asyncio.start_server(self._on_tcp, host, port)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def open_pty(self) -> str:
        """Open a pseudo-terminal in raw mode, serve it, return the slave's path.

        The gateway opens the path as a serial port (115200 8N1 is accepted
        and meaningless on a pty). ``boot`` is written at once, as a node on
        a UART does on power-up. The node keeps the slave open too, so the
        gateway may close and reopen it.
        """
        self._ensure_started()
        loop = asyncio.get_running_loop()
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            fcntl.ioctl(master, termios.TIOCPKT, struct.pack("i", 1))
            os.set_blocking(master, False)
            path = os.ttyname(slave)
        except OSError as exc:
            os.close(master)
            os.close(slave)
            raise NodeError(f"cannot set up a pty: {exc}") from exc
        reader = asyncio.StreamReader()
        sink = _PtyWriter(master, loop)
        self._ptys.append((master, slave, sink))
        loop.add_reader(master, self._pty_readable, master, reader, sink)
        self._sink = sink
        self._emit({"event": "boot", "node": self.name, "fw": self.fw})
        task = loop.create_task(self._session(reader, sink), name=f"simnode-{self.name}-pty")
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)
        return path

    def _pty_readable(self, fd: int, reader: asyncio.StreamReader, sink: _PtyWriter) -> None:
        """Feed what the gateway wrote; notice when it opens the port.

        The master runs in packet mode (TIOCPKT): data comes with a leading
        zero byte, and a lone control byte reports what the other side did to
        the line. pyserial flushes its input when it opens a port, which
        would swallow the ``boot`` written at ``open_pty``; on that flush the
        node writes ``boot`` again so the gateway learns who it talks to, as
        an ESP32 dev board announces itself when the host opens its port.
        """
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO cannot happen while the node holds the slave open
        if not data:
            return
        if data[0] == _TIOCPKT_DATA:
            if len(data) > 1:
                reader.feed_data(data[1:])
        elif data[0] & _TIOCPKT_FLUSHREAD and self._sink is sink:
            self._emit({"event": "boot", "node": self.name, "fw": self.fw})

    async def close(self) -> None:
        """Stop every actuator, cancel and await every task, close sockets and fds."""
        if self._closed:
            return
        self._closed = True
        self.tick()
        self._all_off()
        for server in self._servers:
            server.close()
        if self._tcp is not None:
            self._tcp[0].close()
        tasks = [*self._tasks, *self._conn_tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._handlers:  # they end on their own once their session has
            await asyncio.gather(*self._handlers, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        loop = asyncio.get_running_loop()
        for master, slave, sink in self._ptys:
            sink.close()
            loop.remove_reader(master)
            os.close(master)
            os.close(slave)
        self._ptys.clear()
        self._sink = None

    # --- state seen by tests -----------------------------------------------

    @property
    def running(self) -> dict[str, int]:
        """Duty of every actuator that is on."""
        return {name: duty for name, (duty, _) in self._running.items()}

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the last reading sent (0 before the first; with ``seq=True``)."""
        return self._seq

    @property
    def uptime_ms(self) -> int:
        return round((self._clock() - self._start) * 1000)

    # --- time ----------------------------------------------------------------

    def tick(self) -> None:
        """Apply due actuator timers and the watchdog, then step the plant to now.

        Timers are applied at their exact deadlines (the plant is stepped to
        each deadline first), so a dose is ``flow * ms`` however late the tick.
        """
        now = self._clock()
        while self._running:
            name, (_, deadline) = min(self._running.items(), key=lambda item: item[1][1])
            if deadline > now:
                break
            self._advance_plant(deadline)
            self._off(name)
        watchdog_at = self._last_valid + self.watchdog_s
        if self._running and watchdog_at <= now:
            self._advance_plant(watchdog_at)
            self._all_off()
        self._advance_plant(now)

    def _advance_plant(self, to: float) -> None:
        if to > self._plant_t:
            self.plant.step((to - self._plant_t) * self.speed)
            self._plant_t = to

    async def _tick_loop(self) -> None:
        while True:
            self.tick()
            delay = self.tick_s
            if self._running and self._clock is time.monotonic:
                soonest = min(deadline for _, deadline in self._running.values())
                delay = min(delay, max(0.0, soonest - time.monotonic()))
            await asyncio.sleep(delay)

    # --- actuators ---------------------------------------------------------

    def _set(self, name: str, duty: int, ms: int) -> None:
        if duty == 0:
            self._off(name)
            return
        was_on = name in self._running
        self._running[name] = (duty, self._clock() + ms / 1000.0)
        self.switches.append((self._clock(), name, duty))
        if self.plant.has_pump(name):
            self.plant.set_pump(name, duty)
        if not was_on:
            self._emit({"event": "actuator", "actuator": name, "on": 1, "duty": duty})

    def _off(self, name: str) -> None:
        entry = self._running.pop(name, None)
        if entry is None:
            return
        # At the deadline when a timer ran out (tick() applies timers at their deadlines).
        self.switches.append((min(self._clock(), entry[1]), name, 0))
        if self.plant.has_pump(name):
            self.plant.set_pump(name, 0)
        self._emit({"event": "actuator", "actuator": name, "on": 0})

    def _all_off(self) -> None:
        for name in list(self._running):
            self._off(name)

    # --- sending -------------------------------------------------------------

    def _frame(self, msg: Mapping[str, Any], lenient: bool = False) -> bytes:
        """One outgoing frame with whatever faults are due, as bytes to write."""
        self._frames_sent += 1
        n = self._frames_sent
        f = self.faults
        out = b""
        if f.garbage_every and n % f.garbage_every == 0:
            junk = bytes(self._rng.choice(_GARBAGE) for _ in range(self._rng.randint(1, 80)))
            out += junk + b"\n"
        if f.overlong_every and n % f.overlong_every == 0:
            out += b'{"pad":"' + b"x" * 1989 + b'"}\n'
        line = frame_lenient(msg) if lenient else encode(msg)
        if f.corrupt_crc_every and n % f.corrupt_crc_every == 0:
            crc = int(line[-5:-1], 16) ^ 0x5A5A
            line = line[:-5] + b"%04X\n" % crc
        return out + line

    def _emit(self, msg: Mapping[str, Any]) -> None:
        """Send an event to the current connection, if any (none while silent)."""
        sink = self._sink
        if sink is None or self.faults.silent:
            return
        sink.write(self._frame(msg))
        self.sent[str(msg["event"])] += 1

    def _reading(self) -> tuple[dict[str, Any], bool]:
        """Values for a read reply or report; and whether they need lenient JSON."""
        sensed = self.plant.sensors()
        values: dict[str, Any] = {}
        for key in self.keys:
            value = sensed.get(key)
            if value is None:
                values[key] = None
            elif key.endswith("_adc"):
                values[key] = int(value)
            else:
                values[key] = round(value, 4)
        if self.seq:
            self._seq += 1
            values["seq"] = self._seq
        values.update(self.faults.extra_values)
        for _ in range(self.faults.fresh_keys):
            self._fresh += 1
            values[f"k{self._fresh}"] = 1.0
        bad = self.faults.bad_value
        if bad is not None and values:
            key = self.faults.bad_value_key or next(iter(values))
            values[key] = bad
            return values, True
        return values, False

    # --- sessions ------------------------------------------------------------

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one TCP client, replacing the older one.

        asyncio runs this callback in a task of its own that it logs as an
        error if cancelled, so the session runs in a task the node owns (and
        cancels); this callback only waits for it and cleans up.
        """
        handler = asyncio.current_task()
        if self._closed:
            writer.close()
            return
        older = self._tcp
        if older is not None:
            older[0].close()
            older[1].cancel()
        session = asyncio.get_running_loop().create_task(
            self._session(reader, writer), name=f"simnode-{self.name}-tcp"
        )
        self._conn_tasks.add(session)
        if handler is not None:
            self._handlers.add(handler)
        self._tcp = (writer, session)
        self._sink = writer
        if not self._booted:
            self._booted = True
            self._emit({"event": "boot", "node": self.name, "fw": self.fw})
        try:
            await asyncio.wait({session})
        finally:
            writer.close()
            if self._tcp is not None and self._tcp[1] is session:
                self._tcp = None
                self._sink = None
            self._conn_tasks.discard(session)
            self._handlers.discard(handler)

    async def _session(self, reader: asyncio.StreamReader, sink: _Sink) -> None:
        splitter = LineSplitter()
        overlong = 0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                lines = splitter.feed(data)
                if splitter.overlong != overlong:
                    self.bad_frames["too_long"] += splitter.overlong - overlong
                    overlong = splitter.overlong
                for line in lines:
                    await self._handle(line, sink)
        except ConnectionError:
            return

    async def _handle(self, line: bytes, sink: _Sink) -> None:
        try:
            msg = parse_request(line)
        except FrameError as exc:
            self.bad_frames[exc.reason] += 1
            return
        op = msg.get("op")
        self.requests[op if type(op) is str else "?"] += 1
        if self.faults.silent:
            return
        self._last_valid = self._clock()
        rid = msg.get("id")
        if not _is_int(rid) or not 1 <= rid <= _ID_MAX:
            self.bad_frames["field"] += 1
            return
        if type(op) is str and op in self.faults.unanswered:
            return
        self.tick()
        reply, lenient = self._execute(op, msg)
        reply = {"id": rid, **reply}
        if self.faults.delay_reply_s > 0:
            await asyncio.sleep(self.faults.delay_reply_s)
        if self._rng.random() < self.faults.drop_reply_probability:
            self.replies_dropped += 1
            return
        if self.faults.silent or sink is not self._sink:
            return
        sink.write(self._frame(reply, lenient))
        self.sent[str(op)] += 1
        await sink.drain()

    def _execute(self, op: object, msg: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Carry out one request; return the reply body (without ``id``) and its leniency."""
        if op == "hello":
            return {
                "ok": True,
                "node": self.name,
                "fw": self.fw,
                "proto": PROTO,
                "sensors": list(self.keys),
                "actuators": list(self.actuators),
            }, False
        if op == "read":
            values, lenient = self._reading()
            return {"ok": True, "uptime_ms": self.uptime_ms, "values": values}, lenient
        if op == "actuate":
            return self._actuate(msg), False
        if op == "stop":
            self._all_off()
            return {"ok": True}, False
        if op == "state":
            states = {name: int(name in self._running) for name in self.actuators}
            return {"ok": True, "actuators": states}, False
        if op == "ping":
            return {"ok": True}, False
        return {"ok": False, "error": "unknown op"}, False

    def _actuate(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        name, duty, ms = msg.get("actuator"), msg.get("duty"), msg.get("ms")
        if type(name) is not str or name not in self.actuators:
            return {"ok": False, "error": f"unknown actuator {name!r}"}
        if not _is_int(duty) or not 0 <= duty <= 255:
            return {"ok": False, "error": "duty must be an integer 0..255"}
        if not _is_int(ms) or not 1 <= ms <= MAX_MS:
            return {"ok": False, "error": f"ms must be an integer 1..{MAX_MS}"}
        other = _EXCLUSIVE.get(name)
        if duty and other in self._running:  # never ph_up and ph_down at once
            return {"ok": False, "error": f"{other} is running"}
        self._set(name, duty, ms)
        return {"ok": True}

    # --- push mode -----------------------------------------------------------

    async def _push_loop(self, interval: float) -> None:
        """Push a ``report`` every ``interval`` s; when behind, several per write.

        For tiny intervals the loop sleeps at least 5 ms and writes the
        reports that fell due meanwhile in one batch, so thousands of reports
        per second cost one write (and one plant reading) per batch.
        """
        loop = asyncio.get_running_loop()
        due = loop.time() + interval
        while True:
            now = loop.time()
            if now < due:
                await asyncio.sleep(max(due - now, min(_MIN_PUSH_SLEEP, interval * 10)))
                now = loop.time()
            count = min(int((now - due) / interval) + 1, _MAX_BATCH)
            due += count * interval
            due = max(due, now - 1.0)  # a backlog older than 1 s is forgiven, not replayed
            sink = self._sink
            if sink is None or self.faults.silent:
                continue
            self.tick()
            uptime = self.uptime_ms
            chunks = []
            for _ in range(count):
                values, lenient = self._reading()
                report = {"event": "report", "uptime_ms": uptime, "values": values}
                chunks.append(self._frame(report, lenient))
            sink.write(b"".join(chunks))
            self.sent["report"] += count
            try:
                await sink.drain()
            except ConnectionError:
                continue


_EXCLUSIVE: Final[Mapping[str, str]] = {"ph_up": "ph_down", "ph_down": "ph_up"}
"""Actuators a node never runs together: the second one is refused."""

_GARBAGE: Final = bytes(b for b in range(256) if b not in (0x0A, 0x2A))
"""Bytes for garbage lines: anything but newline and ``*``, so never a valid frame."""
