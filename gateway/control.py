"""Edge control of one node: settings, the control cycle, and every actuation.

Every actuation of a node, whether a controller or an RPC asked for it, goes
through `NodeControl.actuate`, and so through the node's `SafetyGuard`. The
control cycle exists only when the node has a `control:` section; manual
doses and `stop` work on every node. The RPC handlers (``rpc_*``) are called
from the one table of gateway/rpc.py, which has checked the method and its
params.

Control is handed a `gateway.ports.NodePort`, never the node task: it reads
the node's announced actuators, latest values and link state there, and
acts through it (send an actuation or a stop, record an entry, run a task
in the link session). The node task owns the link and what runs on the
node; control owns its settings, cycle, guard and plant constants.

Settings changed at run time (shared attributes, `set_mode`) are validated
as a whole, applied at once and persisted in the store, each with when it
was set; the config file's values are persisted with when each was edited.
Key by key, the newer wins (gateway/settings.py): an edit of the file wins
over run-time values set before it, a later run-time value over the file.
After every change (start, reload, attribute, RPC, refusal) the gateway is
told (``on_change``), so that it publishes what is in force.

What a controller learned about the tank (`rules.controller.Learner`) is
saved in the store whenever it changes, keyed by node and controller name,
together with the plant constants it was learned under, and handed back to
the next controller of that name on this node: after a restart, a reload or a
switch of controller and back. Knowledge learned under other plant constants
(another tank volume, stock or pump) is discarded.

A guided titration (`titrate`, gateway/titration.py) measures a pH solution's
strength on the running node; while it runs, automatic cycles wait and manual
doses are refused, and its result becomes the node's plant constant. So do a
pump calibration (`pump_calibrate`, gateway/pumpcal.py: a measured flow) and
a guided probe calibration (`probe_calibrate`, gateway/probecal.py: a
measured calibration map). A measured flow rescales what the controller and
the pH envelope learned through the old one (`recalibrate_flow`) instead of
discarding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from drivers.errors import LinkError
from gateway.clock import Clock
from gateway.config import ConfigError, ControlConfig, NodeConfig, apply_control_update
from gateway.config import control_settings as settings_of
from gateway.errors import CommandError
from gateway.ports import NodePort
from gateway.probecal import CONTROLLED, NodeProbeCalibration
from gateway.pumpcal import NodePumpCalibration
from gateway.service import fields
from gateway.settings import RPC, THINGSBOARD, SettingsState
from gateway.store import Store, StoreClosed, StoreError
from gateway.titration import NodeTitration
from rules import units
from rules.controller import (
    ACTUATORS,
    PH_PUMPS,
    Controller,
    ControllerError,
    ControllerOptions,
    Dose,
    Learner,
    PlantConstants,
    Recalibrated,
    create,
)
from rules.cycle import ControlCycle, CycleSettings, Triggers
from rules.envelope import EnvelopeError, PhEnvelope
from rules.nutrients import NUTRIENT, Feed
from rules.safety import CONTROLLING_SENSOR, SafetyGuard, SafetyLimits, SafetyRefusal, SensorWatch

log = logging.getLogger("hydrogate.control")

_T = TypeVar("_T")

#: How often the control loop wakes without a new reading (schedules, hold times).
TICK_S = 1.0


#: The key under which the node's pH safety envelope is kept in the store's learned table.
ENVELOPE_KEY = "ph-envelope"
#: The two ways of writing the conductivity setpoint: one setting, kept under the node's unit's.
SETPOINT_KEYS = frozenset({"tds_setpoint", "ec_setpoint"})


def _plant_constants(config: NodeConfig) -> PlantConstants:
    if config.plant is None:
        return PlantConstants()
    return PlantConstants(
        tank_volume_l=config.plant.tank_volume_l,
        stock_ppm=config.plant.stock_ppm,
        flow_ml_s=dict(config.plant.flow_ml_s),
        ph_ml_per_l_per_unit=dict(config.plant.ph_ml_per_l_per_unit),
        nutrient_ratio=dict(config.plant.nutrient_ratio),
    )


def plant_fingerprint(plant: PlantConstants) -> dict[str, Any]:
    """The plant constants as a JSON object, to tell what learned state was learned under.

    ``nutrient_ratio`` is in it only for a multi-part feed, so a single-pump
    plant keeps the fingerprint it had before parts existed.
    """
    fingerprint: dict[str, Any] = {
        "tank_volume_l": float(plant.tank_volume_l),
        "stock_ppm": float(plant.stock_ppm),
        "flow_ml_s": {a: float(f) for a, f in sorted(plant.flow_ml_s.items())},
        "ph_ml_per_l_per_unit": {
            a: float(v) for a, v in sorted(plant.ph_ml_per_l_per_unit.items())
        },
    }
    if plant.nutrient_ratio:
        fingerprint["nutrient_ratio"] = {p: float(v) for p, v in plant.nutrient_ratio.items()}
    return fingerprint


def envelope_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """What of a plant fingerprint the pH envelope's knowledge depends on.

    The envelope works per litre of tank, in ml of the pH pumps: the volume,
    their flows and strengths. A nutrient pump or the stock changing is no
    reason to measure the tank's pH chemistry again.
    """
    flows = fingerprint.get("flow_ml_s", {})
    return {
        "tank_volume_l": fingerprint.get("tank_volume_l"),
        "flow_ml_s": {p: flows.get(p) for p in PH_PUMPS},
        "ph_ml_per_l_per_unit": fingerprint.get("ph_ml_per_l_per_unit"),
    }


def _plant_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two plant fingerprints, e.g. ``tank_volume_l 10.0 -> 20.0``."""

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in d.items():
            if isinstance(value, Mapping):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    a, b = flat(old), flat(new)
    return ", ".join(
        f"{key} {a.get(key, '-')} -> {b.get(key, '-')}"
        for key in sorted(a.keys() | b.keys())
        if a.get(key) != b.get(key)
    )


