"""The clock: steps noticed and logged once, NTP sync, unique stamps, held readings re-stamped."""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from bench.shims import build, set_clock
from gateway.clock import STAMP_SEARCH_MS, ClockEvent, Stamps, TimeKeeper, describe_seconds
from gateway.store import Store
from tests.conftest import FakeClock

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000


# ------------------------------------------------------------------ Stamps
def test_stamps_are_the_clock_when_they_are_new() -> None:
    s = Stamps()
    assert [s.unique("a", t) for t in (1000, 1500, 2000)] == [1000, 1500, 2000]
    assert s.unique("b", 1000) == 1000  # devices are independent


def test_same_millisecond_takes_the_free_one_below_never_above() -> None:
    s = Stamps()
    assert [s.unique("a", 5000) for _ in range(4)] == [5000, 4999, 4998, 4997]
    assert s.last("a") == 5000


def test_after_a_backward_step_stamps_follow_the_clock_and_avoid_old_ones() -> None:
    s = Stamps()
    old = [s.unique("a", 10_000 + 1000 * i) for i in range(10)]  # 10 000 .. 19 000
    assert s.unique("a", 12_500) == 12_500  # the clock went back 6.5 s: followed
    assert s.unique("a", 13_000) == 12_999  # 13 000 was taken before the step
    assert s.unique("a", 13_000) == 12_998
    assert len({*old, 12_500, 12_999, 12_998}) == 13


def test_a_device_faster_than_one_reading_per_ms_goes_one_past_the_newest() -> None:
    s = Stamps()
    stamps = [s.unique("a", 1000) for _ in range(STAMP_SEARCH_MS + 3)]
    assert sorted(stamps) == list(range(min(stamps), max(stamps) + 1))  # unique, packed
    assert min(stamps) > 1000 - STAMP_SEARCH_MS  # a few ms below the clock at most...
    assert max(stamps) == 1003  # ...then past it, only once every ms below is taken


def test_stamps_older_than_memory_are_taken_as_they_are() -> None:
    s = Stamps(memory=4)
    for t in range(100, 120):
        s.unique("a", t)
    assert s.unique("a", 50) == 50  # older than anything remembered: cannot tell, not moved


def test_seeded_stamps_from_before_a_restart_are_avoided() -> None:
    s = Stamps()
    s.seed("a", 7000)
    assert s.unique("a", 7000) == 6999


