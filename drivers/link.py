"""A NodeLink session over one transport: request/reply by id, events, keepalive.

    async with open_link("tcp://192.168.1.50", stats=stats, on_event=cb) as link:
        hello = await link.request("hello")
        reply = await link.request("read")

The gateway is the master and keeps one request outstanding per link, so a
half-duplex UART and a simple firmware loop both work. A reader task cuts the
byte stream into frames, hands replies to the waiting request and events to
``on_event``; a keepalive task sends ``ping`` on an idle link so the node's
30 s watchdog never stops the pumps while the gateway is alive. Both tasks
belong to the context manager, which cancels and awaits them on exit.

Nothing on the wire is a reason to crash: bad frames, late replies and
unknown ids are dropped and counted in ``LinkStats``, and a request whose
reply never comes times out. Only the transport closing or failing ends the
link (``LinkDown``); the node task then backs off and opens a new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .errors import LinkDown, NodeRefused, RequestTimeout, TransportError
from .nodelink import (
    ID_MAX,
    ID_MIN,
    Event,
    FrameError,
    LineSplitter,
    Reply,
    check_reply,
    decode,
    encode,
)
from .transport import open_transport

log = logging.getLogger(__name__)

RETRYABLE: Final = frozenset({"read", "state", "hello", "ping", "stop"})
"""Ops repeated after a timeout; ``actuate`` is never repeated by the link."""

READ_CHUNK: Final = 65536
_RECENT_IDS: Final = 64

COUNTERS: Final = (
    "crc",
    "json",
    "not_object",
    "field",
    "too_long",
    "encoding",
    "bad_value",
    "late_reply",
    "unknown_id",
    "timeout",
    "retry",
    "link_down",
    "callback_error",
    "frames_in",
    "frames_out",
)
_NOT_ERRORS: Final = frozenset({"retry", "frames_in", "frames_out"})


class LinkStats:
    """Counters of one node's link, kept by the node task across reconnects.

    The link's own counters (``COUNTERS``) always exist, at 0 until counted:
    one per ``FrameError`` reason, ``bad_value`` (counted by the caller from
    ``clean_values``), ``late_reply``, ``unknown_id``, ``timeout``, ``retry``,
    ``link_down``, ``callback_error``, ``frames_in`` (frames that decoded) and
    ``frames_out``. The node task may add counters of its own by counting them.
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts = dict.fromkeys(COUNTERS, 0)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        self._counts[name] = self._counts.get(name, 0) + n

    def __getitem__(self, name: str) -> int:
        return self._counts.get(name, 0)

    def as_dict(self) -> dict[str, int]:
        """A copy of every counter."""
        return dict(self._counts)

    def total_errors(self) -> int:
        """Every counter that records a fault: all but ``retry``, ``frames_in``, ``frames_out``."""
        return sum(v for k, v in self._counts.items() if k not in _NOT_ERRORS)


class MonotonicClock(Protocol):
    """What a link reads of a clock: the daemon's `gateway.clock.Clock` is one."""

    def monotonic(self) -> float: ...


class HostMonotonic:
    """The host's monotonic clock, what a link reads unless it is handed another."""

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(slots=True)
class _Pending:
    id: int
    op: str
    waiter: asyncio.Future[Reply]


