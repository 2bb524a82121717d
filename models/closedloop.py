"""The ``ml`` model's training data: the best doses found by search on the simulator, closed loop.

Labels are not a formula's output. For every decision the ``ml`` controller
meets while it runs a tank, the simulator is asked what would have been
best, and that is the label:

1. **Tanks** are drawn from issue 11's ranges (:func:`sim.tanks.draw`:
   5–200 L, buffer ×0.3–3, water alkalinity, pH solutions of 0.1–2 M,
   mixing lag 30–300 s, dead time 5–60 s, pumps ×0.5–4, starts pH 4.5–8
   and TDS 300–1400 ppm), with their own seeds (never the sweep's), and
   unlike the sweep in three ways that a real gateway meets: a stock of
   5,000–30,000 ppm (×0.5–3 of the sweep's, the same buffer per ppm); each
   configured constant (volume, stock, each pump's flow, each pH strength)
   is up to 20 % wrong *on its own*, with probability 1/2, and the pH
   strengths are unset on a third of the tanks; a level sensor on two tanks
   in three whatever the config. (The sweep's configs are all right or all
   wrong, and it hides the level sensor exactly when they are wrong: a model
   trained on that would learn that a level reading matching the configured
   volume means the stock and the pumps are right too.) One episode in five
   starts near the setpoints instead (a held tank drifting), so small
   errors are covered.
2. **Episodes** run the daemon's own stack in simulated time — the
   :class:`~rules.cycle.ControlCycle` with its deadband and pH safety
   envelope, the :class:`~rules.safety.SafetyGuard`, the noisy sensors —
   with the ``ml`` controller itself deciding (its settling test, its
   measured effect ratios, its features), but with an *exploring* model
   (:class:`Explorer`): random fractions around sensible ones, so the
   states and the knowledge the real controller will meet are covered,
   including those after an overshoot.
3. **Labels.** At each query the plant is copied as it is, and on the copy
   the pump the controller would run is run until the tank's value reaches
   the aim: the *landing dose*, the dose whose settled result lands nearest
   the setpoint without passing it. TDS: the aim is the setpoint minus
   :data:`AIM_PCT` % on the near side (inside what the cycle's deadband
   accepts), and the label is the landing dose as a fraction of the
   controller's reference (the need by the configured constants); pH: the
   aim is the setpoint, and the label is a fraction of the envelope's
   limit, at most 1 (the cycle cuts anything above).

   Before a pump's effect on the tank has been measured, nothing the
   gateway knows tells a right config from one 20 % off, so the search
   runs on the tank the config allows on which the dose goes furthest
   (:func:`worst_case`: flow and stock 1/0.8 of the configured ones, the
   volume 1/1.2 of it unless a level sensor measures it): a first dose
   never overshoots because a config was wrong. Once measured, the search
   runs on the tank itself, and what the gateway cannot know is only the
   measurement's noise: models/train.py fits a low quantile of the label.

Everything is seeded per episode (``(seed, episode)``), so the rows do not
depend on how episodes are spread over processes; ``--jobs 2`` uses both
cores. Tanks whose index is a multiple of 5 make the held-out split. The
split is written as arrays (:class:`Dataset`) whose SHA-256 (over the
arrays, not the zip file) goes into ``models/metadata.json``.

    .venv/bin/python -m models.closedloop --jobs 2     # ~15 min on two cores
    .venv/bin/python -m models.closedloop --check 20   # does the code still make this data?
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import logging
import math
import multiprocessing
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from rules.controller import NUTRIENT, PH_UP, PlantConstants
from rules.ml import MlController
from rules.mlpolicy import FEATURES, OUTPUT_SCALE, TARGETS, PhQuery, TdsQuery
from rules.mlpolicy import RANGES as FEATURE_RANGES
from rules.mlruntime import InputRangeError, ModelSpec
from sim.plant import Reservoir
from sim.rig import Rig
from sim.tanks import Config, Tank, draw

__all__ = [
    "AIM_PCT",
    "DEFAULT_DATA",
    "EPISODES",
    "SEED",
    "Dataset",
    "Explorer",
    "check",
    "episode_rows",
    "generate",
    "landing",
    "worst_case",
    "training_tank",
]

FloatArray = npt.NDArray[np.float64]

SEED = 20_251_201
EPISODES = 2400
HELD_OUT_EVERY = 5  # tanks whose index is a multiple of this are held out
AIM_PCT = 0.5  # TDS labels land this far on the near side of the setpoint
NEAR_SHARE = 0.2  # of the episodes start near the setpoints
LEVEL_SENSOR_SHARE = 2.0 / 3.0
CONFIG_ERROR = (0.8, 1.2)  # configured / true, at worst (issue 11: 20 % wrong)
WRONG_SHARE = 0.5  # of the config's constants, each on its own, are up to 20 % off
UNSET_SHARE = 1.0 / 3.0  # of the tanks have no pH strength configured
STOCK_FACTOR = (0.5, 3.0)  # × the sweep's 10,000 ppm stock, log-uniform
POLL_S = 2.0  # as hydrogate evaluate
SEARCH_STEP_S = 0.5
#: The committed data (the held-out split only; the training split is regenerated).
DEFAULT_DATA = Path(__file__).with_name("heldout.npz")
COMMAND = ".venv/bin/python -m models.closedloop --jobs 2"

_SPEC = ModelSpec(
    features=FEATURES,
    targets=TARGETS,
    ranges=FEATURE_RANGES,
    inputs=(),
    output_scale=OUTPUT_SCALE,
    sha256=MappingProxyType({}),
)


@dataclass(frozen=True)
class Dataset:
    """Rows of decisions: features (``FEATURES`` order), which target, its label, and origin."""

    x: FloatArray  # (n, len(FEATURES))
    target: npt.NDArray[np.int8]  # index into TARGETS
    y: FloatArray  # the landing fraction
    episode: npt.NDArray[np.int32]

    def sha256(self) -> str:
        """SHA-256 over the arrays (C order, little-endian), in field order."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.x, dtype="<f8").tobytes())
        digest.update(np.ascontiguousarray(self.target, dtype="i1").tobytes())
        digest.update(np.ascontiguousarray(self.y, dtype="<f8").tobytes())
        digest.update(np.ascontiguousarray(self.episode, dtype="<i4").tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.y)

    def select(self, mask: npt.NDArray[np.bool_]) -> Dataset:
        """The rows where ``mask`` holds."""
        return Dataset(self.x[mask], self.target[mask], self.y[mask], self.episode[mask])

    def save(self, path: Path) -> None:
        """Write the arrays (``.npz``; the file's bytes vary, :meth:`sha256` does not)."""
        np.savez_compressed(path, x=self.x, target=self.target, y=self.y, episode=self.episode)

    @classmethod
    def load(cls, path: Path) -> Dataset:
        """Read what :meth:`save` wrote."""
        with np.load(path) as data:
            return cls(
                np.asarray(data["x"], dtype=np.float64),
                np.asarray(data["target"], dtype=np.int8),
                np.asarray(data["y"], dtype=np.float64),
                np.asarray(data["episode"], dtype=np.int32),
            )

    @classmethod
    def concat(cls, parts: Sequence[Dataset]) -> Dataset:
        """One dataset of ``parts`` in order."""
        if not parts:
            return cls(np.zeros((0, len(FEATURES))), np.zeros(0, np.int8), np.zeros(0),
                       np.zeros(0, np.int32))
        return cls(
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.target for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.episode for p in parts]),
        )


