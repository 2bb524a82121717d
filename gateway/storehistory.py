"""Forwarded readings kept for export: the ``history`` table, written by the store's writer.

A reading leaves the outbox when ThingsBoard acknowledges it. With
``storage.history_days`` > 0 it is kept here instead of being forgotten, so
that `hydrogate export` can hand out yesterday's readings without a cloud.
It is never on the hot path: readings acknowledged before they were
committed wait in the writer's memory and go here with a commit that
happens anyway (at most `HOLD_S` later); readings acknowledged after their
commit are moved from the outbox in the transaction that deletes them.

One row is a *chunk*: the entries of one device (the outbox's
``{"ts":…,"values":{…}}`` text, unchanged), sorted by ``ts``, as a zlib'd
JSON array, with the first and last ``ts`` and how many it holds. A chunk
never spans more than `SPAN_MS`, so a reader looking for readings from
``since`` on needs only the chunks that start after ``since - SPAN_MS``
(index ``(device, ts_first)``). Chunks make the bytes written per reading
small (a few pages per commit, however many readings) and the table a
fraction of the outbox's size.

Retention: chunks whose last reading is older than ``history_days`` go, and
the oldest go while the table holds more than ``history_max_bytes``
(compressed). The totals are kept in ``meta`` so that opening a large file
does not read the table.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

#: Readings acknowledged before their commit wait in memory at most this long (seconds)
#: before they are written with the next commit (a flush writes them at once).
HOLD_S = 60.0
#: At most this many entries in one chunk...
CHUNK_ENTRIES = 2000
#: ...this much entry text (bytes, before compression)...
CHUNK_RAW_BYTES = 256 << 10
#: ...and never a span longer than this (ms) from its first to its last reading.
SPAN_MS = 3_600_000
#: zlib level: 6 (the default) compresses readings ~5x at a few MB/s on a Pi.
LEVEL = 6
#: Oldest chunks looked at per query while pruning.
PRUNE_BATCH = 256

#: A reading on its way into the history: device, ts (ms), entry text.
Pending = tuple[str, int, str]
#: A chunk to insert: device, ts_first, ts_last, n, size, data.
Chunk = tuple[str, int, int, int, int, bytes]

_INSERT = (
    "INSERT INTO history (device, ts_first, ts_last, n, size, data) VALUES (?, ?, ?, ?, ?, ?)"
)


def chunks(rows: Iterable[Pending]) -> list[Chunk]:
    """``rows`` as chunks: grouped by device, sorted by ts, cut by count, size and span."""
    by_device: dict[str, list[tuple[int, str]]] = {}
    for device, ts, entry in rows:
        by_device.setdefault(device, []).append((ts, entry))
    out: list[Chunk] = []
    for device, entries in by_device.items():
        entries.sort(key=lambda e: e[0])
        start = 0
        raw = 0
        for i, (ts, entry) in enumerate(entries):
            if i > start and (
                i - start >= CHUNK_ENTRIES
                or raw + len(entry) > CHUNK_RAW_BYTES
                or ts - entries[start][0] > SPAN_MS
            ):
                out.append(_chunk(device, entries[start:i]))
                start, raw = i, 0
            raw += len(entry) + 1
        if start < len(entries):
            out.append(_chunk(device, entries[start:]))
    return out


def _chunk(device: str, entries: list[tuple[int, str]]) -> Chunk:
    text = "[" + ",".join(entry for _, entry in entries) + "]"
    data = zlib.compress(text.encode(), LEVEL)
    return (device, entries[0][0], entries[-1][0], len(entries), len(data), data)


def insert(conn: sqlite3.Connection, new: list[Chunk]) -> tuple[int, int]:
    """Insert ``new``; returns (bytes, readings) added."""
    conn.executemany(_INSERT, new)
    return sum(c[4] for c in new), sum(c[3] for c in new)


def prune(
    conn: sqlite3.Connection, *, cutoff_ms: int, max_bytes: int | None, total_bytes: int
) -> tuple[int, int]:
    """Delete the oldest chunks (by id) older than ``cutoff_ms`` or beyond ``max_bytes``.

    Stops at the first chunk that may stay: a chunk stamped in the future (a
    clock that was wrong) keeps the ones behind it until it expires, but the
    byte bound still holds. Returns (bytes, readings) deleted.
    """
    freed = readings = 0
    while True:
        rows = conn.execute(
            "SELECT id, ts_last, n, size FROM history ORDER BY id LIMIT ?", (PRUNE_BATCH,)
        ).fetchall()
        upto = None
        stop = len(rows) < PRUNE_BATCH
        for rid, ts_last, n, size in rows:
            over = max_bytes is not None and total_bytes - freed > max_bytes
            if ts_last >= cutoff_ms and not over:
                stop = True
                break
            upto = rid
            freed += size
            readings += n
        if upto is not None:
            conn.execute("DELETE FROM history WHERE id <= ?", (upto,))
        if stop:
            return freed, readings


def totals(conn: sqlite3.Connection) -> tuple[int, int]:
    """(bytes, readings) the table holds, counted (used once, when ``meta`` lacks them)."""
    size, n = conn.execute(
        "SELECT COALESCE(SUM(size), 0), COALESCE(SUM(n), 0) FROM history"
    ).fetchone()
    return int(size), int(n)


def decode(data: bytes) -> list[dict[str, Any]]:
    """A chunk's entries (``{"ts": ms, "values": {...}}``), in ts order."""
    entries = json.loads(zlib.decompress(data))
    if not isinstance(entries, list):
        raise ValueError("a history chunk is not a JSON array")
    return entries


def iter_entries(data: bytes) -> Iterator[dict[str, Any]]:
    """Like `decode`, entries that are not ``{"ts": int, "values": {...}}`` skipped."""
    for entry in decode(data):
        if isinstance(entry, dict) and isinstance(entry.get("ts"), int) and isinstance(
            entry.get("values"), dict
        ):
            yield entry
