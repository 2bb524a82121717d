"""The daemon: builds the store, node tasks and uplink from a Config and runs them.

Every task has one owner, the TaskGroup of `Gateway.run`. Signals only set
flags: SIGTERM/SIGINT stop (actuators commanded off, buffer committed),
SIGHUP reloads the config file (a bad file is refused and the running
config stays). Under systemd the gateway says READY=1 once running, wraps a
reload in RELOADING=1 ... READY=1 with a STATUS= that names a refusal, and
pings the watchdog while the store's writer thread answers (`run_watchdog`).
Each node's task runs in a context whose `service.NODE` is the node's name,
so every line it logs carries ``NODE=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import time
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.clock import Clock, SystemClock, TimeKeeper, describe_seconds
from gateway.config import RUNTIME_KEYS, Config, ConfigError, NodeConfig, load_config
from gateway.errors import CommandError
from gateway.faults import FaultLog, quote
from gateway.localrpc import LocalServer, socket_path
from gateway.node import NodeRunner
from gateway.rpc import answer_gateway, answer_node
from gateway.service import NODE, monotonic_usec, notify, run_watchdog, watchdog_interval
from gateway.status import StatusWatcher, collect
from gateway.store import Store, StoreError
from gateway.tasks import cancel_and_wait
from gateway.uplink import Uplink

log = logging.getLogger("hydrogate")

#: SIGTERM must finish within 10 s (docs/references.md, "Interface"); stopping actuators
#: gets this much.
STOP_ACTUATORS_S = 5.0
#: Seconds between two looks at the system clock (steps, synchronisation).
CLOCK_CHECK_S = 0.5
#: Keys a node's shared attributes may set: the config's run-time settings.
SHARED_KEYS = RUNTIME_KEYS
#: A shared attribute whose every update acknowledges a stop of automatic control (the pH
#: lock); it is an event, not a setting, so it is never requested at a session start.
ACKNOWLEDGE = "acknowledge"


def node_context(name: str) -> contextvars.Context:
    """A copy of the current context in which `service.NODE` is ``name``."""
    ctx = contextvars.copy_context()
    ctx.run(NODE.set, name)
    return ctx


class Gateway:
    """The running gateway: node tasks, store, uplink; also the uplink's handler."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        clock: Clock | None = None,
        timekeeper: TimeKeeper | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock or SystemClock()
        self.timekeeper = timekeeper or TimeKeeper(self.clock)
        self.started = time.monotonic()
        self.runners: dict[str, NodeRunner] = {}
        self.store: Store | None = None
        self.uplink: Uplink | None = None
        self.local: LocalServer | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.ready = asyncio.Event()
        #: Faults of outside input (server messages, node frames), by kind: the
        #: uplink, every node task and the handlers here count into this one.
        self.faults = FaultLog(log)
        #: When the config file was last modified: the date of its edits (gateway/settings.py).
        self.config_mtime = self._mtime()
        #: Why the last reload was refused (the running config is not the file's), or None.
        self.reload_refused: str | None = None
        #: The counters over time (drain rate, backlog trend) and systemd's STATUS= line.
        self.status_watcher = StatusWatcher(self, notify)

    # ------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        """Ask the gateway to stop cleanly (signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stop.is_set()

    async def wait_stopping(self) -> None:
        """Wait until a stop is requested."""
        await self._stop.wait()

    def request_reload(self) -> None:
        """Ask the gateway to re-read its config file (signal-safe)."""
        self._reload.set()

    async def run(self) -> None:
        """Run until `request_stop`; then stop actuators, say goodbye, commit."""
        cfg = self.config
        async with Store.open(
            cfg.storage.path,
            max_rows=cfg.storage.max_rows,
            max_bytes=cfg.storage.max_bytes,
            max_payload_bytes=cfg.thingsboard.max_payload_bytes if cfg.thingsboard else 65536,
            commit_interval=cfg.storage.commit_interval,
            sync_interval=cfg.storage.sync_interval,
            clock=self.clock,
            history_days=cfg.storage.history_days,
            history_max_bytes=cfg.storage.history_max_bytes,
        ) as store:
            self.store = store
            await self._clock_at_start(store)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._tasks["clock"] = tg.create_task(self._watch_clock(store), name="clock")
                for node in cfg.nodes:
                    self._start_node(node)
                self._start_uplink()
                self._start_local()
                self._tasks["status"] = tg.create_task(self.status_watcher.run(), name="status")
                interval = watchdog_interval()
                if interval is not None:
                    self._tasks["watchdog"] = tg.create_task(
                        run_watchdog(interval, store.flush), name="watchdog"
                    )
                self._ready_status()
                self.ready.set()
                log.info(
                    "hydrogate %s running: %d nodes, buffer %s, %s",
                    cfg.gateway.name,
                    len(cfg.nodes),
                    cfg.storage.path,
                    f"ThingsBoard {cfg.thingsboard.host}:{cfg.thingsboard.port}"
                    if cfg.thingsboard
                    else "offline (buffer only)",
                )
                await self._supervise()
                notify("STOPPING=1\nSTATUS=stopping: pumps off, committing the buffer")
                await self._shutdown()
            self._tg = None
        log.info("hydrogate stopped; %d readings buffered", store.stats.depth)

    # ---------------------------------------------------------------- clock
    async def _clock_at_start(self, store: Store) -> None:
        """Hold readings while the clock is not synchronised; release what an earlier run held."""
        keeper = self.timekeeper
        wait = self.config.storage.clock_sync_wait
        if keeper.unattended:
            log.warning(
                "no NTP client synchronises the system clock here: readings are stamped by"
                " the clock as it is"
            )
        if not keeper.synchronized and wait > 0:
            store.hold()
            log.warning(
                "system clock not synchronised yet (no NTP sync): readings are kept back and"
                " re-stamped once it is; after %s of uplink without a sync the clock is"
                " trusted as it is (storage.clock_sync_wait)",
                describe_seconds(wait).lstrip("+"),
            )
        elif store.holding:
            await self._release(store, "held before a restart")

    async def _watch_clock(self, store: Store) -> None:
        """Notice clock steps and synchronisation; release held readings when it is time."""
        keeper = self.timekeeper
        wait = self.config.storage.clock_sync_wait
        waited = 0.0
        last = self.clock.monotonic()
        while True:
            await asyncio.sleep(CLOCK_CHECK_S)
            now = self.clock.monotonic()
            keeper.check()
            if self.uplink is not None and self.uplink.connected:
                waited += now - last
            last = now
            if not store.holding:
                continue
            if keeper.synchronized:
                await self._release(store, "the clock is synchronised")
            elif waited >= wait:
                log.warning(
                    "system clock still not synchronised after %s of uplink: trusting it as it is",
                    describe_seconds(waited).lstrip("+"),
                )
                await self._release(store, "the clock is trusted as it is")

    async def _release(self, store: Store, why: str) -> None:
        offset_ms = round(self.timekeeper.offset * 1000)
        try:
            count = await store.release(offset_ms)
        except StoreError as exc:  # e.g. arriving while the store closes: never fatal
            log.error("held readings not released (%s): %s", why, exc)
            return
        if count:
            log.info("%s: %d readings taken before it re-stamped and released", why, count)

    async def _supervise(self) -> None:
        while not self._stop.is_set():
            stop = asyncio.ensure_future(self._stop.wait())
            reload = asyncio.ensure_future(self._reload.wait())
            try:
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                reload.cancel()
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")
                self.reload_refused = await self.reload()
                self._ready_status()

    def _ready_status(self) -> None:
        """READY=1 with the one-line state systemctl status shows (gateway/status.py)."""
        line = self.status_watcher.line()
        notify(f"READY=1\nSTATUS={line}")
        self.status_watcher.sent(line)

    def _mtime(self) -> float | None:
        try:
            return None if self.config_path is None else self.config_path.stat().st_mtime
        except OSError:
            return None

    async def _shutdown(self) -> None:
        runners = list(self.runners.values())
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_ACTUATORS_S):
                # Each in its node's context, so its lines carry NODE=; awaited here.
                await asyncio.gather(*(
                    loop.create_task(r.shutdown(), name=f"shutdown:{r.name}",
                                     context=node_context(r.name))
                    for r in runners
                ))
        for name in list(self._tasks):
            await self._stop_task(name)
        if self.uplink is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.uplink.say_goodbye()
            await self._stop_task("uplink")
        assert self.store is not None
        await self.store.flush()

    def _start_node(self, node: NodeConfig) -> None:
        assert self._tg is not None and self.store is not None
        runner = NodeRunner(node, store=self.store, clock=self.clock, faults=self.faults,
                            config_mtime=self.config_mtime)
        runner.control.on_change = lambda: self._publish_settings(node.name)
        self.runners[node.name] = runner
        self._tasks[f"node:{node.name}"] = self._tg.create_task(
            runner.run(), name=f"node:{node.name}", context=node_context(node.name)
        )

    def _start_uplink(self) -> None:
        tb = self.config.thingsboard
        if tb is None or self._tg is None or self.store is None:
            self.uplink = None
            return
        self.uplink = Uplink(
            tb,
            gateway_name=self.config.gateway.name,
            store=self.store,
            handler=self,
            devices=lambda: list(self.runners),
            health_interval=self.config.gateway.health_interval,
            health_extra=self.health_extra,
            clock=self.clock,
            faults=self.faults,
        )
        for name in self.runners:
            self._publish_settings(name)
        self._tasks["uplink"] = self._tg.create_task(self.uplink.run(), name="uplink")

    def _publish_settings(self, name: str) -> None:
        """Hand the uplink what is in force on a node (its client attributes; sent at once if
        connected, else at the next session start, so never lost across a reconnect)."""
        runner = self.runners.get(name)
        if runner is None or self.uplink is None:
            return
        attrs = runner.control.published()
        if attrs:
            self.uplink.set_client_attributes(name, attrs)

    def _start_local(self) -> None:
        """The local control socket (gateway/localrpc.py), for `hydrogate` commands."""
        assert self._tg is not None
        self.local = LocalServer(socket_path(self.config), self)
        self._tasks["local"] = self._tg.create_task(self.local.run(), name="local-socket")

    async def _stop_task(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            await cancel_and_wait(task)

    # ---------------------------------------------------------------- reload
    async def reload(self) -> str | None:
        """Apply the config file again; a bad file changes nothing.

        Returns None when the file was applied, else why it was refused.
        """
        if self.config_path is None:
            log.warning("SIGHUP ignored: no config file to reload")
            return "no config file to reload"
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            log.error(
                "reload refused, keeping the running config; fix %s (check it with "
                "`hydrogate check-config -c %s`):\n%s",
                self.config_path, self.config_path, exc,
            )
            first = exc.errors[0] if exc.errors else ("", str(exc))
            more = f" (+{len(exc.errors) - 1} more)" if len(exc.errors) > 1 else ""
            return f"{first[0]}: {first[1]}{more}"
        old = self.config
        self.config_mtime = self._mtime()
        if new.storage != old.storage:
            log.warning("storage settings changed: they take effect at the next restart")
        self.config = new
        old_nodes = {n.name: n for n in old.nodes}
        new_nodes = {n.name: n for n in new.nodes}
        for name, node in old_nodes.items():
            if new_nodes.get(name) != node:
                await self._remove_node(name, left=name not in new_nodes)
        for name, node in new_nodes.items():
            if old_nodes.get(name) != node:
                self._start_node(node)
                if self.uplink is not None:
                    await self.uplink.device_added(name)
        if new.thingsboard != old.thingsboard or new.gateway != old.gateway:
            await self._stop_task("uplink")
            self._start_uplink()
        log.info("configuration reloaded from %s", self.config_path)
        return None

    async def _remove_node(self, name: str, *, left: bool) -> None:
        runner = self.runners.pop(name, None)
        if runner is not None:
            token = NODE.set(name)  # this reload's lines about the node say which
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_ACTUATORS_S):
                        await runner.shutdown()
            finally:
                NODE.reset(token)
        await self._stop_task(f"node:{name}")
        if left and self.uplink is not None:
            self.uplink.forget_client_attributes(name)
            await self.uplink.device_removed(name)
        log.info("node %s %s", name, "removed" if left else "restarted with new settings",
                 extra={"NODE": name})

    # ------------------------------------------------- uplink handler (RPC, attributes)
    def shared_attribute_keys(self, device: str) -> list[str]:
        """The shared attributes to request for a device at each session start."""
        runner = self.runners.get(device)
        if runner is None or runner.control.settings is None:
            return []
        # The setpoint in the node's unit only: a stale one in the other could contradict it.
        other = "tds_setpoint" if runner.config.conductivity == "ec" else "ec_setpoint"
        return [k for k in SHARED_KEYS if k != other]

    def on_attributes(
        self, device: str, data: Mapping[str, Any], *, response: bool = False
    ) -> None:
        """Shared attributes changed on the server (``response``: asked for at a session start)."""
        runner = self.runners.get(device)
        if runner is None:
            self.faults.refused(
                "attributes:unknown_device",
                f"attributes for unknown device {quote(device)} ignored",
            )
            return
        if ACKNOWLEDGE in data and not response and self._tg is not None:
            self._tg.create_task(
                self._isolated(device, "acknowledge",
                               runner.control.acknowledge("shared attribute acknowledge")),
                name=f"acknowledge:{device}",
            )
        update = {k: v for k, v in data.items() if k in SHARED_KEYS}
        raw_deleted = data.get("deleted")
        deleted = [k for k in raw_deleted if k in SHARED_KEYS] if isinstance(
            raw_deleted, list) else []
        ignored = sorted(set(data) - set(update) - {"deleted", ACKNOWLEDGE})
        if ignored:
            shown = ", ".join(quote(k, 40) for k in ignored[:5])
            more = f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""
            log.info("device %s: attributes %s%s are not settings, ignored", device, shown, more)
        if not (update or deleted) or runner.control.settings is None or self._tg is None:
            return
        self._tg.create_task(
            self._apply_attributes(runner, update, deleted, response=response),
            name=f"attributes:{device}",
            context=node_context(device),
        )

    async def _apply_attributes(
        self, runner: NodeRunner, update: Mapping[str, Any], deleted: list[str], *,
        response: bool,
    ) -> None:
        """Apply one update; whatever it holds, this task ends quietly (never the daemon)."""
        try:
            await runner.control.server_update(update, deleted, response=response)
        except CommandError:
            pass  # refused as a whole, logged and published by update_settings
        except StoreError as exc:  # e.g. arriving while the store closes: never fatal
            log.error("node %s: settings applied but not saved: %s", runner.name, exc)
        except Exception as exc:  # noqa: BLE001 - an attribute update must never stop the daemon
            self.faults.failed(
                "attributes",
                f"node {runner.name}: applying shared attributes failed",
                exc,
                extra={"NODE": runner.name},
            )

    async def _isolated(self, device: str, what: str, work: Awaitable[Any]) -> None:
        """Await work that server input started in the daemon's TaskGroup, never ending it."""
        try:
            await work
        except Exception as exc:  # noqa: BLE001 - outside input must never stop the daemon
            self.faults.failed(what, f"node {device}: {what} failed", exc, extra={"NODE": device})

    async def on_rpc(self, device: str, method: str, params: Any) -> dict[str, Any]:
        """A server-side RPC to one node's device; the reply's `data` (gateway/rpc.py's table)."""
        runner = self.runners.get(device)
        if runner is None:
            return {"success": False, "error": f"unknown device {device!r}"}
        token = NODE.set(device)  # this RPC's task: its lines are about the node
        try:
            return await answer_node(runner, method, params)
        finally:
            NODE.reset(token)

    async def on_gateway_rpc(self, method: str, params: Any) -> dict[str, Any]:
        """A request to the gateway itself (local socket, no device); the reply's data."""
        return await answer_gateway(self, method)

    # The gateway-level requests of gateway/rpc.py's table.
    async def rpc_ping(self) -> dict[str, Any]:
        """``ping``: who answers, and how long it has run."""
        return {
            "gateway": self.config.gateway.name,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "nodes": list(self.runners),
        }

    async def rpc_status(self) -> dict[str, Any]:
        """``status``: the gateway's state (`hydrogate status`)."""
        return await collect(self, self.status_watcher.sampler)

    async def rpc_flush(self) -> dict[str, Any]:
        """``flush`` (`hydrogate export`): commit what waits in memory for the history."""
        if self.store is None:
            raise CommandError("the buffer is not open")
        await self.store.flush_history()
        return {}

    def health_extra(self) -> Mapping[str, Any]:
        """Per-node figures added to the gateway's own health telemetry."""
        extra: dict[str, Any] = {
            "nodes_up": sum(r.link_up for r in self.runners.values()),
            # Outside input refused by validation / exceptions caught at the edge.
            "input_refused": self.faults.malformed,
            "input_faults": self.faults.failures,
        }
        if self.store is not None:
            stats = self.store.stats
            extra["storage"] = stats.storage
            extra["unstored"] = stats.unstored
            extra["backlog"] = stats.depth + stats.pending
            extra["history_readings"] = stats.history_readings
        extra.update(self.status_watcher.health())
        extra["clock_synced"] = self.timekeeper.synchronized
        for name, runner in self.runners.items():
            extra[f"{name}_link_errors"] = runner.stats.total_errors()
            extra[f"{name}_link"] = "up" if runner.link_up else "down"
        return extra


async def run_daemon(
    config: Config,
    *,
    config_path: Path | None = None,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> int:
    """`hydrogate run`: the gateway with its signal handlers; returns the exit code."""
    gateway = Gateway(config, config_path=config_path)
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, gateway.request_stop)
    loop.add_signal_handler(signal.SIGHUP, gateway.request_reload)
    try:
        await gateway.run()
    finally:
        for sig in (*signals, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0
