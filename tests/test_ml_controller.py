"""The ``ml`` controller: model doses, and RB — saying why — on every kind of failure."""

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
from models.runtime import DEFAULT_METADATA, DEFAULT_MODEL, Model, ModelSpec
from rules.controller import (
    ControllerError,
    ControllerOptions,
    DecisionContext,
    Dose,
    PlantConstants,
    create,
)
from rules.ml import MlController, to_model_units
from rules.rb import RbController

SPEC = ModelSpec.load(DEFAULT_METADATA)
CALM = {"tds": 700.0, "ph": 6.0, "air_temp": 22.0, "humidity": 60.0,
        "water_temp": 20.0, "water_level": 1.8}


def ctx(loop: str = "tds", measured: float = 500.0, *, setpoint: float | None = None,
        band: tuple[float, float] | None = None, plant: PlantConstants | None = None,
        **values: float) -> DecisionContext:
    default_band = {"tds": (560.0, 840.0), "ph": (5.5, 6.5)}[loop]
    return DecisionContext(
        loop=loop,  # type: ignore[arg-type]
        setpoint=setpoint if setpoint is not None else sum(band or default_band) / 2,
        measured=measured,
        previous_error=None,
        values={**CALM, loop: measured, **values},
        plant=plant or PlantConstants(),
        band=band or default_band,
    )


class FakeModel:
    """An injected model: fixed outputs, optionally held until ``gate`` opens."""

    def __init__(self, outputs: Mapping[str, float], gate: threading.Event | None = None) -> None:
        self.spec = SPEC
        self.outputs = dict(outputs)
        self.gate = gate
        self.calls = 0

    def predict(self, features: Mapping[str, float]) -> dict[str, float]:
        self.calls += 1
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


# --- the model decides ------------------------------------------------------


async def test_registered_and_decides_tds_doses_with_the_model() -> None:
    controller = create("ml")
    try:
        decision = await controller.decide(ctx("tds", 500.0))  # RB: 60 ppm low -> 37.97 s
    finally:
        controller.close()
    assert decision.controller == "ml"
    (dose,) = decision.doses
    assert dose.actuator == "nutrient" and dose.duty == 255
    assert dose.ms == pytest.approx(37_970, abs=3_000)


async def test_ph_loop_returns_only_ph_pumps(ml: MlController) -> None:
    # Dry air would make the model ask for refill, but that is the tds loop's business.
    decision = await ml.decide(ctx("ph", 4.9, humidity=20.0))
    assert decision.controller == "ml"
    assert [d.actuator for d in decision.doses] == ["ph_up"]
    assert decision.doses[0].ms == pytest.approx(30_000, abs=3_000)


async def test_interaction_learned_no_nutrient_while_ph_out_of_band(ml: MlController) -> None:
    decision = await ml.decide(ctx("tds", 450.0, ph=5.0))
    assert decision.controller == "ml"
    assert decision.doses == ()
    assert "no output" in decision.note


async def test_worker_is_one_named_thread(ml: MlController) -> None:
    await ml.decide(ctx())
    await ml.decide(ctx())
    workers = [t for t in threading.enumerate() if t.name.startswith("hydrogate-ml")]
    assert len(workers) == 1


async def test_node_band_is_mapped_onto_the_model_band(ml: MlController) -> None:
    # Setpoint 800 ± 5 %: 700 ppm is 60 ppm below the band, like 500 ppm for the model.
    decision = await ml.decide(ctx("tds", 700.0, setpoint=800.0, band=(760.0, 840.0)))
    assert decision.controller == "ml"
    (dose,) = decision.doses
    assert dose.actuator == "nutrient"
    assert dose.ms == pytest.approx(37_970, abs=3_000)


def test_to_model_units() -> None:
    assert to_model_units(700, (760, 840), (560, 840), ratio=True) == 500
    assert to_model_units(1000, (760, 840), (560, 840), ratio=True) == 1000
    assert to_model_units(924, (760, 840), (560, 840), ratio=True) == pytest.approx(924)
    assert to_model_units(800, (760, 840), (560, 840), ratio=True) == 700
    assert to_model_units(6.35, (5.85, 6.15), (5.5, 6.5), ratio=False) == pytest.approx(6.7)
    assert to_model_units(5.65, (5.85, 6.15), (5.5, 6.5), ratio=False) == pytest.approx(5.3)


