"""The ``ml`` controller: model-sized doses within the envelope, and RB — saying why — on failure."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import threading
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

import rules.ml  # noqa: F401 - registers "ml"
from rules.controller import (
    ControllerError,
    ControllerOptions,
    DecisionContext,
    Dose,
    Learner,
    PlantConstants,
    create,
)
from rules.ml import MAX_DOSE_S, MlController
from rules.mlpolicy import FEATURES, TARGETS, PhQuery, TdsQuery
from rules.mlruntime import DEFAULT_METADATA, DEFAULT_MODEL, Model, ModelSpec
from rules.rb import RbController

SPEC = ModelSpec.load(DEFAULT_METADATA)
TANK = PlantConstants(tank_volume_l=10.0, stock_ppm=10_000.0,
                      flow_ml_s={"nutrient": 6.0, "refill": 30.0, "ph_up": 1.58, "ph_down": 1.58})


def ctx(loop: str = "tds", measured: float = 500.0, *, setpoint: float | None = None,
        plant: PlantConstants = TANK, now: float | None = None, first: bool = True,
        max_ml: Mapping[str, float] | None = None, **values: float) -> DecisionContext:
    sp = setpoint if setpoint is not None else {"tds": 700.0, "ph": 6.0}[loop]
    half = sp * 0.05 if loop == "tds" else 0.15
    return DecisionContext(
        loop=loop,  # type: ignore[arg-type]
        setpoint=sp,
        measured=measured,
        previous_error=None if first else sp - measured,
        values={"water_level": 10.0, loop: measured, **values},
        plant=plant,
        band=(sp - half, sp + half),
        max_ml=max_ml or {},
        now=now,
    )


class FakeModel:
    """An injected model: fixed outputs, optionally held until ``gate`` opens."""

    def __init__(self, outputs: Mapping[str, float], gate: threading.Event | None = None) -> None:
        self.spec = SPEC
        self.outputs = dict(outputs)
        self.gate = gate
        self.calls: list[Mapping[str, float]] = []

    def predict(self, features: Mapping[str, float]) -> dict[str, float]:
        self.calls.append(dict(features))
        if self.gate is not None:
            assert self.gate.wait(5.0), "test never opened the gate"
        return dict(self.outputs)


@pytest.fixture
async def ml() -> AsyncIterator[MlController]:
    controller = MlController(ControllerOptions())
    try:
        yield controller
    finally:
        controller.close()


def copy_model(tmp_path: Path, content: bytes, *, rehash: bool) -> ControllerOptions:
    path = tmp_path / DEFAULT_MODEL.name
    path.write_bytes(content)
    meta = json.loads(DEFAULT_METADATA.read_text())
    if rehash:
        meta["files"][path.name]["sha256"] = hashlib.sha256(content).hexdigest()
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    return ControllerOptions(model_path=str(path))


async def rb_doses(context: DecisionContext) -> tuple[Dose, ...]:
    return (await RbController().decide(context)).doses


def need_ms(c: float, sp: float = 700.0, plant: PlantConstants = TANK, volume: float = 10.0
            ) -> float:
    """The reference: seconds of nutrient that bring ``c`` to ``sp`` by mass balance, in ms."""
    litres = volume * (sp - c) / (plant.stock_ppm - sp)
    return litres * 1e6 / plant.flow_ml_s["nutrient"]


# --- the model decides ------------------------------------------------------


async def test_registered_and_sizes_a_first_tds_dose_below_the_need() -> None:
    registered = create("ml")
    try:
        assert (await registered.decide(ctx("tds", 500.0))).controller == "ml"
    finally:
        registered.close()
    queries: list[TdsQuery | PhQuery] = []
    controller = MlController(observer=queries.append)
    try:
        decision = await controller.decide(ctx("tds", 500.0))
    finally:
        controller.close()
    assert decision.controller == "ml"
    (dose,) = decision.doses
    assert dose.actuator == "nutrient" and dose.duty == 255
    (query,) = queries
    assert query.reference_ms == pytest.approx(need_ms(500.0))
    # Nothing is measured yet and the config may be 20 % off each way: well short of the need.
    assert 0.4 * need_ms(500.0) <= dose.ms <= 0.95 * need_ms(500.0)


async def test_one_model_serves_another_tank() -> None:
    """The old model refused every tank but its own; plant constants are features now."""
    big = PlantConstants(tank_volume_l=150.0, stock_ppm=20_000.0,
                         flow_ml_s={"nutrient": 60.0, "refill": 300.0, "ph_up": 20.0,
                                    "ph_down": 20.0})
    controller = MlController()
    try:
        decision = await controller.decide(ctx("tds", 900.0, setpoint=1000.0, plant=big,
                                               water_level=150.0))
    finally:
        controller.close()
    assert decision.controller == "ml"
    (dose,) = decision.doses
    assert dose.actuator == "nutrient"
    assert dose.ms <= need_ms(900.0, 1000.0, big, 150.0)


async def test_a_measured_weak_pump_gets_a_larger_dose_than_a_strong_one() -> None:
    """The effect ratio measured from a settled dose is the model's factor feature."""
    model = Model.load()
    answers = {}
    for ratio in (0.7, 1.3):
        queries: list[TdsQuery | PhQuery] = []
        controller = MlController(model=model, observer=queries.append)
        try:
            await controller.decide(ctx("tds", 400.0, now=0.0))
            fraction = model.predict(queries[0].features)["tds_fraction"]
            ml = round(fraction * queries[0].reference_ms) / 1e6 * TANK.flow_ml_s["nutrient"]
            expected = (400 * 10 + 10_000 * ml) / (10 + ml) - 400
            after = 400 + ratio * expected  # where the reading settles
            for step in range(100):  # the rest of the dose's pieces, the wait, the next dose
                decision = await controller.decide(ctx("tds", after, now=100.0 + 10 * step,
                                                       first=False))
                if decision.doses and len(queries) == 2:
                    break
        finally:
            controller.close()
        assert decision.controller == "ml" and decision.doses
        last = queries[-1]
        assert isinstance(last, TdsQuery)
        assert last.features["factor_known"] == 1.0
        assert last.features["factor"] == pytest.approx(ratio, rel=0.02)
        answers[ratio] = model.predict(last.features)["tds_fraction"]
    assert answers[0.7] > answers[1.3]
    for ratio, answer in answers.items():  # the need corrected by the ratio, never past it
        assert 0.6 <= answer * ratio <= 1.0


