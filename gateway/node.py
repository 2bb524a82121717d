"""One task per node: keep the link up, poll, stamp and store every reading.

A `NodeRunner` owns everything about one NodeLink node: the link (reconnected
with backoff), the latest values, the counters, and (when the node has a
`control:` section) its `NodeControl`. A slow or dead node only ever delays
its own task.

A node counts as up only while it serves readings: from its first reading
after a (re)connect until a read goes unanswered. A node that accepts the
connection, or even answers ``hello``, but sends no reading is down, with
the reason. Nothing a node sends can end the daemon: a bad value or key
costs only itself (dropped and counted), and any exception raised while
handling a reading or a session is counted and logged once per kind
(`gateway.faults`), after which the node task reconnects.

Conductivity crosses two edges here (rules/units.py): a reading's NodeLink
`ec` (µS/cm) becomes the internal `tds` (ppm, 500 scale) that control and
severity use, and what is stored for ThingsBoard and shown by `get_state`
carries it under the configured unit's key (`ec`, `tds`, `tds_640`,
`tds_700`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine, Mapping
from typing import Any

from drivers.backoff import Backoff
from drivers.errors import LinkDown, LinkError, NodeRefused, RequestTimeout
from drivers.link import Link, LinkStats, open_link
from drivers.nodelink import Event, Reply, clean_values
from gateway.clock import Clock
from gateway.config import CalibrationMap, NodeConfig
from gateway.control import NodeControl
from gateway.errors import CommandError
from gateway.faults import FaultLog
from gateway.monitor import NodeMonitor, severity_bands
from gateway.service import fields
from gateway.store import InvalidMessage, Store
from gateway.tbmsg import drop_unsendable
from rules import units
from rules.calibration import Calibrator
from rules.severity import Severity

log = logging.getLogger("hydrogate.node")

#: Failed reads in a row after which the link is treated as down and reopened.
MAX_FAILED_READS = 3
#: Actuator names whose on/off state is sent as ``<actuator>_on`` telemetry.
_PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


class NodeRunner:
    """Polls one node and turns its replies and reports into stored readings."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        store: Store,
        clock: Clock,
        backoff: Backoff | None = None,
        faults: FaultLog | None = None,
        config_mtime: float | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self._store = store
        self._clock = clock
        self._backoff = backoff or Backoff()
        self.faults = faults if faults is not None else FaultLog(log)
        self.stats = LinkStats()
        self.link_up = False
        self.link_reason = "not connected yet"
        #: When (wall s) the link last went up or down (or the task started).
        self.link_since = clock.time()
        self._link_sent: bool | None = None  # the link state last sent as telemetry
        self.fw: str | None = None
        self.sensors: tuple[str, ...] = ()
        self.actuators: tuple[str, ...] = ()
        self.running: dict[str, int] = {}
        self.latest: dict[str, float] = {}
        self.latest_ts: int | None = None
        self.flags: dict[str, str] = {}
        self.readings = 0
        self.monitor = NodeMonitor(config.name)
        self._calibrator = Calibrator(config.calibration) if config.calibration else None
        self._calibrated: frozenset[str] = frozenset(config.calibration)  # keys a map makes
        self._measured_maps: dict[str, CalibrationMap] = {}  # guided calibrations, over the file's
        self.unit = units.unit(config.conductivity)
        self._link: Link | None = None
        self._session_tg: asyncio.TaskGroup | None = None
        self._reading_event = asyncio.Event()
        # Control is handed this runner as its `gateway.ports.NodePort`: it reads the
        # latest values and link state and acts through the port's few methods only.
        self.control = NodeControl(self, store=store, clock=clock, config_mtime=config_mtime)

    # ------------------------------------------------------------------ link
    async def run(self) -> None:
        """Run until cancelled: connect, poll, reconnect with backoff."""
        await self.control.load_settings()
        try:
            while True:
                try:
                    await self._session()
                except LinkError as exc:
                    self._set_down(str(exc) or type(exc).__name__)
                except OSError as exc:
                    self._set_down(f"{type(exc).__name__}: {exc}")
                except Exception as exc:  # noqa: BLE001 - a bug must cost a reconnect, not the daemon
                    self.stats.count("handler_error")
                    self.faults.failed(
                        f"node {self.name} session",
                        f"node {self.name}: session failed",
                        exc,
                        extra=fields(node=self.name),
                    )
                    self._set_down(f"internal error: {type(exc).__name__}")
                await asyncio.sleep(self._backoff.next())
        finally:
            self._link = None
            self.control.close()

    async def _session(self) -> None:
        cfg = self.config
        async with open_link(
            cfg.url,
            stats=self.stats,
            on_event=self._on_event,
            timeout=cfg.timeout,
            retries=cfg.retries,
            keepalive=cfg.keepalive,
            clock=self._clock,
        ) as link:
            hello = await link.request("hello")
            self._on_hello(hello)
            self.control.announced(self.actuators)
            # We lost track of what ran while we were away: start from all off.
            await link.request("stop")
            self.running = {}
            self._link = link
            # Up (and the backoff reset) only once it serves a reading: a node
            # that answers hello but never a read must not look healthy.
            self.link_reason = "connected, no reading yet"
            try:
                async with asyncio.TaskGroup() as tg:
                    self._session_tg = tg
                    tg.create_task(self._poll_loop(link), name=f"poll:{self.name}")
                    tg.create_task(self._watch(link), name=f"watch:{self.name}")
                    if self.control.automatic:
                        tg.create_task(
                            self.control.run(self._reading_event), name=f"control:{self.name}"
                        )
            except* LinkError as group:
                raise group.exceptions[0] from None
            finally:
                self._link = None
                self._session_tg = None
                self.control.link_lost()

    async def _watch(self, link: Link) -> None:
        """End the session as soon as the transport closes, even between polls."""
        await link.wait_down()
        raise LinkDown("connection closed")

    async def _poll_loop(self, link: Link) -> None:
        interval = self.config.poll_interval
        failures = 0
        next_at = self._clock.monotonic()
        while True:
            try:
                reply = await link.request("read")
            except RequestTimeout as exc:
                failures += 1
                self._set_down(f"no answer to read ({exc})")  # down now, not after the retries
                if failures >= MAX_FAILED_READS:
                    raise
            except NodeRefused as exc:  # the node is there but cannot read its sensors
                self.stats.count("read_refused")
                log.debug("node %s refused read: %s", self.name, exc.error)
            else:
                failures = 0
                self.take_reading(reply.body)
            next_at += interval
            now = self._clock.monotonic()
            if next_at < now:  # fell behind: skip missed polls rather than burst
                next_at = now + interval - ((now - next_at) % interval)
            await asyncio.sleep(next_at - now)

    def _on_hello(self, hello: Reply) -> None:
        body = hello.body
        self.fw = str(body.get("fw", ""))
        self.sensors = tuple(body.get("sensors", ()))
        self.actuators = tuple(body.get("actuators", ()))
        error = body.get("error")
        if isinstance(error, str) and error:  # e.g. the reference firmware's config.json errors
            log.warning("node %s reports a problem: %s", self.name, error,
                        extra=fields(node=self.name))
        reported = body.get("node")
        if reported and reported != self.name:
            log.warning(  # the URL may lead to another tank's node: someone must look
                "node %s introduces itself as %r (fw %s)",
                self.name,
                reported,
                self.fw,
                extra=fields(node=self.name),
            )

    def _set_up(self) -> None:
        self._backoff.reset()
        if not self.link_up:
            self.link_since = self._clock.time()
            log.info(
                "node %s link up (%s, fw %s, actuators %s)",
                self.name,
                self.config.url,
                self.fw,
                ",".join(self.actuators) or "none",
                extra=fields(node=self.name),
            )
        self.link_up = True
        self.link_reason = ""

    def _set_down(self, reason: str) -> None:
        if self.link_up or self.link_reason != reason:
            log.warning(
                "node %s link down: %s", self.name, reason, extra=fields(node=self.name)
            )
        if self.link_up:
            self.link_since = self._clock.time()
        self.link_up = False
        self.link_reason = reason
        self._send_link()
        if self._link is None:  # still connected (no reading yet): what runs is still known
            self.running = {}

    # -------------------------------------------------------------- readings
    def _send_link(self) -> None:
        """Telemetry ``link`` (``up``/``down``) and ``link_reason`` whenever the state changes.

        Sent from the first state on (a node down since the start is down for
        ThingsBoard too), so the profile's alarm can follow it.
        """
        if self._link_sent is self.link_up:
            return
        self._link_sent = self.link_up
        self.record(int(self._clock.time() * 1000), {
            "link": "up" if self.link_up else "down",
            "link_reason": self.link_reason or "ok",
        })

    def _on_event(self, event: Event) -> None:
        body = event.body
        if event.event == "report":
            self.take_reading(body)
        elif event.event == "actuator":
            actuator = body.get("actuator")
            if isinstance(actuator, str):
                on = 1 if body.get("on") else 0
                if (
                    self.running.get(actuator) != on  # the node's own word on its pumps
                    and actuator in self.actuators
                    and _PLAIN_KEY.fullmatch(actuator)
                ):
                    self.record(int(self._clock.time() * 1000), {f"{actuator}_on": on})
                self.running[actuator] = on
        elif event.event == "boot":
            log.info(  # after every power-up of the site too: not by itself a problem
                "node %s (re)started (fw %s)",
                self.name,
                body.get("fw"),
                extra=fields(node=self.name),
            )
            self.running = {}
            self.control.node_rebooted()

    def take_reading(self, body: Mapping[str, Any]) -> None:
        """One reading from a ``read`` reply or a ``report``; never raises.

        An exception here is a bug of ours met on some node input: it costs
        that reading (counted as ``handler_error``, logged once per kind),
        never the poll loop or the daemon.
        """
        try:
            self._on_reading(body)
        except Exception as exc:  # noqa: BLE001 - node input must never stop the node task
            self.stats.count("handler_error")
            self.faults.failed(
                f"node {self.name} reading",
                f"node {self.name}: a reading could not be handled",
                exc,
                extra=fields(node=self.name),
            )

    def _on_reading(self, body: Mapping[str, Any]) -> None:
        """Calibrate, stamp with our clock and commit one reading."""
        raw = body.get("values")
        if type(raw) is not dict:  # decode() guarantees a dict for replies and reports
            self.stats.count("field")
            return
        values, dropped = clean_values(raw)
        if dropped:
            self.stats.count("bad_value", dropped)
        self.control.observe_raw(values)
        flags: Mapping[str, str] = {}
        if self._calibrator is not None:
            calibrated = self._calibrator.apply(values)
            values, flags = calibrated.values, calibrated.flags
        values = units.inbound(values, calibrated=self._calibrated)
        calibrating = self.control.calibrating
        if calibrating is not None and calibrating in values:
            flags = {**flags, calibrating: "calibrating"}  # the probe is in a buffer, not the tank
        ts = int(self._clock.time() * 1000)
        entry: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
        for key, flag in flags.items():
            entry[f"{key}_flag"] = flag
        entry = units.outbound(entry, self.unit)
        if not entry:
            return
        try:
            self._store.append(self.name, ts, entry)
        except InvalidMessage:
            # One bad entry (a calibration gone non-finite, ...) must not cost the
            # others: keep what can be sent, count what cannot.
            entry, bad = drop_unsendable(entry)
            self.stats.count("bad_value", len(bad))
            values = {k: v for k, v in values.items() if k not in bad}
            try:
                if not entry:
                    raise InvalidMessage("no value left to send") from None
                self._store.append(self.name, ts, entry)
            except InvalidMessage as exc:
                self.stats.count("invalid_reading")
                self.faults.refused(
                    f"node {self.name}:invalid_reading",
                    f"node {self.name}: reading refused: {exc}",
                    extra=fields(node=self.name),
                )
                return
        if self._link is not None:  # a report may arrive before the session is set up
            self._set_up()
            self._send_link()
        self.readings += 1
        self.latest_ts = ts
        for key, value in values.items():
            if value is None:
                self.latest.pop(key, None)
            else:
                self.latest[key] = value
        self.flags = dict(flags)
        self.control.observe(values)
        self._reading_event.set()
        self._update_severity(ts)

    def _update_severity(self, ts: int) -> None:
        now = self._clock.monotonic()
        if not self.monitor.due(now):
            return
        control = self.control
        entry = self.monitor.update(
            now,
            self.latest,
            severity_bands(control.plant.tank_volume_l, control.settings,
                           self.config.conductivity),
            calibrating=control.calibrating,
            alarm=control.alarm,
            reminders=control.reminders(),
        )
        if entry is not None:
            self.record(ts, entry)

    @property
    def severity(self) -> Severity | None:
        """The node's last assessed severity (gateway/monitor.py), ``None`` before a reading."""
        return self.monitor.severity

    def set_calibration(self, key: str, measured: CalibrationMap | None) -> None:
        """A guided calibration's map for ``key`` from the next reading on (``None``: none)."""
        if measured is None:
            self._measured_maps.pop(key, None)
        else:
            self._measured_maps[key] = measured
        maps = {**self.config.calibration, **self._measured_maps}
        self._calibrator = Calibrator(maps) if maps else None
        self._calibrated = frozenset(maps)

    def calibration_map(self, key: str) -> CalibrationMap | None:
        """The map in use for ``key``: a guided calibration's, else the config file's."""
        return self._measured_maps.get(key, self.config.calibration.get(key))

    def record(self, ts: int, values: Mapping[str, Any]) -> None:
        """Commit a gateway-made entry (actuation, severity, refusal) for this device."""
        try:
            self._store.append(self.name, ts, values)
        except InvalidMessage as exc:  # our own entries are small; this is a bug
            log.error("node %s: entry refused by validation: %s", self.name, exc)

    # ------------------------------------------- commands (the port of gateway/ports.py)
    def _down(self) -> CommandError:
        return CommandError(f"node {self.name} link is down ({self.link_reason})")

    def require_link(self) -> None:
        """Raise CommandError with the reason unless the node serves readings."""
        if self._link is None or not self.link_up:
            raise self._down()

    def connected(self) -> bool:
        """Whether a session is open (the node answered hello), readings or not.

        Enough to send ``stop``: stopping is never refused for want of readings.
        """
        return self._link is not None

    def require_connected(self) -> None:
        """Raise CommandError with the reason unless a session is open."""
        if self._link is None:
            raise self._down()

    async def send_actuate(self, actuator: str, duty: int, ms: int) -> None:
        """NodeLink ``actuate`` (control checked it against every safety limit first)."""
        self.require_link()
        assert self._link is not None
        await self._link.request("actuate", actuator=actuator, duty=duty, ms=ms)
        self.running[actuator] = 1

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task of the link session: a lost link or a stop cancels it."""
        tg = self._session_tg
        try:
            if tg is None or not self.link_up:
                raise RuntimeError("no link session")
            return tg.create_task(coro, name=name)
        except RuntimeError as exc:
            coro.close()
            raise self._down() from exc

    async def send_stop(self, *, within: float = 3.0) -> bool:
        """Send NodeLink `stop`; True if the node confirmed it."""
        link = self._link
        if link is None:
            return False
        try:
            async with asyncio.timeout(within):
                await link.request("stop")
        except (LinkError, TimeoutError) as exc:
            log.warning(
                "node %s: stop not confirmed: %s", self.name, exc, extra=fields(node=self.name)
            )
            return False
        self.running = {key: 0 for key in self.running}
        return True

    async def shutdown(self) -> None:
        """Clean stop: abort any cycle and command every actuator off."""
        self.control.abort("gateway stopping")
        await self.control.cancel_procedures("gateway stopping")
        if self.connected():
            await self.control.stop_actuators()

    def state(self) -> dict[str, Any]:
        """The node's state as `get_state` reports it."""
        state: dict[str, Any] = {
            "values": units.outbound(dict(self.latest), self.unit),
            "ts": self.latest_ts,
            "actuators": {a: self.running.get(a, 0) for a in self.actuators},
            "link": "up" if self.link_up else "down",
            "link_reason": self.link_reason or None,
            "link_errors": self.stats.total_errors(),
            "fw": self.fw,
        }
        if self.flags:
            state["flags"] = units.outbound(dict(self.flags), self.unit)
        if self.severity is not None:
            state["severity"] = self.severity.level
            state["severity_reason"] = self.severity.reason
        state.update(self.control.state())
        return state
