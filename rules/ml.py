"""The ``ml`` controller: the int8 TFLite model sizes each dose, RB whenever it cannot be trusted.

The model (rules/mlpolicy.py, trained by models/train.py on the closed-loop
data of models/closedloop.py) answers one question per decision: *what
fraction of the reference dose to run now*. TDS: of the need, the dose
that brings the settled TDS to the setpoint by mass balance with the
configured constants; pH: of the pH safety envelope's limit
(``DecisionContext.max_ml``), which the cycle enforces anyway. The plant
constants and what this controller measured of the tank are its features,
so one model serves every tank in the ranges it was trained on.

Around the model, this controller does what no model should guess:

- **TDS: it looks again only once a dose has settled** (the windows after
  a dose agree, and the change over the last third of the time since it
  ended is small against its effect, whatever the mixing lag), and then
  measures the pump's *effect ratio* — observed change over the change the
  configured constants predicted — which is the model's ``factor`` feature
  for that pump's later doses. A dose longer than :data:`MAX_DOSE_S` runs
  in pieces, one per decision, sized at once.
- **pH: nothing beyond the envelope.** While the envelope allows nothing
  (the last dose is mixing in) no dose is asked for.

RB decides, and the decision says so (``Decision.controller == "rb"`` and
a ``note`` naming the reason), whenever:

- the model could not be loaded: missing file, bytes that do not match the
  hash in ``metadata.json``, a file the interpreter refuses (logged once,
  at construction);
- a feature is not finite or outside the range the model was trained on
  (:class:`rules.mlruntime.InputRangeError`): another kind of tank, stock or
  pump than the training tanks;
- inference does not finish within ``deadline_s`` (the worker thread is left
  to finish on its own; while it is still busy the next decisions go straight
  to RB rather than queueing behind it);
- the model returns a non-finite value or no value for a target.

A dose RB makes in a TDS loop is waited for like the model's, but teaches
no effect ratio. Inference runs in one dedicated, named worker thread, so
the event loop never blocks on the interpreter; :meth:`MlController.close`
joins it. The measured effect ratios are what this controller learns about
the tank (:meth:`MlController.learned`); the gateway keeps them across
restarts.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rules.controller import (
    NUTRIENT,
    REFILL,
    ControllerError,
    ControllerOptions,
    Decision,
    DecisionContext,
    Dose,
    register,
)
from rules.envelope import CAP_PH, HALF, PhEnvelope
from rules.mlpolicy import (
    OUTPUT_SCALE,
    PhQuery,
    TdsQuery,
    ph_query,
    tds_effect,
    tds_query,
    volume_l,
)
from rules.mlruntime import DEFAULT_MODEL, Model, ModelError, ModelSpec, OutputError
from rules.rb import RbController
from rules.settling import Settling, threshold

__all__ = ["MAX_DOSE_S", "MlController", "Observer", "Predictor"]

_LOG = logging.getLogger(__name__)

STATE_VERSION = 1  # of the learned-state snapshot
MAX_DOSE_S = 60.0  # a longer TDS dose runs in pieces (the safety guard allows 120 s per dose)
MIN_DOSE_MS = 20
LEARN_MIN_PCT = 3.0  # a dose measures its pump's effect only above this change (% of sp)
FACTOR_RANGE = (0.4, 2.5)  # an effect ratio outside is a fault (a dry pump), not the tank
FACTOR_MEMORY = 4  # measurements kept per pump (the latest), weighted by their change


class Predictor(Protocol):
    """What the controller needs from a model (:class:`rules.mlruntime.Model` is one)."""

    @property
    def spec(self) -> ModelSpec: ...

    def predict(self, features: Mapping[str, float]) -> dict[str, float]: ...


#: Called with every query before it goes to the model (the training-data generator).
Observer = Callable[[TdsQuery | PhQuery], None]


@dataclass
class _InFlight:
    """A TDS dose whose effect has not settled yet."""

    actuator: str
    before: float  # settled TDS when it was decided
    volume: float  # litres, then
    ml: float = 0.0  # configured ml of the pieces run so far
    remaining_ms: int = 0  # pieces still to run
    end_s: float | None = None  # when the last piece ran out, on the cycle's clock
    learn: bool = True  # False: RB's dose, waited for but not measured


@dataclass
class _TdsMemory:
    windows: Settling = field(default_factory=Settling)  # window averages since the last dose
    in_flight: _InFlight | None = None
    ratios: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (ratio, weight)

    def factors(self) -> dict[str, float]:
        """The measured effect ratio of each pump: the weighted mean of its latest measurements."""
        return {
            pump: math.fsum(r * w for r, w in rows) / math.fsum(w for _, w in rows)
            for pump, rows in self.ratios.items()
            if rows
        }


@register("ml")
class MlController:
    """Registered controller ``"ml"``: model-sized doses, RB on any doubt (module docstring).

    ``options.model_path`` picks the ``.tflite`` file (default: the
    committed int8 model); its ``metadata.json`` is the file of that name
    beside it. Tests and the data generator inject ``model`` instead, and
    may pass an ``observer`` that sees every query.
    """

    name = "ml"

    def __init__(
        self,
        options: ControllerOptions | None = None,
        *,
        model: Predictor | None = None,
        deadline_s: float = 0.05,
        observer: Observer | None = None,
    ) -> None:
        options = options or ControllerOptions()
        if not deadline_s > 0:
            raise ControllerError("deadline_s must be > 0")
        self._rb = RbController(options)
        self._deadline_s = deadline_s
        self._observer = observer
        self._unavailable: str | None = None
        self._last_reason: str | None = None
        self._pending: Future[dict[str, float]] | None = None
        self._closed = False
        self._tds = _TdsMemory()
        if model is None:
            path = Path(options.model_path) if options.model_path else DEFAULT_MODEL
            try:
                model = Model.load(path, path.with_name("metadata.json"))
            except ModelError as exc:
                self._unavailable = f"model unavailable: {exc}"
                _LOG.warning(
                    "ml cannot run its model on this machine (%s): rb decides every dose "
                    "until a TFLite runtime is installed (see docs/install-raspberry-pi.md)",
                    exc, extra={"CONTROLLER": "ml", "REASON": "model_unavailable",
                                "MODEL": str(path)},
                )
        self._model = model
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="hydrogate-ml")
            if model is not None else None
        )

    # ------------------------------------------------------------- deciding
    async def decide(self, ctx: DecisionContext) -> Decision:
        """The model's doses for ``ctx.loop``, or RB's with the reason in ``note``."""
        if self._closed:
            raise ControllerError("ml controller is closed")
        settled: float | None = None
        try:
            if self._unavailable is not None or self._model is None:
                raise ModelError(self._unavailable or "no model")
            if ctx.loop == "ph":
                decision = await self._ph(ctx)
            else:
                settled, decision = await self._tds_decision(ctx)
        except TimeoutError:
            reason = f"inference slower than {self._deadline_s * 1000:.0f} ms"
        except ModelError as exc:
            reason = str(exc)
        else:
            if self._last_reason is not None:
                _LOG.info("ml controller decides again (was rb: %s)", self._last_reason,
                          extra={"CONTROLLER": "ml"})
            self._last_reason = None
            return decision
        if reason != self._last_reason and self._unavailable is None:
            # A feature outside the trained range or a slow inference is expected
            # operation (rb still decides, within the envelope): INFO, not a warning.
            _LOG.info("ml controller falls back to rb: %s", reason,
                      extra={"CONTROLLER": "ml", "REASON": reason})
        self._last_reason = reason
        rb = await self._rb.decide(ctx)
        if ctx.loop == "tds" and rb.doses:
            self._foreign(ctx, settled, rb.doses)
        note = f"ml fallback: {reason}" + (f"; rb: {rb.note}" if rb.note else "")
        return Decision(doses=rb.doses, controller=self._rb.name, note=note)

    async def _ask(self, query: TdsQuery | PhQuery, target: str) -> float:
        """The model's output for ``target``, clipped to its range; raises ``ModelError``."""
        assert self._model is not None and self._executor is not None
        if self._observer is not None:
            self._observer(query)
        if self._pending is not None and not self._pending.done():
            raise ModelError("previous inference still running")
        features = {f: query.features[f] for f in self._model.spec.features}
        self._pending = self._executor.submit(self._model.predict, features)
        async with asyncio.timeout(self._deadline_s):
            outputs = await asyncio.wrap_future(self._pending)
        bad = [t for t in self._model.spec.targets if not math.isfinite(outputs.get(t, math.nan))]
        if bad:
            raise OutputError(f"non-finite output for {', '.join(bad)}")
        return min(max(outputs[target], 0.0), OUTPUT_SCALE[target])

    # ------------------------------------------------------------------ pH
    async def _ph(self, ctx: DecisionContext) -> Decision:
        """A fraction of the envelope's limit, towards the setpoint."""
        actuator = "ph_up" if ctx.error > 0 else "ph_down"
        flow = ctx.plant.flow_ml_s.get(actuator)
        if flow is None:
            return self._none(f"cannot dose {actuator}: no flow configured")
        if actuator in ctx.max_ml:
            max_ml = ctx.max_ml[actuator]
        else:  # no cycle (a direct call): the same bound from the configured plant alone
            move = min(HALF * abs(ctx.error), CAP_PH)
            bound = PhEnvelope(ctx.plant)
            max_ml = bound.per_l_to_move(actuator, ctx.measured, move, ctx.setpoint)
            max_ml *= volume_l(ctx)
        query = ph_query(ctx, max_ml)
        if query is None:
            return self._none("waiting: the pH envelope allows no dose now")
        fraction = min(await self._ask(query, "ph_fraction"), 1.0)
        ms = min(math.floor(fraction * query.reference_ms), round(MAX_DOSE_S * 1000.0))
        if ms < 1:
            return self._none(f"the model asks for {fraction:.2f} of the envelope's limit: <1 ms")
        note = (f"{actuator} {fraction:.2f} of the envelope's {max_ml:.3g} ml "
                f"from pH {ctx.measured:.3f}")
        return Decision(doses=(Dose(actuator, 255, ms),), controller=self.name, note=note)

    # ----------------------------------------------------------------- TDS
    async def _tds_decision(self, ctx: DecisionContext) -> tuple[float | None, Decision]:
        """(the settled TDS if known, the decision) for a TDS loop decision."""
        st = self._tds
        if ctx.previous_error is None:  # a new loop: nothing of ours is in flight
            st.windows.reset()
            st.in_flight = None
        st.windows.add(ctx)
        dose = st.in_flight
        if dose is not None and dose.remaining_ms > 0:
            return None, self._piece(ctx, dose)
        settled = st.windows.settled(
            ctx,
            before=None if dose is None else dose.before,
            end_s=None if dose is None else dose.end_s,
        )
        if settled is None:
            return None, self._none("waiting for the reading to settle")
        if dose is not None:
            self._learn(ctx, dose, settled)
        st.in_flight = None
        try:
            query = tds_query(ctx, settled, st.factors())
        except KeyError as exc:
            return settled, self._none(f"cannot dose {exc.args[0]}: no flow configured")
        if query is None:
            return settled, self._none("the stock is not stronger than the setpoint")
        fraction = await self._ask(query, "tds_fraction")
        total_ms = round(fraction * query.reference_ms)
        if total_ms < MIN_DOSE_MS:
            return settled, self._none(f"the model asks for {fraction:.2f} of the need: too little")
        st.in_flight = _InFlight(query.actuator, settled, volume_l(ctx), remaining_ms=total_ms)
        decision = self._piece(ctx, st.in_flight)
        note = f"{fraction:.2f} of the need ({total_ms / 1000:.1f} s) from {settled:.4g}; "
        return settled, Decision(decision.doses, self.name, note + decision.note)

    def _piece(self, ctx: DecisionContext, dose: _InFlight) -> Decision:
        """The next piece (at most :data:`MAX_DOSE_S`) of the dose in flight."""
        ms = min(dose.remaining_ms, round(MAX_DOSE_S * 1000.0))
        dose.remaining_ms -= ms
        dose.ml += ms / 1000.0 * ctx.plant.flow_ml_s[dose.actuator]
        dose.end_s = None if ctx.now is None else ctx.now + ms / 1000.0
        self._tds.windows.reset()
        left = f", {dose.remaining_ms / 1000:.1f} s to follow" if dose.remaining_ms else ""
        note = f"{dose.actuator} {ms / 1000:.1f} s{left}"
        return Decision(doses=(Dose(dose.actuator, 255, ms),), controller=self.name, note=note)

    def _foreign(
        self, ctx: DecisionContext, settled: float | None, doses: tuple[Dose, ...]
    ) -> None:
        """RB dosed in a TDS loop: wait for it to settle like our own, learn nothing from it."""
        longest = max(d.ms for d in doses)
        end = None if ctx.now is None else ctx.now + longest / 1000.0
        before = ctx.measured if settled is None else settled
        self._tds.in_flight = _InFlight(doses[0].actuator, before, volume_l(ctx), end_s=end,
                                        learn=False)
        self._tds.windows.reset()

    def _learn(self, ctx: DecisionContext, dose: _InFlight, final: float) -> None:
        """The pump's effect ratio from a settled dose, if it is large enough to tell."""
        if not dose.learn:
            return
        inflow = ctx.plant.stock_ppm if dose.actuator == "nutrient" else 0.0
        expected = tds_effect(dose.before, dose.volume, dose.ml, inflow)
        observed = final - dose.before
        big = max(2.0 * threshold(ctx), LEARN_MIN_PCT / 100.0 * ctx.setpoint)
        if expected == 0.0 or abs(observed) < big:
            return
        ratio = observed / expected
        low, high = FACTOR_RANGE
        if not low <= ratio <= high:
            _LOG.warning("ml: %s changed TDS by %.1f where %.1f was expected; not learned",
                         dose.actuator, observed, expected, extra={"ACTUATOR": dose.actuator})
            return
        rows = self._tds.ratios.setdefault(dose.actuator, [])
        rows.append((ratio, abs(observed)))
        del rows[:-FACTOR_MEMORY]

    def _none(self, note: str) -> Decision:
        return Decision(doses=(), controller=self.name, note=note)

    # ----------------------------------------------------------- knowledge
    def learned(self) -> dict[str, Any]:
        """The measured effect ratios of the TDS pumps (the Learner side); ``{}`` before any."""
        ratios = self._tds.ratios
        if not any(ratios.values()):
            return {}
        return {
            "version": STATE_VERSION,
            "tds_ratios": {p: [list(r) for r in rows] for p, rows in ratios.items() if rows},
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back a :meth:`learned` snapshot; :class:`ControllerError` if it is unusable."""
        try:
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"version {state.get('version')!r}, expected {STATE_VERSION}")
            ratios = {
                str(p): [(float(r), float(w)) for r, w in rows]
                for p, rows in state["tds_ratios"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ControllerError(f"ml: unusable learned state: {exc}") from exc
        low, high = FACTOR_RANGE
        if any(
            p not in (NUTRIENT, REFILL)
            or not 0 < len(rows) <= FACTOR_MEMORY
            or not all(math.isfinite(r) and low <= r <= high and w > 0 and math.isfinite(w)
                       for r, w in rows)
            for p, rows in ratios.items()
        ):
            raise ControllerError("ml: unusable learned state: a value out of range")
        self._tds.ratios = ratios

    def close(self) -> None:
        """Stop the worker thread (waiting for an inference still running) and the fallback."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._rb.close()

