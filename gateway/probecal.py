"""Guided probe calibration on a running node: the `probe_calibrate` RPC, its steps, its result.

The procedure (buffers, fit, health limits, stability) is rules/probecal.py;
this module walks a grower through it on a live node, step by step, so a
terminal (`hydrogate calibrate NODE ph`) or a dashboard can drive it:

1. ``start`` (``probe``: ``ph`` or ``ec``; the buffers or standards; for pH
   the raw key and its front end) checks that it can run and opens a
   session: automatic cycles wait, manual doses of the pumps that probe
   controls are refused, and the probe's readings are sent with
   ``<key>_flag: calibrating`` and left out of the severity;
2. ``read``, once the probe sits in the next buffer, watches the live raw
   value until it is stable (a task of the node's link session) and keeps
   the point with the temperature measured then;
3. after the last point, the fit: a usable probe's map is applied at once (the
   next reading uses it), kept in the store with its date and what it
   replaced, and reported (slope in % of Nernst and offset in mV for pH); a
   probe outside the limits is refused with the reason, and nothing changes;
4. ``cancel`` ends the session; so do `stop`, `force_stop`, the gateway
   stopping, and half an hour without a step.

**Which map wins.** A measured map wins over the config file's
``calibration.<key>`` until that map is edited in the file (each result is
kept with the map it replaced): then the file wins, logged at start.
A calibration older than ``recalibrate_after_days`` raises an ``info``
severity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.clock import Clock
from gateway.config import CalibrationMap
from gateway.errors import CommandError
from gateway.ports import NodePort, ProcedureHost
from gateway.service import fields
from gateway.store import Store, StoreClosed, StoreError
from gateway.tasks import cancel_and_wait
from rules.probecal import (
    DEFAULT_BUFFERS,
    EC_STANDARDS_US,
    EcCalibration,
    EcPoint,
    FrontEnd,
    PhCalibration,
    PhPoint,
    ProbeCalibrationError,
    ProbeRefused,
    Stability,
    buffer_ph,
    fit_ec,
    fit_ph,
    front_end_for,
)

log = logging.getLogger("hydrogate.probecal")

#: The key under which a node's probe calibrations are kept in the store's learned table.
PROBE_KEY = "probe-calibration"
STATE_VERSION = 1
PROBES = ("ph", "ec")
#: pH raw keys tried, in order, when the node has no pH map and none is named.
PH_SOURCES = ("ph_v", "ph_mv", "ph_adc")
#: A reading is stable when the halves of this window agree within the tolerance; the
#: window holds at least this many readings (a node polled every 5 s: 30 s).
WINDOW_S = 10.0
MIN_READINGS = 6
PH_TOLERANCE_MV = 0.3
EC_TOLERANCE = 0.003  # of the reading
#: A reading that is not stable within this long fails the step (a dry or broken probe).
READ_TIMEOUT_S = 300.0
#: A session with no step for this long is cancelled (automatic control resumes).
IDLE_TIMEOUT_S = 1800.0
#: Without a water_temp reading the buffers are taken at this temperature, and said so.
DEFAULT_TEMP_C = 25.0
#: µS/cm -> the unit of the conductivity key a map produces.
PER_US = {"tds": 0.5, "ec": 1.0}
#: What each probe's key controls (doses of these pumps wait while it is calibrated).
CONTROLLED = {"ph": "ph", "ec": "tds"}


@dataclass
class _Session:
    """One calibration under way."""

    probe: str
    key: str  # the calibration map's key: ph, tds or ec
    source: str  # the raw key read
    steps: tuple[float, ...]  # buffers (pH) or standards (µS/cm), in order
    front_end: FrontEnd | None = None  # pH
    poly: tuple[float, ...] = ()  # conductivity: the map corrected
    valid: tuple[float, float] | None = None
    temp_coefficient: float | None = None
    temp_override: float | None = None
    points: list[dict[str, Any]] = field(default_factory=list)
    stability: Stability | None = None
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    last_step: float = 0.0


def _numbers(value: Any, name: str, low: float, high: float) -> tuple[float, ...]:
    if not isinstance(value, list) or not value or len(value) > 3:
        raise CommandError(f"params.{name} must be a list of 1 to 3 numbers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high:
            raise CommandError(f"params.{name} must hold numbers between {low:g} and {high:g}")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise CommandError(f"params.{name} names the same value twice")
    return tuple(out)


def _optional_number(params: Mapping[str, Any], name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CommandError(f"params.{name} must be a finite number")
    return float(value)


def map_json(m: CalibrationMap | None) -> dict[str, Any] | None:
    """A calibration map as JSON (what a result is kept with, to tell whether the file changed)."""
    if m is None:
        return None
    return {"source": m.source, "poly": list(m.poly),
            "valid": None if m.valid is None else list(m.valid),
            "temp_coefficient": m.temp_coefficient}


class NodeProbeCalibration:
    """The probe calibrations of one node: at most one session, the results kept per probe."""

    def __init__(
        self, control: ProcedureHost, node: NodePort, *, store: Store, clock: Clock
    ) -> None:
        self._control = control
        self._node = node
        self._store = store
        self._clock = clock
        self._session: _Session | None = None
        self._status: dict[str, Any] | None = None
        self._results: dict[str, dict[str, Any]] = {}  # per probe, as stored
        self._raw: Mapping[str, float | None] = {}  # the node's last uncalibrated values

    # ------------------------------------------------------------------ state
    @property
    def active(self) -> str | None:
        """The probe under calibration (automatic cycles wait), else ``None``."""
        session = self._session
        if (
            session is not None
            and self._clock.monotonic() - session.last_step > IDLE_TIMEOUT_S
            and (session.task is None or session.task.done())
        ):
            self._close("cancelled", "no step for half an hour")
        return None if self._session is None else self._session.probe

    @property
    def calibrating(self) -> str | None:
        """The reading's key whose probe sits in a buffer (flagged, left out of severity)."""
        if self._session is None:  # (asked for every reading)
            return None
        probe = self.active
        return None if probe is None else CONTROLLED[probe]

    def observe_raw(self, values: Mapping[str, float | None]) -> None:
        """The node's reading before calibration: the raw value goes to a running step."""
        self._raw = values  # (a fresh dict per reading, never changed afterwards)
        session = self._session
        if session is None or session.stability is None:
            return
        raw = values.get(session.source)
        if raw is not None and math.isfinite(raw):
            session.stability.add(self._clock.monotonic(), raw)
            session.wake.set()

    def state(self) -> dict[str, Any] | None:
        """The session under way or the last one (``get_state``'s ``probe_calibration``)."""
        self.active  # noqa: B018 - expires an abandoned session
        if self._status is None:
            return None
        status = dict(self._status)
        session = self._session
        if session is not None and session.stability is not None:
            status["raw"] = session.stability.latest
            drift = session.stability.drift()
            status["drift"] = None if drift is None else round(drift, 6)
        return status

    def measured(self) -> dict[str, Any]:
        """The kept results, per probe (``get_state``'s ``probe_calibrated``)."""
        keys = ("key", "source", "poly", "slope_pct", "offset_mv", "scale", "measured_at")
        return {p: {k: r.get(k) for k in keys if k in r} for p, r in sorted(self._results.items())}

    def reminders(self, days: Mapping[str, float]) -> list[str]:
        """A line per probe calibration older than its ``days`` (0: none)."""
        now_ms = self._clock.time() * 1000.0
        out = []
        for probe, result in sorted(self._results.items()):
            limit = days.get(probe, 0.0)
            age = (now_ms - float(result["measured_at"])) / 86_400_000.0
            if limit > 0 and age > limit:
                name = "pH" if probe == "ph" else "EC"
                out.append(f"{name} probe calibrated {age:.0f} days ago (recalibrate every "
                           f"{limit:g})")
        return out

    # -------------------------------------------------------------------- RPC
    async def rpc(self, params: Any) -> dict[str, Any]:
        """`probe_calibrate`: ``step`` start, read or cancel (see the module docstring)."""
        if not isinstance(params, Mapping):
            raise CommandError("params must be an object with probe (ph or ec) and step")
        known = ("probe", "step", "buffers", "standards", "source", "mv_per_unit", "zero",
                 "temp", "force")
        unknown = sorted(str(k) for k in params if k not in known)
        if unknown:
            raise CommandError(f"unknown params {', '.join(unknown)} ({', '.join(known)})")
        probe = params.get("probe")
        if probe not in PROBES:
            raise CommandError("params.probe must be ph or ec")
        step = params.get("step", "start")
        if step == "start":
            return await self._start(str(probe), params)
        session = self._session
        if session is None or session.probe != probe:
            raise CommandError(f"no {probe} calibration is under way: start one (step start)")
        session.last_step = self._clock.monotonic()
        if step == "read":
            return self._read(session, params)
        if step == "cancel":
            await self.cancel("cancelled by request")
            return {"probe_calibration": self.state()}
        raise CommandError("params.step must be start, read or cancel")

    async def _start(self, probe: str, params: Mapping[str, Any]) -> dict[str, Any]:
        node, control = self._node, self._control
        if self.active is not None:
            raise CommandError(f"a {self.active} calibration is under way: read its next point, "
                               "or cancel it (step cancel)")
        node.require_link()
        force = params.get("force", False)
        if not isinstance(force, bool):
            raise CommandError("params.force must be true or false")
        other = control.procedure()
        if other is not None:
            raise CommandError(f"{other}: wait for it to end")
        session = self._ph_session(params) if probe == "ph" else self._ec_session(params)
        busy = control.busy()
        if busy is not None:
            if not force:
                raise CommandError(f"{busy}: wait for it to end, or pass force: true to stop it")
            control.abort("a probe calibration was forced")
            if not await control.stop_actuators():
                raise CommandError(f"{busy}, and the node did not confirm stop")
        session.temp_override = _optional_number(params, "temp")
        session.last_step = self._clock.monotonic()
        self._session = session
        ts = int(self._clock.time() * 1000)
        self._status = {
            "state": "waiting", "probe": probe, "key": session.key, "source": session.source,
            "steps": list(session.steps), "next": session.steps[0], "points": [],
            "started": ts, "result": None, "error": None,
        }
        node.record(ts, {"probe_calibration": "started", "probe_calibration_probe": probe})
        log.info("node %s: %s calibration started (%s, %s)", node.name, probe, session.source,
                 ", ".join(f"{s:g}" for s in session.steps), extra=fields(node=node.name))
        return {"started": ts, "probe_calibration": self.state()}

    def _ph_session(self, params: Mapping[str, Any]) -> _Session:
        current = self._node.calibration_map("ph")
        source = params.get("source")
        if source is None:
            source = current.source if current is not None else next(
                (k for k in PH_SOURCES if self._raw.get(k) is not None), None)
        if not isinstance(source, str) or not source:
            raise CommandError("no raw pH value from the node (ph_v, ph_mv or ph_adc): name it "
                               "(params.source)")
        if self._raw.get(source) is None:
            raise CommandError(f"no {source} reading from node {self._node.name} yet")
        gain, zero = _optional_number(params, "mv_per_unit"), _optional_number(params, "zero")
        kept = self._results.get("ph", {}).get("front_end")
        try:
            if gain is not None:
                front = FrontEnd(gain, zero or 0.0)
            elif isinstance(kept, dict) and self._results["ph"].get("source") == source:
                front = FrontEnd(float(kept["mv_per_unit"]), float(kept["zero"]))
            else:
                guess = front_end_for(source)
                if guess is None:
                    raise CommandError(
                        f"{source} is not a potential: give the front end's mV per unit and "
                        "the raw value at 0 mV (params.mv_per_unit, params.zero)")
                front = guess
        except ProbeCalibrationError as exc:
            raise CommandError(f"params: {exc}") from exc
        buffers = params.get("buffers")
        steps = DEFAULT_BUFFERS if buffers is None else _numbers(buffers, "buffers", 0.0, 14.0)
        if len(steps) < 2:
            raise CommandError("params.buffers must name 2 or 3 buffers")
        return _Session("ph", "ph", source, steps, front_end=front)

    def _ec_session(self, params: Mapping[str, Any]) -> _Session:
        if params.get("source") is not None or params.get("mv_per_unit") is not None:
            raise CommandError("an EC calibration corrects the conductivity map in use: "
                               "source and front end are the map's")
        target = next((k for k in ("tds", "ec") if self._node.calibration_map(k) is not None),
                      None)
        if target is not None:
            current = self._node.calibration_map(target)
            assert current is not None
            source, poly = current.source, tuple(current.poly)
            valid, coefficient = current.valid, current.temp_coefficient
        else:
            target = next((k for k in ("ec", "tds") if self._raw.get(k) is not None), None)
            if target is None:
                raise CommandError(
                    "no conductivity reading to calibrate: the node sends neither tds nor ec, "
                    "and no calibration map makes one (nodes[].calibration.tds)")
            source, poly, valid, coefficient = target, (1.0, 0.0), None, None
        if self._raw.get(source) is None:
            raise CommandError(f"no {source} reading from node {self._node.name} yet")
        standards = params.get("standards")
        steps = (EC_STANDARDS_US[0],) if standards is None else _numbers(
            standards, "standards", 10.0, 200_000.0)
        if len(steps) > 2:
            raise CommandError("params.standards must name 1 or 2 standards")
        return _Session("ec", target, source, steps, poly=poly, valid=valid,
                        temp_coefficient=coefficient)

    def _read(self, session: _Session, params: Mapping[str, Any]) -> dict[str, Any]:
        if session.task is not None and not session.task.done():
            raise CommandError("a reading is under way: wait until it is stable")
        override = _optional_number(params, "temp")
        if override is not None:
            session.temp_override = override
        index = len(session.points)
        # At least six readings in the window, however slowly the node is polled.
        window = max(WINDOW_S, MIN_READINGS * self._node.config.poll_interval)
        if session.probe == "ph":
            assert session.front_end is not None
            tolerance = PH_TOLERANCE_MV / abs(session.front_end.mv_per_unit)
            session.stability = Stability(window, tolerance)
        else:
            session.stability = Stability(window, EC_TOLERANCE, relative=True)
        session.task = self._node.spawn(self._watch(session), name=f"probecal:{self._node.name}")
        assert self._status is not None
        self._status.update(state="reading", next=session.steps[index], error=None)
        return {"probe_calibration": self.state()}

    # ------------------------------------------------------------------ the task
    async def _watch(self, session: _Session) -> None:
        """Watch the raw value until it is stable, then keep the point (and maybe finish)."""
        assert session.stability is not None
        began = self._clock.monotonic()
        try:
            while True:
                value = session.stability.stable()
                if value is not None:
                    break
                if self._clock.monotonic() - began > READ_TIMEOUT_S:
                    self._step_failed(session, f"{session.source} did not settle within "
                                      f"{READ_TIMEOUT_S / 60:.0f} min: is the probe in the "
                                      "solution, and the solution still?")
                    return
                session.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await session.wake.wait()
            await self._point(session, value)
        except asyncio.CancelledError:
            if self._session is session:
                self._step_failed(session, "interrupted (link lost or gateway stopping): read "
                                  "this point again")
            raise

    def _step_failed(self, session: _Session, why: str) -> None:
        session.stability = None
        if self._status is not None and self._session is session:
            self._status.update(state="waiting", error=why)
        log.warning("node %s: %s calibration: %s", self._node.name, session.probe, why,
                    extra=fields(node=self._node.name))

    def _temperature(self, session: _Session) -> tuple[float, str | None]:
        if session.temp_override is not None:
            return session.temp_override, None
        temp = self._node.latest.get("water_temp")
        if temp is None or not math.isfinite(temp):
            return DEFAULT_TEMP_C, f"no water_temp reading: taken at {DEFAULT_TEMP_C:g} °C"
        return float(temp), None

    async def _point(self, session: _Session, raw: float) -> None:
        index = len(session.points)
        nominal = session.steps[index]
        temp, note = self._temperature(session)
        point: dict[str, Any] = {"raw": raw, "temp_c": round(temp, 2)}
        if session.probe == "ph":
            value = buffer_ph(nominal, temp)
            point.update(buffer=nominal, ph=nominal if value is None else round(value, 4))
            if value is None:
                note = f"pH {nominal:g} has no known temperature dependence: taken as labelled"
        else:
            point.update(standard_us=nominal)
        if note:
            point["note"] = note
        session.points.append(point)
        session.stability = None
        assert self._status is not None
        self._status["points"] = list(session.points)
        self._node.record(int(self._clock.time() * 1000), {
            "probe_calibration": "point", "probe_calibration_raw": raw,
        })
        if len(session.points) < len(session.steps):
            self._status.update(state="waiting", next=session.steps[len(session.points)])
            return
        await self._finish(session)

    # ---------------------------------------------------------------- the result
    async def _finish(self, session: _Session) -> None:
        node = self._node
        ts = int(self._clock.time() * 1000)
        try:
            if session.probe == "ph":
                calibration: PhCalibration | EcCalibration = self._fit_ph(session)
            else:
                calibration = self._fit_ec(session)
        except ProbeRefused as refused:
            self._close("refused", str(refused), result=_describe(refused.calibration, ts))
            node.record(ts, {"probe_calibration": "refused",
                             **_telemetry(session, refused.calibration)})
            return
        except ProbeCalibrationError as exc:
            self._close("failed", str(exc))
            return
        # Six digits: far finer than any probe, and what the grower copies into the file.
        poly = tuple(float(f"{c:.6g}") for c in calibration.poly)
        measured = CalibrationMap(session.key, session.source, poly, self._valid(session),
                                  session.temp_coefficient)
        replaced = node.calibration_map(session.key)
        node.set_calibration(session.key, measured)
        result = _describe(calibration, ts)
        result.update(key=session.key, source=session.source, poly=list(measured.poly),
                      valid=None if measured.valid is None else list(measured.valid),
                      temp_coefficient=measured.temp_coefficient, replaced=map_json(replaced))
        if session.front_end is not None:
            result["front_end"] = {"mv_per_unit": session.front_end.mv_per_unit,
                                   "zero": session.front_end.zero}
        self._results[session.probe] = {
            **result, "base": map_json(node.config.calibration.get(session.key))}
        await self._save()
        self._close("done", None, result=result)
        node.record(ts, {"probe_calibration": "done", **_telemetry(session, calibration)})
        log.info("node %s: %s calibration done: %s; applied", node.name, session.probe,
                 _summary(calibration), extra=fields(node=node.name))

    def _fit_ph(self, session: _Session) -> PhCalibration:
        assert session.front_end is not None
        points = [PhPoint(p["buffer"], p["ph"], p["raw"], p["temp_c"]) for p in session.points]
        return fit_ph(points, session.front_end)

    def _fit_ec(self, session: _Session) -> EcCalibration:
        valid = session.valid
        if valid is not None and len(session.poly) > 2:
            outside = [p["raw"] for p in session.points if not valid[0] <= p["raw"] <= valid[1]]
            if outside:
                raise ProbeCalibrationError(
                    f"{session.source} read {outside[0]:g} in the standard, outside the range "
                    f"the map was fitted on ({valid[0]:g}–{valid[1]:g}): it cannot be corrected "
                    "there; use a standard inside it, or fit the map again")
        points = [EcPoint(p["standard_us"], p["raw"], p["temp_c"]) for p in session.points]
        return fit_ec(points, session.poly, per_us=PER_US[session.key],
                      temp_coefficient=session.temp_coefficient)

    @staticmethod
    def _valid(session: _Session) -> tuple[float, float] | None:
        """A linear map's valid range grows to the standards it was just calibrated in."""
        valid = session.valid
        if valid is None or len(session.poly) > 2:
            return valid
        raws = [p["raw"] for p in session.points]
        return min(valid[0], *raws), max(valid[1], *raws)

    # ---------------------------------------------------------------- endings
    async def cancel(self, why: str) -> bool:
        """End the session under way; True if there was one."""
        session = self._session
        if session is None:
            return False
        self._session = None
        if session.task is not None and not session.task.done():
            await cancel_and_wait(session.task)
        self._session = session
        self._close("cancelled", why)
        return True

    def _close(self, state: str, error: str | None, *, result: dict[str, Any] | None = None
               ) -> None:
        session, self._session = self._session, None
        if self._status is not None:
            self._status.update(state=state, error=error, result=result,
                                ended=int(self._clock.time() * 1000))
            self._status.pop("next", None)
        if session is not None and state != "done":
            log.warning("node %s: %s calibration %s: %s", self._node.name, session.probe,
                        state, error, extra=fields(node=self._node.name))
            if state != "refused":
                self._node.record(int(self._clock.time() * 1000), {"probe_calibration": state})

    # -------------------------------------------------------------- persistence
    async def _save(self) -> None:
        try:
            if self._results:
                await self._store.save_learned(
                    self._node.name, PROBE_KEY,
                    {"version": STATE_VERSION, "probes": self._results}, {},
                    ts=self._clock.time(),
                )
            else:
                await self._store.forget_learned(self._node.name, PROBE_KEY)
        except StoreError as exc:
            log.warning("node %s: cannot keep the probe calibration: %s", self._node.name, exc,
                        extra=fields(node=self._node.name))

    async def restore(self) -> None:
        """At the node's start: kept maps whose config map is unchanged apply."""
        node = self._node
        try:
            saved = await self._store.load_learned(node.name, PROBE_KEY)
        except StoreClosed:
            return
        except StoreError as exc:
            log.warning("node %s: probe calibrations cannot be read (%s); the config's maps "
                        "apply", node.name, exc, extra=fields(node=node.name))
            return
        if saved is None:
            return
        results = _valid_results(saved[0])
        if results is None:
            log.warning("node %s: the stored probe calibrations are unusable; the config's maps "
                        "apply", node.name, extra=fields(node=node.name))
            return
        kept = {}
        for probe, r in results.items():
            if r["base"] != map_json(node.config.calibration.get(r["key"])):
                log.info("node %s: calibration.%s was edited since the %s probe was calibrated;"
                         " the file wins", node.name, r["key"], probe,
                         extra=fields(node=node.name))
                continue
            kept[probe] = r
            node.set_calibration(r["key"], CalibrationMap(
                r["key"], r["source"], tuple(float(c) for c in r["poly"]),
                None if r.get("valid") is None else (float(r["valid"][0]),
                                                      float(r["valid"][1])),
                r.get("temp_coefficient")))
            log.info("node %s: the %s probe's calibration of %s applies (%s)", node.name, probe,
                     r["key"], r["source"], extra=fields(node=node.name))
        self._results = kept
        if len(kept) != len(results):
            await self._save()


