"""A small, vectorised fuzzy inference engine: Sugeno and Mamdani over data-defined sets.

Sets, variables and rules are plain frozen data; evaluation is numpy over
whole arrays, so a controller evaluates one point and a test or a plot a
grid of a million points with the same call.

Membership functions (:class:`Mf`) are trapezoids ``(a, b, c, d)``; a
triangle is a trapezoid with ``b == c``. As in the thesis's firmware, a
set whose first two points coincide is a *left shoulder* (membership 1 at and
below ``b``), and one whose last two coincide is a *right shoulder*
(1 at and above ``c``): ``trapmf(-250, -250, -200, -100)`` is 1 at -250
and below. Inputs are clamped to their variable's universe first, so the
shoulders and the clamp agree. A NaN input belongs to no set.

Rules combine their antecedents with AND = min. Sugeno
(:meth:`FuzzySystem.sugeno`) takes the weighted average of the rules'
singleton outputs. When no rule fires the output is NaN and ``fired`` is
False, so the caller applies its own fallback (the firmware's 255 / 2000 ms).

Mamdani (:meth:`FuzzySystem.mamdani`) uses min implication, max
aggregation and centroid defuzzification over a sampled output universe.
Its output sets are derived from the singleton levels of the same output:
each level ``v`` becomes a *symmetric* triangle centred on ``v`` whose
half-width is the distance to the nearest other level. Symmetry makes a
single fully fired rule defuzzify to exactly its level (so at the set peaks
Mamdani and Sugeno agree), and because only the lowest (highest) triangle
reaches below (above) the lowest (highest) level, the centroid always stays
within the levels' range: Mamdani never invents a negative pump time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np
import numpy.typing as npt

from rules.membership import FuzzyError, Mf, trapmf, trimf

__all__ = [
    "FuzzyError",
    "FuzzyResult",
    "FuzzySystem",
    "Mf",
    "Output",
    "Rule",
    "Variable",
    "rules_from_table",
    "trapmf",
    "trimf",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def _frozen(mapping: Mapping[str, Mf] | Mapping[str, float]) -> Mapping[str, object]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Variable:
    """An input variable: a universe and named sets, in order (e.g. NB NK Z PK PB)."""

    name: str
    universe: tuple[float, float]
    sets: Mapping[str, Mf] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lo, hi = self.universe
        if not lo < hi:
            raise FuzzyError(f"{self.name}: universe must be increasing, got {self.universe}")
        if not self.sets:
            raise FuzzyError(f"{self.name}: no sets")
        object.__setattr__(self, "sets", _frozen(self.sets))

    @property
    def labels(self) -> tuple[str, ...]:
        """Set names in definition order."""
        return tuple(self.sets)

    def clamp(self, x: npt.ArrayLike) -> FloatArray:
        """``x`` clamped to the universe (NaN stays NaN)."""
        lo, hi = self.universe
        return np.clip(np.asarray(x, dtype=np.float64), lo, hi)

    def fuzzify(self, x: npt.ArrayLike) -> FloatArray:
        """Memberships, shape ``(len(sets),) + x.shape``, after clamping."""
        xs = self.clamp(x)
        return np.stack([mf(xs) for mf in self.sets.values()])


@dataclass(frozen=True)
class Output:
    """An output with named singleton levels (Sugeno) (e.g. slow 178, medium 204, fast 255)."""

    name: str
    levels: Mapping[str, float]

    def __post_init__(self) -> None:
        if len(self.levels) < 2:
            raise FuzzyError(f"{self.name}: need at least two levels")
        if len(set(self.levels.values())) != len(self.levels):
            raise FuzzyError(f"{self.name}: levels must be distinct")
        object.__setattr__(self, "levels", _frozen(self.levels))

    @property
    def labels(self) -> tuple[str, ...]:
        """Level names in definition order."""
        return tuple(self.levels)

    def mamdani_sets(self) -> dict[str, Mf]:
        """Symmetric triangles centred on the levels, half-width = nearest neighbour distance."""
        values = sorted(self.levels.values())
        out: dict[str, Mf] = {}
        for label, v in self.levels.items():
            half = min(abs(v - w) for w in values if w != v)
            out[label] = trimf(v - half, v, v + half)
        return out

    def mamdani_universe(self) -> tuple[float, float]:
        """The range the Mamdani sets cover (beyond the lowest and highest levels)."""
        sets = self.mamdani_sets().values()
        return (min(s.a for s in sets), max(s.d for s in sets))

    def mamdani_grid(self, samples: int) -> FloatArray:
        """At least ``samples`` uniform points over the universe, with every set corner on it.

        With the corners on a uniform grid, the sampled centroid of one
        clipped symmetric triangle is exactly its centre, so a single fully
        fired rule gives its level without sampling error.
        """
        lo, hi = self.mamdani_universe()
        corners = [p for mf in self.mamdani_sets().values() for p in mf.points]
        micro = [round((p - lo) * 1e6) for p in corners]
        step = math.gcd(*micro)
        intervals = round((hi - lo) * 1e6) // step if step else 0
        if intervals == 0 or intervals > 100 * samples:
            return np.linspace(lo, hi, samples)
        per = max(1, math.ceil((samples - 1) / intervals))
        return np.linspace(lo, hi, intervals * per + 1)


@dataclass(frozen=True)
class Rule:
    """IF every input is in its set (AND = min) THEN each output takes its level."""

    when: tuple[str, ...]
    then: Mapping[str, str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "then", MappingProxyType(dict(self.then)))


def rules_from_table(
    rows: Sequence[str],
    columns: Sequence[str],
    tables: Mapping[str, Sequence[Sequence[str]]],
) -> tuple[Rule, ...]:
    """Rules from rule tables: ``tables[output][i][j]`` for ``rows[i]`` x ``columns[j]``.

    The thesis writes its 25 rules this way: rows are error sets, columns
    Δerror sets, one table per output.
    """
    rules = []
    for i, r in enumerate(rows):
        for j, c in enumerate(columns):
            then = {}
            for out, table in tables.items():
                if len(table) != len(rows) or any(len(row) != len(columns) for row in table):
                    raise FuzzyError(f"table {out!r} is not {len(rows)}x{len(columns)}")
                then[out] = table[i][j]
            rules.append(Rule((r, c), then))
    return tuple(rules)


@dataclass(frozen=True)
class FuzzyResult:
    """Outputs by name (NaN where no rule fired), ``fired`` and the total rule weight."""

    outputs: dict[str, FloatArray]
    fired: BoolArray
    weight: FloatArray


@dataclass(frozen=True)
class FuzzySystem:
    """Inputs, outputs and rules; evaluate with :meth:`sugeno` or :meth:`mamdani`."""

    inputs: tuple[Variable, ...]
    outputs: tuple[Output, ...]
    rules: tuple[Rule, ...]
    _index: npt.NDArray[np.intp] = field(init=False, repr=False, compare=False)
    _levels: dict[str, FloatArray] = field(init=False, repr=False, compare=False)
    _level_index: dict[str, npt.NDArray[np.intp]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.rules:
            raise FuzzyError("no rules")
        index = np.empty((len(self.rules), len(self.inputs)), dtype=np.intp)
        levels: dict[str, FloatArray] = {}
        level_index: dict[str, npt.NDArray[np.intp]] = {}
        for k, rule in enumerate(self.rules):
            if len(rule.when) != len(self.inputs):
                raise FuzzyError(
                    f"rule {k} has {len(rule.when)} antecedents, not {len(self.inputs)}"
                )
            for i, (var, label) in enumerate(zip(self.inputs, rule.when, strict=True)):
                if label not in var.sets:
                    raise FuzzyError(f"rule {k}: {var.name} has no set {label!r}")
                index[k, i] = var.labels.index(label)
        for out in self.outputs:
            idx = np.empty(len(self.rules), dtype=np.intp)
            for k, rule in enumerate(self.rules):
                level = rule.then.get(out.name)
                if level is None or level not in out.levels:
                    raise FuzzyError(f"rule {k}: {out.name} has no level {level!r}")
                idx[k] = out.labels.index(level)
            level_index[out.name] = idx
            levels[out.name] = np.array([out.levels[lb] for lb in out.labels])[idx]
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_levels", levels)
        object.__setattr__(self, "_level_index", level_index)

    def strengths(self, *x: npt.ArrayLike) -> FloatArray:
        """Firing strength of every rule, shape ``(n_rules,) + broadcast(x).shape``."""
        if len(x) != len(self.inputs):
            raise FuzzyError(f"expected {len(self.inputs)} inputs, got {len(x)}")
        arrays = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in x))
        mus = [var.fuzzify(a) for var, a in zip(self.inputs, arrays, strict=True)]
        per_input = [mu[self._index[:, i]] for i, mu in enumerate(mus)]
        return np.asarray(np.minimum.reduce(per_input), dtype=np.float64)

    def sugeno(self, *x: npt.ArrayLike) -> FuzzyResult:
        """Weighted average of singleton outputs; NaN and ``fired=False`` where no rule fires."""
        w = self.strengths(*x)
        total = w.sum(axis=0)
        fired = total > 0.0
        safe = np.where(fired, total, 1.0)
        outputs = {}
        for name, z in self._levels.items():
            zz = z.reshape((-1,) + (1,) * (w.ndim - 1))
            outputs[name] = np.where(fired, (w * zz).sum(axis=0) / safe, np.nan)
        return FuzzyResult(outputs=outputs, fired=fired, weight=total)

    def mamdani(self, *x: npt.ArrayLike, samples: int = 1001, chunk: int = 4096) -> FuzzyResult:
        """Min implication, max aggregation, centroid over ``samples`` points.

        Evaluated in chunks of ``chunk`` inputs to bound memory on large grids.
        """
        w = self.strengths(*x)
        shape = w.shape[1:]
        flat = w.reshape(len(self.rules), -1)
        total = flat.sum(axis=0)
        fired = total > 0.0
        outputs: dict[str, FloatArray] = {}
        for out in self.outputs:
            z = out.mamdani_grid(samples)
            sets = np.stack([mf(z) for mf in out.mamdani_sets().values()])  # (K, S)
            idx = self._level_index[out.name]
            # Max aggregation of rule strengths per output set: (K, N).
            per_set = np.zeros((len(out.levels), flat.shape[1]))
            for k in range(len(out.levels)):
                mask = idx == k
                if mask.any():
                    per_set[k] = flat[mask].max(axis=0)
            result = np.full(flat.shape[1], np.nan)
            for start in range(0, flat.shape[1], chunk):
                part = per_set[:, start : start + chunk]  # (K, n)
                agg = np.minimum(part[:, :, None], sets[:, None, :]).max(axis=0)  # (n, S)
                area = agg.sum(axis=1)
                ok = area > 0.0
                centroid = (agg * z).sum(axis=1) / np.where(ok, area, 1.0)
                result[start : start + chunk] = np.where(ok, centroid, np.nan)
            outputs[out.name] = result.reshape(shape)
        return FuzzyResult(outputs=outputs, fired=fired.reshape(shape), weight=total.reshape(shape))

    def evaluate(
        self, *x: npt.ArrayLike, method: Literal["sugeno", "mamdani"] = "sugeno"
    ) -> FuzzyResult:
        """Dispatch to :meth:`sugeno` or :meth:`mamdani`."""
        if method == "sugeno":
            return self.sugeno(*x)
        if method == "mamdani":
            return self.mamdani(*x)
        raise FuzzyError(f"unknown method {method!r}")