async def test_waits_for_a_dose_to_settle_and_runs_long_doses_in_pieces() -> None:
    fake = FakeModel({"tds_fraction": 1.0, "ph_fraction": 1.0})
    controller = MlController(model=fake)
    try:
        total = need_ms(300.0)  # 72 s of pump: two pieces
        first = await controller.decide(ctx("tds", 300.0, now=0.0))
        assert first.doses == (Dose("nutrient", 255, round(MAX_DOSE_S * 1000)),)
        ran = first.doses[0].ms
        t = 100.0
        while ran < round(total):
            piece = await controller.decide(ctx("tds", 300.0, now=t, first=False))
            (dose,) = piece.doses
            ran += dose.ms
            t += 100.0
        assert ran == round(total) and len(fake.calls) == 1  # sized once
        moving = await controller.decide(ctx("tds", 650.0, now=t, first=False))
        assert moving.doses == () and "settle" in moving.note
    finally:
        controller.close()


async def test_ph_dose_is_a_fraction_of_the_envelope_limit(ml: MlController) -> None:
    decision = await ml.decide(ctx("ph", 5.2, max_ml={"ph_up": 2.0, "ph_down": 0.0}))
    assert decision.controller == "ml"
    (dose,) = decision.doses
    assert dose.actuator == "ph_up"
    limit_ms = 2.0 / 1.58 * 1000
    assert 0.5 * limit_ms <= dose.ms <= limit_ms


