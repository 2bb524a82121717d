"""Exponential backoff with jitter: the one reconnect policy of the gateway.

Node tasks and the uplink wait ``backoff.next()`` seconds after each failed
attempt and call ``reset()`` once connected. Jitter spreads the reconnects of
many nodes (or many gateways) so they do not hit a recovering peer together.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays ``initial, initial*factor, ...`` capped at ``maximum``, each ± ``jitter``.

    The jitter is a fraction of the capped delay: with ``jitter=0.2`` a delay
    of 30 s comes back as a value in [24, 36]. Pass a seeded ``rng`` for
    reproducible delays in tests.
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {initial} and {maximum}")
        if factor < 1:
            raise ValueError(f"factor must be at least 1, got {factor}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._delay = initial

    def next(self) -> float:
        """The delay before the next attempt, in seconds; grows the following one."""
        delay = self._delay
        self._delay = min(delay * self.factor, self.maximum)
        if self.jitter:
            delay *= 1.0 + self._rng.uniform(-self.jitter, self.jitter)
        return delay

    def reset(self) -> None:
        """Start again from ``initial`` (call after a successful connection)."""
        self._delay = self.initial
