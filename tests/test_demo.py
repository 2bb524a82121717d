"""`hydrogate demo` runs for real: three simulated tanks, live readings, clean stop."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_shows_three_live_tanks_and_stops_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--duration", "4", "--poll", "0.5",
         "--refresh", "0.5"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    screens = proc.stdout.split("hydrogate demo - ")
    last = screens[-1]
    for tank in ("tank-a", "tank-b", "tank-c"):
        line = next(x for x in last.splitlines() if x.startswith(tank))
        assert " up " in line, line
        # a live pH value in the table, not a dash
        assert any(c.isdigit() for c in line.split()[3]), line
    assert "offline (no ThingsBoard configured)" in last
    assert "demo stopped" in proc.stdout
    received = int(last.split(" received")[0].rsplit(",", 1)[-1].strip())
    assert received >= 9


async def test_time_compressed_demo_reaches_the_setpoints_and_shows_a_refusal() -> None:
    """At the default 20x: within two minutes TDS and pH of both controlled tanks are within
    their bands, under the controller named on the screen, and tank-c's dose is refused."""
    import argparse
    import time

    from gateway.daemon import Gateway
    from gateway.demo import run_demo

    reached: dict[tuple[str, str], float] = {}
    started = time.monotonic()
    seen: dict[str, Gateway] = {}

    def done(gateway: Gateway) -> bool:
        seen["gw"] = gateway
        for name in ("tank-a", "tank-b"):
            runner = gateway.runners[name]
            s, v = runner.control.settings, runner.latest
            assert s is not None
            if "tds" in v and abs(v["tds"] - s.tds_setpoint) <= s.tds_setpoint * s.tds_tolerance_pct / 100:
                reached.setdefault((name, "tds"), time.monotonic() - started)
            if "ph" in v and abs(v["ph"] - s.ph_setpoint) <= s.ph_tolerance:
                reached.setdefault((name, "ph"), time.monotonic() - started)
        refusal = gateway.runners["tank-c"].control.last_refusal
        if refusal is not None:
            reached.setdefault(("tank-c", "refused"), time.monotonic() - started)
        return len(reached) == 5

    args = argparse.Namespace(duration=120.0, speed=20.0, storage=None, broker=None,
                              refresh=1.0, poll=None)
    assert await run_demo(args, until=done) == 0
    print("reached (s):", {k: round(v) for k, v in reached.items()})
    assert len(reached) == 5, f"after 120 s only {sorted(reached)}"
    gateway = seen["gw"]
    # The doses came from the controllers the demo names, pumps 20x as strong as the plant's.
    a, b = gateway.runners["tank-a"].control, gateway.runners["tank-b"].control
    assert a.last_dose is not None and a.last_dose["controller"] == "adaptive"
    assert b.last_dose is not None and b.last_dose["controller"] == "rb"
    refusal = gateway.runners["tank-c"].control.last_refusal
    assert refusal is not None and "water_low" in refusal["reason"]
    assert gateway.config.nodes[0].plant is not None
    assert gateway.config.nodes[0].plant.flow_ml_s["nutrient"] == pytest.approx(1.58 * 20)