async def test_no_ph_dose_while_the_envelope_allows_none(ml: MlController) -> None:
    decision = await ml.decide(ctx("ph", 6.8, max_ml={"ph_up": 0.0, "ph_down": 0.0}))
    assert decision.controller == "ml"
    assert decision.doses == () and "envelope" in decision.note


async def test_loops_only_drive_their_own_pumps() -> None:
    fake = FakeModel({"tds_fraction": 2.0, "ph_fraction": 1.0})
    controller = MlController(model=fake)
    try:
        tds = await controller.decide(ctx("tds", 900.0))
        ph = await controller.decide(ctx("ph", 7.0, max_ml={"ph_down": 1.0}))
    finally:
        controller.close()
    assert [d.actuator for d in tds.doses] == ["refill"]
    assert [d.actuator for d in ph.doses] == ["ph_down"]
    assert ph.doses[0].ms <= math.floor(1.0 / 1.58 * 1000)  # never above the limit


async def test_worker_is_one_named_thread(ml: MlController) -> None:
    await ml.decide(ctx("ph", 5.2, max_ml={"ph_up": 1.0}))
    await ml.decide(ctx("ph", 5.2, max_ml={"ph_up": 1.0}))
    workers = [t for t in threading.enumerate() if t.name.startswith("hydrogate-ml")]
    assert len(workers) == 1


async def test_learned_effect_ratios_survive_a_restart() -> None:
    controller = MlController(model=FakeModel({"tds_fraction": 0.5, "ph_fraction": 1.0}))
    try:
        assert isinstance(controller, Learner)
        assert controller.learned() == {}
        await controller.decide(ctx("tds", 400.0, now=0.0))
        for step in range(60):
            if (await controller.decide(ctx("tds", 520.0, now=100.0 + 10 * step,
                                            first=False))).doses:
                break
        state = controller.learned()
    finally:
        controller.close()
    assert state["version"] == 1 and list(state["tds_ratios"]) == ["nutrient"]
    again = MlController(model=FakeModel({"tds_fraction": 0.5, "ph_fraction": 1.0}))
    try:
        again.restore(json.loads(json.dumps(state)))
        assert again.learned() == state
        for bad in ({"version": 9}, {"version": 1, "tds_ratios": {"nutrient": [[9.0, 1.0]]}},
                    {"version": 1, "tds_ratios": {"ph_up": [[1.0, 1.0]]}}, {"version": 1}):
            with pytest.raises(ControllerError):
                again.restore(bad)
        assert again.learned() == state
    finally:
        again.close()


# --- every fallback path -----------------------------------------------------


async def test_missing_model_falls_back_to_rb_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rules.ml")
    controller = MlController(ControllerOptions(model_path=str(tmp_path / "none.tflite")))
    try:
        first = await controller.decide(ctx())
        second = await controller.decide(ctx("tds", 900.0))
    finally:
        controller.close()
    assert first.controller == second.controller == "rb"
    assert "model unavailable" in first.note and "cannot read" in first.note
    assert first.doses == await rb_doses(ctx())
    assert second.doses == await rb_doses(ctx("tds", 900.0))
    assert len(caplog.records) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("hydrogate-ml")]


async def test_corrupted_model_fails_the_hash(tmp_path: Path) -> None:
    content = bytearray(DEFAULT_MODEL.read_bytes())
    content[100] ^= 0x01
    controller = MlController(copy_model(tmp_path, bytes(content), rehash=False))
    try:
        decision = await controller.decide(ctx())
    finally:
        controller.close()
    assert decision.controller == "rb" and "sha256" in decision.note
    assert decision.doses == await rb_doses(ctx())


