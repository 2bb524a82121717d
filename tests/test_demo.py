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
