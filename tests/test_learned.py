"""What a controller learned about a tank survives cycles, restarts and controller switches.

NodeControl is driven directly, with a real NodeRunner (never connected: the
test controller asks for no doses) and a real Store file, on an injected
clock. The controller is a test-only `Learner` registered under its own name.
"""

from __future__ import annotations

import datetime
import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import gateway.control as control_module
import rules.controller as controller_module
from gateway.config import CONTROLLER_NAMES, NodeConfig, apply_control_update, parse_config
from gateway.control import NodeControl, plant_fingerprint
from gateway.node import NodeRunner
from gateway.store import Store, StoreError
from rules.controller import (
    ControllerError,
    ControllerOptions,
    Decision,
    DecisionContext,
    Learner,
    PlantConstants,
    register,
)
from tests.conftest import FakeClock

NAME = "test-tutor"
NODE = "tank-a"
ACCEPTED = (*CONTROLLER_NAMES, NAME)


class Tutor:
    """A Learner for tests: learns the ratio measured/setpoint of its last decision."""

    name = NAME

    def __init__(self) -> None:
        self.decisions = 0
        self.ratio: float | None = None
        self.closed = False

    async def decide(self, ctx: DecisionContext) -> Decision:
        self.decisions += 1
        self.ratio = round(ctx.measured / ctx.setpoint, 6)
        return Decision((), self.name, note="test: learns, never doses")

    def close(self) -> None:
        self.closed = True

    def learned(self) -> dict[str, Any]:
        if not self.decisions:
            return {}
        return {"decisions": self.decisions, "ratio": self.ratio}

    def restore(self, state: Mapping[str, Any]) -> None:
        # Careless on purpose: takes the ratio before checking the rest, so a
        # refused state leaves this instance half restored.
        self.ratio = float(state["ratio"])
        decisions = state["decisions"]  # KeyError when missing: a contract breach
        if not isinstance(decisions, int) or decisions < 1:
            raise ControllerError(f"decisions must be a positive integer, got {decisions!r}")
        self.decisions = decisions


@pytest.fixture
def tutors(monkeypatch: pytest.MonkeyPatch) -> list[Tutor]:
    """Register the Tutor for this test only; every instance built lands in the list."""
    controller_module.names()  # the built-ins first, into the real registry
    monkeypatch.setattr(controller_module, "_REGISTRY", dict(controller_module._REGISTRY))
    built: list[Tutor] = []

    @register(NAME)
    def factory(options: ControllerOptions) -> Tutor:
        tutor = Tutor()
        built.append(tutor)
        return tutor

    # Run-time updates accept the test controller, as they would any registered one.
    monkeypatch.setattr(
        control_module,
        "apply_control_update",
        functools.partial(apply_control_update, controllers=ACCEPTED),
    )
    return built


def node_config(plant: dict[str, Any] | None = None, controller: str = NAME) -> NodeConfig:
    entry: dict[str, Any] = {
        "name": NODE,
        "url": "tcp://127.0.0.1:9",
        "control": {
            "mode": "auto", "controller": controller, "tds_setpoint": 800, "ph_setpoint": 6.0,
            "interval": 3600, "tds_average_s": 1,
        },
    }
    if plant is not None:
        entry["plant"] = plant
    data = {"gateway": {"name": "gw"}, "storage": {"path": "unused.sqlite"}, "nodes": [entry]}
    return parse_config(data, controllers=ACCEPTED).nodes[0]


@asynccontextmanager
async def started(
    path: Path, config: NodeConfig, clock: FakeClock
) -> AsyncIterator[tuple[NodeControl, Store, NodeRunner]]:
    """A node's control as the node task starts it (load_settings), on the store at ``path``."""
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        runner = NodeRunner(config, store=store, clock=clock)
        runner.latest.update({"tds": 500.0, "ph": 6.0})
        await runner.control.load_settings()
        try:
            yield runner.control, store, runner
        finally:
            runner.control.close()


async def decide_once(control: NodeControl, clock: FakeClock) -> None:
    """Start a cycle if none runs, then tick until the controller has decided once."""
    await control.tick()  # starts the cycle (the interval fires at the first check)
    clock.advance(1.5)  # the 1 s TDS window is full and the next decision is due
    await control.tick()


def count_calls(
    monkeypatch: pytest.MonkeyPatch, store: Store, method: str
) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []
    real: Callable[..., Any] = getattr(store, method)

    async def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, method, spy)
    return calls


