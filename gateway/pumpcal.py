"""Pump calibration on a running node: the `pump_calibrate` RPC, its run, the flow kept.

Cheap peristaltic pumps deliver 10–30 % more or less than their label, and
less as the tubing wears. The grower puts a pump's outlet into a measuring
cup; `pump_calibrate` with ``actuator`` and ``ms`` runs it for that long,
through `NodeControl.actuate` and so through every safety check (refused in
auto mode unless ``force``: an automatic dose would run meanwhile); once the
run is over, `pump_calibrate` with ``actuator`` and ``ml`` (what came out)
gives the flow, ``ml / (ms / 1000)`` at full duty. `hydrogate pump calibrate`
drives the same two RPCs from a terminal.

The flow is applied at once (`NodeControl.recalibrate_flow`: controllers and
the pH envelope use it from the next dose, what they learned through the old
flow is rescaled, not dropped) and kept in the store with its date, in the
`learned` table under ``pump-calibration``. A measured flow wins over the
config file's ``plant.flow_ml_s`` of that pump until the file's value for
that pump is edited (then the file wins, logged at start). One older than
``recalibrate_after_days.pumps`` raises an ``info`` severity.

While a calibration runs or waits for its ml, automatic cycles wait (the
cup's ml would not be in the tank) and the pump cannot be dosed by hand;
`stop`, `force_stop` and ``cancel: true`` end it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from drivers.errors import LinkError
from gateway.clock import Clock
from gateway.errors import CommandError
from gateway.ports import NodePort, ProcedureHost
from gateway.service import fields
from gateway.store import Store, StoreClosed, StoreError
from rules.controller import Dose
from rules.safety import SafetyRefusal

log = logging.getLogger("hydrogate.pumpcal")

#: The key under which a node's measured flows are kept in the store's learned table.
PUMP_KEY = "pump-calibration"
STATE_VERSION = 1
#: How long after its run a calibration waits for the ml before it is dropped.
MEASURE_TIMEOUT_S = 1800.0
#: A measured flow this many times smaller or larger than the one in use is a typo, unless forced.
PLAUSIBLE_CHANGE = 4.0
#: The config's largest flow (gateway/config.py): beyond it a flow cannot be written down either.
MAX_FLOW_ML_S = 1000.0
MAX_ML = 100_000.0


def _number(params: Mapping[str, Any], name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CommandError(f"params.{name} must be a finite number")
    return float(value)


class NodePumpCalibration:
    """The pump calibrations of one node: at most one under way, the measured flows kept."""

    def __init__(
        self, control: ProcedureHost, node: NodePort, *, store: Store, clock: Clock
    ) -> None:
        self._control = control
        self._node = node
        self._store = store
        self._clock = clock
        self._pending: dict[str, Any] | None = None  # the calibration under way
        self._status: dict[str, Any] | None = None  # the last one, for get_state
        self._results: dict[str, dict[str, Any]] = {}  # per pump, as stored

    # ------------------------------------------------------------------ state
    @property
    def pending(self) -> str | None:
        """The pump being calibrated (running, or waiting for its ml), else ``None``."""
        self._expire()
        return None if self._pending is None else str(self._pending["actuator"])

    def _expire(self) -> None:
        pending = self._pending
        if pending is None:
            return
        if self._clock.monotonic() - pending["ends"] > MEASURE_TIMEOUT_S:
            self._end("expired", f"no ml came within {MEASURE_TIMEOUT_S / 60:.0f} min of the run")

    def state(self) -> dict[str, Any] | None:
        """The calibration under way or the last one (``get_state``'s ``pump_calibration``)."""
        self._expire()
        if self._status is None:
            return None
        status = dict(self._status)
        pending = self._pending
        if pending is not None and status.get("state") == "running":
            left = pending["ends"] - self._clock.monotonic()
            if left <= 0:
                status["state"] = self._status["state"] = "measure"
            else:
                status["left_s"] = round(left, 1)
        return status

    def flows(self) -> dict[str, dict[str, Any]]:
        """The measured flows kept, per pump (``get_state``'s ``pump_flows``)."""
        return {
            pump: {k: r.get(k) for k in ("flow_ml_s", "measured_at", "ms", "ml")}
            for pump, r in sorted(self._results.items())
        }

    def reminders(self, days: float) -> list[str]:
        """A line per measured flow older than ``days`` (0: none)."""
        if days <= 0:
            return []
        now_ms = self._clock.time() * 1000.0
        out = []
        for pump, result in sorted(self._results.items()):
            age = (now_ms - float(result["measured_at"])) / 86_400_000.0
            if age > days:
                out.append(f"{pump} flow calibrated {age:.0f} days ago (recalibrate every "
                           f"{days:g})")
        return out

    # -------------------------------------------------------------------- RPC
    async def rpc(self, params: Any) -> dict[str, Any]:
        """`pump_calibrate`: start a run (``ms``), give its ``ml``, or ``cancel``."""
        if not isinstance(params, Mapping):
            raise CommandError("params must be an object with actuator and ms (or ml)")
        unknown = sorted(str(k) for k in params if k not in ("actuator", "ms", "ml", "force",
                                                               "cancel"))
        if unknown:
            raise CommandError(f"unknown params {', '.join(unknown)} (actuator, ms, ml, force, "
                               "cancel)")
        force = params.get("force", False)
        if not isinstance(force, bool):
            raise CommandError("params.force must be true or false")
        if params.get("cancel") is not None:
            if params.get("cancel") is not True:
                raise CommandError("params.cancel must be true")
            return {"cancelled": await self.cancel("cancelled by request", stop=True),
                    "pump_calibration": self.state()}
        actuator = params.get("actuator")
        if not isinstance(actuator, str) or not actuator or len(actuator) > 64:
            raise CommandError("params.actuator must be the pump's name")
        ms, ml = params.get("ms"), _number(params, "ml")
        if (ms is None) == (ml is None):
            raise CommandError("give params.ms to run the pump, or params.ml once it has run")
        if ms is not None:
            if isinstance(ms, bool) or not isinstance(ms, int) or not 1 <= ms <= 600_000:
                raise CommandError("params.ms must be an integer between 1 and 600000")
            return await self._start(actuator, ms, force)
        assert ml is not None
        return await self._finish(actuator, ml, force)

    async def _start(self, actuator: str, ms: int, force: bool) -> dict[str, Any]:
        node, control = self._node, self._control
        pending = self.pending
        if pending is not None:
            raise CommandError(f"a calibration of {pending} is under way: give its ml, or "
                               "cancel it (cancel: true)")
        node.require_link()
        if actuator not in node.actuators:
            raise CommandError(f"node {node.name} did not announce {actuator}")
        other = control.procedure()
        if other is not None:
            raise CommandError(f"{other}: wait for it to end")
        settings = control.settings
        if settings is not None and settings.mode == "auto" and not force:
            raise CommandError(
                f"node {node.name} is in auto mode: an automatic dose could run meanwhile; set "
                "mode manual first, or pass force: true (automatic cycles then wait until the "
                "calibration ends)"
            )
        busy = control.busy()
        if busy is not None:
            if not force:
                raise CommandError(f"{busy}: wait for it to end, or pass force: true to stop it")
            control.abort("a pump calibration was forced")
            if not await control.stop_actuators():
                raise CommandError(f"{busy}, and the node did not confirm stop")
        flow = control.plant.flow_ml_s.get(actuator)
        try:
            granted = await control.actuate(Dose(actuator, 255, ms), controller="calibration",
                                            strict=True)
        except SafetyRefusal as exc:
            raise CommandError(f"refused by safety: {exc}") from exc
        except LinkError as exc:
            raise CommandError(f"node did not confirm the run ({exc}): calibrate again") from exc
        now = self._clock.monotonic()
        ts = int(self._clock.time() * 1000)
        self._pending = {"actuator": actuator, "ms": granted.ms, "ends": now + granted.ms / 1000}
        self._status = {
            "state": "running", "actuator": actuator, "ms": granted.ms, "started": ts,
            "flow_ml_s": flow, "expected_ml": None if flow is None else round(
                flow * granted.ms / 1000.0, 2),
            "result": None, "error": None,
        }
        node.record(ts, {"pump_calibration": "running", "pump_calibration_actuator": actuator})
        log.info("node %s: pump calibration of %s: running %d ms", node.name, actuator,
                 granted.ms, extra=fields(node=node.name, actuator=actuator))
        return {"started": ts, "pump_calibration": self.state()}

    async def _finish(self, actuator: str, ml: float, force: bool) -> dict[str, Any]:
        node, control = self._node, self._control
        pending = self._pending
        if pending is None or pending["actuator"] != actuator:
            raise CommandError(f"no calibration run of {actuator} is waiting for its ml: run it "
                               "first (params.ms)")
        left = pending["ends"] - self._clock.monotonic()
        if left > 0:
            raise CommandError(f"{actuator} still runs for {left:.0f} s: measure once it stopped")
        if not 0 < ml <= MAX_ML:
            raise CommandError(f"params.ml must be more than 0 and at most {MAX_ML:g}")
        # Four digits: what a measuring cup tells, and what the grower copies into the file.
        flow = float(f"{ml / (pending['ms'] / 1000.0):.4g}")
        if flow > MAX_FLOW_ML_S:
            raise CommandError(f"{ml:g} ml in {pending['ms']} ms is {flow:.4g} ml/s, more than "
                               f"any pump hydrogate doses with ({MAX_FLOW_ML_S:g} ml/s)")
        old = control.plant.flow_ml_s.get(actuator)
        if old is not None and not force and not (
            1.0 / PLAUSIBLE_CHANGE <= flow / old <= PLAUSIBLE_CHANGE
        ):
            raise CommandError(
                f"{ml:g} ml in {pending['ms'] / 1000:g} s is {flow:.4g} ml/s, {flow / old:.2g} "
                f"times the {old:.4g} ml/s in use: check the number (or pass force: true)"
            )
        ts = int(self._clock.time() * 1000)
        await control.recalibrate_flow(actuator, flow)
        result = {
            "actuator": actuator, "flow_ml_s": flow, "ms": pending["ms"], "ml": ml,
            "previous_flow_ml_s": old, "measured_at": ts,
            "change_pct": None if old is None else round(100.0 * (flow / old - 1.0), 2),
        }
        await self._keep(actuator, result)
        self._pending = None
        if self._status is not None:
            self._status.update(state="done", result=result, ended=ts)
        node.record(ts, {f"{actuator}_flow_ml_s": result["flow_ml_s"],
                         "pump_calibration": "done"})
        log.info("node %s: %s flow measured: %.4g ml/s (was %s); applied", node.name, actuator,
                 flow, "unknown" if old is None else f"{old:.4g}",
                 extra=fields(node=node.name, actuator=actuator))
        return {"pump_calibration": self.state(), **result}

    def link_lost(self) -> None:
        """The node's watchdog stops a pump that runs: a run under way is not a measurement."""
        pending = self._pending
        if pending is not None and self._clock.monotonic() < pending["ends"]:
            self._end("cancelled", "the link was lost during the run: run it again")

    async def cancel(self, why: str, *, stop: bool = False) -> bool:
        """End the calibration under way (stopping the node while the pump runs, with ``stop``)."""
        pending = self._pending
        if pending is None:
            return False
        if stop and self._clock.monotonic() < pending["ends"]:
            await self._control.stop_actuators()
        self._end("cancelled", why)
        return True

    def _end(self, state: str, why: str) -> None:
        pending, self._pending = self._pending, None
        if self._status is not None:
            self._status.update(state=state, error=why, ended=int(self._clock.time() * 1000))
        if pending is not None:
            log.warning("node %s: pump calibration of %s %s: %s", self._node.name,
                        pending["actuator"], state, why, extra=fields(node=self._node.name))
            self._node.record(int(self._clock.time() * 1000), {"pump_calibration": state})

    # -------------------------------------------------------------- persistence
    def _base(self, actuator: str) -> float | None:
        """The config file's flow of ``actuator`` (the value a measurement wins over)."""
        value = self._control.config_plant()["flow_ml_s"].get(actuator)
        return None if value is None else float(value)

    async def _keep(self, actuator: str, result: Mapping[str, Any]) -> None:
        self._results[actuator] = {**result, "base": self._base(actuator)}
        await self._save()

    async def _save(self) -> None:
        try:
            if self._results:
                await self._store.save_learned(
                    self._node.name, PUMP_KEY, {"version": STATE_VERSION,
                                                "pumps": self._results},
                    {}, ts=self._clock.time(),
                )
            else:
                await self._store.forget_learned(self._node.name, PUMP_KEY)
        except StoreError as exc:
            log.warning("node %s: cannot keep the measured flows: %s", self._node.name, exc,
                        extra=fields(node=self._node.name))

    async def restore(self) -> None:
        """At the node's start: measured flows whose config value is unchanged apply."""
        name = self._node.name
        try:
            saved = await self._store.load_learned(name, PUMP_KEY)
        except StoreClosed:
            return
        except StoreError as exc:
            log.warning("node %s: measured flows cannot be read (%s); the config's apply", name,
                        exc, extra=fields(node=name))
            return
        if saved is None:
            return
        results = _valid(saved[0])
        if results is None:
            log.warning("node %s: the stored measured flows are unusable; the config's apply",
                        name, extra=fields(node=name))
            return
        kept = {p: r for p, r in results.items() if r["base"] == self._base(p)}
        for pump in sorted(set(results) - set(kept)):
            log.info("node %s: plant.flow_ml_s.%s was edited since it was measured; the file "
                     "wins", name, pump, extra=fields(node=name, actuator=pump))
        self._results = kept
        if kept:
            self._control.apply_flows({p: float(r["flow_ml_s"]) for p, r in kept.items()})
            log.info("node %s: measured flows apply (ml/s): %s", name,
                     {p: r["flow_ml_s"] for p, r in sorted(kept.items())},
                     extra=fields(node=name))
        if len(kept) != len(results):
            await self._save()


def _valid(state: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The stored results if every one is usable, else ``None``."""
    pumps = state.get("pumps")
    if state.get("version") != STATE_VERSION or not isinstance(pumps, dict):
        return None
    for r in pumps.values():
        if not isinstance(r, dict):
            return None
        flow, when, base = r.get("flow_ml_s"), r.get("measured_at"), r.get("base")
        if (
            isinstance(flow, bool) or not isinstance(flow, int | float)
            or not (math.isfinite(flow) and 0 < flow <= MAX_FLOW_ML_S)
            or isinstance(when, bool) or not isinstance(when, int | float)
            or not (base is None or (isinstance(base, int | float) and not isinstance(base, bool)))
        ):
            return None
    return pumps
