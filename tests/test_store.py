"""The SQLite outbox: order, timestamps, retention, validation, crash safety, settings."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.store import SCHEMA_VERSION, InvalidMessage, Store, StoreClosed, StoreError

ROOT = Path(__file__).resolve().parent.parent


def _stored_bytes(path: Path) -> int:
    """What the file's outbox holds, as the store counts it (device and stored text)."""
    conn = sqlite3.connect(path)
    try:
        (size,) = conn.execute("SELECT SUM(length(device) + length(entry)) FROM outbox").fetchone()
    finally:
        conn.close()
    return int(size)


async def test_rows_come_back_in_order_with_their_entries(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        for i in range(10):
            store.append("tank-a" if i % 2 else "tank-b", 1000 + i, {"i": i, "ph": 6.0 + i})
        await store.flush()
        rows = await store.peek(100)
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        assert [json.loads(r.entry)["values"]["i"] for r in rows] == list(range(10))
        assert all(json.loads(r.entry)["ts"] == r.ts for r in rows)
        assert store.stats.received == 10
        assert store.stats.depth == 10
        # bytes counts what is stored (values against a key list: far less than the entries).
        assert store.stats.bytes == _stored_bytes(tmp_path / "s.db")
        assert store.stats.bytes < sum(len(r.device) + len(r.entry) for r in rows) / 2
        later = await store.peek(3, after_id=rows[4].id)
        assert later == rows[5:8]


async def test_peek_max_bytes_returns_at_least_one_row(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        for i in range(5):
            store.append("tank-a", i, {"v": i})
        rows = await store.peek(10)
        one = len(rows[0].device) + len(rows[0].entry)
        assert len(await store.peek(10, max_bytes=1)) == 1
        assert len(await store.peek(10, max_bytes=2 * one)) == 2
        assert len(await store.peek(10, max_bytes=2 * one + 1)) == 2


async def test_timestamps_are_unique_per_device_and_never_ahead_of_the_clock(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        store.append("tank-a", 1000, {"v": 1})
        store.append("tank-a", 1000, {"v": 2})  # same ms: the free ms just before
        store.append("tank-a", 900, {"v": 3})  # clock stepped back: follows it
        store.append("tank-a", 999, {"v": 4})  # taken: the next free one below
        store.append("tank-b", 1000, {"v": 5})  # other device: untouched
        store.append("tank-a", 5000, {"v": 6})
        rows = await store.peek(10)
        await store.ack([r.id for r in rows])  # the outbox is empty again
    assert [(r.device, r.ts) for r in rows] == [
        ("tank-a", 1000),
        ("tank-a", 999),
        ("tank-a", 900),
        ("tank-a", 998),
        ("tank-b", 1000),
        ("tank-a", 5000),
    ]
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        store.append("tank-a", 5000, {"v": 7})  # the newest stamp survives the restart
        store.append("tank-a", 4000, {"v": 8})  # an older clock is followed, not overtaken
        new = await store.peek(10)
        assert [(r.ts, json.loads(r.entry)["ts"]) for r in new] == [(4999, 4999), (4000, 4000)]
        assert new[0].id > rows[-1].id  # ids are never reused, even from an empty outbox


async def test_a_refused_reading_does_not_move_the_device_clock(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        with pytest.raises(InvalidMessage):
            store.append("tank-a", 9000, {"v": math.nan})
        store.append("tank-a", 1000, {"v": 1})
        [row] = await store.peek(10)
        assert row.ts == 1000


@pytest.mark.parametrize(
    ("device", "ts", "values"),
    [
        ("", 1, {"v": 1}),
        (None, 1, {"v": 1}),
        ("tank-a", 1, {}),
        ("tank-a", 1, {"v": None}),
        ("tank-a", 1, {"v": math.nan}),
        ("tank-a", 1, {"v": math.inf}),
        ("tank-a", 1, {"v": {"nested": {1, 2}}}),
        ("tank-a", 1, {"v": "x" * 3000}),
        ("tank-a", 1.5, {"v": 1}),
        ("tank-a", None, {"v": 1}),
    ],
)
async def test_append_refuses_at_once(
    tmp_path: Path, device: object, ts: object, values: object
) -> None:
    async with Store.open(
        tmp_path / "s.db", max_rows=None, max_bytes=None, max_payload_bytes=2048
    ) as store:
        with pytest.raises(InvalidMessage):
            store.append(device, ts, values)  # type: ignore[arg-type]
        await store.flush()
        assert store.stats.received == 0
        assert await store.peek(10) == []


async def test_ack_deletes_by_ranges_and_counts_forwarded(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        for i in range(10):
            store.append("tank-a", i, {"v": i})
        rows = await store.peek(10)
        ids = [r.id for r in rows]
        assert await store.ack(ids[0:3] + ids[5:7]) == 5
        assert await store.ack(ids[0:2]) == 0  # already gone: not counted twice
        left = await store.peek(10)
        assert [r.id for r in left] == ids[3:5] + ids[7:]
        stats = store.stats
        assert (stats.forwarded, stats.depth) == (5, 5)
        assert stats.bytes == _stored_bytes(path)
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        assert (store.stats.forwarded, store.stats.received, store.stats.depth) == (5, 10, 5)


async def test_retention_by_rows_evicts_oldest_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.db"
    caplog.set_level("INFO", logger="hydrogate.store")
    async with Store.open(path, max_rows=100, max_bytes=None, commit_interval=0) as store:
        for batch in range(5):
            for i in range(50):
                store.append("tank-a", batch * 50 + i, {"v": batch * 50 + i})
            await store.flush()
        rows = await store.peek(1000)
        assert len(rows) == 100
        assert [json.loads(r.entry)["values"]["v"] for r in rows] == list(range(150, 250))
        assert store.stats.evicted == 150
        assert store.stats.depth == 100
        # One warning for the whole episode, however many commits evicted.
        warnings = [r for r in caplog.records if "evicting" in r.getMessage()]
        assert len(warnings) == 1
        await store.ack([r.id for r in rows])
        store.append("tank-a", 10_000, {"v": 0})
        await store.flush()
        assert any("below its limits" in r.getMessage() for r in caplog.records)
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        assert store.stats.evicted == 150


async def test_retention_by_bytes(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=1000) as store:
        for i in range(100):
            store.append("tank-a", i, {"v": i})
        await store.flush()
        stats = store.stats
        assert 0 < stats.bytes <= 1000
        assert stats.evicted + stats.depth == 100
        rows = await store.peek(1000)
        assert json.loads(rows[-1].entry)["values"]["v"] == 99


async def test_lower_limits_apply_when_reopened(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        for i in range(20):
            store.append("tank-a", i, {"v": i})
    async with Store.open(path, max_rows=5, max_bytes=None) as store:
        assert (store.stats.depth, store.stats.evicted) == (5, 15)


async def test_close_commits_what_was_queued(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None, commit_interval=10) as store:
        for i in range(1000):
            store.append("tank-a", i, {"v": i})
    with pytest.raises(StoreClosed):
        store.append("tank-a", 1, {"v": 1})
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 1000


async def test_committed_event_is_set_when_rows_can_be_peeked(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        store.committed.clear()
        store.append("tank-a", 1, {"v": 1})
        async with asyncio.timeout(5):
            await store.committed.wait()
        assert [r.ts for r in await store.peek(10)] == [1]  # forwarded before it is written
        assert (store.stats.pending, store.stats.depth) == (1, 0)
        await store.flush()
        assert (store.stats.pending, store.stats.depth) == (0, 1)


async def test_writer_is_one_named_thread(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None):
        names = [t.name for t in threading.enumerate()]
        assert names.count("hydrogate-store") == 1
    assert "hydrogate-store" not in [t.name for t in threading.enumerate()]


async def test_settings_persist_and_are_replaced_as_a_whole(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        assert await store.load_settings("tank-a") == {}
        await store.save_settings("tank-a", {"mode": "manual", "schedule": ["09:00"]})
        await store.save_settings("tank-a", {"mode": "auto", "current": {"tds_setpoint": 900}})
        await store.save_settings("tank-b", {"mode": "manual"})
        with pytest.raises(StoreError):
            await store.save_settings("tank-a", {"bad": math.nan})
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        assert await store.load_settings("tank-a") == {
            "mode": "auto",
            "current": {"tds_setpoint": 900},
        }
        assert await store.load_settings("tank-b") == {"mode": "manual"}


async def test_actuation_ledger_survives_restarts(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    now = 1_732_200_000.0
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        await store.record_actuation("tank-a", "nutrient", now - 7200, 1000)
        await store.record_actuation("tank-a", "nutrient", now - 1800, 2000)
        await store.record_actuation("tank-a", "ph_up", now - 60, 500)
        await store.record_actuation("tank-b", "refill", now - 60, 9000)
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        since = await store.actuations_since("tank-a", now - 3600)
        assert since == [("nutrient", now - 1800, 2000), ("ph_up", now - 60, 500)]
        assert since[0].actuator == "nutrient"
        # Entries older than a day are pruned when a new one is recorded.
        await store.record_actuation("tank-a", "nutrient", now + 86_400 - 1000, 100)
        assert len(await store.actuations_since("tank-a", 0)) == 2


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        async with Store.open(path, max_rows=None, max_bytes=None):
            pass


async def test_unusable_path_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        async with Store.open(tmp_path / "missing" / "s.db", max_rows=None, max_bytes=None):
            pass


async def test_hundred_thousand_appends_commit(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None) as store:
        for i in range(100_000):
            store.append(f"tank-{i % 4}", 1_732_200_000_000 + i, {"tds": 800.0 + i, "ph": 6.0})
        await store.flush()
        assert store.stats.received == 100_000
        assert store.stats.depth == 100_000


CHILD = """
import asyncio, sys
from gateway.store import Store

async def main():
    async with Store.open(sys.argv[1], max_rows=None, max_bytes=None) as store:
        for i in range(5000):
            store.append("tank-a", 1_732_200_000_000 + i, {"i": i})
        await store.flush()
        print(store.stats.received, flush=True)
        while True:  # keep appending, uncommitted, until killed
            store.append("tank-a", 1, {"i": -1})
            await asyncio.sleep(0)

asyncio.run(main())
"""


async def test_committed_rows_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(path),
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            line = await proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert int(line) == 5000
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        assert store.stats.received >= 5000
        rows = await store.peek(5000)
        assert [json.loads(r.entry)["values"]["i"] for r in rows] == list(range(5000))
        assert store.stats.depth == store.stats.received


async def _drain_all(store: Store, batch: int) -> list[int]:
    """Peek and ack everything the way the uplink does; the values' `i` in order."""
    seen: list[int] = []
    after = 0
    for _ in range(10_000):
        rows = await store.peek(batch, after)
        if not rows:
            return seen
        seen.extend(json.loads(r.entry)["values"]["i"] for r in rows)
        after = rows[-1].id
        await store.ack([r.id for r in rows])
    raise AssertionError("drain did not finish")


async def test_memory_tail_and_sqlite_hand_over_without_gaps_or_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recent rows are served from memory, older ones (overflow, restart) from SQLite."""
    import gateway.store as store_module

    monkeypatch.setattr(store_module, "TAIL_ROWS", 50)
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        for i in range(120):  # more than the tail holds: the oldest 70 live only in SQLite
            store.append("tank-a", 1000 + i, {"i": i})
        await store.flush()
        assert len(store._tail) == 50  # noqa: SLF001
        first = await store.peek(30)
        assert [json.loads(r.entry)["values"]["i"] for r in first] == list(range(30))
        await store.ack([r.id for r in first[:10]])  # ten delivered before a "crash"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        for i in range(120, 150):  # new rows after the restart, in memory
            store.append("tank-a", 2000 + i, {"i": i})
        await store.flush()
        assert await _drain_all(store, 17) == list(range(10, 150))
        assert store.stats.depth == 0


async def test_evicted_and_acked_rows_leave_the_memory_tail(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db", max_rows=20, max_bytes=None) as store:
        for i in range(50):
            store.append("tank-a", 1000 + i, {"i": i})
        await store.flush()
        rows = await store.peek(100)
        assert [json.loads(r.entry)["values"]["i"] for r in rows] == list(range(30, 50))
        await store.ack([r.id for r in rows[:5]])
        left = await store.peek(100)
        assert [json.loads(r.entry)["values"]["i"] for r in left] == list(range(35, 50))


PLANT = {"tank_volume_l": 10.0, "stock_ppm": 10000.0, "flow_ml_s": {"nutrient": 1.58}}


async def test_learned_state_round_trips_per_node_and_controller(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        assert await store.load_learned("tank-a", "adaptive") is None
        await store.save_learned("tank-a", "adaptive", {"gain": 0.5}, PLANT, ts=1000.0)
        await store.save_learned("tank-a", "adaptive", {"gain": 0.4, "n": [1, 2]}, PLANT)
        await store.save_learned("tank-a", "other", {"k": 1}, PLANT)
        await store.save_learned("tank-b", "adaptive", {"gain": 0.9}, {"tank_volume_l": 20.0})
        with pytest.raises(StoreError, match="not JSON"):
            await store.save_learned("tank-a", "adaptive", {"gain": math.nan}, PLANT)
        with pytest.raises(StoreError, match="not JSON"):
            await store.save_learned("tank-a", "adaptive", {"gain": {1, 2}}, PLANT)
        with pytest.raises(StoreError, match="not JSON"):
            await store.save_learned("tank-a", "adaptive", {"gain": 1}, {"flow": object()})
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        # The refused saves changed nothing; the second save replaced the first.
        assert await store.load_learned("tank-a", "adaptive") == ({"gain": 0.4, "n": [1, 2]}, PLANT)
        assert await store.load_learned("tank-b", "adaptive") == (
            {"gain": 0.9}, {"tank_volume_l": 20.0}
        )
        await store.forget_learned("tank-a", "other")
        assert await store.load_learned("tank-a", "other") is None
        assert await store.load_learned("tank-a", "adaptive") is not None
        await store.forget_learned("tank-a")
        assert await store.load_learned("tank-a", "adaptive") is None
        assert await store.load_learned("tank-b", "adaptive") is not None


async def test_a_damaged_learned_row_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        await store.save_learned("tank-a", "adaptive", {"gain": 0.5}, PLANT)
        await store.save_learned("tank-a", "other", {"gain": 0.5}, PLANT)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE learned SET state = '{\"gain\": 0.' WHERE controller = 'adaptive'")
        conn.execute("UPDATE learned SET plant = '[1, 2]' WHERE controller = 'other'")
    conn.close()
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        with pytest.raises(StoreError):
            await store.load_learned("tank-a", "adaptive")
        with pytest.raises(StoreError, match="not a JSON object"):
            await store.load_learned("tank-a", "other")
        await store.forget_learned("tank-a")  # the store goes on working
        assert await store.load_learned("tank-a", "adaptive") is None


#: The schema of the files gateways wrote before version 2, verbatim.
SCHEMA_V1 = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    ts INTEGER NOT NULL,
    entry TEXT NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE settings (
    node TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (node, key)
);
CREATE TABLE actuations (node TEXT NOT NULL, actuator TEXT NOT NULL, ts REAL NOT NULL,
                         ms INTEGER NOT NULL);
CREATE INDEX actuations_node_ts ON actuations (node, ts);
"""


async def test_a_version_1_file_is_migrated_and_keeps_its_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "v1.db"
    entry = json.dumps({"ts": 1_732_200_000_000, "values": {"tds": 812.5}})
    conn = sqlite3.connect(path)
    with conn:
        conn.executescript(SCHEMA_V1)
        conn.execute(
            "INSERT INTO outbox (device, ts, entry) VALUES (?, ?, ?)",
            ("tank-a", 1_732_200_000_000, entry),
        )
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("received", 7), ("forwarded", 6), ("last_ts:tank-a", 1_732_200_000_000)],
        )
        conn.execute(
            "INSERT INTO settings (node, key, value) VALUES (?, ?, ?)",
            ("tank-a", "current", json.dumps({"tds_setpoint": 900})),
        )
        conn.execute("PRAGMA user_version = 1")
    conn.close()

    caplog.set_level("INFO", logger="hydrogate.store")
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        assert (store.stats.received, store.stats.forwarded, store.stats.depth) == (7, 6, 1)
        [row] = await store.peek(10)
        assert (row.device, row.ts, row.entry) == ("tank-a", 1_732_200_000_000, entry)
        assert await store.load_settings("tank-a") == {"current": {"tds_setpoint": 900}}
        store.append("tank-a", 1_732_200_000_000, {"tds": 1.0})  # same ts: the ms before
        assert [r.ts for r in await store.peek(10)] == [1_732_200_000_000, 1_732_199_999_999]
        await store.save_learned("tank-a", "adaptive", {"gain": 0.5}, PLANT)
    assert any("migrated from version 1 to 2" in r.getMessage() for r in caplog.records)
    assert any("migrated from version 2 to 3" in r.getMessage() for r in caplog.records)
    assert any("migrated from version 3 to 4" in r.getMessage() for r in caplog.records)
    assert any("migrated from version 5 to 6" in r.getMessage() for r in caplog.records)

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert conn.execute("SELECT node, controller FROM learned").fetchall() == [
            ("tank-a", "adaptive")
        ]
    finally:
        conn.close()
    caplog.clear()
    async with Store.open(path, max_rows=None, max_bytes=None) as store:  # current version
        assert await store.load_learned("tank-a", "adaptive") == ({"gain": 0.5}, PLANT)
        assert store.stats.depth == 2
    assert not any("migrated" in r.getMessage() for r in caplog.records)


async def test_a_new_file_has_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None):
        pass
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 1024
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"outbox", "meta", "settings", "actuations", "learned", "history"} <= tables
    finally:
        conn.close()


async def test_readings_acknowledged_before_their_commit_are_never_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None, sync_interval=5.0) as store:
        for i in range(10):
            store.append("tank-a", 1000 + i, {"v": i})
        rows = await store.peek(100)  # forwarded at once, not written yet
        assert len(rows) == 10 and store.stats.depth == 0
        assert await store.ack([r.id for r in rows]) == 10  # answered without a write
        stats = store.stats
        assert (stats.received, stats.forwarded, stats.depth, stats.pending) == (10, 10, 0, 0)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
        meta = dict(conn.execute("SELECT key, value FROM meta"))
    finally:
        conn.close()
    assert (meta["received"], meta["forwarded"], meta["next_id"]) == (10, 10, 11)


async def test_readings_are_committed_within_sync_interval_without_a_flush(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None, sync_interval=0.3) as store:
        store.append("tank-a", 1000, {"v": 1})
        await asyncio.sleep(0.05)
        assert (store.stats.pending, store.stats.depth) == (1, 0)  # waits in memory...
        async with asyncio.timeout(2):
            while store.stats.depth == 0:
                await asyncio.sleep(0.02)
        # ...and is in the file (read by another connection) within sync_interval.
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("SELECT ts FROM outbox").fetchall() == [(1000,)]
        finally:
            conn.close()


async def test_acks_of_written_rows_are_deleted_with_the_next_commit(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.db", max_rows=None, max_bytes=None,
                          sync_interval=0.2) as store:
        for i in range(5):
            store.append("tank-a", 1000 + i, {"v": i})
        await store.flush()
        rows = await store.peek(10)
        async with asyncio.timeout(2):  # at most sync_interval later
            assert await store.ack([r.id for r in rows]) == 5
        assert (store.stats.depth, store.stats.forwarded) == (0, 5)


# ------------------------------ stored entries: values only (version 5), against key lists (6)
def _v4_file(path: Path, rows: list[tuple[int, str, int, str, int | None]], meta: dict[str, object]) -> None:
    """A file as version 4 wrote it: the same tables, rows keeping their whole entry."""
    from gateway import storefile

    conn = sqlite3.connect(path)
    with conn:
        conn.executescript(
            storefile._OUTBOX + storefile._REST + storefile._LEARNED + storefile._HISTORY
        )
        conn.executemany("INSERT INTO outbox (id, device, ts, entry, mono) VALUES (?, ?, ?, ?, ?)",
                         rows)
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
        conn.execute("PRAGMA user_version = 4")
    conn.close()


def _wrapped(ts: int, values: dict[str, object]) -> str:
    return json.dumps({"ts": ts, "values": values}, separators=(",", ":"))


async def test_rows_keep_their_values_against_a_key_list_and_go_out_as_whole_entries(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        store.append("tank-a", 1000, {"ph": 6.1, "note": "a,b}"})
        store.append("tank-b", 1001, {"ph": 6.2, "note": "c"})  # the same keys: the same list
        store.append("tank-a", 1002, {"ph": 6.3})  # a reading missing a key: another list
        await store.flush()
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("SELECT ts, entry FROM outbox ORDER BY id").fetchall() == [
                (1000, '[1,6.1,"a,b}"]'), (1001, '[1,6.2,"c"]'), (1002, '[2,6.3]')
            ]
            assert conn.execute("SELECT id, keys FROM keysets ORDER BY id").fetchall() == [
                (1, '["ph","note"]'), (2, '["ph"]')
            ]
        finally:
            conn.close()
    async with Store.open(path, max_rows=None, max_bytes=None) as store:  # peeked from SQLite
        rows = await store.peek(10)
        assert [r.entry for r in rows] == [
            _wrapped(1000, {"ph": 6.1, "note": "a,b}"}),
            _wrapped(1001, {"ph": 6.2, "note": "c"}),
            _wrapped(1002, {"ph": 6.3}),
        ]
        store.append("tank-a", 2000, {"ph": 6.4})  # the lists are known after a restart
        await store.flush()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT entry FROM outbox WHERE ts = 2000").fetchone() == ("[2,6.4]",)
        assert conn.execute("SELECT COUNT(*) FROM keysets").fetchone() == (2,)
    finally:
        conn.close()


_KEY = st.text(min_size=1, max_size=12)
_SCALAR = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text(max_size=12)
    | st.booleans()
)
_VALUE = st.recursive(_SCALAR, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(_KEY, inner, max_size=3), max_leaves=6)


_NUMBER = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.booleans()
)
_READING = st.dictionaries(_KEY, _VALUE, min_size=1, max_size=6) | st.dictionaries(
    _KEY | st.text(alphabet="%s:\"\\,{}[]\x00\x7fé", min_size=1, max_size=6), _NUMBER,
    min_size=1, max_size=6,
)  # the second: numbers only, the entry put together from the row's text


@settings(max_examples=400, deadline=None)
@given(readings=st.lists(_READING, min_size=1, max_size=8))
def test_a_row_gives_back_exactly_the_entry_that_was_sent(readings: list[dict[str, object]]) -> None:
    from gateway import storefile, tbmsg

    conn = sqlite3.connect(":memory:")
    conn.executescript(storefile._SCHEMA)
    rows = storefile.Rows(conn)
    for rid, values in enumerate(readings, start=1):
        entry = tbmsg.encode_entry("tank-a", 1000 + rid, values, 1 << 20)
        stored = rows.stored(storefile.values_text(entry))
        assert stored.startswith("[")
        assert rows.entry(rid, 1000 + rid, stored) == entry
        assert storefile.Rows(conn).entry(rid, 1000 + rid, stored) == entry  # from the file
        assert rows.values(rid, 1000 + rid, stored) == json.loads(entry)["values"]
    conn.close()


def test_a_key_list_rolled_back_with_its_rows_is_written_again(tmp_path: Path) -> None:
    from gateway import storefile

    conn = storefile.connect(tmp_path / "s.db")
    try:
        rows = storefile.Rows(conn)
        conn.execute("BEGIN IMMEDIATE")
        assert rows.stored('{"ph":6.1}') == "[1,6.1]"
        conn.rollback()  # e.g. the disk was full
        rows.rolled_back()
        conn.execute("BEGIN IMMEDIATE")
        assert rows.stored('{"ph":6.2}') == "[1,6.2]"
        assert rows.stored('{"ph":6.3}') == "[1,6.3]"
        conn.execute("COMMIT")
        rows.committed()
        assert conn.execute("SELECT id, keys FROM keysets").fetchall() == [(1, '["ph"]')]
        conn.execute("BEGIN IMMEDIATE")
        assert rows.stored('{"ec":1.2}') == "[2,1.2]"
        conn.rollback()
        rows.rolled_back()  # only the list of the rolled-back transaction is forgotten
        assert rows.entry(9, 5, "[1,6.2]") == '{"ts":5,"values":{"ph":6.2}}'
        with pytest.raises(storefile.DamagedRow):
            rows.entry(10, 5, "[2,1.2]")
    finally:
        conn.close()


def test_a_peeked_entry_is_kept_for_the_history_once_and_within_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway import storefile

    monkeypatch.setattr(storefile, "KEPT_ENTRIES", 3)
    conn = sqlite3.connect(":memory:")
    conn.executescript(storefile._SCHEMA)
    rows = storefile.Rows(conn)
    stored = rows.stored('{"ph":6.1}')
    unreadable = "[99,1.0]"  # a list not in the file: put together, it raises
    entry = rows.entry(1, 5, stored, keep=True)
    assert rows.moved(1, 5, unreadable) is entry  # the peek's own, not read again
    with pytest.raises(storefile.DamagedRow):
        rows.moved(1, 5, unreadable)  # given once
    rows.entry(2, 5, stored, keep=True)
    assert rows.moved(2, 6, stored) == '{"ts":6,"values":{"ph":6.1}}'  # re-stamped since
    for rid in (3, 4, 5, 6):
        rows.entry(rid, 5, stored, keep=True)
    with pytest.raises(storefile.DamagedRow):
        rows.moved(3, 5, unreadable)  # the oldest, given up past the bound
    assert [rows.moved(rid, 5, unreadable) for rid in (4, 5, 6)] == [entry] * 3
    rows.entry(7, 5, stored)  # without keep (no history): nothing kept
    with pytest.raises(storefile.DamagedRow):
        rows.moved(7, 5, unreadable)
    conn.close()


async def test_a_file_keeps_a_bounded_number_of_key_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import storefile

    monkeypatch.setattr(storefile, "MAX_KEYSETS", 2)  # a node inventing keys at every reading
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        for i in range(4):
            store.append("tank-a", 1000 + i, {f"k{i}": i})
        await store.flush()
        assert [json.loads(r.entry)["values"] for r in await store.peek(10)] == [
            {"k0": 0}, {"k1": 1}, {"k2": 2}, {"k3": 3}
        ]
    conn = sqlite3.connect(path)
    try:  # the lists beyond the limit: kept as objects, as version 5 did
        assert [e for (e,) in conn.execute("SELECT entry FROM outbox ORDER BY id")] == [
            "[1,0]", "[2,1]", '{"k2":2}', '{"k3":3}'
        ]
    finally:
        conn.close()


async def test_a_row_whose_key_list_does_not_read_is_discarded_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.db"
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        for i in range(3):
            store.append("tank-a", 1000 + i, {"ph": 6.0 + i})
        await store.flush()
    conn = sqlite3.connect(path)
    with conn:  # damage one row: a key list the file does not hold, or too many values
        conn.execute("UPDATE outbox SET entry = '[7,6.1]' WHERE ts = 1001")
        conn.execute("UPDATE outbox SET entry = '[1,6.2,9]' WHERE ts = 1002")
    conn.close()
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        rows = await store.peek(10)
        assert [json.loads(r.entry) for r in rows] == [{"ts": 1000, "values": {"ph": 6.0}}]
        assert (store.stats.evicted, store.stats.depth) == (2, 1)
        assert await store.peek(10, after_id=rows[0].id) == []
    assert "key list 7 does not read: discarded" in caplog.text


async def test_a_version_4_file_is_migrated_without_rewriting_its_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.clock import boot_id
    from gateway.history import HistoryFile

    path = tmp_path / "v4.db"
    T = int(time.time() - 60) * 1000  # the history keeps what is younger than history_days
    old = [
        (1, "tank-a", T + 5000, _wrapped(T + 5000, {"ph": 6.0, "seq": 1}), None),
        (2, "tank-b", T + 5001, _wrapped(T + 5001, {"ph": 6.2, "seq": 2}), None),
        # held for the clock during this boot: re-stamped from its monotonic time
        (3, "tank-a", T + 7000, _wrapped(T + 7000, {"ph": 6.4, "seq": 3}), 100),
    ]
    _v4_file(path, old, {"received": 3, "next_id": 4, "hold_boot": boot_id()})
    with HistoryFile(path) as db, db.snapshot():  # an export of the file before the upgrade
        assert [e["values"]["seq"] for e in db.entries("tank-a", 0, 10**13)] == [1, 3]

    caplog.set_level("INFO", logger="hydrogate.store")
    async with Store.open(path, max_rows=None, max_bytes=None, history_days=1.0) as store:
        assert any("migrated from version 4 to 5" in r.getMessage() for r in caplog.records)
        assert [(r.id, r.entry) for r in await store.peek(10)] == [(i, e) for i, _, _, e, _ in old[:2]]
        assert await store.release(offset_ms=T + 1_000) == 1
        store.append("tank-b", T + 6000, {"ph": 6.3, "seq": 4})
        await store.flush()
        conn = sqlite3.connect(path)
        try:  # the old rows keep their whole entry (re-stamped inside); the new one its values
            assert conn.execute("SELECT id, entry FROM outbox ORDER BY id").fetchall() == [
                (1, old[0][3]), (2, old[1][3]), (3, _wrapped(T + 1_100, {"ph": 6.4, "seq": 3})),
                (4, "[1,6.3,4]"),
            ]
            assert conn.execute("SELECT id, keys FROM keysets").fetchall() == [(1, '["ph","seq"]')]
            assert conn.execute("SELECT value FROM meta WHERE key = 'bare_from'").fetchone() == (4,)
        finally:
            conn.close()
        rows = await store.peek(10)
        assert [json.loads(r.entry) for r in rows] == [
            {"ts": T + 5000, "values": {"ph": 6.0, "seq": 1}},
            {"ts": T + 5001, "values": {"ph": 6.2, "seq": 2}},
            {"ts": T + 1_100, "values": {"ph": 6.4, "seq": 3}},
            {"ts": T + 6000, "values": {"ph": 6.3, "seq": 4}},
        ]
        assert [r.ts for r in rows] == [T + 5000, T + 5001, T + 1_100, T + 6000]
        with HistoryFile(path) as db, db.snapshot():  # export while buffered: both kinds
            assert [e["values"]["seq"] for e in db.entries("tank-b", 0, 10**13)] == [2, 4]
        assert await store.ack([r.id for r in rows]) == 4  # into the history, whole entries
        await store.flush_history()
        with HistoryFile(path) as db, db.snapshot():
            got = [(e["ts"], e["values"]["seq"]) for d in ("tank-a", "tank-b")
                   for e in db.entries(d, 0, 10**13)]
        assert sorted(got) == [(T + 1_100, 3), (T + 5000, 1), (T + 5001, 2), (T + 6000, 4)]
        assert store.stats.depth == 0


def test_salvaged_rows_of_every_version_are_restored_as_values_only(tmp_path: Path) -> None:
    from gateway import storefile

    wrapped = [(1, "tank-a", 5000, _wrapped(5000, {"ph": 6.0}), None)]
    bare = [(2, "tank-a", 5001, '{"ph":6.1}', None)]
    array = [(3, "tank-a", 5002, "[4,6.2,880]", None)]
    broken = [
        (4, "tank-a", 5003, "{not json", None),
        (5, "tank-a", 5004, "[5,6.3]", None),  # its key list did not read
        (6, "tank-a", 5005, "[4,6.3]", None),  # fewer values than keys
    ]
    keysets = [(4, '["ph","tds"]'), (5, "not json")]
    cases = [
        ({"next_id": 2}, wrapped + broken),  # a version 4 file
        ({"next_id": 3, "bare_from": 2}, wrapped + bare + broken),  # migrated
        ({"next_id": 4, "bare_from": 2}, wrapped + bare + array + broken),  # version 6
        ({}, wrapped + bare + array + broken),  # counters unreadable: told apart by their text
    ]
    expect = {1: {"ph": 6.0}, 2: {"ph": 6.1}, 3: {"ph": 6.2, "tds": 880}}
    for n, (meta, rows) in enumerate(cases):
        conn = storefile.connect(tmp_path / f"fresh{n}.db")
        try:
            found = storefile.Salvage(rows=list(rows), meta=dict(meta), keysets=list(keysets))
            assert storefile.restore(conn, found) == len(rows) - len(broken)
            assert list(storefile.outbox_values(conn)) == [
                (r[0], r[1], r[2], expect[r[0]]) for r in rows[: -len(broken)]
            ]
            assert conn.execute("SELECT entry FROM outbox WHERE id = 1").fetchone() == (
                '{"ph":6.0}',
            )
        finally:
            conn.close()


# ------------------------------------------- written back for an older release
async def test_a_file_written_back_for_the_previous_release_is_what_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway import storefile
    from gateway.cli import main as cli_main

    path = tmp_path / "gw.sqlite"
    config = tmp_path / "config.yaml"
    config.write_text(f"gateway: {{name: gw}}\nstorage: {{path: '{path}'}}\n"
                      "nodes: [{name: tank-a, url: 'tcp://127.0.0.1:9'}]\n")
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        store.append("tank-a", 1000, {"ph": 6.1, "note": "a,b}"})
        store.append("tank-a", 1001, {"ph": 6.2, "note": "c"})
        store.append("tank-a", 1002, {"ph": 6.3})
        await store.flush()
        sent = [r.entry for r in await store.peek(10)]
        # The daemon has the file open: refused, nothing changed.
        assert cli_main(["storage", "downgrade", "-c", str(config), "--to", "5"]) == 1
        assert "is the daemon running?" in capsys.readouterr().err
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO outbox (id, device, ts, entry) VALUES (99, 'tank-a', 1003, '[9,1]')")
    conn.close()

    assert cli_main(["storage", "downgrade", "-c", str(config), "--to", "5"]) == 0
    assert "from schema version 6 to 5; dropped 1 row that does not read" in capsys.readouterr().out
    conn = sqlite3.connect(path)
    try:  # exactly what version 5 wrote: each row's values as an object, no key lists
        assert conn.execute("PRAGMA user_version").fetchone() == (5,)
        assert conn.execute("SELECT entry FROM outbox ORDER BY id").fetchall() == [
            ('{"ph":6.1,"note":"a,b}"}',), ('{"ph":6.2,"note":"c"}',), ('{"ph":6.3}',)
        ]
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'keysets'").fetchall() == []
    finally:
        conn.close()
    assert storefile.downgrade(path, 5) == (5, 0)  # at that version already: nothing to do
    assert cli_main(["storage", "downgrade", "-c", str(config), "--to", "4"]) == 2
    assert "schema version 5 at the oldest" in capsys.readouterr().err
    async with Store.open(path, max_rows=None, max_bytes=None) as store:  # and forward again
        assert [r.entry for r in await store.peek(10)] == sent
        store.append("tank-a", 2000, {"ph": 6.4, "note": "d"})
        await store.flush()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (6,)
        assert conn.execute("SELECT entry FROM outbox WHERE ts = 2000").fetchone() == ('[1,6.4,"d"]',)
    finally:
        conn.close()


def test_a_key_list_that_does_not_read_keeps_its_id(tmp_path: Path) -> None:
    from gateway import storefile

    conn = storefile.connect(tmp_path / "s.db")
    try:
        conn.execute("INSERT INTO keysets (id, keys) VALUES (1, '[\"ph\"]'), (2, 'damaged')")
        rows = storefile.Rows(conn)
        conn.execute("BEGIN IMMEDIATE")
        assert rows.stored('{"ec":1.2}') == "[3,1.2]"  # not 2: that id is taken
        assert rows.stored("{not json") == "{not json"  # never raises: kept as it came
        conn.execute("COMMIT")
        rows.committed()
        assert rows.entry(5, 7, "[3,1.2]") == '{"ts":7,"values":{"ec":1.2}}'
        with pytest.raises(storefile.DamagedRow):
            rows.entry(6, 7, "[2,1.2]")
    finally:
        conn.close()
