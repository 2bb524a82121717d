"""The controller contract: what a controller is given, what it returns, and how it is found.

Every controller (the thesis's fuzzy controllers, the close-loop baseline, the
rule-based fallback, an ML model) is a small object with a ``name``, an async
``decide(ctx) -> Decision`` and a ``close()``. Controllers are registered by
name with :func:`register` and built with :func:`create`, so the gateway picks
one from the config string without an if/elif chain.
A controller that learns the tank as it doses may also implement
:class:`Learner`, so that the gateway can keep that knowledge across restarts.

``decide`` is async only so that a controller backed by a model can await a
worker thread; every built-in controller is pure, synchronous numpy code
underneath. The safety layer sits below every controller and may clamp or
refuse the doses returned here.

The registry is the one piece of module-level state in rules/: it is filled
by the ``@register`` decorators when the controller modules are imported
(the built-ins are imported by the first :func:`names` or :func:`create`)
and never changed afterwards (registering another factory under a taken
name is an error), so it is configuration, not mutable run-time state.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

__all__ = [
    "ACTUATORS",
    "BUILTIN",
    "BUILTIN_NAMES",
    "DEFAULT_FLOW_ML_S",
    "Controller",
    "ControllerError",
    "ControllerFactory",
    "ControllerOptions",
    "Decision",
    "DecisionContext",
    "Dose",
    "Learner",
    "NUTRIENT",
    "NUTRIENT_PARTS",
    "PH_DOWN",
    "PH_PUMPS",
    "PH_UP",
    "REFILL",
    "PlantConstants",
    "Recalibrated",
    "RulesError",
    "UnknownControllerError",
    "create",
    "names",
    "register",
]

#: The actuators a hydroponic node drives, by their NodeLink names: the one place these
#: names are written; every other module imports them from here.
NUTRIENT = "nutrient"
PH_UP = "ph_up"
PH_DOWN = "ph_down"
REFILL = "refill"
ACTUATORS: tuple[str, ...] = (NUTRIENT, PH_UP, PH_DOWN, REFILL)

#: A pump's flow at full duty (ml/s) until the config gives one: the thesis rig's pumps.
DEFAULT_FLOW_ML_S = 1.58
_DEFAULT_FLOW_ML_S: Mapping[str, float] = MappingProxyType(
    dict.fromkeys(ACTUATORS, DEFAULT_FLOW_ML_S)
)

#: The pH pumps, whose solutions' strength a tank's titration decides.
PH_PUMPS: tuple[str, ...] = (PH_UP, PH_DOWN)

#: The pumps of a multi-part nutrient (A and B, sometimes a third part), dosed in
#: ``PlantConstants.nutrient_ratio`` instead of one ``nutrient`` pump (rules/nutrients.py).
NUTRIENT_PARTS: tuple[str, ...] = ("nutrient_a", "nutrient_b", "nutrient_c")


class RulesError(Exception):
    """Base of every error raised by the rules/ layer."""


class ControllerError(RulesError):
    """A controller could not be built or could not decide."""


class UnknownControllerError(ControllerError, KeyError):
    """No controller is registered under the requested name."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(f"unknown controller {name!r} (known: {', '.join(known)})")
        self.name = name
        self.known = known

    def __str__(self) -> str:
        # KeyError quotes its argument; keep the plain message.
        return str(self.args[0])


@dataclass(frozen=True)
class Dose:
    """One actuator run: ``duty`` 0..255 (PWM) for ``ms`` milliseconds."""

    actuator: str
    duty: int
    ms: int

    def __post_init__(self) -> None:
        if not 0 <= self.duty <= 255:
            raise ValueError(f"duty must be 0..255, got {self.duty}")
        if self.ms < 0:
            raise ValueError(f"ms must be >= 0, got {self.ms}")


