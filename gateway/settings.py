"""Who wins, the config file or ThingsBoard: the control settings in force, key by key.

The rule (docs/thingsboard.md, "Who wins"): for each run-time setting
(``mode``, ``controller``, ``tds_setpoint``, ``ph_setpoint``, ``schedule``,
``interval``), **the newer one wins**. An edit of the config file wins over
values set at run time (shared attributes, the ``set_mode`` RPC) before the
edit; a value set at run time after the edit wins over the file, until the
file's value for that key is edited again. A key the file did not change
keeps its run-time value; a run-time value deleted on the server falls back
to the file.

What "when" means:

- the file's edit of a key is dated by the file's modification time, taken
  when the gateway first sees that key's value differ from the value it saw
  last (at start or at a reload); the first value ever seen has no date, so
  any run-time value is newer;
- a run-time value is dated when the gateway received it. A shared attribute
  *pushed* by ThingsBoard (someone set it) is new. The values ThingsBoard
  returns when the gateway asks at every session start carry no date: a
  value the gateway has received before is the old one (it keeps its old
  date), so a stale attribute never overrides a newer file edit at a
  reconnect; only a value it has not seen yet (changed while the gateway was
  away) counts as new.

`SettingsState` is that bookkeeping, pure and JSON-able; `gateway.control`
validates, applies and persists it in the store (``settings`` table).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: The format of what is saved (version 1 was {"base": file, "current": in force}).
FORMAT = 2
#: Where a run-time value came from, as `sources` names it.
THINGSBOARD = "thingsboard"
RPC = "rpc"
FILE = "file"

_MISSING = object()


@dataclass
class RuntimeValue:
    """A value set at run time, when (wall s) and by what (`THINGSBOARD`, `RPC`)."""

    value: Any
    ts: float
    source: str


@dataclass
class SettingsState:
    """The file's values and their edit dates, run-time values, what ThingsBoard last sent."""

    file: dict[str, Any] = field(default_factory=dict)
    file_ts: dict[str, float] = field(default_factory=dict)
    runtime: dict[str, RuntimeValue] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------ persistence
    @classmethod
    def restore(cls, saved: Mapping[str, Any]) -> SettingsState:
        """From what `to_saved` returned (or an earlier format); raises ValueError if unusable."""
        if not saved:
            return cls()
        if saved.get("v") == FORMAT:
            runtime = {
                str(k): RuntimeValue(v["value"], float(v["ts"]), str(v["source"]))
                for k, v in dict(saved.get("runtime") or {}).items()
            }
            return cls(
                file=dict(saved.get("file") or {}),
                file_ts={str(k): float(v) for k, v in dict(saved.get("file_ts") or {}).items()},
                runtime=runtime,
                server=dict(saved.get("server") or {}),
            )
        if "base" in saved:  # format 1: run-time values won unless the file changed
            base, current = dict(saved.get("base") or {}), dict(saved.get("current") or {})
            state = cls(file=base, server=copy.deepcopy(current))
            for key, value in current.items():
                if base.get(key, _MISSING) != value:  # older than any edit seen from now on
                    state.runtime[key] = RuntimeValue(value, 0.0, THINGSBOARD)
            return state
        raise ValueError(f"saved settings in an unknown format (keys {sorted(saved)})")

    def to_saved(self) -> dict[str, Any]:
        """JSON-able, for the store."""
        return {
            "v": FORMAT,
            "file": self.file,
            "file_ts": self.file_ts,
            "runtime": {
                k: {"value": v.value, "ts": v.ts, "source": v.source}
                for k, v in self.runtime.items()
            },
            "server": self.server,
        }

    # ------------------------------------------------------------- the rule
    def see_file(self, values: Mapping[str, Any], mtime: float) -> list[str]:
        """The config file says ``values`` (it was last modified at ``mtime``).

        Keys whose value changed since the file was last seen are dated
        ``mtime``; returns them. A first sight dates nothing.
        """
        old = self.file
        dated = [k for k, v in values.items() if k in old and old[k] != v]
        for key in dated:
            self.file_ts[key] = mtime
        self.file = copy.deepcopy(dict(values))
        return dated

    def winners(self) -> dict[str, Any]:
        """The run-time values newer than the file's edit of their key (they are in force)."""
        return {
            key: rv.value
            for key, rv in self.runtime.items()
            if key in self.file and rv.ts > self.file_ts.get(key, -1.0)
        }

    def sources(self) -> dict[str, str]:
        """Where each setting in force comes from: `FILE`, `THINGSBOARD` or `RPC`."""
        winners = self.winners()
        return {key: self.runtime[key].source if key in winners else FILE for key in self.file}

    def set(self, values: Mapping[str, Any], *, ts: float, source: str) -> None:
        """Values set at run time at ``ts`` (already validated and applied by the caller)."""
        for key, value in values.items():
            self.runtime[key] = RuntimeValue(copy.deepcopy(value), ts, source)

    def news(self, data: Mapping[str, Any], *, response: bool) -> dict[str, Any]:
        """What in ``data`` from ThingsBoard is new: a push all, a response what is unseen."""
        if not response:
            return dict(data)
        return {k: v for k, v in data.items() if self.server.get(k, _MISSING) != v}

    def heard(self, data: Mapping[str, Any]) -> None:
        """ThingsBoard holds these shared attribute values now (applied or refused)."""
        for key, value in data.items():
            self.server[key] = copy.deepcopy(value)

    def deleted(self, keys: Iterable[str]) -> list[str]:
        """Shared attributes deleted on the server: their run-time values go; which did."""
        gone = []
        for key in keys:
            self.server.pop(key, None)
            rv = self.runtime.get(key)
            if rv is not None and rv.source == THINGSBOARD:
                del self.runtime[key]
                gone.append(key)
        return gone

    def drop(self, keys: Iterable[str]) -> None:
        """Forget run-time values (they no longer validate against the file)."""
        for key in keys:
            self.runtime.pop(key, None)
