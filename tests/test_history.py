"""The local history: forwarded readings kept outside the outbox, retention, and reading them back
(export's and backup's side) from the file while a store writes it."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import zlib
from pathlib import Path
from typing import Any, TypedDict

import pytest

from gateway import storefile, storehistory
from gateway.history import HistoryError, HistoryFile
from gateway.store import Store
from tests.conftest import FakeClock

DAY = 86_400.0
T0 = 1_732_200_000.0


class Entry(TypedDict):
    """One reading as a history chunk holds it."""

    ts: int
    values: dict[str, Any]


def history_rows(path: Path) -> list[tuple[str, int, int, int, list[Entry]]]:
    conn = sqlite3.connect(path)
    try:
        return [
            (device, first, last, n, json.loads(zlib.decompress(data)))
            for device, first, last, n, data in conn.execute(
                "SELECT device, ts_first, ts_last, n, data FROM history ORDER BY id"
            )
        ]
    finally:
        conn.close()


def meta(path: Path) -> dict[str, object]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT key, value FROM meta"))
    finally:
        conn.close()


async def forward_all(store: Store) -> int:
    """What the uplink does: peek everything, acknowledge it."""
    done = 0
    while rows := await store.peek(1000):
        done += await store.ack([r.id for r in rows])
    return done


async def test_forwarded_readings_go_to_the_history_not_the_outbox(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    clock = FakeClock()
    async with Store.open(path, max_rows=None, max_bytes=None, clock=clock,
                          history_days=7) as store:
        # Acknowledged before they were committed: never in the outbox.
        for i in range(20):
            store.append("tank-a" if i % 2 else "tank-b", int(T0 * 1000) + i, {"i": i})
        assert await forward_all(store) == 20
        # Committed first (a flush), acknowledged later: moved from the outbox.
        for i in range(20, 30):
            store.append("tank-a", int(T0 * 1000) + i, {"i": i})
        await store.flush()
        assert store.stats.depth == 10
        assert await forward_all(store) == 10
        await store.flush_history()
        assert store.stats.depth == 0
        assert store.stats.history_readings == 30
        assert store.stats.history_bytes > 0
    chunks = history_rows(path)
    by_device: dict[str, list[int]] = {}
    for device, first, last, n, entries in chunks:
        assert n == len(entries) and entries[0]["ts"] == first and entries[-1]["ts"] == last
        assert [e["ts"] for e in entries] == sorted(e["ts"] for e in entries)
        by_device.setdefault(device, []).extend(int(e["values"]["i"]) for e in entries)
    assert sorted(by_device["tank-a"]) == [i for i in range(30) if i % 2 or i >= 20]
    assert sorted(by_device["tank-b"]) == [i for i in range(20) if not i % 2]
    saved = meta(path)
    assert saved["history_readings"] == 30
    conn = sqlite3.connect(path)
    try:
        assert saved["history_bytes"] == conn.execute(
            "SELECT SUM(length(data)) FROM history").fetchone()[0]
    finally:
        conn.close()


async def test_history_totals_survive_a_restart_and_stay_off_when_disabled(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    clock = FakeClock()
    async with Store.open(path, max_rows=None, max_bytes=None, history_days=7,
                          clock=clock) as store:
        for i in range(50):
            store.append("tank-a", int(T0 * 1000) + i, {"i": i})
        await forward_all(store)
    async with Store.open(path, max_rows=None, max_bytes=None, history_days=7,
                          clock=clock) as store:
        assert store.stats.history_readings == 50
        assert store.stats.history_bytes > 0
    # history_days 0: forwarded readings are forgotten, as before.
    off = tmp_path / "off.db"
    async with Store.open(off, max_rows=None, max_bytes=None, history_days=0) as store:
        for i in range(50):
            store.append("tank-a", int(T0 * 1000) + i, {"i": i})
        await store.flush()
        store.append("tank-a", int(T0 * 1000) + 99, {"i": 99})
        await forward_all(store)
        await store.flush_history()
        assert store.stats.history_readings == 0 and store.stats.depth == 0
    assert history_rows(off) == []


async def test_history_waits_in_memory_a_minute_then_rides_with_a_commit(tmp_path: Path) -> None:
    """Acknowledged readings are not written at once (no write of their own per second)."""
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None, history_days=7,
                          sync_interval=0.2, clock=FakeClock()) as store:
        store.append("tank-a", int(T0 * 1000), {"i": 1})
        await forward_all(store)
        await asyncio.sleep(0.6)  # several sync intervals: nothing to sync, nothing written
        assert history_rows(path) == []
        assert store.stats.history_readings == 0
    assert [n for *_, n, _ in history_rows(path)] == [1]  # the last commit at close


def test_chunks_are_cut_by_count_and_by_span() -> None:
    rows = [("tank-a", i * 1000, f'{{"ts":{i * 1000},"values":{{"i":{i}}}}}')
            for i in range(storehistory.CHUNK_ENTRIES + 10)]
    rows.append(("tank-a", rows[-1][1] + storehistory.SPAN_MS + 1, '{"ts":0,"values":{}}'))
    chunks = storehistory.chunks(reversed(rows))  # any order: sorted by ts per device
    assert [c[3] for c in chunks] == [storehistory.CHUNK_ENTRIES, 10, 1]
    for _device, first, last, n, size, data in chunks:
        assert last - first <= storehistory.SPAN_MS
        assert size == len(data) and len(storehistory.decode(data)) == n


async def test_retention_by_age_and_by_bytes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    clock = FakeClock()
    async with Store.open(path, max_rows=None, max_bytes=None, clock=clock, history_days=2,
                          history_max_bytes=1 << 20) as store:
        for day in range(4):  # one forwarded reading a day, each written as its own chunk
            clock.wall = T0 + day * DAY
            store.append("tank-a", int(clock.wall * 1000), {"day": day})
            await forward_all(store)
            await store.flush_history()
        kept = [e["values"]["day"] for *_, entries in history_rows(path) for e in entries]
        # Day 3 now: day 0 is older than two days and pruned with the write of day 3.
        assert kept == [1, 2, 3]
        assert store.stats.history_readings == 3
    # The byte bound: the oldest chunks go until the table fits.
    small = tmp_path / "small.db"
    async with Store.open(small, max_rows=None, max_bytes=None, clock=clock, history_days=30,
                          history_max_bytes=1 << 20) as store:
        for batch in range(8):  # random text compresses to about half: 1.3 MB in all
            for i in range(400):
                store.append("tank-a", int(clock.wall * 1000) + batch * 1000 + i,
                             {"noise": os.urandom(400).hex()})
            await forward_all(store)
            await store.flush_history()
        assert store.stats.history_bytes <= 1 << 20
        first_kept = history_rows(small)[0][4][0]["ts"]
        assert first_kept > int(clock.wall * 1000)  # the oldest chunks were the ones to go


async def test_reading_the_file_while_the_store_writes(tmp_path: Path) -> None:
    """Export's view: forwarded and buffered readings merged in time order, one snapshot."""
    path = tmp_path / "s.db"
    clock = FakeClock()
    base = int(T0 * 1000)
    async with Store.open(path, max_rows=None, max_bytes=None, clock=clock,
                          history_days=7) as store:
        for i in range(0, 100, 2):
            store.append("tank-a", base + i, {"i": i})
        await forward_all(store)
        await store.flush_history()
        for i in range(1, 100, 2):  # buffered: not forwarded yet
            store.append("tank-a", base + i, {"i": i})
        store.append("tank-b", base, {"other": 1})
        await store.flush()
        with HistoryFile(path) as db, db.snapshot():
            assert db.devices() == ["tank-a", "tank-b"]
            got = [e["values"]["i"] for e in db.entries("tank-a", base, base + 1000)]
            assert got == list(range(100))
            assert db.count("tank-a", base, base + 1000) == 100
            window = [e["ts"] - base for e in db.entries("tank-a", base + 10, base + 19)]
            assert window == list(range(10, 20))
            # The daemon goes on: what it commits now is not in this snapshot.
            store.append("tank-a", base + 500, {"i": 500})
            await store.flush()
            assert [e["values"]["i"] for e in db.entries("tank-a", base + 400, base + 600)] == []
        with HistoryFile(path) as db, db.snapshot():
            assert [e["values"]["i"] for e in db.entries("tank-a", base + 400, base + 600)] == [500]


