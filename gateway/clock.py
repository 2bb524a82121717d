"""The clocks the daemon reads, passed in so tests can control time."""

from __future__ import annotations

import datetime
import time
from typing import Protocol


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