@dataclass(frozen=True)
class PlantConstants:
    """The physical constants that dose-computing controllers need.

    Defaults are the control documentation's plant: a 10 L tank, a
    10,000 ppm nutrient stock and pumps of 1.58 ml/s.

    ``ph_ml_per_l_per_unit`` is the strength of each pH solution *on this
    tank*: the ml of ``ph_up`` / ``ph_down`` per litre of tank that move the
    pH by one unit near the setpoint, measured by a guided titration
    (``hydrogate titrate``) or known from an earlier one. A pump missing from
    it has an unknown strength: the pH safety envelope then assumes the
    steepest plausible tank (rules/envelope.py) until it has measured one.

    ``nutrient_ratio`` (empty: one ``nutrient`` pump) names the parts of a
    multi-part nutrient and the ratio they are dosed in; ``stock_ppm`` is then
    what the parts *mixed in that ratio* are worth (rules/nutrients.py).
    ``stock_ppm`` and every reading are ppm on the 500 scale (rules/units.py).
    """

    tank_volume_l: float = 10.0
    stock_ppm: float = 10000.0
    flow_ml_s: Mapping[str, float] = field(default_factory=lambda: _DEFAULT_FLOW_ML_S)
    ph_ml_per_l_per_unit: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType({})
    )
    nutrient_ratio: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not self.tank_volume_l > 0:
            raise ValueError(f"tank_volume_l must be > 0, got {self.tank_volume_l}")
        if not self.stock_ppm > 0:
            raise ValueError(f"stock_ppm must be > 0, got {self.stock_ppm}")
        for actuator, flow in self.flow_ml_s.items():
            if not flow > 0:
                raise ValueError(f"flow_ml_s[{actuator}] must be > 0, got {flow}")
        for actuator, strength in self.ph_ml_per_l_per_unit.items():
            if actuator not in PH_PUMPS:
                raise ValueError(f"ph_ml_per_l_per_unit: {actuator!r} is not a pH pump")
            if not (math.isfinite(strength) and strength > 0):
                raise ValueError(f"ph_ml_per_l_per_unit[{actuator}] must be > 0, got {strength}")
        for part, share in self.nutrient_ratio.items():
            if part not in NUTRIENT_PARTS:
                raise ValueError(f"nutrient_ratio: {part!r} is not a nutrient part")
            if not (math.isfinite(share) and share > 0):
                raise ValueError(f"nutrient_ratio[{part}] must be > 0, got {share}")
        # Freeze the mappings too, so a frozen PlantConstants is really immutable.
        object.__setattr__(self, "flow_ml_s", MappingProxyType(dict(self.flow_ml_s)))
        object.__setattr__(
            self, "ph_ml_per_l_per_unit", MappingProxyType(dict(self.ph_ml_per_l_per_unit))
        )
        object.__setattr__(
            self,
            "nutrient_ratio",
            MappingProxyType({p: self.nutrient_ratio[p] for p in NUTRIENT_PARTS
                              if p in self.nutrient_ratio}),
        )

    def flow(self, actuator: str) -> float:
        """The flow of ``actuator`` in ml/s; raises ``KeyError`` if it has none."""
        return self.flow_ml_s[actuator]

    def __reduce__(self) -> tuple[Any, ...]:
        # The read-only mapping views do not pickle; the evaluation sends plants to workers.
        return (
            type(self),
            (
                self.tank_volume_l,
                self.stock_ppm,
                dict(self.flow_ml_s),
                dict(self.ph_ml_per_l_per_unit),
                dict(self.nutrient_ratio),
            ),
        )


@dataclass(frozen=True)
class DecisionContext:
    """Everything a controller may look at for one decision of one loop.

    ``measured`` is the averaged measurement of the loop's variable (ppm for
    ``"tds"``, pH for ``"ph"``); ``previous_error`` is the error of the
    previous decision in the same cycle (``None`` at the start of a cycle);
    ``values`` holds the latest calibrated readings of every key;
    ``band`` is the (low, high) range that counts as on target.
    ``max_ml`` is the most of each pump the cycle will let run for this
    decision (the pH safety envelope, rules/envelope.py; 0 while the last
    dose is still mixing in); a pump missing from it has no such limit. A
    controller that keeps track of what it dosed must not ask for more:
    anything above is cut by the cycle without telling it. ``now`` is the
    cycle's clock in seconds (``None`` when the caller has none), so a
    controller can tell how long ago it dosed.
    """

    loop: Literal["tds", "ph"]
    setpoint: float
    measured: float
    previous_error: float | None
    values: Mapping[str, float]
    plant: PlantConstants
    band: tuple[float, float]
    max_ml: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    now: float | None = None

    @property
    def error(self) -> float:
        """``setpoint - measured``: positive when the value is too low."""
        return self.setpoint - self.measured

    @property
    def delta_error(self) -> float:
        """``error - previous_error``, 0 when there is no previous error."""
        if self.previous_error is None:
            return 0.0
        return self.error - self.previous_error

    @property
    def in_band(self) -> bool:
        """Whether the measurement lies inside ``band`` (edges included)."""
        low, high = self.band
        return low <= self.measured <= high


@dataclass(frozen=True)
class Decision:
    """The doses one decision asks for, and who really decided.

    ``controller`` names whoever actually decided, e.g. ``"rb"`` when the
    ``"ml"`` controller fell back to the rule-based one; ``note`` says why
    when that is not obvious (a fallback, no rule fired, ...).
    """

    doses: tuple[Dose, ...]
    controller: str
    note: str = ""


