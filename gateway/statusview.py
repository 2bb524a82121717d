"""The live status screen, one renderer for `hydrogate demo` and `hydrogate status [--watch]`.

`render` turns the ``status`` reply (gateway/status.py) into text: a table of
the nodes (link, the readings, severity, cycle, mode and controller), a line
per node for what needs words (why a link is down, the severity's reason,
the last dose and the last refusal, a pH lock), then the uplink and the
buffer. `Screen` redraws it in place on a terminal, or prints snapshots when
the output is not one.
"""

from __future__ import annotations

import collections
import datetime
import logging
from typing import Any, TextIO

SHOWN_KEYS = ("tds", "ph", "water_temp", "water_level", "air_temp", "humidity")


def _fmt(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def ago(seconds: float | None) -> str:
    """``12 s``, ``5 min``, ``3 h``, ``2 d``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 100:
        return f"{s:.0f} s"
    if s < 6000:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} d"


def _since(now_ms: int, ts_ms: int | None) -> str:
    if ts_ms is None:
        return "-"
    when = datetime.datetime.fromtimestamp(ts_ms / 1000).strftime("%H:%M:%S")
    return f"{when} ({ago((now_ms - ts_ms) / 1000)} ago)"


def render(status: dict[str, Any], *, title: str) -> str:
    """One screen of ``status`` under ``title``."""
    now = int(status.get("now") or 0)
    lines = [
        title,
        "",
        f"{'node':8} {'link':5} " + " ".join(f"{k:>11}" for k in SHOWN_KEYS)
        + f" {'age':>6} {'severity':9} {'cycle':6} {'mode':7} controller",
    ]
    for node in status.get("nodes", []):
        values = node.get("values") or {}
        controller = node.get("last_controller") or node.get("controller") or "-"
        lines.append(
            f"{node['name']:8} {node['link']:5} "
            + " ".join(f"{_fmt(values.get(k)):>11}" for k in SHOWN_KEYS)
            + f" {ago(node.get('age_s')):>6} {node.get('severity') or '-':9}"
            f" {node.get('cycle') or '-':6} {node.get('mode') or 'monitor':7} {controller}"
        )
        lines.extend(f"{'':9}{text}" for text in _node_notes(node, now))
    lines.append("")
    uplink = status.get("uplink") or {}
    if not uplink.get("configured"):
        lines.append("uplink: offline (no ThingsBoard configured): readings are buffered")
    else:
        state = "connected" if uplink.get("connected") else "disconnected"
        line = f"uplink: {state} to {uplink.get('host')} since {_since(now, uplink.get('since'))}"
        if not uplink.get("connected") and uplink.get("last_error"):
            line += f": {uplink['last_error']}"
        lines.append(line)
    buffer = status.get("buffer")
    if buffer is not None:
        rate = buffer.get("drain_per_s")
        lines.append(
            f"buffer: backlog {buffer['backlog']}, oldest {ago(buffer.get('oldest_age_s'))},"
            f" drain {'-' if rate is None else f'{rate:g}/s'}, {buffer['received']} received,"
            f" {buffer['forwarded']} forwarded, {buffer['evicted']} evicted"
            + (f", storage {buffer['storage']}" if buffer.get("storage") != "ok" else "")
        )
        lines.append(
            f"history: {buffer.get('history_readings', 0)} forwarded readings kept"
            f" ({buffer.get('history_bytes', 0) / 1048576:.1f} MiB) in {buffer['path']}"
        )
    return "\n".join(lines) + "\n"


def _node_notes(node: dict[str, Any], now: int) -> list[str]:
    """The lines under a node's row: what a table cell cannot say."""
    notes = []
    if node["link"] != "up":
        notes.append(f"link down since {_since(now, node.get('link_since'))}:"
                     f" {node.get('link_reason') or 'unknown'}")
    elif node.get("link_since"):
        notes.append(f"link up since {_since(now, node.get('link_since'))}")
    if node.get("severity") not in (None, "none") and node.get("severity_reason"):
        notes.append(f"{node['severity']}: {node['severity_reason']}")
    if node.get("ph_lock"):
        notes.append(f"pH lock: {node['ph_lock']}")
    dose = node.get("last_dose")
    if dose:
        notes.append(f"last dose {dose['actuator']} {dose['ms']} ms ({dose['controller']})"
                     f" at {_since(now, dose['ts'])}")
    refusal = node.get("last_refusal")
    if refusal:
        notes.append(f"last refused {_since(now, refusal['ts'])}: {refusal['reason']}")
    refused = node.get("settings_refused")
    if refused:
        notes.append(f"settings update refused: {refused['reason']} ({refused['source']})")
    others = {k: v for k, v in (node.get("settings_from") or {}).items() if v != "file"}
    if others:
        notes.append("settings not from the config file: "
                     + ", ".join(f"{k} ({v})" for k, v in sorted(others.items())))
    return notes


class Screen:
    """Redraws in place on a terminal; prints plain snapshots when piped.

    With ``log_lines``, the latest log lines of this process are shown under
    the screen on a terminal instead of scrolling it away (the demo).
    """

    def __init__(self, out: TextIO, log_lines: int = 0) -> None:
        self._out = out
        self._tty = out.isatty()
        self._log: collections.deque[str] = collections.deque(maxlen=max(1, log_lines))
        if self._tty and log_lines:
            root = logging.getLogger()
            for handler in list(root.handlers):
                root.removeHandler(handler)
            root.addHandler(_TailHandler(self._log))

    def log_tail(self) -> str:
        """The latest log lines, for under the screen."""
        if not self._log:
            return ""
        return "\nrecent log:\n" + "\n".join(self._log) + "\n"

    def show(self, text: str) -> None:
        """Draw ``text`` (a whole screen)."""
        if self._tty:
            self._out.write("\x1b[H\x1b[J" + text)
        else:
            self._out.write(text + "\n")
        self._out.flush()


class _TailHandler(logging.Handler):
    def __init__(self, lines: collections.deque[str]) -> None:
        super().__init__()
        self._lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.append(self.format(record))
