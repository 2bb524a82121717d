"""The ``ml`` controller: the int8 TFLite model first, RB whenever it cannot be trusted.

The control documentation's ML controller is the primary one and RB its
fallback "on any ML failure". Here "failure" is spelled out; RB decides,
and the decision says so (``Decision.controller == "rb"`` and a ``note``
naming the reason), whenever:

- the model could not be loaded: missing file, bytes that do not match the
  hash in ``metadata.json``, a file the interpreter refuses (logged once,
  at construction);
- a reading the model needs is missing, not finite, or outside the range it
  was trained on (:class:`models.runtime.InputRangeError`);
- the plant differs from the one the labels were computed for (another tank
  volume, stock concentration or pump flow changes every dose in seconds);
- inference does not finish within ``deadline_s`` (the worker thread is left
  to finish on its own; while it is still busy the next decisions go straight
  to RB rather than queueing behind it);
- the model returns a non-finite value or no value for a target.

Inference runs in one dedicated, named worker thread, so the event loop
never blocks on the interpreter; :meth:`MlController.close` joins it.

The model learned the documentation's bands (560–840 ppm, pH 5.5–6.5). For
a node with another setpoint or tolerance the loop's own measurement is
mapped into the model's coordinates: below the band the distance to the
band edge is kept (a nutrient or pH-up dose is proportional to it), above
it the ratio to the edge for ppm (dilution) and the distance for pH, and
inside the band linearly. The other loop's reading is used as it is. Only
the loop's own actuators are returned (``tds``: nutrient and refill; ``ph``:
ph_up and ph_down), at PWM 255, for outputs of at least ``min_seconds`` and
at most the output's cap; the safety layer below may still clamp or refuse.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from models.runtime import (
    DEFAULT_MODEL,
    InputRangeError,
    Model,
    ModelError,
    ModelSpec,
    OutputError,
)
from rules.controller import (
    ControllerError,
    ControllerOptions,
    Decision,
    DecisionContext,
    Dose,
    PlantConstants,
    register,
)
from rules.rb import RbController

__all__ = ["LOOP_ACTUATORS", "MlController", "PlantMismatch", "Predictor", "to_model_units"]

_LOG = logging.getLogger(__name__)

#: The actuators each loop may drive.
LOOP_ACTUATORS: Mapping[str, tuple[str, ...]] = {
    "tds": ("nutrient", "refill"),
    "ph": ("ph_up", "ph_down"),
}


class PlantMismatch(ModelError):
    """The node's plant differs from the model's: every decision falls back until it is fixed."""


class Predictor(Protocol):
    """What the controller needs from a model (:class:`models.runtime.Model` is one)."""

    @property
    def spec(self) -> ModelSpec: ...

    def predict(self, features: Mapping[str, float]) -> dict[str, float]: ...


def to_model_units(
    value: float, band: tuple[float, float], model_band: tuple[float, float], *, ratio: bool
) -> float:
    """Map ``value`` from a node's ``band`` into the band the model was trained on.

    Below the band the distance to the lower edge is kept; above it the ratio
    to the upper edge (``ratio=True``, ppm: dilution) or the distance (pH);
    inside the band the mapping is linear, edges onto edges.
    """
    low, high = band
    m_low, m_high = model_band
    if value < low:
        return m_low - (low - value)
    if value > high:
        return m_high * value / high if ratio else m_high + (value - high)
    if high == low:
        return (m_low + m_high) / 2.0
    return m_low + (value - low) * (m_high - m_low) / (high - low)


def _same_plant(a: PlantConstants, b: PlantConstants, actuators: tuple[str, ...]) -> bool:
    if not (math.isclose(a.tank_volume_l, b.tank_volume_l)
            and math.isclose(a.stock_ppm, b.stock_ppm)):
        return False
    return all(
        (q := a.flow_ml_s.get(act)) is not None
        and (r := b.flow_ml_s.get(act)) is not None
        and math.isclose(q, r)
        for act in actuators
    )


@register("ml")
class MlController:
    """Registered controller ``"ml"``: model doses, RB on any doubt (see the module docstring).

    ``options.model_path`` picks the ``.tflite`` file (default: the
    committed int8 model); its ``metadata.json`` is the file of that name
    beside it. Tests inject ``model`` instead.
    """

    name = "ml"

    def __init__(
        self,
        options: ControllerOptions | None = None,
        *,
        model: Predictor | None = None,
        deadline_s: float = 0.05,
        min_seconds: float = 0.5,
    ) -> None:
        options = options or ControllerOptions()
        if not deadline_s > 0 or not min_seconds >= 0:
            raise ControllerError("deadline_s must be > 0 and min_seconds >= 0")
        self._rb = RbController(options)
        self._deadline_s = deadline_s
        self._min_seconds = min_seconds
        self._unavailable: str | None = None
        self._last_reason: str | None = None
        self._pending: Future[dict[str, float]] | None = None
        self._closed = False
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

    async def decide(self, ctx: DecisionContext) -> Decision:
        """The model's doses for ``ctx.loop``, or RB's with the reason in ``note``."""
        if self._closed:
            raise ControllerError("ml controller is closed")
        try:
            decision = await self._decide_ml(ctx)
        except TimeoutError:
            reason = f"inference slower than {self._deadline_s * 1000:.0f} ms"
            level = logging.INFO
        except ModelError as exc:
            reason = str(exc)
            # A plant the model was not made for lasts until someone fixes the
            # config: the grower must act. A reading outside the trained range
            # or a slow inference is expected operation: rb still decides.
            level = logging.WARNING if isinstance(exc, PlantMismatch) else logging.INFO
        else:
            if self._last_reason is not None:
                _LOG.info("ml controller decides again (was rb: %s)", self._last_reason,
                          extra={"CONTROLLER": "ml"})
            self._last_reason = None
            return decision
        if reason != self._last_reason and self._unavailable is None:
            _LOG.log(level, "ml controller falls back to rb: %s", reason,
                     extra={"CONTROLLER": "ml", "REASON": reason})
        self._last_reason = reason
        rb = await self._rb.decide(ctx)
        note = f"ml fallback: {reason}" + (f"; rb: {rb.note}" if rb.note else "")
        return Decision(doses=rb.doses, controller=self._rb.name, note=note)

    async def _decide_ml(self, ctx: DecisionContext) -> Decision:
        if self._unavailable is not None or self._model is None or self._executor is None:
            raise ModelError(self._unavailable or "no model")
        spec = self._model.spec
        actuators = LOOP_ACTUATORS[ctx.loop]
        if not _same_plant(ctx.plant, spec.plant, actuators):
            raise PlantMismatch("the node's plant constants differ from the model's")
        features = dict(ctx.values)
        features[ctx.loop] = to_model_units(
            ctx.measured, ctx.band, spec.bands[ctx.loop], ratio=ctx.loop == "tds"
        )
        missing = [f for f in spec.features if f not in features]
        if missing:
            raise InputRangeError(f"missing input {', '.join(missing)}")
        if self._pending is not None and not self._pending.done():
            raise ModelError("previous inference still running")
        self._pending = self._executor.submit(
            self._model.predict, {f: features[f] for f in spec.features}
        )
        async with asyncio.timeout(self._deadline_s):
            seconds = await asyncio.wrap_future(self._pending)
        bad = [t for t in spec.targets if not math.isfinite(seconds.get(t, math.nan))]
        if bad:
            raise OutputError(f"non-finite output for {', '.join(bad)}")
        doses = []
        for actuator in actuators:
            s = min(seconds[actuator], spec.output_scale[actuator])
            if s >= self._min_seconds:
                doses.append(Dose(actuator, 255, round(s * 1000.0)))
        note = "" if doses else f"no output of {self._min_seconds:g} s or more"
        return Decision(doses=tuple(doses), controller=self.name, note=note)

    def close(self) -> None:
        """Stop the worker thread (waiting for an inference still running) and the fallback."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._rb.close()
