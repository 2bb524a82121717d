"""The clocks the daemon reads, passed in so tests can control time, and what it knows of them.

A Raspberry Pi has no real-time clock: it boots with the time it was shut
down at (or older) and steps when NTP synchronises; NTP can also step the
clock backwards. Three things here keep timestamps honest:

- `kernel_synchronized` asks the kernel (``adjtimex``) whether an NTP client
  has synchronised the system clock (``STA_UNSYNC`` clear), as
  ``timedatectl`` does;
- `TimeKeeper` watches the wall clock against the monotonic clock, logs every
  step once with its size, and says when the clock becomes synchronised;
- `Stamps` gives each device unique millisecond timestamps (ThingsBoard keeps
  only the last of two entries of a device with the same ``ts`` and key)
  without inventing any: after a backward step stamps follow the corrected
  clock, and a stamp already taken is avoided by stepping a millisecond or
  two back, never forward past the clock.
"""

from __future__ import annotations

import bisect
import ctypes
import datetime
import logging
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("hydrogate.clock")

#: A jump of the wall clock against the monotonic clock larger than this between
#: two checks is a step (NTP slews smaller offsets, at most 0.5 ms per second).
STEP_THRESHOLD_S = 0.2
#: systemd-timesyncd creates this file once it has synchronised the clock.
TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: Stamps remembered per device, to keep new stamps unique after a backward step
#: (8 bytes each: 16,384 cover 4.5 h of readings at 1 Hz).
STAMP_MEMORY = 16_384
#: How far below the clock a stamp may be moved to find a free millisecond.
STAMP_SEARCH_MS = 8

#: Where the usual NTP clients (systemd-timesyncd, chrony, ntpd, ntpsec) leave a trace
#: once they have run on this machine.
TIME_CLIENT_TRACES = (
    Path("/run/systemd/timesync"),
    Path("/var/lib/systemd/timesync"),
    Path("/run/chrony"),
    Path("/var/lib/chrony"),
    Path("/var/lib/ntp"),
    Path("/var/lib/ntpsec"),
    Path("/run/ntpd.pid"),
)

_STA_PLL = 0x0001
_STA_FLL = 0x0008
_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


class Clock(Protocol):
    """Wall time for timestamps and schedules, monotonic time for intervals."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def now(self) -> datetime.datetime: ...


class SystemClock:
    """The host's clocks; `now()` is local time, as schedules are written."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime.datetime:
        return datetime.datetime.now().astimezone()


class _Timex(ctypes.Structure):
    """``struct timex`` of Linux on 64-bit (and time64 32-bit) glibc; only the head is read."""

    _fields_ = [  # noqa: RUF012 - ctypes layout
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("rest", ctypes.c_byte * 256),  # constant, precision, ... and padding, never read
    ]


def kernel_synchronized() -> bool | None:
    """Whether the system clock is NTP-synchronised; None when nothing will ever sync it.

    ``adjtimex`` with no mode bits only reads: ``STA_UNSYNC`` is set at boot
    and cleared by timesyncd, chrony or ntpd once they have synchronised
    (what ``timedatectl`` shows as "System clock synchronized"). Looked up in
    the process's global namespace, so an LD_PRELOAD shim can stand in for it
    in tests. Without adjtimex, systemd-timesyncd's flag file decides. A clock
    that is not synchronised on a machine where no NTP client has ever run
    (no trace of one, no discipline mode set in the kernel) is None: waiting
    for a sync that cannot come would only hold readings back.
    """
    try:
        adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
    except (OSError, AttributeError):
        adjtimex = None
    status = 0
    if adjtimex is not None:
        tx = _Timex()
        state = adjtimex(ctypes.byref(tx))
        if state >= 0 and state != _TIME_ERROR and not tx.status & _STA_UNSYNC:
            return True
        status = tx.status if state >= 0 else 0
    try:
        if TIMESYNC_FLAG.exists():
            return True
        client = status & (_STA_PLL | _STA_FLL) or any(p.exists() for p in TIME_CLIENT_TRACES)
    except OSError:
        return None
    return False if client else None


