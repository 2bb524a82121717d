"""The thesis's TDS and pH controllers: Sugeno fuzzy (its design), Mamdani, and close loop.

Sets, constants and the 25-rule tables are exactly the thesis's (tables 3.2 to
3.7), checked rule by rule against the defuzzification code of its firmware
(appendix C, ``defuzzifikasi_tds`` / ``defuzzifikasi_ph``): rows are the
error set, columns the Δerror set, both NB NK Z PK PB.

How the outputs drive the pumps, as in the firmware's ``tds_control_loop`` /
``ph_control_loop``:

- TDS: error = setpoint − ppm. ``error >= 0`` runs the nutrient diaphragm
  pump at the fuzzy PWM for the fuzzy time; ``error < 0`` runs the fresh-water
  pump (a relay: time only, so duty 255) for the fuzzy time.
- pH: ``error >= 0`` (too acidic, or exactly on setpoint) runs pH-up,
  ``error < 0`` runs pH-down, both at the fuzzy PWM for the fuzzy time.
  The firmware's test is ``>= 0``; at exactly 0 only the Z/NB and Z/PB
  rules give a non-zero time.
- A time of 0 ms means no dose (the firmware starts a 0 ms timer).
- PWM and time are truncated to integers, as the firmware's ``float`` to
  ``int`` argument conversion does (after rounding to 6 decimals, so that
  float noise such as 2749.9999999 does not lose a millisecond).
- A non-finite measurement or setpoint is refused (``ControllerError``)
  rather than dosed on: the firmware would run pH-down on a NaN error.
- When no rule fires the firmware's ``isnan`` fallback applies: PWM 255 and
  2000 ms (TDS) / 5000 ms (pH). With inputs clamped to the universes and the
  thesis's sets covering them, this only happens for a NaN input.

Δerror is ``error − previous_error`` and 0 at the start of a cycle
(``DecisionContext.delta_error``). The firmware instead keeps its last error
in a global that starts at 0 and is never reset, so its very first Δerror
equals the error; we do not copy that artefact.

The "close loop" baseline of the thesis runs a constant PWM 255 for 2 s
(TDS) or 5 s (pH) whenever the value is outside the band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from rules.controller import (
    ControllerError,
    ControllerOptions,
    Decision,
    DecisionContext,
    Dose,
    register,
)
from rules.fuzzy import FuzzyResult, FuzzySystem, Output, Variable, rules_from_table, trapmf, trimf

__all__ = [
    "CLOSE_LOOP",
    "FALLBACK",
    "PH_SYSTEM",
    "TDS_SYSTEM",
    "CloseLoopController",
    "FuzzyController",
    "MamdaniController",
    "ThesisOutput",
    "doses_for",
    "thesis_output",
]

Loop = Literal["tds", "ph"]
Method = Literal["sugeno", "mamdani"]
SETS = ("NB", "NK", "Z", "PK", "PB")

TDS_ERROR = Variable(
    "error_ppm",
    (-250.0, 250.0),
    {
        "NB": trapmf(-250, -250, -200, -100),
        "NK": trimf(-200, -100, 0),
        "Z": trimf(-100, 0, 100),
        "PK": trimf(0, 100, 200),
        "PB": trapmf(100, 200, 250, 250),
    },
)
TDS_DERROR = Variable(
    "delta_error_ppm",
    (-150.0, 150.0),
    {
        "NB": trapmf(-150, -150, -100, -50),
        "NK": trimf(-100, -50, 0),
        "Z": trimf(-50, 0, 50),
        "PK": trimf(0, 50, 100),
        "PB": trapmf(50, 100, 150, 150),
    },
)
_PH_SETS = {
    "NB": trapmf(-1.5, -1.5, -0.4, -0.1),
    "NK": trimf(-0.4, -0.1, 0),
    "Z": trimf(-0.1, 0, 0.1),
    "PK": trimf(0, 0.1, 0.4),
    "PB": trapmf(0.1, 0.4, 1.5, 1.5),
}
PH_ERROR = Variable("error_ph", (-1.5, 1.5), _PH_SETS)
PH_DERROR = Variable("delta_error_ph", (-1.5, 1.5), _PH_SETS)

# S slow (lambat), M medium (sedang), F fast (cepat); B short (bentar), M, L long (lama).
TDS_PWM = Output("pwm", {"S": 178.0, "M": 204.0, "F": 255.0})
TDS_TIME = Output("time_ms", {"B": 0.0, "M": 1000.0, "L": 2000.0})
PH_PWM = Output("pwm", {"S": 127.0, "M": 178.0, "F": 255.0})
PH_TIME = Output("time_ms", {"B": 0.0, "M": 2500.0, "L": 5000.0})

#: Firmware rule tables, rows = error NB..PB, columns = Δerror NB..PB.
TDS_PWM_TABLE = (
    ("F", "F", "F", "F", "M"),
    ("M", "M", "M", "M", "M"),
    ("S", "S", "S", "S", "S"),
    ("M", "M", "M", "M", "M"),
    ("M", "F", "F", "F", "F"),
)
TDS_TIME_TABLE = (
    ("L", "L", "L", "M", "M"),
    ("M", "M", "M", "M", "M"),
    ("M", "B", "B", "B", "M"),
    ("M", "M", "M", "M", "M"),
    ("L", "L", "L", "L", "L"),
)
PH_PWM_TABLE = TDS_PWM_TABLE
PH_TIME_TABLE = (
    ("L", "L", "L", "M", "B"),
    ("L", "L", "M", "B", "B"),
    ("M", "B", "B", "B", "M"),
    ("B", "B", "M", "L", "L"),
    ("B", "M", "L", "L", "L"),
)

TDS_SYSTEM = FuzzySystem(
    inputs=(TDS_ERROR, TDS_DERROR),
    outputs=(TDS_PWM, TDS_TIME),
    rules=rules_from_table(SETS, SETS, {"pwm": TDS_PWM_TABLE, "time_ms": TDS_TIME_TABLE}),
)
PH_SYSTEM = FuzzySystem(
    inputs=(PH_ERROR, PH_DERROR),
    outputs=(PH_PWM, PH_TIME),
    rules=rules_from_table(SETS, SETS, {"pwm": PH_PWM_TABLE, "time_ms": PH_TIME_TABLE}),
)
SYSTEMS: dict[Loop, FuzzySystem] = {"tds": TDS_SYSTEM, "ph": PH_SYSTEM}

#: The firmware's no-rule fallback, (PWM, ms) per loop.
FALLBACK: dict[Loop, tuple[int, int]] = {"tds": (255, 2000), "ph": (255, 5000)}
#: The close-loop baseline's constant step, (PWM, ms) per loop.
CLOSE_LOOP: dict[Loop, tuple[int, int]] = {"tds": (255, 2000), "ph": (255, 5000)}


@dataclass(frozen=True)
class ThesisOutput:
    """Integer PWM and time as the firmware would use them, and whether a rule fired."""

    pwm: npt.NDArray[np.int64]
    time_ms: npt.NDArray[np.int64]
    fired: npt.NDArray[np.bool_]


def thesis_output(
    loop: Loop, error: npt.ArrayLike, delta_error: npt.ArrayLike, method: Method = "sugeno"
) -> ThesisOutput:
    """PWM and time for (arrays of) error and Δerror, with the no-rule fallback applied."""
    result: FuzzyResult = SYSTEMS[loop].evaluate(error, delta_error, method=method)
    pwm_fb, ms_fb = FALLBACK[loop]
    pwm = np.where(result.fired, result.outputs["pwm"], pwm_fb)
    ms = np.where(result.fired, result.outputs["time_ms"], ms_fb)
    # Truncate like the firmware, but after rounding away float noise (2749.9999... is 2750).
    return ThesisOutput(
        pwm=np.trunc(np.round(pwm, 6)).astype(np.int64),
        time_ms=np.trunc(np.round(ms, 6)).astype(np.int64),
        fired=result.fired,
    )


def doses_for(loop: Loop, error: float, pwm: int, ms: int) -> tuple[Dose, ...]:
    """Which pump runs for a signed error, as the firmware drives them; 0 ms is no dose."""
    if ms <= 0:
        return ()
    if loop == "tds":
        return (Dose("nutrient", pwm, ms),) if error >= 0 else (Dose("refill", 255, ms),)
    return (Dose("ph_up" if error >= 0 else "ph_down", pwm, ms),)


def _check_finite(ctx: DecisionContext) -> None:
    if not (math.isfinite(ctx.setpoint) and math.isfinite(ctx.measured)):
        raise ControllerError(
            f"{ctx.loop}: cannot decide on setpoint {ctx.setpoint} / measured {ctx.measured}"
        )


class _ThesisFuzzy:
    """Shared body of the Sugeno and Mamdani controllers."""

    name: str
    method: Method

    def __init__(self, options: ControllerOptions | None = None) -> None:
        del options  # nothing to configure: the thesis fixes every constant

    async def decide(self, ctx: DecisionContext) -> Decision:
        """Fuzzy PWM and time from error and Δerror, mapped to the loop's pumps."""
        _check_finite(ctx)
        error, delta = ctx.error, ctx.delta_error
        out = thesis_output(ctx.loop, error, delta, self.method)
        pwm, ms, fired = int(out.pwm), int(out.time_ms), bool(out.fired)
        note = f"e={error:.4g} de={delta:.4g} pwm={pwm} ms={ms}"
        if not fired:
            note = f"no rule fired, fallback pwm={pwm} ms={ms}"
        return Decision(doses=doses_for(ctx.loop, error, pwm, ms), controller=self.name, note=note)

    def close(self) -> None:
        """Nothing to release."""


@register("fuzzy")
class FuzzyController(_ThesisFuzzy):
    """Registered ``"fuzzy"``: the thesis's Sugeno controllers (weighted average)."""

    name = "fuzzy"
    method: Method = "sugeno"


@register("mamdani")
class MamdaniController(_ThesisFuzzy):
    """Registered ``"mamdani"``: the same sets and rules, Mamdani inference (see rules.fuzzy)."""

    name = "mamdani"
    method: Method = "mamdani"


@register("closeloop")
class CloseLoopController:
    """Registered ``"closeloop"``: the thesis's baseline, a constant step outside the band."""

    name = "closeloop"

    def __init__(self, options: ControllerOptions | None = None) -> None:
        del options

    async def decide(self, ctx: DecisionContext) -> Decision:
        """PWM 255 for 2 s (TDS) / 5 s (pH) towards the setpoint, nothing inside the band."""
        _check_finite(ctx)
        if ctx.in_band:
            return Decision(doses=(), controller=self.name, note="inside band")
        pwm, ms = CLOSE_LOOP[ctx.loop]
        return Decision(doses=doses_for(ctx.loop, ctx.error, pwm, ms), controller=self.name)

    def close(self) -> None:
        """Nothing to release."""