async def test_which_controllers_are_learners(tutors: list[Tutor]) -> None:
    assert isinstance(Tutor(), Learner)
    adaptive, fuzzy = controller_module.create("adaptive"), controller_module.create("fuzzy")
    try:
        assert isinstance(adaptive, Learner), "the adaptive controller's knowledge is kept"
        assert adaptive.learned() == {}, "nothing learned yet: nothing to save"
        assert not isinstance(fuzzy, Learner)
    finally:
        adaptive.close()
        fuzzy.close()


async def test_learned_state_is_saved_when_it_changes_and_only_then(
    tutors: list[Tutor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(tz=datetime.UTC)
    async with started(tmp_path / "gw.sqlite", node_config(), clock) as (control, store, runner):
        saves = count_calls(monkeypatch, store, "save_learned")
        await control.tick()  # cycle started, nothing decided: nothing learned, nothing saved
        assert saves == [] and await store.load_learned(NODE, NAME) is None
        clock.advance(1.5)
        await control.tick()
        assert tutors[-1].decisions == 1
        assert await store.load_learned(NODE, NAME) == (
            {"decisions": 1, "ratio": 0.625}, plant_fingerprint(PlantConstants())
        )
        for _ in range(3):  # ticks without a decision: the state did not change
            clock.advance(0.2)
            await control.tick()
        assert len(saves) == 1
        runner.latest["tds"] = 600.0
        clock.advance(2.0)
        await control.tick()
        assert len(saves) == 2
        assert await store.load_learned(NODE, NAME) == (
            {"decisions": 2, "ratio": 0.75}, plant_fingerprint(PlantConstants())
        )


async def test_a_restart_restores_what_was_learned(
    tutors: list[Tutor], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, clock = tmp_path / "gw.sqlite", FakeClock(tz=datetime.UTC)
    async with started(path, node_config(), clock) as (control, _, _):
        await decide_once(control, clock)
        assert tutors[-1].learned() == {"decisions": 1, "ratio": 0.625}
    caplog.set_level(logging.INFO, logger="hydrogate.control")
    # A new process: new store object, new runner, new controller instance. The
    # plant written out with its default values is the same plant.
    explicit = {"tank_volume_l": 10, "stock_ppm": 10000,
                "flow_ml_s": {"nutrient": 1.58, "ph_up": 1.58, "ph_down": 1.58, "refill": 1.58}}
    async with started(path, node_config(plant=explicit), FakeClock(tz=datetime.UTC)) as (control, store, runner):
        assert len(tutors) == 2
        assert (tutors[1].decisions, tutors[1].ratio) == (1, 0.625)
        restored = [r for r in caplog.records if "restored what test-tutor learned" in r.message]
        assert len(restored) == 1 and restored[0].levelno == logging.INFO
        assert "tank-a" in restored[0].message and '"ratio":0.625' in restored[0].message
        saves = count_calls(monkeypatch, store, "save_learned")
        await control.tick()  # the restored state is not saved back unchanged
        assert saves == []


async def test_changed_plant_constants_discard_what_was_learned(
    tutors: list[Tutor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, clock = tmp_path / "gw.sqlite", FakeClock(tz=datetime.UTC)
    async with started(path, node_config(), clock) as (control, _, _):
        await decide_once(control, clock)
    caplog.set_level(logging.INFO, logger="hydrogate.control")
    clock = FakeClock(tz=datetime.UTC)
    bigger = node_config(plant={"tank_volume_l": 20})
    async with started(path, bigger, clock) as (control, store, runner):
        assert (tutors[-1].decisions, tutors[-1].ratio) == (0, None), "starts fresh"
        [line] = [r for r in caplog.records if "discarded" in r.message]
        assert line.levelno == logging.INFO
        assert "plant constants changed (tank_volume_l 10.0 -> 20.0)" in line.message
        assert "mislead" in line.message
        assert await store.load_learned(NODE, NAME) is None, "deleted, not kept"
        await decide_once(control, clock)  # learns again, under the new plant
        state, plant = await store.load_learned(NODE, NAME) or ({}, {})
        assert state == {"decisions": 1, "ratio": 0.625}
        assert plant["tank_volume_l"] == 20.0


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ({"decisions": "many", "ratio": 0.9}, "decisions must be a positive integer"),
        ({"ratio": 0.9}, "KeyError"),  # a controller that breaks its contract
    ],
)
async def test_a_state_the_controller_refuses_is_logged_and_it_starts_fresh(
    tutors: list[Tutor], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    state: dict[str, Any], why: str,
) -> None:
    path = tmp_path / "gw.sqlite"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        await store.save_learned(NODE, NAME, state, plant_fingerprint(PlantConstants()))
    caplog.set_level(logging.INFO, logger="hydrogate.control")
    clock = FakeClock(tz=datetime.UTC)
    async with started(path, node_config(), clock) as (control, store, runner):
        [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert "test-tutor learned" in warning.message and why in warning.message
        assert "starts fresh" in warning.message
        assert not any("restored" in r.message for r in caplog.records)
        # The half-restored instance was replaced by a fresh one.
        assert len(tutors) == 2 and tutors[0].closed
        assert (tutors[1].decisions, tutors[1].ratio) == (0, None)
        assert await store.load_learned(NODE, NAME) is None
        await decide_once(control, clock)  # the node goes on and learns again
        assert await store.load_learned(NODE, NAME) == (
            {"decisions": 1, "ratio": 0.625}, plant_fingerprint(PlantConstants())
        )


async def test_a_damaged_row_is_logged_and_the_controller_starts_fresh(
    tutors: list[Tutor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, clock = tmp_path / "gw.sqlite", FakeClock(tz=datetime.UTC)
    async with started(path, node_config(), clock) as (control, _, _):
        await decide_once(control, clock)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE learned SET state = '{\"decisions\": 1, \"rat'")
    conn.close()
    caplog.set_level(logging.INFO, logger="hydrogate.control")
    async with started(path, node_config(), clock) as (control, store, runner):
        [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert "cannot be read" in warning.message and "starts fresh" in warning.message
        assert tutors[-1].decisions == 0
        assert await store.load_learned(NODE, NAME) is None


async def test_switching_controller_away_and_back_brings_the_knowledge_back(
    tutors: list[Tutor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(tz=datetime.UTC)
    async with started(tmp_path / "gw.sqlite", node_config(), clock) as (control, store, runner):
        await decide_once(control, clock)
        learned = tutors[-1].learned()
        assert learned == {"decisions": 1, "ratio": 0.625}
        caplog.set_level(logging.INFO, logger="hydrogate.control")
        await control.update_settings({"controller": "fuzzy"}, source="test")
        assert tutors[0].closed
        await control.tick()  # fuzzy is no Learner: nothing saved for it
        assert await store.load_learned(NODE, "fuzzy") is None
        assert await store.load_learned(NODE, NAME) is not None
        await control.update_settings({"controller": NAME}, source="test")
        assert len(tutors) == 2 and tutors[1].learned() == learned
        assert any("restored what test-tutor learned" in r.message for r in caplog.records)
        # The restored knowledge grows from there.
        runner.latest["tds"] = 400.0
        clock.advance(3600)  # the next interval start (the old cycle was aborted)
        await decide_once(control, clock)
        assert await store.load_learned(NODE, NAME) == (
            {"decisions": 2, "ratio": 0.5}, plant_fingerprint(PlantConstants())
        )


async def test_a_failing_save_is_logged_once_and_not_fatal(
    tutors: list[Tutor], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock(tz=datetime.UTC)
    async with started(tmp_path / "gw.sqlite", node_config(), clock) as (control, store, runner):
        real = store.save_learned

        async def broken(*args: Any, **kwargs: Any) -> None:
            raise StoreError("disk full")

        monkeypatch.setattr(store, "save_learned", broken)
        caplog.set_level(logging.INFO, logger="hydrogate.control")
        await decide_once(control, clock)
        clock.advance(2.0)
        await control.tick()  # a second decision, a second failed save
        assert tutors[-1].decisions == 2
        warnings = [r for r in caplog.records if "cannot save" in r.message]
        assert len(warnings) == 1 and "disk full" in warnings[0].message
        monkeypatch.setattr(store, "save_learned", real)
        clock.advance(2.0)
        await control.tick()  # the store works again: the state is saved
        state, _ = await store.load_learned(NODE, NAME) or ({}, {})
        assert state["decisions"] == 3


async def test_what_the_adaptive_controller_learns_survives_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real thing: adaptive's knowledge after the evaluation's scenarios, kept and restored."""
    from sim.evaluate import learn

    state, envelope = await learn("adaptive")
    assert state, "the adaptive controller learned something"
    assert envelope["anchors"], "and the pH envelope measured the rig"
    path = tmp_path / "gw.sqlite"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        await store.save_learned(NODE, "adaptive", state, plant_fingerprint(PlantConstants()))
        back, _ = await store.load_learned(NODE, "adaptive") or ({}, {})
    fresh = controller_module.create("adaptive")
    try:
        assert isinstance(fresh, Learner)
        fresh.restore(back)
        assert fresh.learned() == state, "JSON round trip, restore, snapshot: the same"
    finally:
        fresh.close()
    caplog.clear()
    caplog.set_level(logging.INFO, logger="hydrogate.control")
    async with started(path, node_config(controller="adaptive"), FakeClock(tz=datetime.UTC)):
        assert any("restored what adaptive learned" in r.message for r in caplog.records)
        assert not any(r.levelno >= logging.WARNING for r in caplog.records)