# -------------------------------------------------------------- TimeKeeper
def test_each_step_is_logged_once_with_its_size(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    keeper = TimeKeeper(clock, probe=lambda: True)
    caplog.set_level(logging.INFO, logger="hydrogate.clock")
    clock.advance(0.5)
    assert keeper.check() == []  # time passing is not a step
    clock.wall -= 3600
    assert keeper.check() == [ClockEvent("step", -3600.0)]
    assert keeper.check() == []
    clock.wall += 3 * 86400 + 1.25
    [event] = keeper.check()
    assert event.kind == "step" and event.size_s == pytest.approx(3 * 86400 + 1.25)
    clock.wall += 0.05  # a slew-sized change is no step
    assert keeper.check() == []
    lines = [r.getMessage() for r in caplog.records if "stepped" in r.getMessage()]
    assert lines == [
        "system clock stepped by -1 h 0 min 0.0 s (synchronised): readings follow the corrected clock",
        "system clock stepped by +3 d 0 h 0 min 1.2 s (synchronised): readings follow the corrected"
        " clock",
    ]
    assert keeper.steps == 2


def test_synchronisation_counts_after_two_checks_without_a_step() -> None:
    clock = FakeClock(wall=1_732_200_000.0 - 3 * 86400)
    synced = False
    keeper = TimeKeeper(clock, probe=lambda: synced)
    assert not keeper.synchronized
    assert keeper.check() == []
    synced = True  # the NTP client says so before its step lands...
    assert keeper.check() == []
    clock.wall += 3 * 86400  # ...and steps
    assert [e.kind for e in keeper.check()] == ["step"]
    assert not keeper.synchronized
    assert keeper.check() == [ClockEvent("synchronized")]
    assert keeper.synchronized
    assert keeper.offset == pytest.approx(1_732_200_000.0 - 1000.0)


def test_unknown_sync_state_trusts_the_clock() -> None:
    assert TimeKeeper(FakeClock(), probe=lambda: None).synchronized


def test_describe_seconds() -> None:
    assert describe_seconds(0.42) == "+0.4 s"
    assert describe_seconds(-3600) == "-1 h 0 min 0.0 s"
    assert describe_seconds(61.5) == "+1 min 1.5 s"


# -------------------------------------------------------- adjtimex, the shim
def test_the_kernel_sync_probe_reads_adjtimex_through_the_clock_shim(tmp_path: Path) -> None:
    """The shim the daemon tests step clocks with: wall clock shifted, NTP state faked."""
    shim = build("clockshift", tmp_path)
    state = tmp_path / "clock"
    set_clock(state, -3 * 86400, synced=False)
    code = (
        "import time, sys\n"
        "from gateway.clock import kernel_synchronized\n"
        "from bench.shims import set_clock\n"
        "from pathlib import Path\n"
        "m = time.monotonic(); w = time.time()\n"
        "print(kernel_synchronized(), round(w))\n"
        "time.sleep(0.05)\n"
        "set_clock(Path(sys.argv[1]), 0.0, synced=True)\n"
        "time.sleep(0.05)\n"
        "print(kernel_synchronized(), round(time.time()), round(time.monotonic() - m, 1))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(state)],
        env={"LD_PRELOAD": str(shim), "CLOCKSHIFT_FILE": str(state), "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=30,
    ).stdout.split("\n")
    now = datetime.datetime.now().timestamp()
    unsynced, before = out[0].split()
    synced, after, slept = out[1].split()
    assert (unsynced, synced) == ("False", "True")
    assert abs(int(before) - (now - 3 * 86400)) < 10
    assert abs(int(after) - now) < 10
    assert float(slept) == pytest.approx(0.1, abs=0.08)  # monotonic time and sleep untouched


# --------------------------------------------------------- held, re-stamped
async def test_readings_taken_before_the_sync_are_held_then_restamped(tmp_path: Path) -> None:
    true_wall = 1_732_200_000.0
    clock = FakeClock(wall=true_wall - 3 * 86400)  # booted three days behind
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None, clock=clock) as store:
        store.append("tank-a", 1000, {"v": 0})  # before the hold: forwarded as stamped
        store.hold()
        for i in range(1, 6):
            clock.advance(1.0)
            store.append("tank-a", int(clock.time() * 1000), {"v": i})
            store.append("tank-a", int(clock.time() * 1000), {"v": -i})  # same ms: unique
        await store.flush()
        assert [json.loads(r.entry)["values"]["v"] for r in await store.peek(100)] == [0]
        assert store.stats.depth == 11
        clock.wall += 3 * 86400  # NTP steps the clock right
        clock.advance(2.0)
        offset_ms = round((clock.time() - clock.monotonic()) * 1000)
        assert await store.release(offset_ms) == 10
        store.append("tank-a", int(clock.time() * 1000), {"v": 99})
        rows = await store.peek(100)
    values = [json.loads(r.entry)["values"]["v"] for r in rows]
    assert values == [0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 99]
    stamps = [r.ts for r in rows[1:]]
    assert [json.loads(r.entry)["ts"] for r in rows[1:]] == stamps
    expected = [int((true_wall + i) * 1000) for i in range(1, 6) for _ in (0, 1)]
    assert all(abs(ts - want) <= 1 for ts, want in zip(stamps, expected, strict=False))
    assert len(set(stamps)) == len(stamps)
    assert stamps[-1] == int((true_wall + 7) * 1000)


async def test_held_readings_survive_a_restart_in_the_same_boot(tmp_path: Path) -> None:
    clock = FakeClock(wall=1_732_200_000.0 - 3600)  # an hour behind
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None, clock=clock) as store:
        store.hold()
        store.append("tank-a", int(clock.time() * 1000), {"v": 1})
    clock.advance(5.0)
    async with Store.open(path, max_rows=None, max_bytes=None, clock=clock) as store:
        assert store.holding  # held rows of this boot: still held
        assert await store.peek(10) == []
        clock.wall += 3600
        offset = round((clock.time() - clock.monotonic()) * 1000)
        assert await store.release(offset) == 1
        [row] = await store.peek(10)
        assert row.ts == int((1_732_200_000.0 - 3600 + 3600) * 1000)


def test_an_unsynchronised_clock_nothing_will_ever_sync_is_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.clock as clock

    monkeypatch.setattr(clock, "TIMESYNC_FLAG", tmp_path / "not-there")
    monkeypatch.setattr(clock, "TIME_CLIENT_TRACES", ())
    alone = clock.kernel_synchronized()
    monkeypatch.setattr(clock, "TIME_CLIENT_TRACES", (tmp_path,))  # a client has run here
    attended = clock.kernel_synchronized()
    # A synchronised clock is synchronised either way; an unsynchronised one is waited
    # for only where a client could synchronise it.
    assert (alone, attended) in {(True, True), (None, False), (False, False)}
    if alone is None:
        assert TimeKeeper(FakeClock(), probe=lambda: alone).unattended


def test_a_stamp_given_back_is_free_again() -> None:
    s = Stamps()
    assert s.unique("a", 5000) == 5000
    assert s.unique("a", 5000) == 4999
    s.give_back("a", 4999)
    assert s.unique("a", 5000) == 4999
    s.give_back("a", 5000)  # the newest: the one before is the newest again
    assert s.last("a") == 4999
    assert s.unique("a", 5000) == 5000
