"""The running gateway's state, for `hydrogate status`, the demo's screen and systemd's STATUS=.

`collect` gathers what a grower asks first, as JSON-able data (the reply of
the local socket's ``status`` request): per node the link and since when,
the latest values and their age, severity and reason, cycle phase, mode and
controller (and where each setting comes from), the last dose and the last
refusal, the pH lock; for the uplink whether it is connected and since
when; for the buffer its backlog, the age of the oldest reading waiting,
how fast it drains, what was evicted, and the local history.

`StatusWatcher` runs in the daemon: it samples the forwarded counter every
second (the drain rate) and sends systemd a new ``STATUS=`` line when the
facts in it change (``3/3 nodes up · backlog 0 · ThingsBoard connected``), a
backlog that only moved at most every `BACKLOG_STATUS_S`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from gateway import __version__

if TYPE_CHECKING:  # types only (what the Gateway protocol below returns)
    from gateway.clock import Clock, TimeKeeper
    from gateway.config import Config
    from gateway.node import NodeRunner
    from gateway.store import Store
    from gateway.uplink import Uplink

#: Seconds between two samples of the counters.
SAMPLE_S = 1.0
#: The drain rate is the forwarded readings per second over this window (seconds).
RATE_WINDOW_S = 60.0
#: A STATUS= line whose only change is the backlog is sent at most this often (seconds).
BACKLOG_STATUS_S = 10.0
#: The backlog is "growing while connected" when, connected all along, it grew over this
#: window (seconds) by at least `GROWTH_MIN` readings: forwarding does not keep up.
GROWTH_WINDOW_S = 300.0
GROWTH_MIN = 100


class Gateway(Protocol):
    """What the status reads of the running gateway (`gateway.daemon.Gateway`, which
    imports this module: the daemon is never imported here)."""

    @property
    def config(self) -> Config: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def timekeeper(self) -> TimeKeeper: ...
    @property
    def started(self) -> float: ...
    @property
    def runners(self) -> Mapping[str, NodeRunner]: ...
    @property
    def store(self) -> Store | None: ...
    @property
    def uplink(self) -> Uplink | None: ...
    @property
    def reload_refused(self) -> str | None: ...


class Sampler:
    """The forwarded counter over the last minute: how fast the buffer drains."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self._window = window_s
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, now: float, forwarded: int) -> None:
        """One sample (monotonic seconds, lifetime forwarded count)."""
        self._samples.append((now, forwarded))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Readings forwarded per second over the window, None before two samples."""
        if len(self._samples) < 2:
            return None
        (t0, f0), (t1, f1) = self._samples[0], self._samples[-1]
        return (f1 - f0) / (t1 - t0) if t1 > t0 else None


def _age_s(now_ms: int, ts_ms: int | None) -> float | None:
    return None if ts_ms is None else round(max(0.0, (now_ms - ts_ms) / 1000), 1)


async def collect(gateway: Gateway, sampler: Sampler | None = None) -> dict[str, Any]:
    """The gateway's state as JSON-able data (see the module's docstring)."""
    now = gateway.clock.time()
    now_ms = int(now * 1000)
    nodes = []
    for name, runner in gateway.runners.items():
        control = runner.control
        state = runner.state()
        node: dict[str, Any] = {
            "name": name,
            "link": state["link"],
            "link_since": int(runner.link_since * 1000),
            "link_reason": state.get("link_reason"),
            "link_errors": state.get("link_errors", 0),
            "values": state["values"],
            "ts": state["ts"],
            "age_s": _age_s(now_ms, state["ts"]),
            "severity": state.get("severity"),
            "severity_reason": state.get("severity_reason"),
            "cycle": state.get("cycle", "idle"),
            "mode": state.get("mode"),
            "controller": state.get("controller"),
            "last_controller": state.get("last_controller"),
            "ph_lock": state.get("ph_lock"),
            "last_dose": control.last_dose,
            "last_refusal": control.last_refusal,
        }
        if control.settings is not None:
            node["settings_from"] = control.settings_from()
            if control.refused is not None:
                node["settings_refused"] = control.refused
        nodes.append(node)
    status: dict[str, Any] = {
        "gateway": gateway.config.gateway.name,
        "version": __version__,
        "now": now_ms,
        "uptime_s": round(time.monotonic() - gateway.started, 1),
        "clock_synced": gateway.timekeeper.synchronized,
        "reload_refused": gateway.reload_refused,
        "nodes": nodes,
        "uplink": _uplink(gateway, now),
    }
    store = gateway.store
    if store is not None:
        stats = store.stats
        oldest = await store.oldest()
        status["buffer"] = {
            "path": str(store.path),
            "backlog": stats.depth + stats.pending,
            "oldest_age_s": _age_s(now_ms, oldest),
            "drain_per_s": None if sampler is None or sampler.rate() is None
            else round(sampler.rate() or 0.0, 2),
            "received": stats.received,
            "forwarded": stats.forwarded,
            "evicted": stats.evicted,
            "unstored": stats.unstored,
            "storage": stats.storage,
            "history_readings": stats.history_readings,
            "history_bytes": stats.history_bytes,
        }
    return status


def _uplink(gateway: Gateway, now: float) -> dict[str, Any]:
    tb = gateway.config.thingsboard
    uplink = gateway.uplink
    if tb is None or uplink is None:
        return {"configured": False, "connected": False}
    return {
        "configured": True,
        "host": f"{tb.host}:{tb.port}",
        "connected": uplink.connected,
        "since": int((now - uplink.in_state_s()) * 1000),
        "last_error": None if uplink.connected else uplink.stats.last_error,
        "reconnects": uplink.stats.reconnects,
    }


def backlog_text(n: int) -> str:
    """A backlog for a one-line summary: exact below 1000, else two significant digits."""
    if n < 1000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.2g}k" if n < 10_000 else f"{n // 1000}k"
    return f"{n / 1_000_000:.2g}M"


def summary(status: dict[str, Any]) -> str:
    """The one line systemd shows: nodes up, backlog, ThingsBoard (and a storage fault).

    A refused reload comes first (``reload refused: <why> · ...``) until a
    reload is applied: the running config is not the file's.
    """
    nodes = status["nodes"]
    up = sum(1 for n in nodes if n["link"] == "up")
    parts = [f"{up}/{len(nodes)} nodes up"]
    if status.get("reload_refused"):
        parts.insert(0, f"reload refused: {status['reload_refused']}")
    buffer = status.get("buffer")
    if buffer is not None:
        parts.append(f"backlog {backlog_text(buffer['backlog'])}")
        if buffer["storage"] != "ok":
            parts.append(f"storage {buffer['storage']}")
    uplink = status["uplink"]
    if not uplink["configured"]:
        parts.append("offline (buffer only)")
    else:
        parts.append(f"ThingsBoard {'connected' if uplink['connected'] else 'disconnected'}")
    return " · ".join(parts)


class StatusWatcher:
    """Samples the counters every second; tells systemd the STATUS= line when it changes."""

    def __init__(
        self,
        gateway: Gateway,
        send: Callable[[str], object],
        *,
        growth_window_s: float = GROWTH_WINDOW_S,
        growth_min: int = GROWTH_MIN,
    ) -> None:
        self._gateway = gateway
        self._send = send
        self.sampler = Sampler()
        #: The oldest reading not forwarded yet (ts ms), as of the last check.
        self.oldest: int | None = None
        self._growth_window = growth_window_s
        self._growth_min = growth_min
        # (monotonic s, backlog) while connected; cleared when the uplink is not.
        self._backlog: collections.deque[tuple[float, int]] = collections.deque()
        self._line: str | None = None
        self._facts: tuple[object, ...] | None = None
        self._sent_at = -float("inf")

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(SAMPLE_S)

    async def check(self) -> None:
        """Sample, and send the line if it changed (a backlog-only change not too often)."""
        gateway = self._gateway
        now = time.monotonic()
        store = gateway.store
        if store is not None:
            stats = store.stats
            self.sampler.add(now, stats.forwarded)
            self.oldest = await store.oldest()
            if gateway.uplink is not None and gateway.uplink.connected:
                self._backlog.append((now, stats.depth + stats.pending))
                while len(self._backlog) > 2 and now - self._backlog[1][0] >= self._growth_window:
                    self._backlog.popleft()
            else:
                self._backlog.clear()
        line = self.line()
        facts = self._facts_of()
        if line == self._line:
            return
        if facts == self._facts and now - self._sent_at < BACKLOG_STATUS_S:
            return  # only the backlog moved: not a line a second
        self._line, self._facts, self._sent_at = line, facts, now
        self._send(f"STATUS={line}")

    def growing(self) -> bool:
        """Whether the backlog grew over the whole window while connected (see GROWTH_*)."""
        if len(self._backlog) < 2:
            return False
        (t0, first), (t1, last) = self._backlog[0], self._backlog[-1]
        return t1 - t0 >= self._growth_window * 0.9 and last - first >= self._growth_min

    def health(self) -> dict[str, Any]:
        """Figures for the gateway's health telemetry (ThingsBoard's alarms use them)."""
        now_ms = int(self._gateway.clock.time() * 1000)
        rate = self.sampler.rate()
        return {
            "backlog_oldest_age_s": _age_s(now_ms, self.oldest) or 0.0,
            "drain_per_s": round(rate, 2) if rate is not None else 0.0,
            "backlog_growing": self.growing(),
        }

    def line(self) -> str:
        """The summary line as of now (no I/O: counters and flags in memory)."""
        return summary(self._now())

    def sent(self, line: str) -> None:
        """``line`` went to systemd by other means (with READY=1): do not send it again."""
        self._line, self._facts, self._sent_at = line, self._facts_of(), time.monotonic()

    def _now(self) -> dict[str, Any]:
        gateway = self._gateway
        status: dict[str, Any] = {
            "reload_refused": gateway.reload_refused,
            "nodes": [{"link": "up" if r.link_up else "down"} for r in gateway.runners.values()],
            "uplink": {"configured": gateway.uplink is not None,
                       "connected": gateway.uplink is not None and gateway.uplink.connected},
        }
        if gateway.store is not None:
            stats = gateway.store.stats
            status["buffer"] = {"backlog": stats.depth + stats.pending, "storage": stats.storage}
        return status

    def _facts_of(self) -> tuple[object, ...]:
        """Everything in the line but the backlog."""
        status = self._now()
        buffer = status.get("buffer") or {}
        return (
            status["reload_refused"],
            tuple(n["link"] for n in status["nodes"]),
            status["uplink"]["connected"],
            buffer.get("storage"),
        )
