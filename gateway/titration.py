"""A guided titration on a running node: the `titrate` RPC, its task, its result.

The procedure itself (steady pH, a small dose sized by the pH envelope's
steepest plausible curve, wait, measure, dose again larger) is
:class:`rules.titration.Titration`; this module runs it on a live node:

- `titrate` (RPC, local socket or ThingsBoard) checks that it can run — the
  link is up, the node announced the pump, the pH reading is fresh and
  plausible, no control cycle runs (``force`` aborts it) — and answers at
  once; the titration runs as a named task of the node's link session, so a
  lost link cancels it, as do `stop`, `force_stop` and the gateway stopping
  (the node's pumps are then stopped by whoever cancelled);
- every dose goes through `NodeControl.actuate`, so every safety limit
  applies; automatic control cycles wait until it ends; manual doses are
  refused meanwhile (they would spoil the measurement);
- progress and the result are in `get_state` (``titration``) and in
  telemetry (``titration``, ``titration_ph``, ``<pump>_ml_per_l_per_unit``, …);
- the result is kept in the store (dated) and applied at once: it becomes the
  node's ``plant.ph_ml_per_l_per_unit`` for that pump and a measured anchor of
  the pH envelope, so the next automatic dose uses it.

**Which strength wins.** A measured strength wins over the config file's,
until the file's ``plant:`` section is edited: each result is stored with the
plant section it was measured under, and one measured under another section
is dropped at the next start (logged), as run-time settings are. A strength
measured far from the setpoint (the span's far end more than
:data:`NEAR_SETPOINT_PH` away) is not the strength *near the setpoint* that
``ph_ml_per_l_per_unit`` means: it only goes to the envelope, and the result
says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from drivers.errors import LinkError
from gateway.clock import Clock
from gateway.config import ControlConfig
from gateway.errors import CommandError
from gateway.ports import NodePort, ProcedureHost
from gateway.service import fields
from gateway.store import Store, StoreClosed, StoreError
from gateway.tasks import cancel_and_wait
from rules.controller import PH_PUMPS, Dose
from rules.envelope import CAP_PH, direction
from rules.safety import SafetyRefusal
from rules.titration import (
    Level,
    Titration,
    TitrationError,
    TitrationResult,
    TitrationSettings,
)

log = logging.getLogger("hydrogate.titration")


def _live(procedure: Titration) -> dict[str, Any]:
    """The procedure's status while its task runs: its end is shown only once applied.

    The procedure reaches ``done`` before the gateway has applied and kept the result; a
    reader polling ``get_state`` must not see ``done`` without the ``result``.
    """
    status = procedure.status()
    if status["state"] in ("done", "failed"):
        del status["state"]
    return status


#: The key under which a node's titration results are kept in the store's learned table.
TITRATION_KEY = "ph-titration"
STATE_VERSION = 1
#: A strength measured with the span's far end further than this from the setpoint is not
#: the strength near the setpoint (the envelope's margin covers 10^0.2 = 1.6, rules/envelope.py).
NEAR_SETPOINT_PH = 0.2
#: How often the titration wakes without a reading (timeouts, stale readings).
TICK_S = 1.0
#: A dose with no visible effect is watched this long at least before a larger one (the
#: longest dead time of a real tank; rules/titration.py). Tests of fast simulated tanks lower it.
MIN_WATCH_S = 60.0
#: Below this the level sensor is not a tank volume (as the control cycle reads it).
_MIN_LEVEL_L = 0.5


def _default(name: str) -> float:
    """A control timing's default (``ph_average_s``, ``mixing_wait_s``) for nodes without one."""
    value = next(f.default for f in dataclasses.fields(ControlConfig) if f.name == name)
    assert isinstance(value, float)
    return value


