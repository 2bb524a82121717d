"""A simulated tank run the way the daemon runs a node, in simulated time.

The evaluation, the ML training data and the envelope's property test all do
the same thing: poll the plant's noisy sensors, hand the reading to the
safety watch and the control cycle, put every dose the cycle asks for
through the safety guard, run the permitted pump for its time, and advance
the plant to the next event. :class:`Rig` is that loop, written once; each
caller adds what it records around :meth:`Rig.poll`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from rules.controller import Controller, Dose
from rules.cycle import ControlCycle, Loop
from rules.envelope import PhEnvelope
from rules.safety import SafetyGuard, SafetyLimits, SafetyRefusal, SensorWatch
from sim.plant import Reservoir
from sim.tanks import Tank

__all__ = ["STEP_S", "Poll", "Rig"]

STEP_S = 0.5  # plant integration step between events


@dataclass
class Poll:
    """What one poll read and what the cycle then did."""

    reading: dict[str, float | None]
    ran: list[Dose] = field(default_factory=list)  # permitted and started
    refused: list[tuple[Dose, SafetyRefusal]] = field(default_factory=list)


class Rig:
    """``tank`` under ``controller``: its plant, safety watch and guard, and control cycle."""

    def __init__(
        self,
        tank: Tank,
        controller: Controller,
        *,
        loops: tuple[Loop, ...] = ("tds", "ph"),
        envelope: PhEnvelope | None = None,
        params_override: Mapping[str, float] | None = None,
        start_ph: float | None = None,
        start_tds: float | None = None,
        poll_s: float = 2.0,
        read: Callable[[Reservoir], dict[str, float | None]] | None = None,
    ) -> None:
        """``read`` turns the plant's probes into what the gateway sees (default: the
        engineering values of ``plant.sensors()``; sim/grower.py calibrates raw ones)."""
        self.tank = tank
        self._read = read
        params = replace(tank.params, **(params_override or {}))
        self.plant = Reservoir.from_state(
            tds=tank.start_tds if start_tds is None else start_tds,
            ph=tank.start_ph if start_ph is None else start_ph,
            params=params,
            seed=tank.seed,
        )
        self.settings = tank.settings(loops)
        self.watch = SensorWatch()
        self.guard = SafetyGuard(SafetyLimits(), actuators=tank.pumps, watch=self.watch)
        self.envelope = envelope if envelope is not None else PhEnvelope(tank.told)
        self.cycle = ControlCycle(
            self.settings, controller, tank.told, actuators=tank.pumps, envelope=self.envelope
        )
        self.poll_s = poll_s
        self.t = 0.0
        self._next_poll = 0.0
        self._off_at: dict[str, float] = {}

    @property
    def poll_due(self) -> bool:
        """Whether the gateway polls the node now."""
        return self.t >= self._next_poll - 1e-9

    def read(self) -> dict[str, float | None]:
        """Poll the node's sensors (what its hidden keys leave) into the safety watch."""
        self._next_poll += self.poll_s
        reading: dict[str, float | None] = (
            dict(self.plant.sensors()) if self._read is None else self._read(self.plant)
        )
        for key in self.tank.hidden:
            reading.pop(key, None)
        self.watch.update(self.t, reading)
        return reading

    async def control(self, reading: Mapping[str, float | None]) -> Poll:
        """Tick the cycle with ``reading``; every dose it asks for through the guard to the pump."""
        poll = Poll(dict(reading))
        for dose in await self.cycle.tick(self.t, reading):
            try:
                permit = self.guard.permit(dose, self.t, strict=False)
            except SafetyRefusal as refusal:
                poll.refused.append((dose, refusal))
                self.cycle.refused(dose)
                continue
            ran = permit.dose
            self.guard.record(ran, self.t)
            self.cycle.ran(ran)
            self.plant.set_pump(ran.actuator, ran.duty)
            self._off_at[ran.actuator] = self.t + ran.ms / 1000.0
            poll.ran.append(ran)
        return poll

    def advance(self, until: float) -> None:
        """Step the plant to the next event: a poll, a pump's end, one step, or ``until``."""
        target = min([self._next_poll, self.t + STEP_S, until, *self._off_at.values()])
        self.plant.step(target - self.t)
        self.t = target
        for actuator, when in list(self._off_at.items()):
            if when <= self.t + 1e-9:
                self.plant.set_pump(actuator, 0)
                del self._off_at[actuator]