@dataclass(frozen=True)
class ControllerOptions:
    """Construction options shared by every controller factory."""

    rb_variant: str = "band"
    model_path: str | None = None


class Controller(Protocol):
    """What the gateway needs from a controller."""

    name: str

    async def decide(self, ctx: DecisionContext) -> Decision:
        """Return the doses for ``ctx.loop`` given the context."""
        ...

    def close(self) -> None:
        """Release whatever the controller holds (threads, models)."""
        ...


@runtime_checkable
class Learner(Protocol):
    """A controller that learns the tank and can hand that knowledge over (JSON-able).

    Optional, next to :class:`Controller`: the gateway checks for it with
    ``isinstance(controller, Learner)``. What a controller learns about a
    tank (how far a ml of pH down moves the pH, a pump's correction factor)
    would otherwise live only as long as the controller object, and a
    restart, a config reload or a switch of controller would start again
    from cautious first doses. The gateway saves :meth:`learned` whenever it
    changes and hands it back to :meth:`restore` of the next controller of
    the same name on the same node, as long as the plant constants it was
    learned under are unchanged.
    """

    def learned(self) -> dict[str, Any]:
        """A snapshot of what was learned: JSON-able, ``{}`` when nothing was learned yet.

        Return a new object (or one never mutated afterwards): the gateway
        compares it with the last snapshot it saved to decide whether to save.
        """
        ...

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take back a snapshot that :meth:`learned` returned earlier (maybe in another process).

        Raise :class:`ControllerError` when ``state`` is unusable (another
        version's format, values out of range), preferably before changing
        anything; the gateway logs it and carries on with a new controller
        that starts fresh.
        """
        ...


@runtime_checkable
class Recalibrated(Protocol):
    """A controller whose knowledge depends on a pump's configured flow (optional, beside Learner).

    A pump calibration (``hydrogate pump calibrate``) replaces a pump's flow
    with the measured one. What a controller learned through the old flow (a
    correction factor that absorbed the flow's error) would then count the
    error twice; the gateway tells it instead of throwing its knowledge away.
    """

    def recalibrated(self, actuator: str, effect: float | None) -> None:
        """``actuator``'s dose now does ``effect`` times what the same decision did before.

        ``effect`` is the old over the new flow for one pump (a decision's ms
        now delivers that share of what it delivered before, as believed then);
        ``None`` when it cannot be told: forget what was learned about it.
        ``actuator`` is the controller's own name for the pump (``nutrient``
        for every part of a multi-part nutrient).
        """
        ...


ControllerFactory = Callable[[ControllerOptions], Controller]
_F = TypeVar("_F", bound=ControllerFactory)

_REGISTRY: dict[str, ControllerFactory] = {}

#: The built-in controllers, by name, each with the module whose import registers it: the
#: one list of controller names. The config accepts these (gateway/config.py), the docs list
#: them (tests/test_one_source.py checks), and importing the modules fills the registry.
BUILTIN: Mapping[str, str] = MappingProxyType(
    {
        "fuzzy": "rules.thesis",
        "rb": "rules.rb",
        "ml": "rules.ml",
        "adaptive": "rules.adaptive",
        "closeloop": "rules.thesis",
        "mamdani": "rules.thesis",
    }
)
BUILTIN_NAMES: tuple[str, ...] = tuple(BUILTIN)


def register(name: str) -> Callable[[_F], _F]:
    """Class or function decorator: register a controller factory under ``name``."""

    def decorator(factory: _F) -> _F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ControllerError(f"controller {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_builtins() -> None:
    """Import the built-in controller modules (their decorators register them).

    Done lazily by :func:`names` and :func:`create` rather than at import
    time, because those modules import this one (and rules.fuzzy imports
    ``RulesError`` from here): importing them from here at import time would
    be a cycle whose outcome depends on which module is imported first.
    """
    for module in dict.fromkeys(BUILTIN.values()):
        importlib.import_module(module)


def names() -> tuple[str, ...]:
    """The names of every registered controller, sorted."""
    _load_builtins()
    return tuple(sorted(_REGISTRY))


def create(name: str, options: ControllerOptions | None = None) -> Controller:
    """Build the controller registered under ``name``.

    Raises :class:`UnknownControllerError` for an unknown name and
    :class:`ControllerError` (chained) when the factory itself fails.
    """
    _load_builtins()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownControllerError(name, tuple(sorted(_REGISTRY))) from None
    try:
        return factory(options if options is not None else ControllerOptions())
    except ControllerError:
        raise
    except (ValueError, TypeError, OSError) as exc:
        raise ControllerError(f"cannot build controller {name!r}: {exc}") from exc

