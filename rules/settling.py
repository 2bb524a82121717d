"""When a TDS reading has settled after a dose: one test for every mass-balance controller.

A controller that learns a pump's real effect from a dose must not read that
effect before the dose has mixed in: a reading taken early makes the pump
look weaker than it is, and the next dose, sized from it, overshoots. The
cycle's mixing wait is a setting that may be too short for the tank, and the
averaging windows are short against a slow mixing lag, so the test here does
not rely on either:

- before the first dose of a loop: a window average that agrees with the
  latest reading (the tank is not moving), or two windows that agree;
- after a dose: the last windows agree (``SPAN`` of them), and the change over
  the last third of the time since the dose ended is small against what the
  dose did so far (``FRACTION``), which holds once ~98 % of a first-order
  response has arrived, whatever its time constant.

:class:`Settling` keeps the window averages (and their times) since the last
dose of one loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rules.controller import DecisionContext

__all__ = ["FRACTION", "MIN_PPM", "PCT", "QUIET_FACTOR", "SEEN", "SPAN", "Settling", "threshold"]

PCT = 0.3  # of the setpoint: consecutive window averages this close have settled
MIN_PPM = 2.5
SPAN = 3  # windows after a dose over which the change must be small too
FRACTION = 0.05  # of a dose's change so far: what may still move in the last third
QUIET_FACTOR = 3.0  # first window of a loop: the latest reading within this many thresholds
SEEN = 240  # window averages kept since the last dose


def threshold(ctx: DecisionContext) -> float:
    """The change between window averages that counts as none (ppm)."""
    return max(MIN_PPM, PCT / 100.0 * ctx.setpoint)


@dataclass
class Settling:
    """The window averages of one TDS loop since its last dose, and when they were taken."""

    seen: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # only when the cycle has a clock

    def reset(self) -> None:
        """A dose ran, or a new loop began: start over."""
        self.seen.clear()
        self.times.clear()

    def add(self, ctx: DecisionContext) -> None:
        """Take this decision's window average."""
        self.seen.append(ctx.measured)
        del self.seen[:-SEEN]
        if ctx.now is not None:
            self.times.append(ctx.now)
            del self.times[:-SEEN]

    def settled(
        self, ctx: DecisionContext, *, before: float | None, end_s: float | None = None
    ) -> float | None:
        """Where the reading settled, or ``None`` while it may still move.

        ``before`` is the settled value the last dose started from (``None``:
        no dose in flight); ``end_s`` when it stopped running, on the cycle's
        clock (``None``: unknown, the windows alone decide).
        """
        limit = threshold(ctx)
        seen = self.seen
        if before is None:
            latest = ctx.values.get(ctx.loop)
            quiet = latest is not None and abs(latest - ctx.measured) <= QUIET_FACTOR * limit
            if len(seen) == 1 and quiet:
                return seen[-1]
            if len(seen) >= 2 and abs(seen[-1] - seen[-2]) <= limit:
                return seen[-1]
            return None
        if len(seen) < SPAN + 1:
            return None
        steps = (seen[-1] - seen[-2], seen[-2] - seen[-3], seen[-1] - seen[-1 - SPAN])
        if max(abs(s) for s in steps) > limit:
            return None
        if ctx.now is None or end_s is None:
            return seen[-1]
        back = ctx.now - (ctx.now - end_s) / 3.0
        if not self.times or self.times[0] > back:
            return None  # the readings do not reach back that far yet
        then = next(
            v for t, v in zip(reversed(self.times), reversed(seen), strict=False) if t <= back
        )
        if abs(seen[-1] - then) <= max(limit, FRACTION * abs(seen[-1] - before)):
            return seen[-1]
        return None
