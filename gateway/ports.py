"""The seams of the command path: what control may use of its node, and procedures of control.

Commands flow down one way: RPC table (gateway/rpc.py) -> `NodeControl`
(gateway/control.py) -> the node's link. Control never holds the node task
(`gateway.node.NodeRunner`); it is handed a `NodePort`, the few things it
may read of its node (announced actuators, latest readings, link state) and
do to it (send an actuation or a stop, record an entry, run a task in the
link session). `NodeRunner` is the one real port; tests drive `NodeControl`
through a small fake (tests/test_control_unit.py).

The guided procedures (gateway/titration.py, gateway/pumpcal.py,
gateway/probecal.py) are parts of `NodeControl`: they get the same port and a
`ProcedureHost`, what they may use of control (its safety guard, plant
constants, actuation, abort).

**Owned state.** The node task owns the link and what runs on the node
(``running``, from the node's own ``actuator`` events, its ``hello``, a
confirmed ``stop`` and each actuation sent through the port); control reads
nothing of it. Control owns its settings, cycle, guard and plant constants;
the node task reads them (``NodeControl.state``).

This module imports no other module of the command path, so none of them
imports another in a circle (tests/test_layers.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol

from gateway.config import CalibrationMap, ControlConfig, NodeConfig
from rules.controller import Dose, PlantConstants
from rules.envelope import PhEnvelope
from rules.safety import SafetyGuard, SensorWatch


class NodePort(Protocol):
    """What control may read of its node and do to it (`gateway.node.NodeRunner`)."""

    @property
    def name(self) -> str:
        """The node's name (its ThingsBoard device)."""

    @property
    def config(self) -> NodeConfig:
        """The node's validated config section."""

    @property
    def actuators(self) -> tuple[str, ...]:
        """The actuators the node announced in its last ``hello``."""

    @property
    def latest(self) -> Mapping[str, float]:
        """The latest calibrated values (internal units: conductivity as ``tds``)."""

    def require_link(self) -> None:
        """Raise CommandError with the reason unless the node serves readings."""

    def require_connected(self) -> None:
        """Raise CommandError unless a session is open (enough for ``stop``), readings or not."""

    async def send_actuate(self, actuator: str, duty: int, ms: int) -> None:
        """Send NodeLink ``actuate`` (CommandError if the link is down, LinkError if unanswered)."""

    async def send_stop(self, *, within: float) -> bool:
        """Send NodeLink ``stop``; True if the node confirmed it within ``within`` seconds."""

    def record(self, ts: int, values: Mapping[str, Any]) -> None:
        """Commit a gateway-made entry (actuation, refusal, procedure step) for this device."""

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run ``coro`` in the link session (a lost link cancels it); CommandError if down."""

    def calibration_map(self, key: str) -> CalibrationMap | None:
        """The calibration map in use for ``key`` (a guided calibration's, else the file's)."""

    def set_calibration(self, key: str, measured: CalibrationMap | None) -> None:
        """Use ``measured`` for ``key`` from the next reading on (``None``: the file's)."""


class ProcedureHost(Protocol):
    """What a guided procedure (titration, pump or probe calibration) may use of `NodeControl`."""

    @property
    def guard(self) -> SafetyGuard:
        """The node's safety guard (its limits; every dose goes through `actuate`)."""

    @property
    def watch(self) -> SensorWatch:
        """Freshness and plausibility of the sensors that control doses."""

    @property
    def envelope(self) -> PhEnvelope:
        """The node's pH safety envelope."""

    @property
    def plant(self) -> PlantConstants:
        """The plant constants in use (measured values included)."""

    @property
    def settings(self) -> ControlConfig | None:
        """The control settings in force, ``None`` for a node without a control section."""

    async def actuate(self, dose: Dose, *, controller: str, strict: bool) -> Dose:
        """One dose through the safety guard to the node; the dose granted."""

    async def stop_actuators(self, *, within: float = 3.0) -> bool:
        """NodeLink ``stop`` (every actuator off); True if confirmed."""

    def abort(self, why: str) -> None:
        """Abort a running control cycle (the caller stops the actuators)."""

    def busy(self) -> str | None:
        """What a procedure must not run alongside (a cycle, a running pump), or ``None``."""

    def procedure(self) -> str | None:
        """The guided procedure under way, or ``None``."""

    def config_plant(self) -> dict[str, Any]:
        """The config file's plant constants (a fingerprint), before any measurement."""

    def set_plant(self, plant: PlantConstants) -> None:
        """New plant constants: the envelope and the next cycle use them."""

    def apply_flows(self, flows: Mapping[str, float]) -> None:
        """Measured flows kept from earlier (at start), nothing rescaled."""

    async def recalibrate_flow(self, actuator: str, flow: float) -> None:
        """A pump's measured flow: applied, what was learned through the old one rescaled."""

    async def save_knowledge(self, *, envelope: bool = False) -> None:
        """Save the envelope's and the controller's knowledge under the current plant."""
