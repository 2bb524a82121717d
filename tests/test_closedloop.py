"""The closed-loop training data: tanks, episodes and labels are what models/closedloop.py says."""

from __future__ import annotations

import copy
import logging
import random
from collections import Counter

import numpy as np
import pytest

from models.closedloop import (
    AIM_PCT,
    SEED,
    episode_rows,
    held_out,
    landing,
    training_tank,
    worst_case,
)
from rules.mlpolicy import FEATURES, OUTPUT_SCALE, RANGES, TdsQuery
from sim.plant import PlantParams, Reservoir
from sim.tanks import CONFIGS, draw


def test_tanks_are_reproducible_and_the_level_sensor_is_not_tied_to_the_config() -> None:
    assert training_tank(SEED, 7) == training_tank(SEED, 7)
    assert training_tank(SEED, 7) != training_tank(SEED, 8)
    tanks = [training_tank(SEED, e) for e in range(90)]
    assert set(Counter(t.config for t in tanks)) <= set(CONFIGS)
    for right in (True, False):  # with and without a level sensor, whatever the volume's config
        hidden = [bool(t.hidden) for t in tanks
                  if (t.told.tank_volume_l == t.params.volume_l) == right]
        assert 0 < sum(hidden) < len(hidden)
    stocks = [t.params.stock_ppm for t in tanks]
    assert min(stocks) < 8000 and max(stocks) > 15000
    volume_right = [t for t in tanks if t.told.tank_volume_l == t.params.volume_l]
    assert 20 < len(volume_right) < 70
    # A right volume says nothing about the stock: each constant is wrong on its own.
    assert any(t.told.stock_ppm != t.params.stock_ppm for t in volume_right)
    assert any(t.told.stock_ppm == t.params.stock_ppm for t in volume_right)
    for t in tanks:  # the config's stock is the tank's, 20 % wrong at most
        assert 0.8 <= t.told.stock_ppm / t.params.stock_ppm <= 1.2


def test_landing_dose_is_the_mass_balance_on_a_simple_tank() -> None:
    params = PlantParams(volume_l=10.0, nutrient_flow_ml_s=6.0, capacity_l=20.0,
                         uptake_per_h=0.0, evaporation_l_per_h=0.0)
    plant = Reservoir.from_state(tds=400.0, ph=6.0, params=params)
    aim = 700.0 * (1 - AIM_PCT / 100)
    seconds = landing(copy.deepcopy(plant), "nutrient", "tds", aim, 600.0)
    litres = 10.0 * (aim - 400.0) / (10_000.0 - aim)
    assert seconds == pytest.approx(litres * 1000 / 6.0, rel=0.002)
    assert landing(copy.deepcopy(plant), "nutrient", "tds", 390.0, 600.0) == 0.0
    assert landing(copy.deepcopy(plant), "nutrient", "tds", 9000.0, 60.0) is None
    # pH: a strong base up to 6.5 lands where the tank's titration says.
    ph_s = landing(copy.deepcopy(plant), "ph_up", "ph", 6.5, 600.0)
    per_l = plant.titration_ml_per_l("ph_up", 6.0, 6.5)
    assert ph_s == pytest.approx(per_l * 10.0 / params.ph_up_flow_ml_s, rel=0.02)


def test_a_first_dose_is_labelled_on_the_worst_tank_the_config_allows() -> None:
    tank = draw(random.Random(4), "t", "right")  # the config tells the truth, here
    plant = Reservoir.from_state(tds=500.0, ph=6.0, params=tank.params)
    v, cs, q = tank.params.volume_l, tank.params.stock_ppm, tank.params.nutrient_flow_ml_s
    aim = 560.0
    truly = landing(copy.deepcopy(plant), "nutrient", "tds", aim, 1e4)
    assert truly == pytest.approx(v * (aim - 500) / (cs - aim) / q * 1000, rel=0.002)
    for level_known, volume in ((0.0, v / 1.2), (1.0, v)):
        query = TdsQuery("nutrient", 1.0, {"level_known": level_known})
        worst = landing(worst_case(copy.deepcopy(plant), tank, query), "nutrient", "tds", aim,
                        1e4)
        # Stock and flow 1/0.8 of the configured, the volume 1/1.2 of it unless measured.
        expected = volume * (aim - 500) / (cs / 0.8 - aim) / (q / 0.8) * 1000
        assert worst == pytest.approx(expected, rel=0.002)


def test_an_episode_is_reproducible_labelled_and_in_range(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    caplog.set_level(logging.ERROR)
    a, b = episode_rows(SEED, 3), episode_rows(SEED, 3)
    assert a.sha256() == b.sha256() and len(a) > 3
    assert set(a.target.tolist()) == {0, 1}
    for i, name in enumerate(FEATURES):
        low, high = RANGES[name]
        assert ((a.x[:, i] >= low) & (a.x[:, i] <= high)).all(), name
    assert (a.y >= 0).all()
    assert (a.y[a.target == 0] <= OUTPUT_SCALE["tds_fraction"]).all()
    assert (a.y[a.target == 1] <= 1.0).all()
    assert np.isin(a.episode, [3]).all() and not held_out(3) and held_out(5)