async def test_outputs_clamped_to_the_cap_and_tiny_ones_dropped() -> None:
    fake = FakeModel({"ph_up": 0.0, "ph_down": 0.0, "nutrient": 500.0, "refill": 0.4})
    controller = MlController(model=fake)
    try:
        decision = await controller.decide(ctx())
    finally:
        controller.close()
    assert decision.controller == "ml"
    assert decision.doses == (Dose("nutrient", 255, 63_000),)


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
    fake = FakeModel({"ph_up": 0.0, "ph_down": 0.0, "nutrient": 20.0, "refill": 0.0}, gate)
    controller = MlController(model=fake, deadline_s=0.01)
    try:
        slow = await controller.decide(ctx())
        busy = await controller.decide(ctx())
        assert slow.controller == busy.controller == "rb"
        assert "slower than 10 ms" in slow.note
        assert "still running" in busy.note
        assert slow.doses == await rb_doses(ctx())
        assert fake.calls == 1
        gate.set()
        for _ in range(200):  # the worker finishes the held call, then the model decides again
            again = await controller.decide(ctx())
            if again.controller == "ml":
                break
            await asyncio.sleep(0.005)
        assert again.controller == "ml"
        assert again.doses == (Dose("nutrient", 255, 20_000),)
    finally:
        gate.set()
        controller.close()


@pytest.mark.parametrize(
    ("values", "reason"),
    [({"humidity": 150.0}, "humidity=150 outside"),
     ({"water_temp": math.nan}, "water_temp=nan outside"),
     ({"ph": 2.0}, "ph=2 outside")],
)
async def test_inputs_outside_the_training_range_fall_back(
    ml: MlController, values: dict[str, float], reason: str
) -> None:
    decision = await ml.decide(ctx("tds", 500.0, **values))
    assert decision.controller == "rb"
    assert reason in decision.note
    assert decision.doses == await rb_doses(ctx("tds", 500.0, **values))


async def test_missing_input_falls_back(ml: MlController) -> None:
    context = ctx()
    values = dict(context.values)
    del values["air_temp"]
    context = DecisionContext(loop="tds", setpoint=700, measured=500, previous_error=None,
                              values=values, plant=PlantConstants(), band=(560, 840))
    decision = await ml.decide(context)
    assert decision.controller == "rb" and "missing input air_temp" in decision.note


async def test_non_finite_outputs_fall_back() -> None:
    fake = FakeModel({"ph_up": 0.0, "ph_down": math.nan, "nutrient": 20.0, "refill": 0.0})
    controller = MlController(model=fake)
    try:
        decision = await controller.decide(ctx())
    finally:
        controller.close()
    assert decision.controller == "rb"
    assert "non-finite output for ph_down" in decision.note
    assert decision.doses == await rb_doses(ctx())


async def test_other_plant_falls_back(ml: MlController) -> None:
    decision = await ml.decide(ctx(plant=PlantConstants(tank_volume_l=50.0)))
    assert decision.controller == "rb" and "plant" in decision.note


async def test_recovers_after_a_fallback(ml: MlController, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    caplog.set_level(logging.INFO, logger="rules.ml")
    assert (await ml.decide(ctx(humidity=150.0))).controller == "rb"
    assert (await ml.decide(ctx(humidity=150.0))).controller == "rb"
    assert (await ml.decide(ctx())).controller == "ml"
    # State changes only; a reading outside the trained range is expected operation: INFO.
    assert [r.levelname for r in caplog.records] == ["INFO", "INFO"]


async def test_closed_controller_refuses() -> None:
    controller = MlController(model=Model.load())
    controller.close()
    controller.close()  # idempotent
    with pytest.raises(ControllerError):
        await controller.decide(ctx())