def held_out(episode: int) -> bool:
    """Whether ``episode``'s tank belongs to the held-out split."""
    return episode % HELD_OUT_EVERY == 0


# --- tanks ---------------------------------------------------------------------------------


def training_tank(seed: int, episode: int) -> Tank:
    """Episode ``episode``'s tank (see the module docstring), from its own random stream."""
    rng = random.Random(f"hydrogate-ml-{seed}-{episode}")
    tank = draw(rng, f"train{seed}-{episode:05d}", "right", seed=rng.randrange(1 << 30))
    s = math.exp(rng.uniform(*(math.log(v) for v in STOCK_FACTOR)))
    p = tank.params
    params = replace(
        p,
        stock_ppm=p.stock_ppm * s,
        stock_phosphate_mol_l=p.stock_phosphate_mol_l * s,
        stock_acid_mol_l=p.stock_acid_mol_l * s,
    )

    def guess(value: float) -> float:
        """A grower's figure: right, or up to 20 % off (each constant on its own)."""
        return value * rng.uniform(*CONFIG_ERROR) if rng.random() < WRONG_SHARE else value

    truth = tank.told  # draw() with "right": the tank's own constants and titrations
    strengths = {pump: guess(v) for pump, v in truth.ph_ml_per_l_per_unit.items()}
    unset = rng.random() < UNSET_SHARE
    told = PlantConstants(
        tank_volume_l=guess(truth.tank_volume_l),
        stock_ppm=guess(params.stock_ppm),
        flow_ml_s={pump: guess(flow) for pump, flow in truth.flow_ml_s.items()},
        ph_ml_per_l_per_unit={} if unset else strengths,
    )
    wrong = (told.tank_volume_l, told.stock_ppm, dict(told.flow_ml_s), strengths) != (
        truth.tank_volume_l, params.stock_ppm, dict(truth.flow_ml_s),
        dict(truth.ph_ml_per_l_per_unit),
    )
    config: Config = "unset" if unset else "wrong" if wrong else "right"
    hidden = () if rng.random() < LEVEL_SENSOR_SHARE else ("water_level",)
    tank = replace(tank, params=params, told=told, config=config, hidden=hidden)
    if rng.random() < NEAR_SHARE:
        sign = rng.choice((-1.0, 1.0))
        start_tds = tank.tds_setpoint * (1.0 + sign * rng.uniform(0.015, 0.10))
        start_ph = tank.ph_setpoint + rng.choice((-1.0, 1.0)) * rng.uniform(0.05, 0.4)
        tank = replace(tank, start_tds=start_tds, start_ph=start_ph)
    return tank