def _summary(state: Mapping[str, Any], limit: int = 160) -> str:
    """``state`` as compact JSON for a log line, cut at ``limit`` characters."""
    text = json.dumps(state, sort_keys=True, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def from_config(target: type[_T], source: object) -> _T:
    """Build a rules/ dataclass from the config section with the same field names.

    rules/ does not import the config; its dataclasses repeat the config's
    field names (tests check that their defaults agree), so one copy rule
    serves them all.
    """
    names = [f.name for f in dataclasses.fields(target) if hasattr(source, f.name)]  # type: ignore[arg-type]
    return target(**{name: getattr(source, name) for name in names})


def _limits(config: NodeConfig) -> SafetyLimits:
    return from_config(SafetyLimits, config.safety)


class NodeControl:
    """Safety, manual doses and (with a `control:` section) the automatic cycle."""

    def __init__(
        self,
        node: NodePort,
        *,
        store: Store,
        clock: Clock,
        config_mtime: float | None = None,
    ) -> None:
        self._node = node
        config = self._config = node.config
        #: When the config file was last modified (wall s): the date of its edits.
        self.config_mtime = config_mtime
        #: Called after every change of the settings in force or a refused update.
        self.on_change: Callable[[], None] | None = None
        self._state = SettingsState()
        #: The last refused update (``ts`` ms, ``reason``, ``source``), until one is applied.
        self.refused: dict[str, Any] | None = None
        self._store = store
        self._clock = clock
        self.plant = _plant_constants(config)
        self.watch = SensorWatch()
        self.guard = SafetyGuard(_limits(config), actuators=(), watch=self.watch)
        self.envelope = PhEnvelope(self.plant, name=node.name)
        self.settings: ControlConfig | None = config.control
        self._controller: Controller | None = None
        self._cycle: ControlCycle | None = None
        self._triggers: Triggers | None = None
        self.last_dose_text: str | None = None
        #: The last dose commanded and the last one refused, for `hydrogate status`:
        #: ``{"ts": ms, "actuator", "ms", "duty", "controller"}`` / ``{"ts": ms, "reason"}``.
        self.last_dose: dict[str, Any] | None = None
        self.last_refusal: dict[str, Any] | None = None
        self._reported_lock: str | None = None
        self._last_failure: str | None = None
        # Learned state (Learner controllers): restore due after every new
        # controller; the lock makes a tick wait for a restore under way.
        self._restore_due = False
        self._learned_lock = asyncio.Lock()
        self._learned_saved: dict[str, Any] = {}
        self._learned_save_failed = False
        self.titration = NodeTitration(self, node, store=store, clock=clock)
        self.pumps = NodePumpCalibration(self, node, store=store, clock=clock)
        self.probes = NodeProbeCalibration(self, node, store=store, clock=clock)
        self._rebuild()

    # -------------------------------------------------------------- settings
    def _rebuild(self, *, controller_changed: bool = True) -> None:
        settings = self.settings
        if settings is None:
            return
        if controller_changed or self._controller is None:
            if self._controller is not None:
                self._controller.close()
            self._controller = create(
                settings.controller,
                ControllerOptions(rb_variant=settings.rb_variant),
            )
            self._learned_saved = {}
            self._restore_due = isinstance(self._controller, Learner)
        cycle_settings = from_config(CycleSettings, settings)
        running = self._cycle is not None and self._cycle.state != "idle"
        if running:
            self.abort("control settings changed")
        self._cycle = ControlCycle(
            cycle_settings,
            self._controller,
            self.plant,
            actuators=self._node.actuators or ACTUATORS,
            envelope=self.envelope,
        )
        triggers = self._triggers
        if triggers is None or (triggers.schedule, triggers.interval_s) != (
            settings.schedule,
            settings.interval,
        ):
            self._triggers = Triggers(settings.schedule, settings.interval)

    async def load_settings(self) -> None:
        """Restore run-time settings, the rolling-hour actuation ledger and what was learned."""
        await self._load_settings()
        # Measured flows and strengths first: the plant they change is what the learned
        # state below was saved under.
        await self.pumps.restore()
        await self.titration.restore()
        await self.probes.restore()
        await self._restore_envelope()
        await self._restore_learned()

    async def _load_settings(self) -> None:
        now_wall = self._clock.time()
        history = await self._store.actuations_since(self._node.name, now_wall - 3600)
        self.guard = SafetyGuard(
            _limits(self._config),
            actuators=self.guard.actuators,
            watch=self.watch,
            history=[(a, self._to_mono(ts), ms) for a, ts, ms in history],
        )
        base = self._config.control
        if base is None:
            return
        node = self._node.name
        try:
            self._state = SettingsState.restore(await self._store.load_settings(node))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("node %s: saved run-time settings ignored: %s", node, exc,
                        extra=fields(node=node))
            self._state = SettingsState()
        mtime = self.config_mtime if self.config_mtime is not None else self._clock.time()
        edited = self._state.see_file(settings_of(base), mtime)
        if edited:
            log.info(
                "node %s: config file edited (%s): it wins over values set at run time before"
                " the edit", node, ", ".join(sorted(edited)), extra=fields(node=node),
            )
        self._in_force()
        await self._save_state()
        runtime = {k: v for k, v in self._state.sources().items() if v != "file"}
        if runtime:
            log.info(
                "node %s: run-time settings in force: %s",
                node,
                ", ".join(f"{k}={settings_of(self.settings)[k]!r} ({v})"  # type: ignore[arg-type]
                          for k, v in sorted(runtime.items())),
                extra=fields(node=node),
            )
        self._changed()

    def _in_force(self) -> None:
        """Compute the settings in force: the file, and the run-time values that win over it."""
        base = self._config.control
        if base is None:
            return
        winners = self._state.winners()
        try:
            settings = apply_control_update(base, winners, safety=self._config.safety)
        except ConfigError as exc:
            reason = "; ".join(f"{p}: {m}" for p, m in exc.errors)
            log.warning(
                "node %s: run-time settings %s no longer fit the config file (%s); the file's"
                " values are used", self._node.name, sorted(winners), reason,
                extra=fields(node=self._node.name),
            )
            self._state.drop(winners)
            self.refused = {"ts": int(self._clock.time() * 1000), "reason": reason,
                            "source": "saved run-time settings"}
            settings = base
        old = self.settings
        self.settings = settings
        if old != settings:
            self._rebuild(controller_changed=old is None or old.controller != settings.controller)

    async def _save_state(self) -> None:
        try:
            await self._store.save_settings(self._node.name, self._state.to_saved())
        except StoreClosed:
            pass  # the gateway is stopping
        except StoreError as exc:
            log.error("node %s: settings not saved: %s", self._node.name, exc,
                      extra=fields(node=self._node.name))

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def settings_from(self) -> dict[str, str]:
        """Where each setting in force comes from: ``file``, ``thingsboard`` or ``rpc``."""
        return self._state.sources()

    def published(self) -> dict[str, Any]:
        """What is in force, as the client attributes the gateway publishes for this node.

        ``effective_<key>`` for every run-time setting (``schedule`` as
        ``"HH:MM,HH:MM"``; the setpoint both as ``effective_tds_setpoint``, ppm
        on the node's scale, and ``effective_ec_setpoint``, mS/cm, as
        `get_state` gives it), ``settings_source`` (which keys are not the
        file's, and from where), ``settings_refused`` (the last refused
        update's reason, empty once a later one is applied). Empty for a
        node without a control section.
        """
        if self.settings is None:
            return {}
        values = settings_of(self.settings)
        attrs: dict[str, Any] = {
            f"effective_{k}": ",".join(v) if k == "schedule" else v for k, v in values.items()
        }
        scale = units.ppm_scale(self._config.conductivity)
        attrs["effective_tds_setpoint"] = units.from_internal(self.settings.tds_setpoint, scale)
        attrs["effective_ec_setpoint"] = units.from_internal(self.settings.tds_setpoint, "ec")
        others = {k: v for k, v in self.settings_from().items() if v != "file"}
        attrs["settings_source"] = (
            "config file" if not others else "config file, except " + ", ".join(
                f"{k} ({v})" for k, v in sorted(others.items())
            )
        )
        refused = self.refused
        attrs["settings_refused"] = "" if refused is None else (
            f"{refused['reason']} ({refused['source']})"
        )
        return attrs

    def _to_mono(self, wall_s: float) -> float:
        return self._clock.monotonic() - (self._clock.time() - wall_s)

    async def update_settings(
        self, data: Mapping[str, Any], *, source: str, origin: str = RPC
    ) -> dict[str, Any]:
        """Validate and apply an update as a whole; raises CommandError if any value is bad.

        ``origin`` (`THINGSBOARD` or `RPC`) is recorded with the values, which
        win over the config file until it is edited again.
        """
        if self.settings is None or self._config.control is None:
            raise CommandError(f"node {self._node.name} has no control section")
        now = self._clock.time()
        try:
            updated = apply_control_update(self.settings, data, safety=self._config.safety)
        except ConfigError as exc:
            reason = "; ".join(f"{p}: {m}" for p, m in exc.errors)
            log.warning(
                "node %s: %s refused: %s", self._node.name, source, reason,
                extra=fields(node=self._node.name),
            )
            self.refused = {"ts": int(now * 1000), "reason": reason, "source": source}
            await self._save_state()
            self._changed()
            raise CommandError(str(exc)) from exc
        old = self.settings
        self.settings = updated
        self._rebuild(controller_changed=updated.controller != old.controller)
        current = settings_of(updated)
        given = set(data)
        if given & SETPOINT_KEYS:  # kept under the key of the node's unit, whichever was sent
            given |= SETPOINT_KEYS
        self._state.set({k: current[k] for k in given if k in current}, ts=now, source=origin)
        self.refused = None
        await self._save_state()
        await self._restore_learned()
        log.info(
            "node %s: settings updated by %s: %s",
            self._node.name,
            source,
            {k: current[k] for k in given if k in current},
            extra=fields(node=self._node.name),
        )
        self._changed()
        return current

    async def server_update(
        self, data: Mapping[str, Any], deleted: Iterable[str] = (), *, response: bool = False
    ) -> None:
        """Shared attributes from ThingsBoard: a push (``response`` False) or the answer to the
        request of a session start, whose values count only where they are new (see
        gateway/settings.py). Raises CommandError when the new values are refused."""
        state = self._state
        new = state.news(data, response=response)
        state.heard(data)
        gone = state.deleted(deleted)
        if gone:
            log.info("node %s: shared attributes %s deleted: the config file's values apply",
                     self._node.name, ", ".join(gone), extra=fields(node=self._node.name))
            self._in_force()
            self._changed()
        if new:
            await self.update_settings(new, source="shared attributes", origin=THINGSBOARD)
        elif data or gone:
            await self._save_state()

    # ------------------------------------------------------------ plant constants
    def config_plant(self) -> dict[str, Any]:
        """The config file's own plant constants (as a fingerprint), before any measurement."""
        return plant_fingerprint(_plant_constants(self._config))

    def set_plant(self, plant: PlantConstants) -> None:
        """New plant constants (a measured strength): the envelope and the next cycle use them.

        What the controller and the envelope learned stays (the tank is the
        same): it is saved again under the new constants (:meth:`save_knowledge`).
        """
        self.plant = plant
        self.envelope.plant = plant
        self._learned_saved = {}
        if self.settings is not None:
            self._rebuild(controller_changed=False)

    async def save_knowledge(self, *, envelope: bool = False) -> None:
        """Save what the envelope and the controller know, under the current plant constants.

        ``envelope``: save the envelope even if it learned nothing new (its row
        must carry the new constants).
        """
        await self._save_envelope(force=envelope)
        await self._save_learned()

    def apply_flows(self, flows: Mapping[str, float]) -> None:
        """Measured flows kept from earlier (at start): the plant uses them, nothing is rescaled."""
        merged = {**self.plant.flow_ml_s, **flows}
        self.set_plant(dataclasses.replace(self.plant, flow_ml_s=merged))

    async def recalibrate_flow(self, actuator: str, flow: float) -> None:
        """A pump's measured flow: applied at once; knowledge learned through the old one kept.

        What was learned through the old flow is rescaled to the new one, not
        discarded: the adaptive controller's correction factor of the pump (or
        of the nutrient feed, for a part: on the assumption that the other
        parts' flows were right), the pH envelope's measurements and a
        titrated strength of a pH pump. Then everything is saved under the new
        plant constants, so a restart keeps it.
        """
        old_plant = self.plant
        old = old_plant.flow_ml_s.get(actuator)
        plant = dataclasses.replace(old_plant, flow_ml_s={**old_plant.flow_ml_s, actuator: flow})
        effect: tuple[str, float | None] | None = None
        if actuator in old_plant.nutrient_ratio:
            feed = Feed.of(old_plant)
            assert feed is not None
            effect = (NUTRIENT, None if old is None else feed.effect_of_recalibration(
                actuator, old, flow))
        elif actuator in (NUTRIENT, "refill") or actuator in PH_PUMPS:
            effect = (actuator, None if old is None else old / flow)
        if actuator in PH_PUMPS and old is not None:
            strength = self.titration.recalibrated(actuator, flow / old)
            if strength is not None:
                plant = dataclasses.replace(plant, ph_ml_per_l_per_unit={
                    **plant.ph_ml_per_l_per_unit, actuator: strength})
            self.envelope.recalibrated(actuator, flow / old)
        self.set_plant(plant)
        if effect is not None and isinstance(self._controller, Recalibrated):
            self._controller.recalibrated(*effect)
        await self.titration.save()
        await self.save_knowledge(envelope=True)

    # ------------------------------------------------------------ pH envelope
    async def _restore_envelope(self) -> None:
        """Take back what the pH envelope knew of this tank, and above all its lock.

        Knowledge measured under other plant constants (volume, flows, the
        solutions' strength) is dropped, but a lock never is: only the grower
        releases it (`acknowledge`).
        """
        node = self._node.name
        try:
            saved = await self._store.load_learned(node, ENVELOPE_KEY)
        except StoreError as exc:
            log.warning("node %s: the pH envelope's state cannot be read (%s); it starts fresh",
                        node, exc, extra=fields(node=node))
            return
        if saved is None:
            return
        state, plant = saved
        try:
            self.envelope.restore(state)
        except EnvelopeError as exc:
            log.warning("node %s: %s; it starts fresh", node, exc, extra=fields(node=node))
            return
        if envelope_fingerprint(plant) != envelope_fingerprint(plant_fingerprint(self.plant)):
            locked = self.envelope.locked
            self.envelope.acknowledge()
            self.envelope.locked = locked
            log.info("node %s: the plant constants changed, so the pH envelope measures the "
                     "tank again", node, extra=fields(node=node))
        if self.envelope.locked is not None:
            log.error("node %s: %s", node, self.envelope.locked, extra=fields(node=node))

    async def _save_envelope(self, *, force: bool = False) -> None:
        """Save the envelope's knowledge when it changed (a lock must survive a restart)."""
        if not self.envelope.take_changed() and not force:
            return
        try:
            await self._store.save_learned(
                self._node.name, ENVELOPE_KEY, self.envelope.learned(),
                plant_fingerprint(self.plant), ts=self._clock.time(),
            )
        except StoreError as exc:
            log.warning("node %s: cannot save the pH envelope's state: %s", self._node.name, exc,
                        extra=fields(node=self._node.name))

    @property
    def alarm(self) -> str | None:
        """Why automatic control needs the grower (the pH lock), or ``None``."""
        return self.envelope.locked

    async def acknowledge(self, source: str) -> bool:
        """The grower acknowledged: release the pH lock and measure the tank again."""
        was = self.envelope.acknowledge()
        log.warning(
            "node %s: %s by %s; automatic pH dosing %s",
            self._node.name,
            "pH lock acknowledged" if was else "acknowledged (nothing was locked)",
            source,
            "resumes, measuring the tank again from small doses" if was else "continues",
            extra=fields(node=self._node.name),
        )
        if was:
            self._node.record(int(self._clock.time() * 1000), {"ph_lock": "released"})
        await self._save_envelope()
        return was

    # ------------------------------------------------------- learned state
    async def _restore_learned(self) -> None:
        """Hand a new Learner controller what its namesake learned here before.

        Saved state learned under other plant constants is deleted, not
        restored: a dose model of another tank or pump would mislead the
        controller more than no model. Unusable state (the controller
        refuses it, or the row is damaged) is logged and the controller
        starts fresh; it never stops the node.
        """
        async with self._learned_lock:
            controller, settings = self._controller, self.settings
            if not self._restore_due or settings is None:
                return
            self._restore_due = False
            if not isinstance(controller, Learner):
                return
            node, name = self._node.name, settings.controller
            try:
                saved = await self._store.load_learned(node, name)
            except StoreClosed:
                return  # the gateway is stopping
            except StoreError as exc:
                self._learned_unusable(name, f"cannot be read ({exc})")
                await self._forget_learned(name)
                return
            if saved is None or controller is not self._controller:
                return  # nothing saved, or switched again meanwhile (that one's restore is due)
            state, plant = saved
            current = plant_fingerprint(self.plant)
            if plant != current:
                log.info(
                    "node %s: discarded what %s learned about the tank: the plant constants "
                    "changed (%s), so the old knowledge would mislead it",
                    node, name, _plant_changes(plant, current),
                    extra=fields(node=node),
                )
                await self._forget_learned(name)
                return
            try:
                controller.restore(state)
            except Exception as exc:  # noqa: BLE001 - whatever the file says must not stop the node
                # ControllerError is the contract; anything else is a bug in the
                # controller, and still no reason to stop the node.
                what = "" if isinstance(exc, ControllerError) else f"{type(exc).__name__}: "
                self._learned_unusable(name, f"was refused ({what}{exc})")
                # A fresh controller, in case it took part of the state before refusing.
                self._rebuild()
                self._restore_due = False
                await self._forget_learned(name)
                return
            self._learned_saved = copy.deepcopy(controller.learned())  # no need to save it back
            log.info(
                "node %s: restored what %s learned about the tank (%s)",
                node, name, _summary(state),
                extra=fields(node=node),
            )

    def _learned_unusable(self, name: str, why: str) -> None:
        log.warning(
            "node %s: what %s learned about the tank %s; it starts fresh",
            self._node.name, name, why,
            extra=fields(node=self._node.name),
        )

    async def _forget_learned(self, name: str) -> None:
        try:
            await self._store.forget_learned(self._node.name, name)
        except StoreError as exc:
            log.warning(
                "node %s: cannot delete what %s learned: %s", self._node.name, name, exc,
                extra=fields(node=self._node.name),
            )

    async def _save_learned(self) -> None:
        """Save the controller's learned state if it changed since the last save."""
        controller, settings = self._controller, self.settings
        if not isinstance(controller, Learner) or settings is None:
            return
        snapshot = controller.learned()
        if not snapshot or snapshot == self._learned_saved:
            return
        snapshot = copy.deepcopy(snapshot)
        node = self._node.name
        try:
            await self._store.save_learned(
                node, settings.controller, snapshot, plant_fingerprint(self.plant),
                ts=self._clock.time(),
            )
        except StoreError as exc:
            if not self._learned_save_failed:  # once per streak of failures
                self._learned_save_failed = True
                log.warning(
                    "node %s: cannot save what %s learned about the tank: %s",
                    node, settings.controller, exc,
                    extra=fields(node=node),
                )
            return
        self._learned_save_failed = False
        if controller is self._controller:
            self._learned_saved = snapshot

    # -------------------------------------------------------------- the loop
    def observe(self, values: Mapping[str, float | None]) -> None:
        """Feed the safety watch (and a running titration) with a calibrated reading."""
        now = self._clock.monotonic()
        self.watch.update(now, values)
        self.titration.observe(now, values)

    def observe_raw(self, values: Mapping[str, float | None]) -> None:
        """The node's reading before calibration: what a probe calibration reads."""
        self.probes.observe_raw(values)

    @property
    def calibrating(self) -> str | None:
        """The reading's key whose probe sits in a calibration buffer, else ``None``."""
        return self.probes.calibrating

    def reminders(self) -> list[str]:
        """Calibrations older than ``recalibrate_after_days``: an ``info`` for the grower."""
        days = self._config.recalibrate_after_days
        return [*self.pumps.reminders(days.pumps),
                *self.probes.reminders({"ph": days.ph, "ec": days.ec})]

    def procedure(self) -> str | None:
        """The guided procedure under way (titration, pump or probe calibration), if any."""
        if self.titration.running:
            return "a titration is running (stop or force_stop cancels it)"
        pump = self.pumps.pending
        if pump is not None:
            return f"a calibration of {pump} is under way (give its ml, or cancel it)"
        probe = self.probes.active
        if probe is not None:
            return f"a {probe} probe calibration is under way (finish or cancel it)"
        return None

    async def cancel_procedures(self, why: str) -> None:
        """`stop`, `force_stop`, shutdown: end a titration or calibration under way."""
        await self.titration.cancel(why)
        await self.pumps.cancel(why)
        await self.probes.cancel(why)

    async def run(self, reading: asyncio.Event) -> None:
        """While the link is up: start cycles when due and carry out their doses."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await reading.wait()
            reading.clear()
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - a control fault must not stop data collection
                await self._control_failed(exc)

    async def _control_failed(self, exc: Exception) -> None:
        """A controller or cycle raised: stop dosing, say so, keep the node polled."""
        text = f"{type(exc).__name__}: {exc}"
        if text != self._last_failure:
            self._last_failure = text
            log.error(
                "node %s: control step failed, cycle aborted and pumps stopped: %s",
                self._node.name, text, exc_info=exc, extra=fields(node=self._node.name),
            )
        self.abort("control step failed")
        self._node.record(int(self._clock.time() * 1000), {"control_error": text})
        await self.stop_actuators()

    async def tick(self) -> None:
        """One control step: triggers, then the cycle's doses through the guard."""
        await self._restore_learned()
        cycle, settings, triggers = self._cycle, self.settings, self._triggers
        if cycle is None or settings is None or triggers is None or self.procedure() is not None:
            return  # (automatic cycles wait while a titration or a calibration runs)
        now = self._clock.monotonic()
        if settings.mode == "auto" and cycle.state == "idle" and triggers.due(self._clock.now()):
            self._start(now, "schedule" if settings.schedule else "interval")
        if cycle.state == "idle":
            return
        doses = await cycle.tick(now, dict(self._node.latest))
        decision = cycle.last_decision
        who = decision.controller if decision is not None else settings.controller
        for dose in doses:
            try:
                granted = await self.actuate(dose, controller=who, strict=False)
            except (SafetyRefusal, CommandError, LinkError):
                # Logged and recorded where raised; the cycle re-decides next window.
                cycle.refused(dose)
                continue
            cycle.ran(granted)
        locked = self.envelope.locked
        if locked is not None and locked != self._reported_lock:
            self._node.record(int(self._clock.time() * 1000), {"ph_lock": locked})
        self._reported_lock = locked
        await self._save_envelope()
        await self._save_learned()

    def _start(self, now: float, why: str) -> None:
        assert self._cycle is not None
        self._cycle.start(now)
        log.info(
            "node %s: control cycle started (%s)", self._node.name, why,
            extra=fields(node=self._node.name),
        )

    def abort(self, why: str) -> None:
        """Abort the running cycle (actuators are stopped by the caller)."""
        if self._cycle is not None and self._cycle.state != "idle":
            self._cycle.abort(self._clock.monotonic())
            log.info(
                "node %s: control cycle aborted (%s)", self._node.name, why,
                extra=fields(node=self._node.name),
            )

    def busy(self) -> str | None:
        """What a titration must not run alongside: a control cycle or a running pump."""
        if self._cycle is not None and self._cycle.state != "idle":
            return f"a control cycle is running (its {self._cycle.state} loop)"
        running = sorted(self.guard.running(self._clock.monotonic()))
        if running:
            return f"{', '.join(running)} running"
        return None

    @property
    def automatic(self) -> bool:
        """Whether this node has a control section (and so a control loop)."""
        return self._cycle is not None

    def announced(self, actuators: tuple[str, ...]) -> None:
        """The node's `hello` listed these actuators: only they may be commanded."""
        self.guard.announce(actuators)
        if self.settings is not None:
            self._rebuild(controller_changed=False)

    def link_lost(self) -> None:
        """No commands can reach the node: abort; its own watchdog stops the pumps."""
        self.abort("link lost")
        self.pumps.link_lost()
        self.guard.stop_all(self._clock.monotonic(), confirmed=False)

    def node_rebooted(self) -> None:
        """A node restart stopped its actuators."""
        self.guard.stop_all(self._clock.monotonic())

    async def stop_actuators(self, *, within: float = 3.0) -> bool:
        """NodeLink `stop` (every actuator of the node off); True if the node confirmed it."""
        if not await self._node.send_stop(within=within):
            return False
        self.guard.stop_all(self._clock.monotonic())
        return True

    def close(self) -> None:
        """Release the controller (an ML controller owns a worker thread)."""
        if self._controller is not None:
            self._controller.close()
            self._controller = None

    # ------------------------------------------------------------- actuation
    async def actuate(self, dose: Dose, *, controller: str, strict: bool) -> Dose:
        """Run one dose through the safety guard and command it on the node."""
        if dose.duty == 0:  # "off" is a stop (see _stop_for), never sent with a run time
            raise CommandError(f"{dose.actuator}: duty 0 is a stop, not an actuation")
        node = self._node
        node.require_link()
        now = self._clock.monotonic()
        ts = int(self._clock.time() * 1000)
        try:
            permit = self.guard.permit(dose, now, strict=strict)
        except SafetyRefusal as exc:
            self._refused(ts, dose, exc, controller)
            raise
        granted = permit.dose
        if permit.clamped_reason:
            log.info(  # the safety layer doing its job: the dose still runs
                "node %s: %s shortened from %d to %d ms (%s)",
                node.name, dose.actuator, dose.ms, granted.ms, permit.clamped_reason,
                extra=fields(node=node.name, actuator=dose.actuator,
                             reason=permit.clamped_reason, controller=controller),
            )
        try:
            await node.send_actuate(granted.actuator, granted.duty, granted.ms)
        except LinkError:
            # It may have run: count it against the hourly budget all the same.
            self.guard.record(granted, now)
            await self._store.record_actuation(node.name, granted.actuator, ts / 1000, granted.ms)
            raise
        self.guard.record(granted, now)
        await self._store.record_actuation(node.name, granted.actuator, ts / 1000, granted.ms)
        entry: dict[str, Any] = {
            f"{granted.actuator}_ms": granted.ms,
            f"{granted.actuator}_duty": granted.duty,
            "controller": controller,
        }
        if permit.clamped_reason:
            entry["safety_clamped"] = f"{granted.actuator}: {permit.clamped_reason}"
        node.record(ts, entry)
        self.last_dose_text = f"{granted.actuator} {granted.ms} ms ({controller})"
        self.last_dose = {"ts": ts, "actuator": granted.actuator, "ms": granted.ms,
                          "duty": granted.duty, "controller": controller}
        log.info(
            "node %s: %s %d ms at duty %d (%s)",
            node.name, granted.actuator, granted.ms, granted.duty, controller,
            extra=fields(node=node.name, actuator=granted.actuator, controller=controller),
        )
        return granted

    def _refused(self, ts: int, dose: Dose, exc: SafetyRefusal, controller: str) -> None:
        log.warning(
            "node %s: %d ms refused by safety (%s): %s",
            self._node.name, dose.ms, controller, exc,
            extra=fields(node=self._node.name, actuator=dose.actuator, reason=exc.reason,
                         controller=controller),
        )
        self._node.record(ts, {"safety_refused": str(exc)})
        self.last_refusal = {"ts": ts, "reason": str(exc), "controller": controller}

    async def _stop_for(self, actuator: str) -> dict[str, Any]:
        """``actuate`` with duty 0: switch ``actuator`` off with NodeLink ``stop``.

        An ``actuate`` with duty 0 would reach the node with its ``ms``, and a
        relay firmware that ignores duty would run the pump for that long;
        ``stop`` is the one command every node carries out the same way. It
        stops every actuator of the node (NodeLink v1 has no stop of one),
        which is never unsafe.
        """
        if actuator not in self.guard.actuators:
            raise CommandError(
                f"refused by safety: {actuator}: unknown_actuator (the node did not announce it)"
            )
        node = self._node
        node.require_connected()
        if not await self.stop_actuators():
            raise CommandError("node did not confirm stop")
        log.info(
            "node %s: duty 0 for %s carried out as stop (every actuator off)",
            node.name, actuator,
            extra=fields(node=node.name, actuator=actuator),
        )
        return {"actuator": actuator, "ms": 0, "duty": 0, "stopped": "every actuator"}

    # ------------------------------------------------------------------- RPC
    def state(self) -> dict[str, Any]:
        """Cycle state and every control setting by its config name."""
        state: dict[str, Any] = {
            "cycle": self._cycle.state if self._cycle else "idle",
            "ph_lock": self.envelope.locked,
            "titration": self.titration.state(),
            "ph_ml_per_l_per_unit": dict(self.plant.ph_ml_per_l_per_unit),
            "ph_titrated": self.titration.measured(),
            "flow_ml_s": dict(self.plant.flow_ml_s),
            "nutrient_ratio": dict(self.plant.nutrient_ratio),
            "pump_calibration": self.pumps.state(),
            "pump_flows": self.pumps.flows(),
            "probe_calibration": self.probes.state(),
            "probe_calibrated": self.probes.measured(),
            "conductivity": self._config.conductivity,
        }
        if self.settings is not None:
            state.update(settings_of(self.settings))
            # The setpoint in both ways of writing it, whichever the node's unit is.
            scale = units.ppm_scale(self._config.conductivity)
            state["tds_setpoint"] = units.from_internal(self.settings.tds_setpoint, scale)
            state["ec_setpoint"] = units.from_internal(self.settings.tds_setpoint, "ec")
            decision = self._cycle.last_decision if self._cycle else None
            if decision is not None:
                state["last_controller"] = decision.controller
        return state

    # The handlers of the node-level RPCs (gateway/rpc.py holds the table: which method,
    # its params, whether it needs a control section or refuses while a procedure runs).
    async def rpc_stop(self) -> dict[str, Any]:
        """`stop`: end a procedure under way and command every actuator off."""
        self._node.require_connected()
        await self.cancel_procedures("stop")
        if not await self.stop_actuators():
            raise CommandError("node did not confirm stop")
        return {}

    async def rpc_titrate(self, params: Any) -> dict[str, Any]:
        """`titrate`: start a guided titration (gateway/titration.py checks its params)."""
        if self.pumps.pending is not None or self.probes.active is not None:
            raise CommandError(f"{self.procedure()}: wait for it to end")
        return await self.titration.start(params)

    async def rpc_pump_calibrate(self, params: Any) -> dict[str, Any]:
        """`pump_calibrate`: a run, its ml or cancel (gateway/pumpcal.py checks its params)."""
        return await self.pumps.rpc(params)

    async def rpc_probe_calibrate(self, params: Any) -> dict[str, Any]:
        """`probe_calibrate`: a step of a probe calibration (gateway/probecal.py)."""
        return await self.probes.rpc(params)

    async def rpc_actuate(self, dose: Dose) -> dict[str, Any]:
        """`actuate`: a manual dose through every safety limit; duty 0 is a stop."""
        busy = self.procedure()
        if dose.duty == 0:  # duty 0 is "off": a stop, never a run of ms milliseconds
            await self.titration.cancel("actuate with duty 0 (a stop)")
            await self.pumps.cancel("actuate with duty 0 (a stop)")
            return await self._stop_for(dose.actuator)
        if self.titration.running:  # a manual dose would spoil the measurement
            raise CommandError(str(busy))
        if self.pumps.pending == dose.actuator:  # the cup would get more than measured
            raise CommandError(str(busy))
        probe = self.probes.active
        if probe is not None and CONTROLLING_SENSOR.get(dose.actuator) == CONTROLLED[probe]:
            raise CommandError(f"{busy}: its readings are a buffer's, not the tank's")
        try:
            granted = await self.actuate(dose, controller="manual", strict=True)
        except SafetyRefusal as exc:
            raise CommandError(f"refused by safety: {exc}") from exc
        except LinkError as exc:
            raise CommandError(f"node did not confirm: {exc}") from exc
        return {"actuator": granted.actuator, "ms": granted.ms, "duty": granted.duty}

    async def rpc_force_on(self) -> dict[str, Any]:
        """`force_on`: start a control cycle now (also in manual mode)."""
        self._node.require_link()
        if self._cycle is not None and self._cycle.state == "idle":
            self._start(self._clock.monotonic(), "force_on")
        return {"cycle": self._cycle.state if self._cycle else "idle"}

    async def rpc_force_stop(self) -> dict[str, Any]:
        """`force_stop`: end a procedure, abort the cycle, command every actuator off."""
        await self.cancel_procedures("force_stop")
        self.abort("force_stop")
        if not await self.stop_actuators():
            raise CommandError("cycle aborted, but the node did not confirm stop")
        return {"cycle": "idle"}

    async def rpc_acknowledge(self) -> dict[str, Any]:
        """`acknowledge`: release a pH lock."""
        return {"released": await self.acknowledge("RPC acknowledge")}

    async def rpc_set_mode(self, mode: Any) -> dict[str, Any]:
        """`set_mode`: ``auto`` or ``manual``, validated and kept like any run-time setting."""
        current = await self.update_settings({"mode": mode}, source="RPC set_mode", origin=RPC)
        return {"mode": current["mode"]}


#: Longest actuator name taken from an RPC (NodeLink keys are short words).
MAX_ACTUATOR_CHARS = 64


def parse_dose(params: Any) -> Dose:
    """The dose an ``actuate`` RPC asks for, every field checked before any use.

    Numbers must be finite integers in range (``ms`` 1..600000 as NodeLink
    allows, ``duty`` 0..255); NaN, infinities, booleans and fractions are
    refused with the field's name, never raised as a Python error.
    """
    if not isinstance(params, Mapping):
        raise CommandError("params must be an object with actuator, ms and optional duty")
    actuator = params.get("actuator")
    if (
        not isinstance(actuator, str)
        or not actuator.strip()
        or len(actuator) > MAX_ACTUATOR_CHARS
        or not actuator.isprintable()
    ):
        raise CommandError(
            f"params.actuator must be an actuator name of at most {MAX_ACTUATOR_CHARS} characters"
        )
    numbers: dict[str, int] = {}
    for name, default, low, high in (("ms", None, 1, 600000), ("duty", 255, 0, 255)):
        value = params.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CommandError(f"params.{name} must be an integer between {low} and {high}")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise CommandError(f"params.{name} must be a finite integer, not {value!r}")
        if not low <= value <= high:
            raise CommandError(f"params.{name} must be between {low} and {high}")
        numbers[name] = int(value)
    return Dose(actuator, numbers["duty"], numbers["ms"])
