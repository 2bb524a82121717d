"""Reading the daemon's file while it runs: readings of a device for export, a consistent backup.

`HistoryFile` opens the store's SQLite file read-only, beside the running
daemon (WAL: readers never block its writer, and its checkpoints never wait
for a reader, see ``storewriter.checkpoint``). Everything one export or one
backup reads comes from one snapshot (`HistoryFile.snapshot`), so a reading
that moves from the outbox to the history meanwhile is seen exactly once.

A device's readings are in two places: the ``history`` table holds those
ThingsBoard acknowledged (gateway/storehistory.py, in chunks), the
``outbox`` those not forwarded yet. `HistoryFile.entries` merges both into
one stream in time order, reading chunk by chunk, so that memory does not
grow with the export.

`HistoryFile.backup` copies the file with SQLite's online backup API, a few
pages per step, inside the same kind of snapshot: the copy is the file as it
was at one instant, whatever the daemon writes meanwhile.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway import storefile, storehistory

__all__ = ["BACKUP_PAGES", "NICE", "HistoryError", "HistoryFile", "step_aside"]

#: Pages copied per step of a backup (1 KiB pages: a progress step every 256 KiB).
BACKUP_PAGES = 256
#: How much lower than the daemon an export or a backup runs (``nice``).
NICE = 10


def step_aside() -> None:
    """Lower this process's CPU priority (`NICE`): on a Pi's few cores the daemon goes first."""
    with contextlib.suppress(OSError):
        os.nice(NICE)


class HistoryError(Exception):
    """The file cannot be read (missing, not a hydrogate buffer, unreadable, ...)."""


Entry = dict[str, Any]


class HistoryFile:
    """A read-only connection to a store file; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise HistoryError(f"{path}: no such file (is storage.path right?)")
        try:
            self._conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA query_only = 1")
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.Error as exc:
            raise HistoryError(f"{path}: cannot read it: {exc}") from exc
        if "outbox" not in tables:
            self._conn.close()
            raise HistoryError(f"{path}: not a hydrogate buffer file")
        self._has_history = "history" in tables
        try:
            self._rows = storefile.Rows(self._conn)
        except sqlite3.Error as exc:
            self._conn.close()
            raise HistoryError(f"{path}: cannot read it: {exc}") from exc

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> HistoryFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: everything read inside sees the file at one instant."""
        try:
            self._conn.execute("BEGIN")
            self._conn.execute("SELECT COUNT(*) FROM meta").fetchone()  # takes the snapshot
        except sqlite3.Error as exc:
            raise HistoryError(f"{self.path}: cannot read it: {exc}") from exc
        try:
            yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("COMMIT")

    # ------------------------------------------------------------- readings
    def devices(self) -> list[str]:
        """Every device with readings in the file (history or outbox)."""
        sql = "SELECT DISTINCT device FROM outbox"
        if self._has_history:
            sql += " UNION SELECT DISTINCT device FROM history"
        return sorted(r[0] for r in self._conn.execute(sql))

    def count(self, device: str, since_ms: int, until_ms: int) -> int:
        """About how many entries `entries` yields (whole chunks at the edges are counted)."""
        total = 0
        if self._has_history:
            (total,) = self._conn.execute(
                "SELECT COALESCE(SUM(n), 0) FROM history WHERE device = ? AND ts_first"
                " BETWEEN ? AND ? AND ts_last >= ?",
                (device, since_ms - storehistory.SPAN_MS, until_ms, since_ms),
            ).fetchone()
        (buffered,) = self._conn.execute(
            "SELECT COUNT(*) FROM outbox WHERE device = ? AND ts BETWEEN ? AND ?",
            (device, since_ms, until_ms),
        ).fetchone()
        return int(total) + int(buffered)

    def entries(self, device: str, since_ms: int, until_ms: int) -> Iterator[Entry]:
        """``{"ts": ms, "values": {...}}`` of ``device`` with ``since_ms <= ts <= until_ms``.

        In time order: forwarded readings from the history and buffered ones
        from the outbox, merged. Read it inside `snapshot`.
        """
        return heapq.merge(
            self._history(device, since_ms, until_ms),
            self._outbox(device, since_ms, until_ms),
            key=_ts,
        )

    def _history(self, device: str, since_ms: int, until_ms: int) -> Iterator[Entry]:
        """The history's entries in time order, chunks opened as their first ts comes up."""
        if not self._has_history:
            return
        cur = self._conn.execute(
            "SELECT ts_first, ts_last, data FROM history WHERE device = ? AND ts_first"
            " BETWEEN ? AND ? ORDER BY ts_first, id",
            (device, since_ms - storehistory.SPAN_MS, until_ms),
        )
        heap: list[tuple[int, int, Entry]] = []
        seq = 0
        ahead = cur.fetchone()
        while True:
            # Open every chunk starting at or before the earliest entry that could go next.
            while ahead is not None and (not heap or ahead[0] <= heap[0][0]):
                ts_first, ts_last, data = ahead
                if ts_last >= since_ms:
                    try:
                        chunk = list(storehistory.iter_entries(data))
                    except (ValueError, zlib.error) as exc:
                        raise HistoryError(f"{self.path}: a history chunk is damaged: {exc}") \
                            from exc
                    for entry in chunk:
                        if since_ms <= entry["ts"] <= until_ms:
                            heapq.heappush(heap, (entry["ts"], seq, entry))
                            seq += 1
                ahead = cur.fetchone()
            if not heap:
                return
            yield heapq.heappop(heap)[2]

    def _outbox(self, device: str, since_ms: int, until_ms: int) -> Iterator[Entry]:
        """Buffered entries (not forwarded yet), in the order they arrived."""
        cur = self._conn.execute(
            "SELECT id, ts, entry FROM outbox WHERE device = ? AND ts BETWEEN ? AND ? ORDER BY id",
            (device, since_ms, until_ms),
        )
        for rid, ts, stored in cur:
            try:
                values = self._rows.values(rid, ts, stored)
            except storefile.DamagedRow:
                continue
            yield {"ts": ts, "values": values}

    # ---------------------------------------------------------------- backup
    def backup(
        self, target: Path, *, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Copy the whole file to ``target`` (a new file) as it is at one instant.

        SQLite's online backup API, `BACKUP_PAGES` pages per step, inside a
        read transaction of this connection: the daemon goes on writing, the
        copy is its file as of the start. ``progress(copied, total)`` is
        called after each step (pages).
        """

        def step(status: int, remaining: int, total: int) -> None:
            if progress is not None:
                progress(total - remaining, total)

        dest = sqlite3.connect(target)
        try:
            with self.snapshot():
                self._conn.backup(dest, pages=BACKUP_PAGES, progress=step)
            problems = [r[0] for r in dest.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise HistoryError(f"the copy does not check: {'; '.join(problems)}")
        except sqlite3.Error as exc:
            raise HistoryError(f"backup of {self.path} to {target} failed: {exc}") from exc
        finally:
            dest.close()

    def summary(self) -> dict[str, int]:
        """What the file holds: buffered readings, forwarded readings kept, counters."""
        meta = dict(self._conn.execute("SELECT key, value FROM meta"))
        (buffered,) = self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
        kept = 0
        if "history_readings" in meta:
            kept = int(meta["history_readings"] or 0)
        elif self._has_history:
            (kept,) = self._conn.execute("SELECT COALESCE(SUM(n), 0) FROM history").fetchone()
        return {
            "buffered": int(buffered),
            "history": int(kept),
            "received": int(meta.get("received") or 0),
            "forwarded": int(meta.get("forwarded") or 0),
            "evicted": int(meta.get("evicted") or 0),
        }


def _ts(entry: Entry) -> int:
    ts = entry.get("ts")
    return ts if isinstance(ts, int) else 0