def parse_params(params: Any) -> tuple[str, float, bool]:
    """``titrate``'s params: ``actuator``, optional ``move`` (default 0.1) and ``force``."""
    if not isinstance(params, Mapping):
        raise CommandError("params must be an object with actuator (ph_up or ph_down)")
    unknown = sorted(str(k) for k in params if k not in ("actuator", "move", "force"))
    if unknown:
        raise CommandError(f"unknown params {', '.join(unknown)} (actuator, move, force)")
    actuator = params.get("actuator")
    if actuator not in PH_PUMPS:
        raise CommandError(f"params.actuator must be one of {', '.join(PH_PUMPS)}")
    move = params.get("move", 0.1)
    if isinstance(move, bool) or not isinstance(move, int | float) or not math.isfinite(move):
        raise CommandError("params.move must be a number of pH units")
    force = params.get("force", False)
    if not isinstance(force, bool):
        raise CommandError("params.force must be true or false")
    try:
        TitrationSettings(str(actuator), float(move))
    except TitrationError as exc:
        raise CommandError(f"params.{exc}") from exc
    return str(actuator), float(move), force


class NodeTitration:
    """The titrations of one node: at most one running, the last one's status, the results kept."""

    def __init__(
        self, control: ProcedureHost, node: NodePort, *, store: Store, clock: Clock
    ) -> None:
        self._control = control
        self._node = node
        self._store = store
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._procedure: Titration | None = None
        self._status: dict[str, Any] | None = None
        self._wake = asyncio.Event()
        self._cancel_reason: str | None = None
        self._results: dict[str, dict[str, Any]] = {}  # per pump, as stored

    @property
    def running(self) -> bool:
        """Whether a titration is under way (automatic cycles and manual doses wait)."""
        return self._task is not None and not self._task.done()

    def observe(self, now: float, values: Mapping[str, float | None]) -> None:
        """A calibrated reading of the node: its pH goes to the running titration."""
        procedure = self._procedure
        ph = values.get("ph")
        if procedure is None or not self.running or ph is None or not math.isfinite(ph):
            return
        procedure.add(now, ph)
        self._wake.set()

    # ------------------------------------------------------------------ start
    async def start(self, params: Any) -> dict[str, Any]:
        """The `titrate` RPC: check, start the task, answer at once (raises CommandError)."""
        pump, move, force = parse_params(params)
        node, control = self._node, self._control
        if self.running:
            assert self._procedure is not None
            raise CommandError(
                f"a titration of {self._procedure.settings.pump} is already running "
                "(stop or force_stop cancels it)"
            )
        node.require_link()
        if pump not in node.actuators:
            raise CommandError(f"node {node.name} did not announce {pump}")
        limits = control.guard.limits
        now = self._clock.monotonic()
        problem = control.watch.problem("ph", now, limits)
        if problem is not None:
            raise CommandError(f"a titration needs a fresh, plausible pH reading: {problem[1]}")
        busy = control.busy()
        if busy is not None:
            if not force:
                raise CommandError(f"{busy}: wait for it to end, or pass force: true to abort it")
            control.abort("a titration was forced")
            if not await control.stop_actuators():
                raise CommandError(f"{busy}, and the node did not confirm stop")
            if self.running:  # another request started one meanwhile
                raise CommandError("a titration is already running (stop or force_stop cancels it)")
        settings = control.settings
        timings = TitrationSettings(
            pump,
            move,
            window_s=settings.ph_average_s if settings else _default("ph_average_s"),
            mixing_wait_s=settings.mixing_wait_s if settings else _default("mixing_wait_s"),
            stale_s=limits.stale_after_s,
            ph_range=limits.ph_range,
            min_watch_s=MIN_WATCH_S,
        )
        ph_now = control.watch.fresh("ph", self._clock.monotonic(), limits.stale_after_s)
        if ph_now is None:
            raise CommandError("a titration needs a fresh pH reading: none since the stop")
        # The envelope's configured strength is a claim near the setpoint; without one, near here.
        centre = settings.ph_setpoint if settings else ph_now
        envelope = control.envelope
        procedure = Titration(timings, lambda x: envelope.gain_bound(pump, x, centre), now)
        ts = int(self._clock.time() * 1000)
        self._procedure = procedure
        self._cancel_reason = None
        self._status = {"started": ts, "ended": None, "result": None, **procedure.status()}
        self._task = node.spawn(self._run(procedure), name=f"titrate:{node.name}")
        node.record(ts, {"titration": "started", "titration_actuator": pump})
        log.info(
            "node %s: titration of %s started at pH %.2f (move %.2f, windows of %g s, mixing "
            "wait %g s)", node.name, pump, ph_now, move, timings.window_s, timings.mixing_wait_s,
            extra=fields(node=node.name, actuator=pump),
        )
        return {"started": ts, "titration": self.state()}

    # ------------------------------------------------------------------ cancel
    async def cancel(self, why: str) -> bool:
        """Cancel a running titration (the caller stops the pumps); True if one ran."""
        task = self._task
        if task is None or task.done():
            return False
        self._cancel_reason = why
        await cancel_and_wait(task)
        return True

    # --------------------------------------------------------------------- run
    async def _run(self, procedure: Titration) -> None:
        """The titration's task: readings in, doses out, until done, failed or cancelled."""
        node = self._node
        seen: Level | None = None
        try:
            while True:
                self._wake.clear()
                per_l = procedure.advance(self._clock.monotonic())
                if procedure.level is not None and procedure.level is not seen:
                    seen = procedure.level
                    self._progress(procedure)
                if per_l is not None:
                    await self._dose(procedure, per_l)
                    continue
                if procedure.phase in ("done", "failed"):
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK_S):
                        await self._wake.wait()
            if procedure.result is not None:
                await self._finished(procedure.result)
            else:
                await self._ended("failed", procedure.error or "failed")
        except asyncio.CancelledError:
            why = self._cancel_reason or "interrupted (link lost or gateway stopping)"
            self._mark("cancelled", why)
            raise
        except Exception as exc:  # noqa: BLE001 - a fault here must not end the node's session
            log.error("node %s: titration failed: %s", node.name, exc, exc_info=exc,
                      extra=fields(node=node.name))
            procedure.fail(f"{type(exc).__name__}: {exc}")
            await self._ended("failed", procedure.error or "failed")

    def _volume(self) -> float:
        level = self._node.latest.get("water_level")
        if level is not None and level > _MIN_LEVEL_L:
            return level
        return self._control.plant.tank_volume_l

    async def _dose(self, procedure: Titration, per_l: float) -> None:
        """Run the dose the procedure asked for, as ms of the pump at full duty."""
        pump = procedure.settings.pump
        control = self._control
        flow = control.plant.flow_ml_s.get(pump)
        if flow is None:
            procedure.fail(f"no flow configured for {pump} (plant.flow_ml_s)")
            return
        volume = self._volume()
        ms = math.floor(per_l * volume / flow * 1000.0)
        if ms < 1:
            shortest = flow / 1000.0 / volume
            if shortest > procedure.allowed_per_l():
                procedure.fail(
                    f"the shortest run of {pump} (1 ms, {flow / 1000:.2g} ml) could move this "
                    f"tank's pH by more than the allowed {CAP_PH} if "
                    "its chemistry were the steepest plausible: set "
                    "plant.ph_ml_per_l_per_unit to a conservative guess first"
                )
                return
            ms = 1
        start = self._clock.monotonic()
        try:
            granted = await control.actuate(Dose(pump, 255, ms), controller="titration",
                                            strict=False)
        except SafetyRefusal as exc:
            procedure.fail(f"dose refused by safety: {exc}")
            return
        except (CommandError, LinkError) as exc:
            procedure.fail(f"dose not confirmed by the node ({exc}): its amount is unknown")
            return
        dosed = granted.ms / 1000.0 * flow * granted.duty / 255.0 / volume
        procedure.dosed(start, dosed, granted.ms / 1000.0)
        self._update(procedure)
        self._node.record(int(self._clock.time() * 1000), {
            "titration": "dosing", "titration_step": len(procedure.steps),
            "titration_ml": round(dosed * volume, 4),
        })

    def _progress(self, procedure: Titration) -> None:
        level = procedure.level
        assert level is not None
        self._update(procedure)
        self._node.record(int(self._clock.time() * 1000), {
            "titration": "measuring", "titration_step": len(procedure.steps),
            "titration_ph": round(level.ph, 3),
        })

    def _update(self, procedure: Titration) -> None:
        if self._status is not None:
            self._status.update(_live(procedure))

    # ------------------------------------------------------------------ endings
    def _mark(self, state: str, error: str | None) -> None:
        """Set the final status and its telemetry (no I/O: also used while cancelled)."""
        ts = int(self._clock.time() * 1000)
        status = self._status if self._status is not None else {}
        if self._procedure is not None:
            status.update(self._procedure.status())
        status.update(state=state, ended=ts, error=error)
        if state != "done":
            status["detail"] = error
        self._status = status
        entry: dict[str, Any] = {"titration": state}
        if error:
            entry["titration_error"] = error
        self._node.record(ts, entry)
        name = self._node.name
        if state == "done":
            return
        log.warning("node %s: titration %s: %s", name, state, error, extra=fields(node=name))

    async def _ended(self, state: str, error: str) -> None:
        self._mark(state, error)
        if state == "failed":
            await self._control.stop_actuators()

    async def _finished(self, result: TitrationResult) -> None:
        """Apply, keep and report a result."""
        control, node = self._control, self._node
        data = result.as_dict()
        strength = data["ml_per_l_per_unit"]
        settings = control.settings
        far = _distance(result, settings.ph_setpoint) if settings is not None else 0.0
        applied = far <= NEAR_SETPOINT_PH
        sign = direction(result.pump)
        # The envelope takes the change plus two standard errors: a steeper secant, one it may
        # trust as a bound.
        change = abs(result.ph_to - result.ph_from) * (1.0 + result.uncertainty)
        control.envelope.measured(
            result.pump, result.ph_from, result.ph_from + sign * change, result.per_l
        )
        if applied:
            strengths = dict(control.plant.ph_ml_per_l_per_unit)
            strengths[result.pump] = strength
            control.set_plant(replace(control.plant, ph_ml_per_l_per_unit=strengths))
            data["note"] = (
                f"now the node's plant.ph_ml_per_l_per_unit for {result.pump}: the next "
                "automatic pH dose uses it"
            )
        else:
            assert settings is not None
            data["note"] = (
                f"measured {far:.2f} pH from the setpoint {settings.ph_setpoint:g}: kept by "
                "the pH envelope as a point of the curve, but not used as the strength near "
                f"the setpoint; titrate again within {NEAR_SETPOINT_PH / 2:g} of it"
            )
        ts = int(self._clock.time() * 1000)
        data.update(
            applied=applied,
            measured_at=ts,
            volume_l=round(self._volume(), 2),
            ph_ml_per_l_per_unit=dict(control.plant.ph_ml_per_l_per_unit),
        )
        await self._keep(result.pump, data)
        await control.save_knowledge()
        if self._status is not None:
            self._status["result"] = data
        self._mark("done", None)
        entry: dict[str, Any] = {
            f"{result.pump}_ml_per_l_per_unit": strength,
            "titration_uncertainty_pct": data["uncertainty_pct"],
        }
        if data["mixing_wait_s"] is not None:
            entry["titration_mixing_wait_s"] = data["mixing_wait_s"]
        node.record(ts, entry)
        log.info(
            "node %s: titration of %s done: %.3g ml/L per pH unit (±%.0f %%) from pH %.2f to "
            "%.2f, %s", node.name, result.pump, strength, data["uncertainty_pct"],
            result.ph_from, result.ph_to, "applied" if applied else "not applied (far from the "
            "setpoint)", extra=fields(node=node.name, actuator=result.pump),
        )

    # -------------------------------------------------------------- persistence
    async def _keep(self, pump: str, data: Mapping[str, Any]) -> None:
        base = control_base(self._control)
        self._results[pump] = {**data, "base": base}
        try:
            await self._store.save_learned(
                self._node.name, TITRATION_KEY, {"version": STATE_VERSION,
                                                 "results": self._results},
                base, ts=self._clock.time(),
            )
        except StoreError as exc:
            log.warning("node %s: cannot keep the titration's result: %s", self._node.name, exc,
                        extra=fields(node=self._node.name))

    def recalibrated(self, pump: str, new_over_old: float) -> float | None:
        """``pump``'s flow was measured again: its kept strength in true ml, if applied.

        A titration counted its doses' ml with the flow of its day; the kept
        result is rescaled (saved by :meth:`save`). Returns the new strength
        when the result is the node's ``ph_ml_per_l_per_unit``, else ``None``.
        """
        result = self._results.get(pump)
        if result is None:
            return None
        result["ml_per_l_per_unit"] = float(result["ml_per_l_per_unit"]) * new_over_old
        if isinstance(result.get("per_l"), int | float):
            result["per_l"] = float(result["per_l"]) * new_over_old
        return float(result["ml_per_l_per_unit"]) if result["applied"] else None

    async def save(self) -> None:
        """Keep the results as they are now (after :meth:`recalibrated`)."""
        if self._results:
            await self._rewrite()

    async def restore(self) -> None:
        """At the node's start: measured strengths whose plant section is unchanged win."""
        node, control = self._node.name, self._control
        try:
            saved = await self._store.load_learned(node, TITRATION_KEY)
        except StoreClosed:
            return
        except StoreError as exc:
            log.warning("node %s: titration results cannot be read (%s); the config's strengths "
                        "apply", node, exc, extra=fields(node=node))
            return
        if saved is None:
            return
        state, _ = saved
        results = _valid_results(state)
        if results is None:
            log.warning("node %s: stored titration results are unusable; the config's "
                        "strengths apply", node, extra=fields(node=node))
            return
        base = control_base(control)
        kept = {p: r for p, r in results.items() if r["base"] == base}
        for pump in sorted(set(results) - set(kept)):
            log.info(
                "node %s: the config file's plant: section changed since %s was titrated; the "
                "file wins", node, pump, extra=fields(node=node, actuator=pump),
            )
        self._results = kept
        strengths = {p: float(r["ml_per_l_per_unit"]) for p, r in kept.items() if r["applied"]}
        if strengths:
            merged = {**control.plant.ph_ml_per_l_per_unit, **strengths}
            control.set_plant(replace(control.plant, ph_ml_per_l_per_unit=merged))
            log.info("node %s: measured pH solution strengths apply (ml/L per pH unit): %s",
                     node, strengths, extra=fields(node=node))
        if len(kept) != len(results):
            await self._rewrite()

    async def _rewrite(self) -> None:
        try:
            if self._results:
                await self._store.save_learned(
                    self._node.name, TITRATION_KEY,
                    {"version": STATE_VERSION, "results": self._results},
                    control_base(self._control), ts=self._clock.time(),
                )
            else:
                await self._store.forget_learned(self._node.name, TITRATION_KEY)
        except StoreError as exc:
            log.warning("node %s: cannot update the titration results: %s", self._node.name, exc,
                        extra=fields(node=self._node.name))

    # ------------------------------------------------------------------- state
    def state(self) -> dict[str, Any] | None:
        """The running or last titration (``get_state``'s ``titration``), ``None`` if none yet."""
        if self._status is None:
            return None
        status = dict(self._status)
        if self.running and self._procedure is not None:
            status.update(_live(self._procedure))
        return status

    def measured(self) -> dict[str, Any]:
        """The kept results, per pump (when and what each titration measured)."""
        return {p: {k: r.get(k) for k in ("ml_per_l_per_unit", "uncertainty_pct", "ph_from",
                                          "ph_to", "measured_at", "applied")}
                for p, r in sorted(self._results.items())}


def control_base(control: ProcedureHost) -> dict[str, Any]:
    """The config file's plant section (as a fingerprint) a result is measured under."""
    return control.config_plant()


def _distance(result: TitrationResult, setpoint: float) -> float:
    """How far the measured span's far end lies from ``setpoint``."""
    return max(abs(result.ph_from - setpoint), abs(result.ph_to - setpoint))


def _valid_results(state: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The stored results if every one is usable, else ``None``."""
    if state.get("version") != STATE_VERSION or not isinstance(state.get("results"), dict):
        return None
    results: dict[str, dict[str, Any]] = state["results"]
    for pump, r in results.items():
        strength = r.get("ml_per_l_per_unit") if isinstance(r, dict) else None
        if (
            pump not in PH_PUMPS
            or isinstance(strength, bool)
            or not isinstance(strength, int | float)
            or not (math.isfinite(strength) and strength > 0)
            or not isinstance(r.get("base"), dict)
            or not isinstance(r.get("applied"), bool)
        ):
            return None
    return results