async def test_an_export_open_before_a_new_key_list_reads_the_rows_that_use_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    base = int(T0 * 1000)
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        store.append("tank-a", base, {"ph": 6.0})
        await store.flush()
        with HistoryFile(path) as db:  # it read the file's key lists when it opened
            store.append("tank-a", base + 1, {"ph": 6.1, "ec": 1.4})  # a list it does not know
            await store.flush()
            with db.snapshot():
                assert [e["values"] for e in db.entries("tank-a", base, base + 10)] == [
                    {"ph": 6.0}, {"ph": 6.1, "ec": 1.4}
                ]


async def test_backup_is_a_consistent_copy_while_the_store_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    copy = tmp_path / "copy.db"
    async with Store.open(path, max_rows=None, max_bytes=None, history_days=7) as store:
        for i in range(3000):
            store.append("tank-a", int(T0 * 1000) + i, {"i": i, "pad": "x" * 200})
        await store.flush()
        steps: list[tuple[int, int]] = []
        done = asyncio.Event()

        async def keep_writing() -> None:
            n = 10_000
            while not done.is_set():
                store.append("tank-a", int(T0 * 1000) + n, {"i": n})
                n += 1
                await asyncio.sleep(0.001)

        writer = asyncio.create_task(keep_writing())
        with HistoryFile(path) as db:
            await asyncio.to_thread(db.backup, copy, progress=lambda c, t: steps.append((c, t)))
        done.set()
        await writer
    assert len(steps) > 2 and steps[-1][0] == steps[-1][1]
    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("PRAGMA quick_check").fetchone() == ("ok",)
        ids = [values["i"] for _, _, _, values in storefile.outbox_values(conn)]
        assert ids[:3000] == list(range(3000))  # everything committed before the start
    finally:
        conn.close()


def test_history_file_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="no such file"):
        HistoryFile(tmp_path / "missing.db")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(HistoryError, match="not a hydrogate buffer"):
        HistoryFile(other)