class Link:
    """One open NodeLink session; made by ``open_link``, not directly."""

    def __init__(
        self,
        url: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        stats: LinkStats,
        on_event: Callable[[Event], None] | None,
        timeout: float,
        retries: int,
        keepalive: float,
        first_id: int,
        clock: MonotonicClock,
    ) -> None:
        self.url = url
        self.stats = stats
        self.last_rx: float | None = None
        """``clock.monotonic()`` when the last valid frame arrived (None before the first)."""
        self._clock = clock
        self._reader = reader
        self._writer = writer
        self._on_event = on_event
        self._timeout = timeout
        self._retries = retries
        self._keepalive = keepalive
        self._lock = asyncio.Lock()
        self._next_id = first_id
        self._pending: _Pending | None = None
        self._recent: deque[int] = deque(maxlen=_RECENT_IDS)
        self._down_reason: str | None = None
        self._down = asyncio.Event()
        self._last_tx = clock.monotonic()
        self._callback_failed = False

    @property
    def is_up(self) -> bool:
        """False once the transport closed or failed, or the link was closed."""
        return self._down_reason is None

    async def wait_down(self) -> None:
        """Return once the link is down (for a node task that only listens to events)."""
        await self._down.wait()

    async def request(self, op: str, **fields: Any) -> Reply:
        """Send ``op`` with ``fields`` and return the node's ok reply.

        Raises ``NodeRefused`` (ok false), ``RequestTimeout`` (no valid reply,
        retries included; ``actuate`` is tried once), ``LinkDown`` (at once
        when the transport fails, also while waiting) and ``FrameTooLong``
        (a ``FrameError``) if the request does not fit in one frame.
        """
        if "id" in fields or "op" in fields:
            raise ValueError("'id' and 'op' are set by the link")
        async with self._lock:
            return await self._exchange(op, fields)

    async def _exchange(self, op: str, fields: Mapping[str, Any]) -> Reply:
        attempts = 1 + self._retries if op in RETRYABLE else 1
        for attempt in range(attempts):
            self._check_up()
            if attempt:
                self.stats.count("retry")
            rid = self._take_id()
            frame = encode({"id": rid, "op": op, **fields})
            waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            self._pending = _Pending(rid, op, waiter)
            try:
                async with asyncio.timeout(self._timeout):
                    reply = await self._send_and_wait(frame, waiter)
            except TimeoutError:
                self.stats.count("timeout")
                continue
            finally:
                self._pending = None
                self._recent.append(rid)
            if not reply.ok:
                raise NodeRefused(op, reply.error or "unknown error")
            return reply
        raise RequestTimeout(op, attempts, self._timeout)

    async def _send_and_wait(self, frame: bytes, waiter: asyncio.Future[Reply]) -> Reply:
        try:
            self._writer.write(frame)
            self._last_tx = self._clock.monotonic()
            self.stats.count("frames_out")
            await self._writer.drain()
        except OSError as exc:
            waiter.cancel()  # raised here instead, with its cause
            self._set_down(f"write failed: {exc}")
            raise LinkDown(f"{self.url}: write failed: {exc}") from exc
        return await waiter

    def _check_up(self) -> None:
        if self._down_reason is not None:
            raise LinkDown(f"{self.url}: {self._down_reason}")
        if self._writer.is_closing():
            self._set_down("transport closing")
            raise LinkDown(f"{self.url}: transport closing")

    def _take_id(self) -> int:
        rid = self._next_id
        self._next_id = rid + 1 if rid < ID_MAX else ID_MIN
        return rid

    def _set_down(self, reason: str, *, count: bool = True) -> None:
        """Mark the link down once: count, log, and fail the waiting request now."""
        if self._down_reason is not None:
            return
        self._down_reason = reason
        self._down.set()
        if count:
            self.stats.count("link_down")
            # The node task logs the state change once; this is for debugging.
            log.debug("link to %s down: %s", self.url, reason, extra={"node_url": self.url})
        pending = self._pending
        if pending is not None and not pending.waiter.done():
            pending.waiter.set_exception(LinkDown(f"{self.url}: {reason}"))

    async def _read_loop(self) -> None:
        """Feed transport chunks to the splitter until EOF or a transport error."""
        splitter = LineSplitter()
        seen_overlong = 0
        read = self._reader.read
        try:
            while True:
                data = await read(READ_CHUNK)
                if not data:
                    self._set_down("closed by the node")
                    return
                lines = splitter.feed(data)
                if splitter.overlong != seen_overlong:
                    self.stats.count("too_long", splitter.overlong - seen_overlong)
                    seen_overlong = splitter.overlong
                if lines:
                    self._on_lines(lines)
        except OSError as exc:
            self._set_down(f"transport failed: {exc}")

    def _on_lines(self, lines: list[bytes]) -> None:
        stats = self.stats
        valid = 0
        for line in lines:
            try:
                msg = decode(line)
            except FrameError as exc:
                stats.count(exc.reason)
                continue
            valid += 1
            if type(msg) is Reply:
                self._on_reply(msg)
            else:
                assert type(msg) is Event
                self._deliver(msg)
        if valid:
            stats.count("frames_in", valid)
            self.last_rx = self._clock.monotonic()

    def _on_reply(self, reply: Reply) -> None:
        pending = self._pending
        if pending is None or reply.id != pending.id or pending.waiter.done():
            late = reply.id in self._recent or (pending is not None and reply.id == pending.id)
            self.stats.count("late_reply" if late else "unknown_id")
            return
        try:
            check_reply(pending.op, reply)
        except FrameError as exc:
            # As if no reply came: the request keeps waiting until its deadline.
            self.stats.count(exc.reason)
            return
        pending.waiter.set_result(reply)

    def _deliver(self, event: Event) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            self.stats.count("callback_error")
            if not self._callback_failed:
                self._callback_failed = True
                log.exception(
                    "event callback failed on link %s (further failures only counted)",
                    self.url,
                    extra={"node_url": self.url},
                )

    async def _keepalive_loop(self) -> None:
        """Ping whenever nothing was sent for ``keepalive`` seconds."""
        while self._down_reason is None:
            idle = self._clock.monotonic() - self._last_tx
            if idle < self._keepalive:
                await asyncio.sleep(self._keepalive - idle)
                continue
            async with self._lock:
                if self._clock.monotonic() - self._last_tx < self._keepalive:
                    continue  # a request went out while we waited for the lock
                try:
                    await self._exchange("ping", {})
                except LinkDown:
                    return
                except (RequestTimeout, NodeRefused) as exc:
                    # Counted already; the node task judges the link by last_rx.
                    log.debug("keepalive on %s: %s", self.url, exc)

    async def _guard(self, loop: Coroutine[Any, Any, None], what: str) -> None:
        """Run a background loop; a bug in it takes the link down loudly, not silently."""
        try:
            await loop
        except Exception:
            log.exception("%s of link %s failed", what, self.url, extra={"node_url": self.url})
            self._set_down(f"{what} failed")