async def test_truncated_model_with_matching_hash_is_refused(tmp_path: Path) -> None:
    content = DEFAULT_MODEL.read_bytes()
    controller = MlController(copy_model(tmp_path, content[: len(content) // 3], rehash=True))
    try:
        decision = await controller.decide(ctx())
    finally:
        controller.close()
    assert decision.controller == "rb" and "interpreter refused" in decision.note


async def test_slow_inference_falls_back_and_busy_worker_is_not_queued() -> None:
    gate = threading.Event()
    fake = FakeModel({"tds_fraction": 0.5, "ph_fraction": 0.5}, gate)
    controller = MlController(model=fake, deadline_s=0.01)
    try:
        slow = await controller.decide(ctx("ph", 5.0, max_ml={"ph_up": 1.0}))
        busy = await controller.decide(ctx("ph", 5.0, max_ml={"ph_up": 1.0}))
        assert slow.controller == busy.controller == "rb"
        assert "slower than 10 ms" in slow.note
        assert "still running" in busy.note
        assert slow.doses == await rb_doses(ctx("ph", 5.0, max_ml={"ph_up": 1.0}))
        assert len(fake.calls) == 1
        gate.set()
        for _ in range(200):  # the worker finishes the held call, then the model decides again
            again = await controller.decide(ctx("ph", 5.0, max_ml={"ph_up": 1.0}))
            if again.controller == "ml":
                break
            await asyncio.sleep(0.005)
        assert again.controller == "ml"
        assert again.doses == (Dose("ph_up", 255, math.floor(0.5 / 1.58 * 1000)),)
    finally:
        gate.set()
        controller.close()


@pytest.mark.parametrize(
    ("plant", "level", "reason"),
    [
        (PlantConstants(tank_volume_l=2000.0), 2000.0, "log_volume=3.3"),
        (TANK, 40.0, "level_ratio=4 outside"),
        (PlantConstants(tank_volume_l=10.0, stock_ppm=600.0), 10.0, None),  # stock too weak
        (PlantConstants(tank_volume_l=10.0, stock_ppm=100_000.0), 10.0, "log_stock_ratio"),
    ],
)
async def test_features_outside_the_training_range_fall_back(
    ml: MlController, plant: PlantConstants, level: float, reason: str | None
) -> None:
    context = ctx("tds", 500.0, plant=plant, water_level=level)
    decision = await ml.decide(context)
    if reason is None:  # no dose can help: the controller says so, no model needed
        assert decision.controller == "ml" and decision.doses == ()
        return
    assert decision.controller == "rb"
    assert reason in decision.note and "outside the training range" in decision.note
    assert decision.doses == await rb_doses(context)


async def test_a_fallback_tds_dose_is_waited_for_but_teaches_nothing() -> None:
    controller = MlController()
    try:
        far = ctx("tds", 1600.0, now=0.0)  # 129 % above the setpoint: no training tank was
        decision = await controller.decide(far)
        assert decision.controller == "rb" and "tds_error" in decision.note
        assert decision.doses  # RB dilutes
        waiting = await controller.decide(ctx("tds", 1400.0, now=300.0, first=False))
        assert waiting.controller == "ml" and waiting.doses == ()
        assert "settle" in waiting.note
        assert controller.learned() == {}
    finally:
        controller.close()


async def test_non_finite_outputs_fall_back() -> None:
    fake = FakeModel({"tds_fraction": 0.5, "ph_fraction": math.nan})
    controller = MlController(model=fake)
    try:
        decision = await controller.decide(ctx())
    finally:
        controller.close()
    assert decision.controller == "rb"
    assert "non-finite output for ph_fraction" in decision.note
    assert decision.doses == await rb_doses(ctx())


async def test_recovers_after_a_fallback(ml: MlController, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    caplog.set_level(logging.INFO, logger="rules.ml")
    out = ctx("ph", 5.0, max_ml={"ph_up": 1.0}, water_level=40.0)
    assert (await ml.decide(out)).controller == "rb"
    assert (await ml.decide(out)).controller == "rb"
    assert (await ml.decide(ctx("ph", 5.0, max_ml={"ph_up": 1.0}))).controller == "ml"
    # State changes only; a feature outside the trained range is expected operation: INFO.
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO"]


async def test_closed_controller_refuses() -> None:
    controller = MlController(model=Model.load())
    controller.close()
    controller.close()  # idempotent
    with pytest.raises(ControllerError):
        await controller.decide(ctx())


def test_features_and_targets_are_the_models() -> None:
    assert SPEC.features == FEATURES
    assert SPEC.targets == TARGETS
