"""systemd glue: readiness notification and logging to journald or stderr.

Under systemd the daemon logs to the journal with structured fields (NODE,
TOPIC, ...) so that `journalctl -u hydrogate NODE=tank-a` filters by node;
anywhere else it logs plain lines to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

try:  # systemd-python: present on Linux installs, absent on a developer's laptop
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # pragma: no cover - exercised only where the package is missing
    _sd_daemon = None
    _sd_journal = None

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


def setup_logging(level: str | int = "INFO") -> None:
    """Send log records to journald when run by systemd, else to stderr."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if under_journal() and _sd_journal is not None:
        handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER="hydrogate")
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)


def notify(state: str) -> bool:
    """Tell systemd about our state (``READY=1``, ``STOPPING=1``, ``STATUS=...``).

    Returns False when there is no NOTIFY_SOCKET (not run by systemd with
    Type=notify); that is normal and not an error.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    if _sd_daemon is not None:
        return bool(_sd_daemon.notify(state))
    return _notify_socket(state)


def _notify_socket(state: str) -> bool:
    """The sd_notify protocol itself, for hosts without systemd-python."""
    import socket

    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def fields(**kwargs: Any) -> dict[str, Any]:
    """Structured journal fields for ``logger.info(..., extra=fields(node=...))``.

    JournalHandler turns upper-case extra attributes into journal fields; on
    stderr they are simply not printed.
    """
    return {key.upper(): value for key, value in kwargs.items()}