def boot_id() -> str:
    """This boot's id: monotonic times are comparable only within one boot."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def describe_seconds(seconds: float) -> str:
    """A signed duration for people: ``+3 d 0 h 0 min 1.2 s``, ``-1 h 0 min 0.0 s``, ``+0.4 s``."""
    sign = "-" if seconds < 0 else "+"
    rest = round(abs(seconds), 1)
    days, rest = divmod(rest, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, rest = divmod(rest, 60)
    parts = []
    if days:
        parts.append(f"{int(days)} d")
    if days or hours:
        parts.append(f"{int(hours)} h")
    if days or hours or minutes:
        parts.append(f"{int(minutes)} min")
    parts.append(f"{rest:.1f} s")
    return sign + " ".join(parts)


@dataclass(frozen=True)
class ClockEvent:
    """What `TimeKeeper.check` noticed: a ``step`` of ``size_s`` seconds, or ``synchronized``."""

    kind: str
    size_s: float = 0.0


class TimeKeeper:
    """Watches the system clock: its steps, and whether NTP has synchronised it.

    ``offset`` is wall time minus monotonic time as of the last `check`; a
    reading's monotonic time plus the offset after synchronisation is its
    true wall time, which is how readings taken before the first sync are
    re-stamped. Synchronisation counts once the probe has said so on two
    checks in a row with no step in between, so a sync announced just before
    its step is not taken for the step's result.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        probe: Callable[[], bool | None] = kernel_synchronized,
    ) -> None:
        self._clock = clock
        self._probe = probe
        self.offset = clock.time() - clock.monotonic()
        state = probe()
        #: False until the clock is known to be synchronised (None from the probe: trusted).
        self.synchronized = state is None or state
        #: True when nothing on this machine synchronises the clock (it is trusted as it is).
        self.unattended = state is None
        self._seen_sync = False
        #: Steps noticed so far (each logged once).
        self.steps = 0

    def check(self) -> list[ClockEvent]:
        """Compare the clocks once; log and return what changed since the last check."""
        events: list[ClockEvent] = []
        offset = self._clock.time() - self._clock.monotonic()
        jump = offset - self.offset
        self.offset = offset
        stepped = abs(jump) > STEP_THRESHOLD_S
        if stepped:
            self.steps += 1
            log.warning(
                "system clock stepped by %s (%s): readings follow the corrected clock",
                describe_seconds(jump),
                "synchronised" if self.synchronized else "not synchronised yet",
            )
            events.append(ClockEvent("step", jump))
        if self.synchronized:
            return events
        state = self._probe()
        if state is None or state:
            if self._seen_sync and not stepped:
                self.synchronized = True
                log.info("system clock synchronised")
                events.append(ClockEvent("synchronized"))
            self._seen_sync = True
        else:
            self._seen_sync = False
        return events


class _DeviceStamps:
    """The newest stamps given to one device, sorted, and the newest of all.

    ``packed_from`` is set while the device sends more than one reading per
    millisecond: from that clock reading on, every millisecond below the
    newest stamp is taken, so the next stamp is one past it without a search.
    """

    __slots__ = ("last", "packed_from", "recent")

    def __init__(self, last: int) -> None:
        self.last = last
        self.packed_from = -1
        self.recent = array("q", [last] if last >= 0 else [])


class Stamps:
    """Unique millisecond timestamps per device, never ahead of the clock.

    `unique` returns the stamp itself when it is newer than every stamp the
    device had; otherwise (two readings in one millisecond, or the clock went
    back) the nearest free millisecond at or below it among the
    `STAMP_MEMORY` newest stamps remembered. Only a device sending more than
    one reading per millisecond for `STAMP_SEARCH_MS` ms runs out of free
    milliseconds: its stamps then go one past the newest, ahead of the clock,
    as the only way to keep them unique. Stamps older than what is remembered
    are taken as they are.
    """

    def __init__(self, memory: int = STAMP_MEMORY) -> None:
        self._memory = memory
        self._limit = 2 * memory
        self._devices: dict[str, _DeviceStamps] = {}

    def last(self, device: str) -> int | None:
        """The newest stamp given to ``device`` (None if none)."""
        d = self._devices.get(device)
        return None if d is None or d.last < 0 else d.last

    def newest(self) -> dict[str, int]:
        """The newest stamp given to each device."""
        return {device: d.last for device, d in self._devices.items() if d.last >= 0}

    def seed(self, device: str, ts: int) -> None:
        """Remember ``ts`` as taken by ``device`` (a stamp from before a restart)."""
        d = self._devices.get(device)
        if d is None:
            self._devices[device] = _DeviceStamps(ts)
        else:
            self._take(d, ts)

    def give_back(self, device: str, ts: int) -> None:
        """Forget ``ts``, just given to ``device`` for an entry that was then refused."""
        d = self._devices.get(device)
        if d is None:
            return
        recent = d.recent
        i = bisect.bisect_left(recent, ts)
        if i < len(recent) and recent[i] == ts:
            del recent[i]
        if d.last == ts:
            d.last = recent[-1] if recent else -1
            d.packed_from = -1

    def forget(self) -> None:
        """Forget every stamp (those given were replaced, e.g. by a re-stamp)."""
        self._devices.clear()

    def unique(self, device: str, ts: int) -> int:
        """A stamp for a new entry of ``device`` taken at ``ts`` (ms), unique for that device."""
        d = self._devices.get(device)
        if d is None:
            self._devices[device] = _DeviceStamps(ts)
            return ts
        recent = d.recent
        if ts > d.last:  # the usual case: newer than anything before
            d.last = ts
            d.packed_from = -1
        elif d.packed_from >= 0 and ts >= d.packed_from:  # still faster than 1/ms
            ts = d.last = d.last + 1
        else:
            return self._older(d, ts)
        recent.append(ts)
        if len(recent) > self._limit:
            del recent[: len(recent) - self._memory]
        return ts

    def _older(self, d: _DeviceStamps, ts: int) -> int:
        """A stamp at or below the newest one: the nearest free millisecond at or below."""
        recent = d.recent
        if not recent or ts < recent[0]:  # older than anything remembered: cannot tell
            recent.insert(0, ts)
            return ts
        j = bisect.bisect_right(recent, ts)
        t = ts
        for _ in range(STAMP_SEARCH_MS):
            if j == 0 or recent[j - 1] != t:
                break
            t -= 1
            j -= 1
        else:
            t = d.last + 1
            d.packed_from = ts
        self._take(d, t)
        return t

    @staticmethod
    def _take(d: _DeviceStamps, ts: int) -> None:
        if ts > d.last:
            d.last = ts
            d.recent.append(ts)
            return
        i = bisect.bisect_left(d.recent, ts)
        if i == len(d.recent) or d.recent[i] != ts:
            d.recent.insert(i, ts)