@asynccontextmanager
async def open_link(
    url: str,
    *,
    stats: LinkStats,
    on_event: Callable[[Event], None] | None = None,
    timeout: float = 1.0,  # noqa: ASYNC109 -- a per-request deadline, not one for this call
    retries: int = 2,
    keepalive: float = 10.0,
    connect_timeout: float = 10.0,
    first_id: int = ID_MIN,
    clock: MonotonicClock | None = None,
) -> AsyncIterator[Link]:
    """Open the transport ``url`` names and run a NodeLink session on it.

    ``timeout`` is per attempt; ``retries`` extra attempts are made for the
    idempotent ops (``RETRYABLE``). ``keepalive`` must stay well under the
    node's 30 s watchdog. ``first_id`` is the first request id (tests use it
    to cross the wrap at 2^31-1). ``clock`` times the keepalive and ``last_rx``
    (the daemon passes its own; the host's monotonic clock by default). Raises
    ``TransportError`` if the transport cannot be opened within ``connect_timeout``
    seconds.
    """
    if timeout <= 0 or keepalive <= 0 or connect_timeout <= 0:
        raise ValueError("timeout, keepalive and connect_timeout must be positive")
    if retries < 0:
        raise ValueError("retries must not be negative")
    if not ID_MIN <= first_id <= ID_MAX:
        raise ValueError("first_id must be in 1..2^31-1")
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await open_transport(url)
    except TimeoutError as exc:
        raise TransportError(f"{url}: no connection within {connect_timeout:g} s") from exc
    link = Link(
        url,
        reader,
        writer,
        stats=stats,
        on_event=on_event,
        timeout=timeout,
        retries=retries,
        keepalive=keepalive,
        first_id=first_id,
        clock=clock if clock is not None else HostMonotonic(),
    )
    tasks = (
        asyncio.create_task(link._guard(link._read_loop(), "reader"), name=f"nodelink-read {url}"),
        asyncio.create_task(
            link._guard(link._keepalive_loop(), "keepalive"), name=f"nodelink-keepalive {url}"
        ),
    )
    log.debug("link to %s open", url, extra={"node_url": url})
    try:
        yield link
    finally:
        link._set_down("link closed", count=False)
        for task in tasks:
            task.cancel()
        try:
            await asyncio.wait(tasks)
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()