# --- the exploring model -------------------------------------------------------------------


class Explorer:
    """A stand-in model for the episodes: random fractions around sensible ones.

    TDS: 0.4–1.1 of the need before the pump's effect is measured (a config
    1.8× off either way overshoots or undershoots), then 0.75–1.05 of the
    need corrected by the measured ratio. pH: the envelope's limit half of
    the time, else 0.2–1 of it. Like the real model it refuses features
    outside the training ranges (the controller then falls back to RB, as
    it would in service), so every row lies inside them.
    """

    def __init__(self, rng: random.Random) -> None:
        self.spec = _SPEC
        self._rng = rng

    def predict(self, features: Mapping[str, float]) -> dict[str, float]:
        """Fractions for both targets (only the loop's is used)."""
        for name in FEATURES:
            low, high = FEATURE_RANGES[name]
            if not low <= features[name] <= high:
                raise InputRangeError(f"{name}={features[name]:g} outside the training range")
        r = self._rng
        if features["factor_known"] > 0.5:
            tds = r.uniform(0.75, 1.05) / features["factor"]
        else:
            tds = r.uniform(0.4, 1.1)
        ph = 1.0 if r.random() < 0.5 else r.uniform(0.2, 1.0)
        return {"tds_fraction": tds, "ph_fraction": ph}


# --- labels --------------------------------------------------------------------------------


