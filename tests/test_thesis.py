"""The thesis's fuzzy and close-loop controllers (docs/references.md, "Thesis: control")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skfuzzy as fz  # the reference for the fuzzy engine (a test dependency)
from hypothesis import given
from hypothesis import strategies as st

from rules.controller import ControllerError, DecisionContext, Dose, PlantConstants, create, names
from rules.thesis import PH_SYSTEM, SYSTEMS, TDS_SYSTEM, Loop, Method, doses_for, thesis_output

# The rule tables as docs/references.md prints them (rows error NB..PB, columns Δerror NB..PB),
# typed again here rather than imported, so the test checks the module's data.
REF = {
    "tds": {
        "pwm": ["F F F F M", "M M M M M", "S S S S S", "M M M M M", "M F F F F"],
        "time_ms": ["L L L M M", "M M M M M", "M B B B M", "M M M M M", "L L L L L"],
    },
    "ph": {
        "pwm": ["F F F F M", "M M M M M", "S S S S S", "M M M M M", "M F F F F"],
        "time_ms": ["L L L M B", "L L M B B", "M B B B M", "B B M L L", "B M L L L"],
    },
}
LEVELS = {
    "tds": {"pwm": {"S": 178, "M": 204, "F": 255}, "time_ms": {"B": 0, "M": 1000, "L": 2000}},
    "ph": {"pwm": {"S": 127, "M": 178, "F": 255}, "time_ms": {"B": 0, "M": 2500, "L": 5000}},
}
# Points where exactly one set of each input has full membership (and no other any).
PEAKS: dict[Loop, tuple[list[float], list[float]]] = {
    "tds": ([-200, -100, 0, 100, 200], [-100, -50, 0, 50, 100]),
    "ph": ([-0.4, -0.1, 0, 0.1, 0.4], [-0.4, -0.1, 0, 0.1, 0.4]),
}
Trapezoid = tuple[float, float, float, float]
# Per loop: the error's sets, the Δerror's sets, the error's and the Δerror's universe.
SETS_REF: dict[Loop, tuple[list[Trapezoid], list[Trapezoid], tuple[float, float],
                           tuple[float, float]]] = {
    "tds": (
        [(-250, -250, -200, -100), (-200, -100, -100, 0), (-100, 0, 0, 100), (0, 100, 100, 200),
         (100, 200, 250, 250)],
        [(-150, -150, -100, -50), (-100, -50, -50, 0), (-50, 0, 0, 50), (0, 50, 50, 100),
         (50, 100, 150, 150)],
        (-250, 250), (-150, 150),
    ),
    "ph": (
        [(-1.5, -1.5, -0.4, -0.1), (-0.4, -0.1, -0.1, 0), (-0.1, 0, 0, 0.1), (0, 0.1, 0.1, 0.4),
         (0.1, 0.4, 1.5, 1.5)],
        [(-1.5, -1.5, -0.4, -0.1), (-0.4, -0.1, -0.1, 0), (-0.1, 0, 0, 0.1), (0, 0.1, 0.1, 0.4),
         (0.1, 0.4, 1.5, 1.5)],
        (-1.5, 1.5), (-1.5, 1.5),
    ),
}


def table_value(loop: Loop, output: str, i: int, j: int) -> int:
    return LEVELS[loop][output][REF[loop][output][i].split()[j]]


@pytest.mark.parametrize("loop", ["tds", "ph"])
def test_sets_are_the_thesis_sets(loop: Loop) -> None:
    e_sets, de_sets, e_uni, de_uni = SETS_REF[loop]
    system = SYSTEMS[loop]
    e_var, de_var = system.inputs
    assert [mf.points for mf in e_var.sets.values()] == [tuple(map(float, p)) for p in e_sets]
    assert [mf.points for mf in de_var.sets.values()] == [tuple(map(float, p)) for p in de_sets]
    assert (e_var.universe, de_var.universe) == (e_uni, de_uni)
    assert len(system.rules) == 25


@pytest.mark.parametrize("method", ["sugeno", "mamdani"])
@pytest.mark.parametrize("loop", ["tds", "ph"])
def test_all_25_peaks_give_the_table(loop: Loop, method: Method) -> None:
    es, des = PEAKS[loop]
    e, de = np.meshgrid(es, des, indexing="ij")
    out = thesis_output(loop, e, de, method)
    want_pwm = [[table_value(loop, "pwm", i, j) for j in range(5)] for i in range(5)]
    want_time = [[table_value(loop, "time_ms", i, j) for j in range(5)] for i in range(5)]
    assert out.pwm.tolist() == want_pwm
    assert out.time_ms.tolist() == want_time
    assert out.fired.all()


def test_tds_mixed_case_by_hand() -> None:
    # e = 50: Z 0.5, PK 0.5; de = -20: NK 0.4, Z 0.6.
    # Z/NK 0.4 -> S,B; Z/Z 0.5 -> S,B; PK/NK 0.4 -> M,M; PK/Z 0.5 -> M,M.
    r = TDS_SYSTEM.sugeno(50.0, -20.0)
    assert float(r.outputs["pwm"]) == pytest.approx((0.9 * 178 + 0.9 * 204) / 1.8)
    assert float(r.outputs["time_ms"]) == pytest.approx(0.9 * 1000 / 1.8)
    out = thesis_output("tds", 50.0, -20.0)
    assert (int(out.pwm), int(out.time_ms)) == (191, 500)


def test_ph_mixed_case_by_hand() -> None:
    # e = 0.3: PK 1/3, PB 2/3; de = -0.05: NK 0.5, Z 0.5.
    # PK/NK 1/3 -> M,B; PK/Z 1/3 -> M,M; PB/NK 0.5 -> F,M; PB/Z 0.5 -> F,L.
    w = [1 / 3, 1 / 3, 0.5, 0.5]
    pwm = (w[0] * 178 + w[1] * 178 + w[2] * 255 + w[3] * 255) / sum(w)
    time = (w[0] * 0 + w[1] * 2500 + w[2] * 2500 + w[3] * 5000) / sum(w)
    r = PH_SYSTEM.sugeno(0.3, -0.05)
    assert float(r.outputs["pwm"]) == pytest.approx(pwm)
    assert float(r.outputs["time_ms"]) == pytest.approx(time)
    out = thesis_output("ph", 0.3, -0.05)
    assert (int(out.pwm), int(out.time_ms)) == (int(pwm), 2750)  # truncated, 2750 not 2749


def test_no_rule_fallback_of_the_firmware() -> None:
    tds = thesis_output("tds", np.nan, 0.0)
    ph = thesis_output("ph", 0.2, np.nan)
    assert (int(tds.pwm), int(tds.time_ms), bool(tds.fired)) == (255, 2000, False)
    assert (int(ph.pwm), int(ph.time_ms), bool(ph.fired)) == (255, 5000, False)


@pytest.mark.parametrize("loop", ["tds", "ph"])
def test_inputs_beyond_the_universe_act_like_its_edge(loop: Loop) -> None:
    big = 1000.0 if loop == "tds" else 10.0
    edge_e = 250.0 if loop == "tds" else 1.5
    edge_de = 150.0 if loop == "tds" else 1.5
    for s in (-1, 1):
        a = thesis_output(loop, s * big, s * big)
        b = thesis_output(loop, s * edge_e, s * edge_de)
        assert (int(a.pwm), int(a.time_ms)) == (int(b.pwm), int(b.time_ms))


@given(st.floats(-400, 400), st.floats(-300, 300))
def test_tds_outputs_within_levels(e: float, de: float) -> None:
    methods: tuple[Method, ...] = ("sugeno", "mamdani")
    for method in methods:
        out = thesis_output("tds", e, de, method)
        assert 178 <= int(out.pwm) <= 255
        assert 0 <= int(out.time_ms) <= 2000


def test_sanity_properties_on_a_grid() -> None:
    e = np.linspace(-250, 250, 101)
    out = thesis_output("tds", e, np.zeros_like(e))
    # With Δerror zero: the far error gets the longest time, on-target none, and the
    # time grows with |error| away from zero (the Z row is short, PK/NK medium, PB/NB long).
    assert out.time_ms[0] == out.time_ms[-1] == 2000
    assert out.time_ms[50] == 0
    assert (np.diff(out.time_ms[50:]) >= 0).all()
    assert (np.diff(out.time_ms[:51]) <= 0).all()
    # PWM is slowest at zero error and never slower anywhere else.
    assert out.pwm[50] == 178
    assert (out.pwm >= 178).all()
    # pH: approaching the setpoint fast from below (error positive and shrinking, Δerror < 0)
    # doses less than drifting away (Δerror > 0).
    closing = thesis_output("ph", 0.2, -0.2)
    drifting = thesis_output("ph", 0.2, 0.2)
    assert int(closing.time_ms) < int(drifting.time_ms)


def test_pump_mapping() -> None:
    assert doses_for("tds", 10.0, 204, 1000) == (Dose("nutrient", 204, 1000),)
    assert doses_for("tds", 0.0, 178, 500) == (Dose("nutrient", 178, 500),)
    assert doses_for("tds", -10.0, 204, 1000) == (Dose("refill", 255, 1000),)
    assert doses_for("ph", 0.2, 178, 2500) == (Dose("ph_up", 178, 2500),)
    assert doses_for("ph", -0.2, 178, 2500) == (Dose("ph_down", 178, 2500),)
    assert doses_for("ph", 0.2, 178, 0) == ()


def ctx(loop: Loop, setpoint: float, measured: float, previous: float | None,
        band: tuple[float, float]) -> DecisionContext:
    return DecisionContext(loop, setpoint, measured, previous, {}, PlantConstants(), band)


async def test_fuzzy_controller_decides() -> None:
    fuzzy = create("fuzzy")
    assert fuzzy.name == "fuzzy"
    # Thesis day 1: TDS 254 with setpoint 700 -> error 446 (PB), first step Δerror 0.
    d = await fuzzy.decide(ctx("tds", 700, 254, None, (665, 735)))
    assert d.doses == (Dose("nutrient", 255, 2000),)
    assert d.controller == "fuzzy"
    # Too strong: refill, time only. e = -145: NB 0.45, NK 0.55; Δe = 5: Z 0.9, PK 0.1.
    # NB/Z 0.45 -> L; NB/PK 0.1, NK/Z 0.55, NK/PK 0.1 -> M: (0.45·2000 + 0.75·1000) / 1.2.
    d = await fuzzy.decide(ctx("tds", 800, 945, -150.0, (760, 840)))
    assert d.doses == (Dose("refill", 255, 1375),)
    # pH 5.63 -> 6.5: error 0.87 (PB), Δerror vs previous 0.9 is -0.03.
    d = await fuzzy.decide(ctx("ph", 6.5, 5.63, 0.9, (6.35, 6.65)))
    want = thesis_output("ph", 6.5 - 5.63, (6.5 - 5.63) - 0.9)
    assert d.doses == (Dose("ph_up", int(want.pwm), int(want.time_ms)),)
    d = await fuzzy.decide(ctx("ph", 6.5, 7.15, None, (6.35, 6.65)))
    assert [x.actuator for x in d.doses] == ["ph_down"]
    # On the setpoint with no change: short time, no dose.
    d = await fuzzy.decide(ctx("ph", 6.0, 6.0, 0.0, (5.85, 6.15)))
    assert d.doses == ()
    with pytest.raises(ControllerError):
        await fuzzy.decide(ctx("ph", 6.0, math.nan, None, (5.85, 6.15)))
    fuzzy.close()


async def test_mamdani_and_closeloop_controllers() -> None:
    mamdani = create("mamdani")
    d = await mamdani.decide(ctx("tds", 700, 254, None, (665, 735)))
    assert d.doses == (Dose("nutrient", 255, 2000),)
    assert d.controller == "mamdani"
    close = create("closeloop")
    assert (await close.decide(ctx("tds", 700, 600, None, (665, 735)))).doses == (
        Dose("nutrient", 255, 2000),
    )
    assert (await close.decide(ctx("tds", 700, 800, None, (665, 735)))).doses == (
        Dose("refill", 255, 2000),
    )
    assert (await close.decide(ctx("ph", 5.5, 5.0, None, (5.35, 5.65)))).doses == (
        Dose("ph_up", 255, 5000),
    )
    assert (await close.decide(ctx("ph", 5.0, 5.5, None, (4.85, 5.15)))).doses == (
        Dose("ph_down", 255, 5000),
    )
    assert (await close.decide(ctx("ph", 5.5, 5.6, None, (5.35, 5.65)))).doses == ()
    assert {"fuzzy", "mamdani", "closeloop", "rb"} <= set(names())


# ------------------------------------------------ cross-check with scikit-fuzzy

def _reference_sugeno(loop: Loop, e: float, de: float) -> tuple[float, float] | None:
    """Independent Sugeno with scikit-fuzzy's membership functions, one point at a time."""
    e_sets, de_sets, (elo, ehi), (dlo, dhi) = SETS_REF[loop]
    e, de = min(max(e, elo), ehi), min(max(de, dlo), dhi)
    mu_e = [float(fz.trapmf(np.array([e]), list(p))[0]) for p in e_sets]
    mu_de = [float(fz.trapmf(np.array([de]), list(p))[0]) for p in de_sets]
    num_pwm = num_time = den = 0.0
    for i in range(5):
        for j in range(5):
            w = min(mu_e[i], mu_de[j])
            num_pwm += w * table_value(loop, "pwm", i, j)
            num_time += w * table_value(loop, "time_ms", i, j)
            den += w
    if den == 0:
        return None
    return num_pwm / den, num_time / den


