"""Run the firmware's real main loop under CPython on the fake board (test-only).

    python tests/fakeboard/run_node.py WORLD.json CONFIG.json [WATCHDOG_MS]

MicroPython's ``time.ticks_ms``/``ticks_diff``/``sleep_us`` are added to
CPython's ``time`` in this process only; the tick counter starts 5 s before
its 2^30 wrap, so the firmware's clock crosses a wrap in every run.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent / "firmware")]

TICKS_PERIOD = 1 << 30
_START = time.monotonic()
_OFFSET = TICKS_PERIOD - 5000


def ticks_ms() -> int:
    return (int((time.monotonic() - _START) * 1000) + _OFFSET) % TICKS_PERIOD


def ticks_diff(a: int, b: int) -> int:
    return ((a - b + TICKS_PERIOD // 2) % TICKS_PERIOD) - TICKS_PERIOD // 2


def main() -> None:
    assert isinstance(sys.stdout, io.TextIOWrapper)  # a pipe to the test, never replaced
    sys.stdout.reconfigure(line_buffering=True)
    time.ticks_ms = ticks_ms  # type: ignore[attr-defined]
    time.ticks_diff = ticks_diff  # type: ignore[attr-defined]
    time.sleep_us = lambda us: time.sleep(us / 1e6)  # type: ignore[attr-defined]
    time.sleep_ms = lambda ms: time.sleep(ms / 1e3)  # type: ignore[attr-defined]
    import machine

    machine.load_world(sys.argv[1])
    import app

    watchdog = int(sys.argv[3]) if len(sys.argv) > 3 else app.WATCHDOG_MS
    app.main(sys.argv[2], watchdog)


if __name__ == "__main__":
    main()
