"""Outbox rows read from leaf pages (gateway/storepages.py), checked against SQLite's own reading."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from gateway import storefile, storepages
from gateway.store import Store

ALL = [(0, 1 << 62)]


async def _make(path: Path, rows: int, pad: int = 50) -> list[tuple[int, str, int, str, int | None]]:
    """A closed store file with ``rows`` readings; its outbox rows as SQLite reads them."""
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        for i in range(rows):
            store.append(f"tank-{i % 3}", 1_700_000_000_000 + i, {"seq": i, "pad": "x" * pad})
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT id, device, ts, entry, mono FROM outbox ORDER BY id").fetchall()
    finally:
        conn.close()


async def test_every_row_of_a_sound_file_reads_from_its_leaf_pages(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    rows = await _make(path, 2000)
    found = storepages.outbox_rows(path, storefile.PAGE_SIZE, ALL)
    assert sorted(found.values()) == rows
    wanted = [(10, 20), (1500, 1502)]
    assert sorted(storepages.outbox_rows(path, storefile.PAGE_SIZE, wanted)) == [
        *range(10, 20), 1500, 1501
    ]


async def test_rows_spilling_to_overflow_pages_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    rows = await _make(path, 20, pad=5000)  # each row over four 1 KiB pages
    assert sorted(storepages.outbox_rows(path, storefile.PAGE_SIZE, ALL).values()) == rows


async def test_rows_below_lost_interior_pages_are_found_when_sqlite_finds_none(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    rows = await _make(path, 3000)
    os.truncate(path, path.stat().st_size // 2)
    found = storefile.salvage(path)
    by_id = {r[0]: r for r in rows}
    assert len(found.rows) >= 1000
    assert all(by_id[r[0]] == r for r in found.rows)  # each exactly as written
    assert any(f"{len(found.rows)} read from their leaf pages" in lost for lost in found.lost)


async def test_freed_pages_and_pages_newer_in_the_wal_give_back_no_deleted_row(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    rows = await _make(path, 3000)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA secure_delete = 0")  # Debian's default zeroes what is deleted
        conn.execute("DELETE FROM outbox WHERE id < 1000")  # forwarded: pages to the freelist
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] > 50
        live = sorted(storepages.outbox_rows(path, storefile.PAGE_SIZE, ALL))
        assert live == [r[0] for r in rows if r[0] >= 1000]
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("DELETE FROM outbox WHERE id < 2000")  # only in the WAL so far
        assert Path(f"{path}-wal").stat().st_size > 0
        live = sorted(storepages.outbox_rows(path, storefile.PAGE_SIZE, ALL))
        assert live and min(live) >= 2000
    finally:
        conn.close()


def test_pages_of_garbage_give_nothing_and_raise_nothing(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(os.urandom(64 * 1024))
    assert storepages.outbox_rows(path, 1024, ALL) == {}
    path.write_bytes(b"\x0d" * 4096)  # every page says "table leaf", nothing else reads
    assert storepages.outbox_rows(path, 1024, ALL) == {}


async def test_wal_frames_count_up_to_the_last_commit_whose_checksums_hold(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    rows = await _make(path, 3000)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA secure_delete = 0")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("DELETE FROM outbox WHERE id < 1000")  # the WAL's first commit
        conn.execute("DELETE FROM outbox WHERE id < 2000")  # its second
        copy = tmp_path / "copy.db"
        copy.write_bytes(path.read_bytes())
        wal = bytearray(Path(f"{path}-wal").read_bytes())
    finally:
        conn.close()
    frame = 24 + storefile.PAGE_SIZE
    commits = [i for i in range((len(wal) - 32) // frame)
               if int.from_bytes(wal[32 + i * frame + 4 : 32 + i * frame + 8], "big")]
    assert len(commits) == 2
    second = 32 + (commits[0] + 1) * frame  # the second commit's first frame
    wal[second + 24 + 500] ^= 0xFF  # a torn write: its checksum no longer holds
    Path(f"{copy}-wal").write_bytes(wal)
    scanned = sorted(storepages.outbox_rows(copy, storefile.PAGE_SIZE, ALL))
    assert scanned == [r[0] for r in rows if r[0] >= 1000]  # the first commit only
    check = sqlite3.connect(copy)  # as SQLite itself reads the copy
    try:
        assert [i for (i,) in check.execute("SELECT id FROM outbox ORDER BY id")] == scanned
    finally:
        check.close()
