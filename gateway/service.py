"""systemd glue: readiness, reload and watchdog notifications; logging to journald or stderr.

Under systemd the daemon logs to the journal with structured fields, so that
``journalctl -u hydrogate NODE=tank-a`` filters by node and ``-p warning``
lists what a grower must act on. Two mechanisms put the fields there:

- every ``extra=`` key of a log call becomes an upper-case journal field
  (``extra={"actuator": "ph_up"}`` -> ``ACTUATOR=ph_up``): journald keeps only
  field names made of upper-case letters, digits and ``_``, and would drop
  the lower-case ones silently;
- ``NODE=`` comes from the context variable :data:`NODE`, which the daemon sets
  in the context of each node's task, so every line logged by that task --
  the control cycle, the safety layer and the controllers in ``rules/``,
  which know nothing about node names -- carries it.

Anywhere else the daemon logs plain lines to stderr, the node's name in front.

The readiness protocol (``sd_notify``) is spoken on ``NOTIFY_SOCKET``:
``READY=1``, ``RELOADING=1`` around a reload, ``STATUS=``, and ``WATCHDOG=1``
from :func:`run_watchdog` while a liveness probe (the store's writer thread
answering) succeeds.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

try:  # systemd-python: present on Linux installs, absent on a developer's laptop
    from systemd import journal as _sd_journal
except ImportError:  # pragma: no cover - exercised only where the package is missing
    _sd_journal = None

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: The node a log line is about, set by the daemon in each node task's context.
NODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("hydrogate_node", default=None)

log = logging.getLogger("hydrogate")

# Attributes every LogRecord has: whatever else a record carries came from ``extra=``.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JournalFields(logging.Filter):
    """Turn a record's ``extra=`` keys into journal fields and add ``NODE=`` from the context."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Upper-case the extra keys; add NODE unless the call named a node itself."""
        for key in [k for k in record.__dict__ if k not in _RECORD_ATTRS]:
            upper = key.upper()
            if upper != key:
                setattr(record, upper, record.__dict__.pop(key))
        if not hasattr(record, "NODE"):
            node = NODE.get()
            if node is not None:
                record.NODE = node
        return True


class NodeFormatter(logging.Formatter):
    """Put ``node NAME:`` in front of a line about a node whose text does not name it."""

    def format(self, record: logging.LogRecord) -> str:
        """The formatted line, with the node's name when the message lacks it."""
        text = super().format(record)
        node = getattr(record, "NODE", None)
        if node is not None and f"node {node}" not in record.getMessage():
            head, sep, tail = text.partition(f"{record.name}: ")
            text = f"{head}{sep}node {node}: {tail}" if sep else f"node {node}: {text}"
        return text


def under_journal() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream or _sd_journal is None:
        return False
    try:
        dev, ino = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def journal_handler() -> logging.Handler:
    """The handler that sends records to journald, fields and all."""
    if _sd_journal is None:  # pragma: no cover - systemd-python is a dependency on Linux
        raise RuntimeError("systemd-python is not installed")
    handler: logging.Handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER="hydrogate")
    handler.setFormatter(NodeFormatter("%(name)s: %(message)s"))
    handler.addFilter(JournalFields())
    return handler


def setup_logging(level: str | int = "INFO") -> None:
    """Send log records to journald when run by systemd, else to stderr."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if under_journal():
        handler = journal_handler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(NodeFormatter(LOG_FORMAT))
        handler.addFilter(JournalFields())
    root.addHandler(handler)
    root.setLevel(level)


def fields(**kwargs: Any) -> dict[str, Any]:
    """Structured journal fields for ``logger.info(..., extra=fields(node=...))``.

    Upper-cased here already (`JournalFields` would do it too); on stderr
    they are not printed.
    """
    return {key.upper(): value for key, value in kwargs.items()}


# ------------------------------------------------------------------ sd_notify
def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``READY=1``, ``STATUS=...``, several lines allowed) to systemd.

    Returns False when there is no NOTIFY_SOCKET (not run by systemd with
    Type=notify, which is normal) or the message could not be sent.
    """
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC=`` with ``RELOADING=1`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, or None.

    None when systemd asked for no watchdog, or asked another process
    (``WATCHDOG_PID`` names a different pid, e.g. the environment was
    inherited by a child).
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        wpid = int(env["WATCHDOG_PID"]) if env.get("WATCHDOG_PID") else None
    except ValueError:
        return None
    if usec <= 0 or (wpid is not None and wpid != (os.getpid() if pid is None else pid)):
        return None
    return usec / 2e6


async def run_watchdog(
    interval: float,
    probe: Callable[[], Awaitable[object]],
    *,
    send: Callable[[str], object] = notify,
) -> None:
    """Ping systemd's watchdog every ``interval`` seconds while ``probe`` answers in time.

    ``probe`` is the liveness check of what the event loop alone cannot vouch
    for (the daemon passes the store's ``flush``, answered by the writer
    thread). A probe that has not finished within ``interval``, or that
    fails, withholds the ping; once ``WatchdogSec`` passes without one,
    systemd kills the service and restarts it. Only one probe is outstanding
    at a time: a hung writer is asked once, not once per tick. That this
    coroutine runs at all shows the event loop is alive. Runs until cancelled.
    """
    loop = asyncio.get_running_loop()
    pending: asyncio.Task[str | None] | None = None
    trouble: str | None = None
    async with asyncio.TaskGroup() as tg:
        while True:
            tick = loop.time()
            if pending is None:
                pending = tg.create_task(_probe(probe), name="watchdog-probe")
            done, _ = await asyncio.wait({pending}, timeout=interval)
            problem: str | None
            if not done:
                problem = f"the store's writer has not answered for {interval:.0f} s"
            else:
                error = pending.result()
                pending = None
                problem = None if error is None else f"the store failed: {error}"
            if problem is None:
                send("WATCHDOG=1")
                if trouble is not None:
                    log.info("watchdog pings resumed (%s no more)", trouble)
                    trouble = None
            elif trouble is None:
                trouble = problem
                log.error(
                    "%s: watchdog pings withheld, systemd will restart the service", problem
                )
            await asyncio.sleep(max(0.0, tick + interval - loop.time()))


async def _probe(probe: Callable[[], Awaitable[object]]) -> str | None:
    """Run ``probe``; its error as text (None when it answered)."""
    try:
        await probe()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the probe withholds the ping
        return f"{type(exc).__name__}: {exc}"
    return None