@pytest.mark.parametrize("loop", ["tds", "ph"])
def test_sugeno_matches_scikit_fuzzy(loop: Loop) -> None:
    rng = np.random.default_rng(7)
    scale = (300.0, 200.0) if loop == "tds" else (1.8, 1.8)
    e = rng.uniform(-scale[0], scale[0], 400)
    de = rng.uniform(-scale[1], scale[1], 400)
    got = SYSTEMS[loop].sugeno(e, de)
    for k in range(len(e)):
        ref = _reference_sugeno(loop, float(e[k]), float(de[k]))
        assert ref is not None
        assert got.outputs["pwm"][k] == pytest.approx(ref[0], abs=1e-9)
        assert got.outputs["time_ms"][k] == pytest.approx(ref[1], abs=1e-9)


@pytest.mark.parametrize("loop", ["tds", "ph"])
def test_mamdani_matches_scikit_fuzzy(loop: Loop) -> None:
    rng = np.random.default_rng(11)
    system = SYSTEMS[loop]
    scale = (260.0, 160.0) if loop == "tds" else (1.6, 1.6)
    e = rng.uniform(-scale[0], scale[0], 60)
    de = rng.uniform(-scale[1], scale[1], 60)
    got = system.mamdani(e, de)
    strengths = system.strengths(e, de)  # (25, n)
    for output in ("pwm", "time_ms"):
        levels = LEVELS[loop][output]
        values = sorted(levels.values())
        # The documented derived sets: symmetric triangles, half-width = nearest neighbour.
        half = {lb: min(abs(v - w) for w in values if w != v) for lb, v in levels.items()}
        lo = min(v - half[lb] for lb, v in levels.items())
        hi = max(v + half[lb] for lb, v in levels.items())
        z = np.linspace(lo, hi, 20001)
        mfs = {lb: fz.trimf(z, [v - half[lb], v, v + half[lb]]) for lb, v in levels.items()}
        labels = [REF[loop][output][i].split()[j] for i in range(5) for j in range(5)]
        for k in range(len(e)):
            agg = np.zeros_like(z)
            for r, lb in enumerate(labels):
                agg = np.fmax(agg, np.fmin(strengths[r, k], mfs[lb]))
            want = fz.defuzz(z, agg, "centroid")
            assert got.outputs[output][k] == pytest.approx(want, abs=(hi - lo) * 1e-3)
