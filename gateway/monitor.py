"""Monitoring of one node: its severity, for people, beside control and never inside it.

`rules.severity` is the pure library (bands, `assess`); this module says which
bands apply to a node (its crop's ranges from the control settings, its own
tank volume, the grower's conductivity unit) and decides when a new severity
is worth telling: at most once per `SEVERITY_PERIOD_S`, as ``severity`` and
``severity_reason`` telemetry whenever its level, the values out of band, the
pH lock or the due calibrations change. The node task (gateway/node.py)
calls it after every stored reading with what control says (the lock, the
reminders, the probe in a buffer); control never calls it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.config import ControlConfig
from gateway.service import fields
from rules import units
from rules.severity import DEFAULT_BANDS, Band, Severity, assess

log = logging.getLogger("hydrogate.node")

#: Severity is assessed at most this often (seconds): it is for people, not pumps.
SEVERITY_PERIOD_S = 1.0


def severity_bands(
    tank_volume_l: float, settings: ControlConfig | None, conductivity: str
) -> Mapping[str, Band]:
    """Severity bands for one tank: its crop's ranges and its own volume.

    The control documentation's water-level band (normal 1.2-2.5 L,
    critical below 1.0 L) is for a reservoir that is full at 2.5 L; we
    scale it to this tank (`plant.tank_volume_l`) with 5% headroom above
    full for sensor noise, so a 10 L tank is normal from 5.04 to 10.5 L
    and critical below 4.2 L.
    """
    bands = dict(DEFAULT_BANDS)
    level = bands["water_level"]
    scale = 1.05 * tank_volume_l / level.high
    bands["water_level"] = Band(
        level.label,
        level.low * scale,
        level.high * scale,
        None if level.critical_low is None else level.critical_low * scale,
        None if level.critical_high is None else level.critical_high * scale,
        level.decimals,
    )
    if settings is not None:
        if settings.tds_band is not None:
            bands["tds"] = bands["tds"].with_normal(*settings.tds_band)
        if settings.ph_band is not None:
            bands["ph"] = bands["ph"].with_normal(*settings.ph_band)
    unit = units.unit(conductivity)  # the reason reads in the grower's unit
    if unit is not units.INTERNAL:
        bands["tds"] = dataclasses.replace(
            bands["tds"], label=unit.label, decimals=unit.decimals,
            scale=unit.per_ms_cm / units.INTERNAL.per_ms_cm,
        )
    return bands


class NodeMonitor:
    """The severity of one node: assessed from its latest values, told when it changes."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: The last severity assessed (``get_state``'s ``severity``), ``None`` before a reading.
        self.severity: Severity | None = None
        self._key: tuple[str, tuple[str, ...]] | None = None
        self._at = -math.inf

    def due(self, now: float) -> bool:
        """Whether an assessment at monotonic ``now`` would be made (one per period at most).

        Asked first on the hot path of every reading, so that the bands and
        reminders are only gathered when they are used.
        """
        return now - self._at >= SEVERITY_PERIOD_S

    def update(
        self,
        now: float,
        latest: Mapping[str, float],
        bands: Mapping[str, Band],
        *,
        calibrating: str | None = None,
        alarm: str | None = None,
        reminders: Sequence[str] = (),
    ) -> dict[str, Any] | None:
        """Assess at monotonic ``now``; the telemetry entry to record if it changed, else None.

        ``calibrating``: a key whose probe sits in a buffer (left out);
        ``alarm``: why automatic control stopped itself (urgent: the grower
        must act); ``reminders``: calibrations that are due (``info``: worth
        a look, nothing is wrong yet).
        """
        if not self.due(now):
            return None
        self._at = now
        values = {k: v for k, v in latest.items() if k != calibrating}
        severity = assess(values, bands)
        if alarm is not None:
            severity = dataclasses.replace(
                severity, level="urgent", reason=f"{alarm}; {severity.reason}")
        due = list(reminders)
        if due:
            level = "info" if severity.level == "none" else severity.level
            reason = "; ".join(due) if severity.level == "none" else f"{severity.reason}; " \
                + "; ".join(due)
            severity = dataclasses.replace(severity, level=level, reason=reason)
        off = tuple(sorted(k for k, degree in severity.degrees.items() if degree > 0))
        key = (severity.level, (*off, *(("lock",) if alarm else ()), *due))
        self.severity = severity
        if key == self._key:
            return None
        self._key = key
        if severity.level in ("warning", "urgent"):
            log.warning(
                "node %s severity %s: %s",
                self.name,
                severity.level,
                severity.reason,
                extra=fields(node=self.name, severity=severity.level),
            )
        return {"severity": severity.level, "severity_reason": severity.reason or "ok"}