def landing(plant: Reservoir, actuator: str, key: str, aim: float, max_s: float) -> float | None:
    """Seconds of ``actuator`` at full duty after which the tank's ``key`` reaches ``aim``.

    Runs on ``plant`` itself (pass a copy). The tank (not the probe, which
    follows it) is well mixed, so its value when the pump stops is where the
    probe settles. ``None``: not within ``max_s``; 0: already there (or past it).
    """
    before = plant.truth()[key]
    sign = 1.0 if actuator in (NUTRIENT, PH_UP) else -1.0
    if (aim - before) * sign <= 0.0:
        return 0.0
    plant.set_pump(actuator, 255)
    t, previous = 0.0, before
    while t < max_s:
        h = min(SEARCH_STEP_S, max_s - t)
        plant.step(h)
        t += h
        value = plant.truth()[key]
        if (value - aim) * sign >= 0.0:
            moved = value - previous
            return t - h + (h * (aim - previous) / moved if moved else h)
        previous = value
    return None


def worst_case(plant: Reservoir, tank: Tank, query: TdsQuery) -> Reservoir:
    """The tank, among those the config allows, on which ``query``'s pump goes furthest.

    Each configured constant may be 20 % off (:data:`CONFIG_ERROR`): the
    true flow and stock up to ``1/0.8`` of the configured ones, the true
    volume down to ``1/1.2`` of it (unless a level sensor measures it). The
    copy holds the same TDS and pH as ``plant``'s tank now.
    """
    low, high = CONFIG_ERROR
    truth = plant.truth()
    p = plant.params
    volume = truth["water_level"]
    if query.features["level_known"] < 0.5:
        volume *= tank.told.tank_volume_l / high / p.volume_l
    flow = tank.told.flow_ml_s[query.actuator] / low
    params = replace(
        p,
        stock_ppm=tank.told.stock_ppm / low,
        nutrient_flow_ml_s=flow,
        refill_flow_ml_s=flow,
        capacity_l=p.capacity_l * volume / truth["water_level"],
        uptake_per_h=0.0,
        evaporation_l_per_h=0.0,
    )
    return Reservoir.from_state(tds=truth["tds"], ph=truth["ph"], volume_l=volume, params=params)


def _label(plant: Reservoir, query: TdsQuery | PhQuery, tank: Tank) -> float:
    """The landing dose as a fraction of the query's reference dose (module docstring)."""
    if isinstance(query, TdsQuery):
        if query.features["factor_known"] < 0.5:
            plant = worst_case(plant, tank, query)
        sp = tank.tds_setpoint
        aim = sp * (1.0 - AIM_PCT / 100.0) if query.actuator == "nutrient" else sp * (
            1.0 + AIM_PCT / 100.0
        )
        top = OUTPUT_SCALE["tds_fraction"]
        landed = landing(plant, query.actuator, "tds", aim, top * query.reference_ms / 1000.0)
        return top if landed is None else min(top, 1000.0 * landed / query.reference_ms)
    landed = landing(plant, query.actuator, "ph", tank.ph_setpoint, query.reference_ms / 1000.0)
    return 1.0 if landed is None else min(1.0, 1000.0 * landed / query.reference_ms)


# --- episodes ------------------------------------------------------------------------------


async def _run(tank: Tank, explorer: Explorer) -> list[tuple[TdsQuery | PhQuery, Reservoir]]:
    """One cycle of ``tank`` with the exploring ``ml`` controller; its queries and plant copies."""
    queries: list[tuple[TdsQuery | PhQuery, Reservoir]] = []

    def observe(query: TdsQuery | PhQuery) -> None:
        queries.append((query, copy.deepcopy(rig.plant)))

    controller = MlController(model=explorer, deadline_s=60.0, observer=observe)
    rig = Rig(tank, controller, poll_s=POLL_S)
    end = rig.settings.max_cycle_s + POLL_S
    try:
        rig.cycle.start(0.0)
        while rig.cycle.state != "idle" and rig.t < end:
            if rig.poll_due:
                await rig.control(rig.read())
            rig.advance(end)
    finally:
        controller.close()
    return queries


