"""Faults met at the outside edge: counted by kind, each kind logged once.

Input from outside (ThingsBoard messages, NodeLink frames) arrives at the
rate the outside chooses. A handler that logged every bad message would let
a flood of them fill the journal, and one that let an exception escape would
stop the daemon. So every handler of outside input reports what went wrong
here: the first fault of a kind is logged (with its traceback when it is an
unexpected exception, a bug of ours), every fault is counted, and the counts
go to the gateway's health telemetry. A kind is a short fixed text such as
``rpc:bad_device`` or ``attributes:RecursionError``, never the offending
input itself, so the set of kinds stays small.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

#: Longest piece of outside text quoted in a log line or an error reply.
QUOTE_CHARS = 120


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, safe for any outside value.

    The repr of a deeply nested value raises RecursionError and the repr of
    a huge one fills a log line; neither may happen while reporting a fault.
    """
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (for messages that may embed outside text)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FaultLog:
    """Counters of faults by kind; the first of each kind is logged.

    ``malformed`` faults are input we refused by design (logged as a WARNING
    without traceback); ``failed`` faults are exceptions our own code raised
    on some input (logged as an ERROR with the traceback, since each is a
    bug to fix). Later faults of a kind already logged are only counted
    (and logged at DEBUG).
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self.counts: Counter[str] = Counter()
        self.failures = 0  # exceptions caught by a handler (bugs)
        self.malformed = 0  # input refused by validation

    @property
    def total(self) -> int:
        """Every fault counted so far."""
        return self.failures + self.malformed

    def refused(self, kind: str, message: str, *, extra: dict[str, Any] | None = None) -> None:
        """Input that validation refused (``message`` says why)."""
        self.malformed += 1
        self._note(kind, logging.WARNING, message, None, extra)

    def failed(
        self,
        kind: str,
        message: str,
        exc: BaseException,
        *,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """A handler raised ``exc`` on some input; the kind gains the exception's class."""
        self.failures += 1
        self._note(f"{kind}:{type(exc).__name__}", logging.ERROR, message, exc, extra)

    def _note(
        self,
        kind: str,
        level: int,
        message: str,
        exc: BaseException | None,
        extra: dict[str, Any] | None,
    ) -> None:
        self.counts[kind] += 1
        first = self.counts[kind] == 1
        if first:
            self._log.log(
                level,
                "%s (%s; further faults of this kind are only counted)",
                message,
                kind,
                exc_info=exc,
                extra=extra,
            )
        else:
            self._log.debug("%s (%s #%d)", message, kind, self.counts[kind], extra=extra)