def _describe(cal: PhCalibration | EcCalibration, ts: int) -> dict[str, Any]:
    if isinstance(cal, PhCalibration):
        return {"slope_pct": round(cal.slope_pct, 2), "offset_mv": round(cal.offset_mv, 2),
                "temp_c": round(cal.temp_c, 2), "residual_ph": round(cal.residual_ph, 4),
                "problems": list(cal.problems), "measured_at": ts}
    return {"scale": round(cal.scale, 5), "offset": round(cal.offset, 4),
            "problems": list(cal.problems), "measured_at": ts}


def _telemetry(session: _Session, cal: PhCalibration | EcCalibration) -> dict[str, Any]:
    if isinstance(cal, PhCalibration):
        return {"ph_slope_pct": round(cal.slope_pct, 2), "ph_offset_mv": round(cal.offset_mv, 2)}
    return {f"{session.key}_scale": round(cal.scale, 5)}


def _summary(cal: PhCalibration | EcCalibration) -> str:
    if isinstance(cal, PhCalibration):
        return f"slope {cal.slope_pct:.1f} % of Nernst, offset {cal.offset_mv:+.1f} mV"
    return f"the probe read {1 / cal.scale:.3f} times the standard"


def _valid_results(state: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    probes = state.get("probes")
    if state.get("version") != STATE_VERSION or not isinstance(probes, dict):
        return None
    for probe, r in probes.items():
        if probe not in PROBES or not isinstance(r, dict):
            return None
        poly: Sequence[Any] = r.get("poly") or []
        if (
            r.get("key") not in ("ph", "tds", "ec") or not isinstance(r.get("source"), str)
            or not isinstance(poly, list) or not 1 <= len(poly) <= 10
            or not all(isinstance(c, int | float) and not isinstance(c, bool)
                       and math.isfinite(c) for c in poly)
            or not isinstance(r.get("measured_at"), int | float)
        ):
            return None
    return probes