def _in_range(features: Mapping[str, float]) -> bool:
    return all(FEATURE_RANGES[f][0] <= features[f] <= FEATURE_RANGES[f][1] for f in FEATURES)


def episode_rows(seed: int, episode: int) -> Dataset:
    """The labelled rows of one episode (deterministic in ``seed`` and ``episode``)."""
    tank = training_tank(seed, episode)
    explorer = Explorer(random.Random(f"hydrogate-ml-explore-{seed}-{episode}"))
    queries = asyncio.run(_run(tank, explorer))
    rows = [(q, plant) for q, plant in queries if _in_range(q.features)]
    x = np.array([[q.features[f] for f in FEATURES] for q, _ in rows], dtype=np.float64)
    target = np.array([0 if isinstance(q, TdsQuery) else 1 for q, _ in rows], dtype=np.int8)
    y = np.array([_label(plant, q, tank) for q, plant in rows], dtype=np.float64)
    return Dataset(x.reshape(len(rows), len(FEATURES)), target, y,
                   np.full(len(rows), episode, dtype=np.int32))


def _worker(args: tuple[int, int]) -> Dataset:
    logging.disable(logging.CRITICAL)  # the episodes' fallbacks and lock warnings are expected
    return episode_rows(*args)


def _episodes(seed: int, episodes: Sequence[int], jobs: int) -> Iterator[Dataset]:
    work = [(seed, e) for e in episodes]
    if jobs <= 1:
        yield from map(_worker, work)
        return
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        yield from pool.imap(_worker, work, chunksize=4)


def generate(
    seed: int = SEED, episodes: int = EPISODES, *, jobs: int = 1, progress: bool = False
) -> tuple[Dataset, Dataset]:
    """(training split, held-out split) of ``episodes`` episodes with ``seed``."""
    parts = []
    started = time.monotonic()
    for i, part in enumerate(_episodes(seed, range(episodes), jobs)):
        parts.append(part)
        if progress and (i + 1) % 50 == 0:
            rate = (time.monotonic() - started) / (i + 1)
            print(f"  {i + 1}/{episodes} episodes, {rate:.2f} s each", file=sys.stderr)
    data = Dataset.concat(parts)
    test = np.array([held_out(int(e)) for e in data.episode], dtype=bool)
    return data.select(~test), data.select(test)


def check(count: int, *, seed: int = SEED, data: Path = DEFAULT_DATA) -> int:
    """Regenerate ``count`` held-out episodes; 0 if their rows equal those in ``data``."""
    committed = Dataset.load(data)
    episodes = sorted(set(committed.episode.tolist()))[:count]
    bad = []
    for episode in episodes:
        again = episode_rows(seed, episode)
        rows = committed.select(committed.episode == episode)
        if again.sha256() != rows.sha256():
            bad.append(episode)
    print(f"{len(episodes) - len(bad)}/{len(episodes)} held-out episodes regenerated identically"
          + (f"; differ: {bad} (the data are stale: regenerate and retrain)" if bad else ""))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """Generate the data; write the held-out split to ``--out`` and the training split beside."""
    parser = argparse.ArgumentParser(prog="python -m models.closedloop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--episodes", type=int, default=EPISODES)
    parser.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_DATA,
                        help="the held-out split; the training split goes to train.npz beside")
    parser.add_argument("--check", type=int, default=0, metavar="K",
                        help="only regenerate the first K held-out episodes and compare them "
                             "with the committed rows (does the code still make this data?)")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.check, seed=args.seed, data=args.out)
    train, test = generate(args.seed, args.episodes, jobs=args.jobs, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    test.save(args.out)
    train.save(args.out.with_name("train.npz"))
    for name, ds in (("train", train), ("held-out", test)):
        counts = [int((ds.target == i).sum()) for i in range(len(TARGETS))]
        per = ", ".join(f"{t} {c}" for t, c in zip(TARGETS, counts, strict=True))
        print(f"{name}: {len(ds)} rows ({per}), sha256 {ds.sha256()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
