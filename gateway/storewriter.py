"""The store's writer thread: the only SQLite connection, group commits, syncs and disk faults.

Readings reach the writer in batches (one per ``commit_interval`` of the
event loop) and wait in memory, already visible to the uplink, until one of:

- they have waited ``sync_interval`` less a margin (what a commit and its
  sync take): they are committed and the WAL is synced at once, so each
  reading is on stable storage at most ``sync_interval`` after it arrived;
- ThingsBoard acknowledged them first (PUBACK): they are never written,
  only counted;
- they fill ``COMMIT_BYTES``, or someone needs the file (a read, a setting,
  the actuation ledger, `flush`): everything waiting is committed then.

A row keeps the reading's values only (gateway/storefile.py): the writer
takes the wrapper off on the way in, readers put it back.

Deletes of forwarded rows ride along with the next commit; the lifetime
counters are written at most every `COUNTERS_S`. At 10 readings/s this is
one small transaction and one ``fdatasync`` a second, and none at all while
ThingsBoard acknowledges each reading within the second
(docs/benchmarks.md). The WAL is checkpointed and truncated once the outbox
is empty, or when it reaches `WAL_CHECKPOINT_BYTES`.

Disk faults never stop the writer: a full or read-only disk, an I/O error,
or a file that cannot be opened puts it in a degraded state, logged once.
Readings then stay in memory (up to `MAX_PENDING`, the oldest beyond that
counted as ``unstored``), are still forwarded, and everything is written
again as soon as a retry every `RETRY_S` succeeds. A file found damaged is
moved aside and what still reads is carried into a fresh one.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import json
import logging
import operator
import os
import queue
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import storefile, storehistory
from gateway.storefile import COUNTERS, DamagedFile, NewerSchema, error_kind

log = logging.getLogger("hydrogate.store")

#: Committed at once when the waiting readings' text reaches this (bounds memory).
COMMIT_BYTES = 4 << 20
#: Readings kept in memory while the disk refuses them; older ones are dropped and counted.
MAX_PENDING = 25_000
#: Seconds between attempts to write again while the disk refuses.
RETRY_S = 2.0
#: The lifetime counters are written at most this often (seconds), with other work.
COUNTERS_S = 10.0
#: The WAL is checkpointed when it reaches this size, whatever the outbox holds...
WAL_CHECKPOINT_BYTES = 4 << 20
#: ...or a quarter of the free disk space, but not below this...
WAL_MIN_BYTES = 64 << 10
#: ...or when the outbox is empty and the last checkpoint is this old (seconds).
IDLE_CHECKPOINT_S = 60.0
#: Smallest margin (seconds) kept between a commit and its sync deadline.
MIN_MARGIN_S = 0.05
#: Most outbox rows re-stamped in one transaction.
RESTAMP_CHUNK = 20_000
#: Most queue items taken in one turn.
MAX_ITEMS = 10_000
#: How long actuations stay in the ledger (the safety budget looks back one hour).
ACTUATION_KEEP_S = 86_400.0
#: How long the writer's connection waits for a lock (ms): sqlite3.connect's default.
BUSY_TIMEOUT_MS = 5000
#: A checkpoint that found a reader on an older snapshot is tried again after this (seconds).
CHECKPOINT_BUSY_S = 1.0
#: The history is pruned (days, bytes) at least this often (seconds), with other work.
PRUNE_S = 60.0
#: An eviction episode ends once the outbox is back under this share of its limits.
EVICTION_HYSTERESIS = 0.9

Row = tuple[int, str, int, str, int | None]  # id, device, ts, entry, mono (ms; None if stamped)
#: As the outbox keeps it: the entry's values only (`storefile.Rows.stored`).
Stored = tuple[int, str, int, str, int | None]
Result = tuple["asyncio.Future[Any] | None", Any, "BaseException | None"]
_SIZE = "COALESCE(SUM(length(device) + length(entry)), 0)"
_UPSERT_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


class StoreError(Exception):
    """The store cannot do what was asked (database error, closed, bad data)."""


class StoreClosed(StoreError):
    """The store was closed (or its writer stopped after an error)."""


def as_store_error(exc: BaseException) -> StoreError:
    """``exc`` as a StoreError (chained)."""
    if isinstance(exc, StoreError):
        return exc
    error = StoreError(f"store failed: {exc}")
    error.__cause__ = exc
    return error


@dataclass(frozen=True)
class Batch:
    """Readings appended during one ``commit_interval``, with when the first arrived.

    ``held``: the rows wait for the clock (they carry their monotonic time);
    ``last``: each device's newest stamp so far (written with the counters).
    """

    arrived: float
    rows: list[Row]
    held: bool = False
    last: dict[str, int] = field(default_factory=dict)


_ENTRY = operator.itemgetter(3)
_DEVICE = operator.itemgetter(1)


class _Waiting:
    """Readings in memory, not committed: whole batches (consecutive ids), and those of
    them ThingsBoard acknowledged meanwhile (never to be written)."""

    __slots__ = ("acked", "batches", "bytes", "count", "first", "held", "last", "since", "starts")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.batches: list[list[Row]] = []
        self.starts: list[int] = []  # each batch's first id (ids within a batch are consecutive)
        self.count = 0
        self.bytes = 0  # entry text added (an upper bound: acknowledged rows stay counted)
        self.since: float | None = None  # when the oldest waiting reading arrived
        self.acked: set[int] = set()
        self.first = 0
        self.last = -1
        self.held = False

    def __len__(self) -> int:
        return self.count - len(self.acked)

    def add(self, batch: Batch) -> None:
        rows = batch.rows
        if not rows:
            return
        if not self.batches:
            self.first = rows[0][0]
            self.since = batch.arrived
        self.batches.append(rows)
        self.starts.append(rows[0][0])
        self.count += len(rows)
        self.bytes += sum(map(len, map(_ENTRY, rows)))
        self.last = rows[-1][0]
        self.held = self.held or batch.held

    def take(self, rid: int) -> Row | None:
        """Mark ``rid`` acknowledged if it waits here (then it is never written); its row."""
        if not self.first <= rid <= self.last or rid in self.acked:
            return None
        rows = self.batches[bisect.bisect_right(self.starts, rid) - 1]
        index = rid - rows[0][0]
        if index >= len(rows) or rows[index][0] != rid:
            return None
        self.acked.add(rid)
        if not len(self):
            self.clear()
        return rows[index]

    def rows(self) -> list[Row]:
        """The rows to write, in id order."""
        if self.acked:
            acked = self.acked
            return [r for b in self.batches for r in b if r[0] not in acked]
        return list(itertools.chain.from_iterable(self.batches))

    def drop_oldest(self, n: int) -> list[int]:
        """Drop the oldest whole batches holding at least ``n`` rows; their unacknowledged ids."""
        dropped: list[int] = []
        while self.batches and len(dropped) < n:
            rows = self.batches.pop(0)
            self.starts.pop(0)
            self.count -= len(rows)
            dropped.extend(r[0] for r in rows if r[0] not in self.acked)
            self.acked.difference_update(r[0] for r in rows)
        if self.batches:
            self.first = self.batches[0][0][0]
        else:
            self.clear()
        return dropped


@dataclass
class Op:
    """A queued operation: a write inside the next transaction, or a read after it."""

    future: asyncio.Future[Any] | None
    write: Callable[[sqlite3.Connection], Any] | None = None
    read: Callable[[sqlite3.Connection], Any] | None = None
    #: What to answer for a read while no file can be opened.
    fallback: Callable[[], Any] | None = None
    stop: bool = False
    #: May wait in memory while the disk refuses (answered at once, written later).
    deferrable: bool = False
    #: Write the readings waiting for the history now (a read of it follows).
    history: bool = False
    #: A read of what is committed only: answered at once, nothing committed for it.
    quiet: bool = False


@dataclass
class Delete:
    """Rows forwarded (``forwarded``) or discarded (``evicted``): deleted with the next commit.

    ``gone`` counts those already dealt with (rows still waiting in memory).
    """

    future: asyncio.Future[Any] | None
    ids: list[int]
    counter: str
    gone: int = 0


@dataclass
class Release:
    """Re-stamp every held row: ``ts = mono + offset_ms``, then clear ``mono``."""

    future: asyncio.Future[Any] | None
    offset_ms: int


Item = Batch | Op | Delete | Release


@dataclass
class Opened:
    """What the loop side needs to know once the file is open."""

    next_id: int
    last_ts: dict[str, int]
    hold_from: int | None  # the first held row's id (held rows of this boot), or None


@dataclass
class _Tx:
    """What one transaction changes in the counters (applied after COMMIT)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    depth: int = 0
    bytes: int = 0
    evicted_upto: int = 0
    history: bool = False  # the history table changed
    history_bytes: int = 0
    history_readings: int = 0
    history_pending: bool = False  # the readings waiting for the history were written
    pruned: bool = False


class Writer:
    """The writer thread's state and loop (`run`); the loop side talks to it through `queue`.

    Results go back through ``post`` (``loop.call_soon_threadsafe``):
    ``on_results`` answers futures, ``on_dropped`` tells which waiting
    readings were dropped, ``on_restamped`` how far held rows are re-stamped,
    ``on_evicted`` up to which id rows were evicted.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int | None,
        max_bytes: int | None,
        sync_interval: float,
        boot: str,
        post: Callable[..., None],
        on_results: Callable[[list[Result]], None],
        on_dropped: Callable[[list[int]], None],
        on_restamped: Callable[[int, bool], None],
        on_evicted: Callable[[int], None],
        history_days: float = 0.0,
        history_max_bytes: int | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.history_days = history_days
        self.history_max_bytes = history_max_bytes
        self._wall = wall
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.sync_interval = sync_interval
        self.boot = boot
        self.queue: queue.SimpleQueue[Item] = queue.SimpleQueue()
        self._post = post
        self._on_results = on_results
        self._on_dropped = on_dropped
        self._on_restamped = on_restamped
        self._on_evicted = on_evicted
        # Read from the loop (plain values written by this one thread).
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.depth = 0
        self.bytes = 0
        self.waiting = 0  # readings in memory, neither committed nor acknowledged
        self.taken = 0  # readings taken from the queue so far
        self.state = "starting"  # ok | full | read-only | I/O error | cannot open | ...
        self.problem = ""
        self.failure: BaseException | None = None
        # The history table (gateway/storehistory.py): what it holds, what was lost.
        self.history_bytes = 0
        self.history_readings = 0
        self.history_dropped = 0  # acknowledged readings memory could not keep for it
        # Writer-only state.
        self._conn: sqlite3.Connection | None = None
        self._ro: sqlite3.Connection | None = None
        self._wal: int | None = None
        self._meta: dict[str, Any] = {}
        self._loaded = False  # counters read from a file at least once
        self._last_ts: dict[str, int] = {}  # newest stamp per device since meta was written
        self._max_id = 0
        self._rows: storefile.Rows | None = None  # what rows keep, both ways
        self._waiting = _Waiting()
        self._deletes: list[Delete] = []
        self._deletes_since: float | None = None
        self._deferred: list[Op] = []
        self._releases: list[Release] = []
        self._restamped = 0
        self._unsynced_since: float | None = None
        self._meta_dirty = False
        self._last_meta = time.monotonic()
        self._last_checkpoint = time.monotonic()
        self._retry_at = 0.0
        self._degraded_since = 0.0
        self._episode_unstored = 0
        self._evicting = False
        self._episode_evicted = 0
        self._hold_saved = False
        self._costs: collections.deque[float] = collections.deque(maxlen=16)
        # Readings acknowledged before their commit, waiting to go to the history.
        self._history: list[storehistory.Pending] = []
        self._history_size = 0
        self._history_since: float | None = None
        self._history_now = False  # asked for (flush_history)
        self._last_prune = 0.0
        self._checkpoint_after = 0.0

    # ------------------------------------------------------------- lifecycle
    def open(self) -> Opened:
        """Open the file (in the writer thread, before `run`); a disk fault leaves it degraded.

        Raises NewerSchema for a file of a newer gateway.
        """
        try:
            self._connect()
        except (sqlite3.Error, OSError) as exc:
            self._degrade(exc, time.monotonic())
            return Opened(next_id=1, last_ts={}, hold_from=None)
        return self._opened()

    def run(self) -> None:
        """The writer's loop: until the stop marker, then a last commit, sync and checkpoint."""
        try:
            while True:
                items = self._collect(self._timeout(time.monotonic()))
                stop = self._take(items)
                self._step(time.monotonic(), final=stop)
                if stop:
                    break
            self._finish()
        except BaseException as exc:  # noqa: BLE001 - recorded, reported to every waiter
            self._fail(exc)
        finally:
            self._close()

    def _connect(self, damaged: str | None = None) -> None:
        """Open the file (or, when ``damaged`` says why, replace it) and load its state."""
        path = self.path
        if damaged is not None:
            conn = self._replace_damaged(damaged)
        else:
            try:
                conn = storefile.connect(path)
            except DamagedFile as exc:
                conn = self._replace_damaged(exc.reason)
        try:
            conn.execute("SELECT COUNT(*) FROM meta").fetchone()  # the WAL exists from here
            self._wal = os.open(f"{path}-wal", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            _sync_dir(path.parent)
            self._load(conn)
        except BaseException:
            conn.close()
            if self._wal is not None:
                os.close(self._wal)
                self._wal = None
            raise
        self._conn = conn
        self.state = "ok"
        self.problem = ""

    def _replace_damaged(self, reason: str) -> sqlite3.Connection:
        """Move a damaged file aside, start a fresh one with what still reads; one log line."""
        aside = storefile.move_aside(self.path)
        found = storefile.salvage(aside)
        conn = storefile.connect(self.path, check=False)
        try:
            kept = storefile.restore(conn, found)
            held = found.held
            lost = held - kept if held is not None and held > kept else 0
            if lost:  # gone from the buffer without being forwarded, like an eviction
                conn.execute(_UPSERT_META, ("evicted", int(found.meta.get("evicted", 0)) + lost))
        except BaseException:
            conn.close()
            raise
        log.error(
            "storage file %s was damaged (%s): moved aside to %s; it held %s buffered readings,"
            " %d recovered into a fresh file%s",
            self.path,
            reason,
            aside.name,
            "an unknown number of" if held is None else held,
            kept,
            "" if not found.lost else "; unreadable: " + ", ".join(found.lost),
        )
        return conn

    def _load(self, conn: sqlite3.Connection) -> None:
        """Counters, depth and ids from the file, and what to do with rows held by another boot."""
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        self._meta = meta
        marked = int(meta.get("next_id", 1) or 1)
        # Rows committed since the counters were last written (COUNTERS_S) were received too.
        (newer,) = conn.execute("SELECT COUNT(*) FROM outbox WHERE id >= ?", (marked,)).fetchone()
        on_file = {key: int(meta.get(key, 0) or 0) for key in COUNTERS}
        on_file["received"] += int(newer)
        for key in COUNTERS:
            # Opened again after a fault: memory knows at least as much. First opened:
            # what was counted before (a disk that refused the file at start) adds up.
            mine = self.counts[key]
            self.counts[key] = max(on_file[key], mine) if self._loaded else on_file[key] + mine
        self._loaded = True
        count, size = conn.execute(f"SELECT COUNT(*), {_SIZE} FROM outbox").fetchone()
        self.depth, self.bytes = int(count), int(size)
        (top,) = conn.execute("SELECT MAX(id) FROM outbox").fetchone()
        self._max_id = max(self._max_id, marked - 1, top or 0)
        self._rows = storefile.Rows(conn)
        if "history_bytes" in meta and "history_readings" in meta:
            self.history_bytes = int(meta["history_bytes"] or 0)
            self.history_readings = int(meta["history_readings"] or 0)
        else:  # migrated or salvaged: counted once, then kept in meta
            self.history_bytes, self.history_readings = storehistory.totals(conn)
        if meta.get("hold_boot") not in (None, self.boot):
            n = conn.execute("UPDATE outbox SET mono = NULL WHERE mono IS NOT NULL").rowcount
            conn.execute("DELETE FROM meta WHERE key = 'hold_boot'")
            self._meta.pop("hold_boot", None)
            if n:
                log.warning(
                    "%d readings were stamped before the clock was synchronised, during an"
                    " earlier boot: they cannot be re-stamped and keep the time the clock"
                    " said then",
                    n,
                )

    def _opened(self) -> Opened:
        conn = self._conn
        assert conn is not None
        meta = self._meta
        last_ts = {
            key[len("last_ts:") :]: int(value)
            for key, value in meta.items()
            if key.startswith("last_ts:")
        }
        marked = int(meta.get("next_id", 1) or 1)
        for device, ts in conn.execute(
            "SELECT device, MAX(ts) FROM outbox WHERE id >= ? AND mono IS NULL GROUP BY device",
            (marked,),
        ):
            last_ts[device] = max(last_ts.get(device, ts), int(ts))
        (hold_from,) = conn.execute("SELECT MIN(id) FROM outbox WHERE mono IS NOT NULL").fetchone()
        self._hold_saved = hold_from is not None
        self._transaction([], time.monotonic(), final=True)  # limits may have shrunk
        return Opened(next_id=self._max_id + 1, last_ts=last_ts, hold_from=hold_from)

    def _finish(self) -> None:
        """At stop: everything committed and synced already (final step); truncate the WAL."""
        if self._conn is None or self.state != "ok":
            if self.waiting:
                log.error(
                    "stopping with storage %s: %d readings were not stored",
                    self.state,
                    self.waiting,
                )
            return
        with contextlib.suppress(sqlite3.Error):
            checkpoint(self._conn)

    def _close(self) -> None:
        if self._ro is not None:
            self._ro.close()
            self._ro = None
        if self._conn is not None:
            self._conn.close()  # checkpoints and removes the WAL when it can
            self._conn = None
        if self._wal is not None:
            os.close(self._wal)
            self._wal = None

    # ------------------------------------------------------------ the loop
    def _timeout(self, now: float) -> float | None:
        """Seconds until something is due (None: only a new item can make work)."""
        if self._releases and self.state == "ok":
            return 0.0
        hold = self._hold_time()
        due: list[float] = []
        if self._waiting.since is not None:
            due.append(self._waiting.since + hold)
        if self._deletes_since is not None:
            due.append(self._deletes_since + self.sync_interval)
        if self._unsynced_since is not None:
            due.append(self._unsynced_since + hold)
        if self._meta_dirty or self._deferred:
            due.append(self._last_meta + COUNTERS_S)
        if self._history_since is not None:
            due.append(self._history_since + storehistory.HOLD_S)
        if self.state != "ok":
            due = [max(t, self._retry_at) for t in due] or [self._retry_at]
        elif self._wal is not None:
            due.append(self._last_checkpoint + IDLE_CHECKPOINT_S)
        return None if not due else max(0.0, min(due) - now)

    def _hold_time(self) -> float:
        """How long readings may wait in memory: sync_interval less what a commit+sync takes."""
        cost = max(self._costs, default=0.0)
        margin = min(self.sync_interval / 2, max(MIN_MARGIN_S, 2 * cost))
        return max(0.0, self.sync_interval - margin)

    def _collect(self, timeout: float | None) -> list[Item]:
        """Wait up to ``timeout`` for an item, then take whatever else is queued."""
        q = self.queue
        try:
            first = q.get(timeout=timeout) if timeout is None or timeout > 0 else q.get_nowait()
        except queue.Empty:
            return []
        items = [first]
        while len(items) < MAX_ITEMS:
            try:
                items.append(q.get_nowait())
            except queue.Empty:
                break
        return items

    def _take(self, items: list[Item]) -> bool:
        """Sort new items into what waits; answer what needs no file; True on the stop marker."""
        stop = False
        urgent: list[Op] = []
        results: list[Result] = []
        now = time.monotonic()
        for item in items:
            if type(item) is Batch:
                self._add_rows(item)
            elif type(item) is Delete:
                if self._delete_waiting(item, now):
                    results.append((item.future, item.gone, None))
            elif type(item) is Release:
                self._releases.append(item)
            else:
                assert isinstance(item, Op)
                if item.quiet and item.write is None and not item.stop:
                    self._reads([item], results)
                    continue
                stop = stop or item.stop
                self._history_now = self._history_now or item.history
                urgent.append(item)
        self.waiting = len(self._waiting)
        if results:
            self._post(self._on_results, results)
        if urgent:
            self._transaction(urgent, now)
        return stop

    def _add_rows(self, batch: Batch) -> None:
        if not batch.rows:
            return
        self._waiting.add(batch)
        self._last_ts.update(batch.last)
        self.taken += len(batch.rows)
        self._max_id = max(self._max_id, batch.rows[-1][0])  # ids are never given twice
        if len(self._waiting) > MAX_PENDING and self.state != "ok":
            self._drop_oldest(len(self._waiting) - MAX_PENDING)

    def _drop_oldest(self, n: int) -> None:
        """Readings the disk would not take and memory cannot keep: dropped, counted."""
        dropped = self._waiting.drop_oldest(n)
        self.counts["unstored"] += len(dropped)
        self._episode_unstored += len(dropped)
        self._meta_dirty = True
        self._post(self._on_dropped, dropped)

    def _delete_waiting(self, item: Delete, now: float) -> bool:
        """Rows acknowledged before they were committed need no write; True if nothing is left."""
        if not item.ids:  # a counter only (rows sent twice)
            self.counts[item.counter] += item.gone
            self._meta_dirty = True
            return True
        waiting = self._waiting
        later: list[int] = []
        keep = self._history if self.history_days > 0 and item.counter == "forwarded" else None
        size = 0
        for rid in item.ids:
            row = waiting.take(rid)
            if row is None:
                later.append(rid)
                continue
            item.gone += 1
            if keep is not None:
                keep.append((row[1], row[2], row[3]))
                size += len(row[3])
        if size:
            self._history_size += size
            if self._history_since is None:
                self._history_since = now
            if len(self._history) > MAX_PENDING and self.state != "ok":
                excess = len(self._history) - MAX_PENDING
                self.history_dropped += excess
                del self._history[:excess]
        if item.gone:
            self.counts["received"] += item.gone
            self.counts[item.counter] += item.gone
            self._meta_dirty = True
        if not later:
            return True
        item.ids = later
        self._deletes.append(item)
        if self._deletes_since is None:
            self._deletes_since = now
        return False

    def _step(self, now: float, *, final: bool = False) -> None:
        """Commit, sync and checkpoint whatever is due now."""
        if self.state != "ok" and now < self._retry_at and not final:
            return
        if self._conn is None:
            self._reopen(now)
            if self._conn is None:
                return
        hold = self._hold_time()
        due = (
            final
            or bool(self._releases)
            or (
                self._waiting.since is not None
                and (self._waiting.since + hold <= now or self._waiting.bytes >= COMMIT_BYTES)
            )
            or (self._deletes_since is not None and self._deletes_since + self.sync_interval <= now)
            or ((self._meta_dirty or bool(self._deferred)) and self._last_meta + COUNTERS_S <= now)
            or self._history_due(now, final=False)
            or self.state != "ok"
        )
        if due:  # a re-stamp goes one chunk per turn: what is queued is answered between
            self._transaction([], now, final=final)
        if self._unsynced_since is not None and (final or self._unsynced_since + hold <= now):
            self._sync(now)
        self._maybe_checkpoint(now)

    def _reopen(self, now: float) -> None:
        try:
            self._connect()
        except (sqlite3.Error, OSError, NewerSchema) as exc:
            self._retry_at = now + RETRY_S
            if self.problem != str(exc):
                log.warning("storage still unavailable: %s", exc)
                self.problem = str(exc)
            return
        self._opened()
        self._recovered(now)

    # -------------------------------------------------------- transactions
    def _transaction(self, ops: list[Op], now: float, *, final: bool = False) -> None:
        """One transaction: waiting readings, deletes, writes, re-stamps, eviction, counters.

        ``ops`` are the operations asked for now (their reads run after the
        commit). While the disk refuses, writes that may wait are kept for
        later and the rest fail; reads are still served.
        """
        conn = self._conn
        results: list[Result] = []
        if conn is None or (self.state != "ok" and now < self._retry_at and not final):
            self._without_file(ops, results)
            self._post(self._on_results, results)
            return
        writes = [op for op in ops if op.write is not None]
        rows = self._waiting.rows()
        held = self._waiting.held
        deletes = self._deletes
        meta = (
            final
            or self.state != "ok"
            or self._last_meta + COUNTERS_S <= now
            or (held and not self._hold_saved)
        )
        history_now = self._history_due(now, final=final)
        if not (
            rows or deletes or writes or self._deferred or self._releases or meta or history_now
        ):
            self._reads(ops, results)  # nothing to write: no transaction
            self._post(self._on_results, results)
            return
        tx = _Tx()
        started = time.monotonic()
        try:
            conn.execute("BEGIN IMMEDIATE")
            codec = self._rows
            assert codec is not None  # set with _conn
            if rows:
                stored = _stored(rows, codec)
                conn.executemany(
                    "INSERT INTO outbox (id, device, ts, entry, mono) VALUES (?, ?, ?, ?, ?)",
                    stored,
                )
                tx.counts["received"] = len(rows)
                tx.depth = len(rows)
                tx.bytes = sum(map(len, map(_ENTRY, stored))) + sum(map(len, map(_DEVICE, rows)))
            moved: list[storehistory.Pending] = []
            keep = self.history_days > 0
            for d in deletes:
                if keep and d.counter == "forwarded":
                    n, size = _move_ids(conn, d.ids, moved, codec)
                else:
                    n, size = _delete_ids(conn, d.ids)
                d.gone += n
                tx.counts[d.counter] += n
                tx.depth -= n
                tx.bytes -= size
            answers = [(op, op.write(conn)) for op in (*self._deferred, *writes)]  # type: ignore[misc]
            restamped = self._restamp(conn, tx, codec) if self._releases else None
            if keep:
                self._write_history(conn, tx, moved, now, pending=history_now or bool(moved))
            self._evict(conn, tx)
            if meta or tx.counts["evicted"]:
                self._save_meta(conn, tx, rows, held)
            if tx.history:
                conn.executemany(_UPSERT_META, [
                    ("history_bytes", self.history_bytes + tx.history_bytes),
                    ("history_readings", self.history_readings + tx.history_readings),
                ])
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.rollback()
            if self._rows is not None:
                self._rows.rolled_back()
            self._degrade(exc, now)
            self._without_file(ops, results)
            self._post(self._on_results, results)
            return
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            if self._rows is not None:
                self._rows.rolled_back()
            raise
        codec.committed()
        self._costs.append(time.monotonic() - started)
        if self.state != "ok":
            self._recovered(now)
        self._committed(tx, rows, held, meta or bool(tx.counts["evicted"]), now)
        for d in deletes:
            results.append((d.future, d.gone, None))
        results.extend((op.future, value, None) for op, value in answers if op in writes)
        self._reads(ops, results)
        progress = None
        if restamped is not None:
            results.extend(self._restamp_done(*restamped))
            progress = (restamped[0], restamped[2])
        # One call on the loop: what the rows became first, so whoever the answers wake sees it.
        self._post(self._to_loop, tx.evicted_upto, progress, results)

    def _committed(self, tx: _Tx, rows: list[Row], held: bool, meta: bool, now: float) -> None:
        """Make a committed transaction visible: counters, waiting readings, deadlines."""
        self._apply(tx)
        if rows:
            since = self._waiting.since if self._waiting.since is not None else now
            self._unsynced_since = min(self._unsynced_since or since, since)
            self._max_id = max(self._max_id, rows[-1][0])
            self._hold_saved = self._hold_saved or held
        if meta:
            self._last_meta = now
            self._meta_dirty = False
            self._last_ts = {}
        if tx.history_pending:
            self._history = []
            self._history_size = 0
            self._history_since = None
            self._history_now = False
        if tx.pruned:
            self._last_prune = now
        self._waiting.clear()
        self.waiting = 0
        self._deletes = []
        self._deletes_since = None
        self._deferred = []

    def _without_file(self, ops: list[Op], results: list[Result]) -> None:
        """Answer ``ops`` while the disk refuses: keep what may wait, fail other writes."""
        for op in ops:
            if op.write is None:
                continue
            if op.deferrable:
                self._deferred.append(op)
                results.append((op.future, None, None))
            else:
                error = StoreError(f"storage {self.state}: {self.problem}")
                results.append((op.future, None, error))
        self._reads(ops, results)

    def _reads(self, ops: Iterable[Op], results: list[Result]) -> None:
        for op in ops:
            if op.read is None:
                if op.write is None:
                    results.append((op.future, None, None))
                continue
            conn = self._conn or self._read_only()
            if conn is None:
                if op.fallback is not None:
                    results.append((op.future, op.fallback(), None))
                else:
                    error = StoreError(f"storage {self.state}: {self.problem}")
                    results.append((op.future, None, error))
                continue
            try:
                results.append((op.future, op.read(conn), None))
            except (sqlite3.Error, ValueError) as exc:
                if conn is not self._conn and op.fallback is not None:
                    results.append((op.future, op.fallback(), None))
                else:
                    results.append((op.future, None, as_store_error(exc)))

    def rows_for(self, conn: sqlite3.Connection) -> storefile.Rows:
        """The `storefile.Rows` for a read through ``conn`` (in the writer's thread).

        The writer's own for its connection (it knows every key list written, no
        need to read them again), a fresh one for a read-only view.
        """
        if conn is self._conn and self._rows is not None:
            return self._rows
        return storefile.Rows(conn)

    def _read_only(self) -> sqlite3.Connection | None:
        """While the file cannot be opened for writing: a read-only view of it, if it reads."""
        if self._ro is None:
            with contextlib.suppress(sqlite3.Error):
                self._ro = sqlite3.connect(
                    f"file:{self.path}?mode=ro&immutable=1", uri=True, check_same_thread=False
                )
        return self._ro

    def _restamp(
        self, conn: sqlite3.Connection, tx: _Tx, codec: storefile.Rows
    ) -> tuple[int, int, bool]:
        """Re-stamp one chunk of held rows with the newest release's offset.

        Returns (last id re-stamped or -1, rows, whether none is left).
        """
        offset = self._releases[-1].offset_ms
        rows = conn.execute(
            "SELECT id, entry, mono FROM outbox WHERE mono IS NOT NULL ORDER BY id LIMIT ?",
            (RESTAMP_CHUNK,),
        ).fetchall()
        updates = []
        for rid, stored, mono in rows:
            ts = int(mono) + offset
            new = stored
            if rid < codec.bare_from:  # the whole entry, stamped inside too
                new = with_ts(stored, ts)
                tx.bytes += len(new) - len(stored)
            updates.append((ts, new, rid))
        conn.executemany("UPDATE outbox SET ts = ?, entry = ?, mono = NULL WHERE id = ?", updates)
        done = len(rows) < RESTAMP_CHUNK
        if done:
            conn.execute("DELETE FROM meta WHERE key = 'hold_boot'")
        return (rows[-1][0] if rows else -1), len(rows), done

    def _restamp_done(self, upto: int, n: int, done: bool) -> list[Result]:
        """After the commit of a re-stamp chunk; the answers to the releases when all are done."""
        self._restamped += n
        if not done:
            return []
        self._hold_saved = False
        total, self._restamped = self._restamped, 0
        releases, self._releases = self._releases, []
        return [(r.future, total, None) for r in releases]

    def _to_loop(
        self, evicted_upto: int, restamped: tuple[int, bool] | None, results: list[Result]
    ) -> None:
        """On the event loop: what rows became first, then the answers (one wake-up, in order)."""
        if evicted_upto:
            self._on_evicted(evicted_upto)
        if restamped is not None:
            self._on_restamped(*restamped)
        self._on_results(results)

    def _evict(self, conn: sqlite3.Connection, tx: _Tx) -> None:
        """Delete the oldest rows while the outbox is over max_rows or max_bytes."""
        depth = self.depth + tx.depth
        size = self.bytes + tx.bytes
        over_rows = depth - self.max_rows if self.max_rows is not None else 0
        over_bytes = size - self.max_bytes if self.max_bytes is not None else 0
        if over_rows <= 0 and over_bytes <= 0:
            return
        cutoff = 0
        if over_rows > 0:
            (cutoff,) = conn.execute(
                "SELECT id FROM outbox ORDER BY id LIMIT 1 OFFSET ?", (over_rows - 1,)
            ).fetchone()
        if over_bytes > 0:
            freed = 0
            cur = conn.execute("SELECT id, length(device) + length(entry) FROM outbox ORDER BY id")
            for rid, n in cur:
                freed += n
                if freed >= over_bytes:
                    cutoff = max(cutoff, rid)
                    break
            cur.close()
        rows, freed_bytes = _delete_range(conn, 0, cutoff)
        tx.evicted_upto = max(tx.evicted_upto, cutoff)
        tx.counts["evicted"] += rows
        tx.depth -= rows
        tx.bytes -= freed_bytes

    # ------------------------------------------------------------- history
    def _history_due(self, now: float, *, final: bool) -> bool:
        """Whether the readings waiting for the history go into this transaction."""
        if not self._history:
            return False
        since = self._history_since if self._history_since is not None else now
        return (
            final
            or self._history_now
            or since + storehistory.HOLD_S <= now
            or self._history_size >= COMMIT_BYTES
        )

    def _write_history(
        self, conn: sqlite3.Connection, tx: _Tx, moved: list[storehistory.Pending],
        now: float, *, pending: bool,
    ) -> None:
        """Chunks of forwarded readings into the history; the oldest pruned now and then."""
        rows = [*self._history, *moved] if pending else moved
        if rows:
            added, readings = storehistory.insert(conn, storehistory.chunks(rows))
            tx.history_bytes += added
            tx.history_readings += readings
            tx.history = True
        tx.history_pending = pending
        if rows or self._last_prune + PRUNE_S <= now:
            cutoff = int((self._wall() - self.history_days * 86_400) * 1000)
            freed, readings = storehistory.prune(
                conn,
                cutoff_ms=cutoff,
                max_bytes=self.history_max_bytes,
                total_bytes=self.history_bytes + tx.history_bytes,
            )
            if freed or readings:
                tx.history_bytes -= freed
                tx.history_readings -= readings
                tx.history = True
            tx.pruned = True

    def _save_meta(self, conn: sqlite3.Connection, tx: _Tx, rows: list[Row], held: bool) -> None:
        """Counters, the next id, the newest stamp per device and the held rows' boot."""
        max_id = max(self._max_id, rows[-1][0] if rows else 0)
        updates: list[tuple[str, Any]] = [
            (key, self.counts[key] + tx.counts[key]) for key in COUNTERS
        ]
        updates.append(("next_id", max_id + 1))
        updates.extend((f"last_ts:{device}", ts) for device, ts in self._last_ts.items())
        if held and not self._hold_saved:
            updates.append(("hold_boot", self.boot))
        conn.executemany(_UPSERT_META, updates)

    def _apply(self, tx: _Tx) -> None:
        """Make a committed transaction's changes visible in the counters; log evictions."""
        for key in COUNTERS:
            self.counts[key] += tx.counts[key]
        self.history_bytes += tx.history_bytes
        self.history_readings += tx.history_readings
        self.depth += tx.depth
        self.bytes += tx.bytes
        evicted = tx.counts["evicted"]
        if evicted:
            self._episode_evicted += evicted
            if not self._evicting:
                self._evicting = True
                log.warning(
                    "outbox full (max_rows=%s, max_bytes=%s): evicting the oldest readings",
                    self.max_rows,
                    self.max_bytes,
                )
        elif self._evicting and self._below_hysteresis():
            log.info(
                "outbox below its limits again; %d readings were evicted", self._episode_evicted
            )
            self._evicting = False
            self._episode_evicted = 0

    def _below_hysteresis(self) -> bool:
        rows_ok = self.max_rows is None or self.depth <= self.max_rows * EVICTION_HYSTERESIS
        bytes_ok = self.max_bytes is None or self.bytes <= self.max_bytes * EVICTION_HYSTERESIS
        return rows_ok and bytes_ok

    # ------------------------------------------------------ sync, checkpoints
    def _sync(self, now: float) -> None:
        """Make every commit so far durable: one fdatasync of the WAL."""
        if self._wal is None:
            return
        started = time.monotonic()
        try:
            os.fdatasync(self._wal)
        except OSError as exc:
            self._degrade(exc, now)
            return
        self._costs.append(time.monotonic() - started)
        self._unsynced_since = None

    def _maybe_checkpoint(self, now: float) -> None:
        """Copy the WAL into the file and truncate it: when it is big, or the outbox is empty.

        "Big" shrinks with the free space: a WAL that filled the disk could never be
        checkpointed again (copying it into the file needs room for the file to grow).
        """
        conn, wal = self._conn, self._wal
        if conn is None or wal is None or self.state != "ok":
            return
        size = os.fstat(wal).st_size
        if size == 0:
            self._last_checkpoint = now
            return
        try:
            st = os.statvfs(self.path.parent)
            limit = min(WAL_CHECKPOINT_BYTES, max(WAL_MIN_BYTES, st.f_bavail * st.f_frsize // 4))
        except OSError:
            limit = WAL_CHECKPOINT_BYTES
        idle = self.depth == 0 and not len(self._waiting)
        if size < limit and not (idle and self._last_checkpoint + IDLE_CHECKPOINT_S <= now):
            return
        if now < self._checkpoint_after:
            return
        try:
            busy = checkpoint(conn)
        except sqlite3.Error as exc:
            self._degrade(exc, now)
            return
        self._last_checkpoint = now
        # A reader (an export, a backup) holds an older snapshot: try again later.
        self._checkpoint_after = now + CHECKPOINT_BUSY_S if busy else 0.0
        if not busy:  # SQLite synced the WAL before copying it
            self._unsynced_since = None

    # ------------------------------------------------------------- faults
    def _degrade(self, exc: BaseException, now: float) -> None:
        """The disk refused: keep going in memory, retry every RETRY_S; log once per episode."""
        kind = error_kind(exc)
        if kind == "damaged" and self._conn is not None:
            self._close()
            try:
                self._connect(damaged=str(exc))
            except (sqlite3.Error, OSError) as again:
                exc, kind = again, error_kind(again)
            else:
                return
        self._retry_at = now + RETRY_S
        if self.state in {"ok", "starting"}:
            self._degraded_since = now
            self._episode_unstored = 0
            log.error(
                "storage %s: %s (%s); readings wait in memory (up to %d) and are still"
                " forwarded; retrying every %.0f s",
                kind,
                exc,
                self.path,
                MAX_PENDING,
                RETRY_S,
            )
        self.state = kind
        self.problem = str(exc)
        self._meta_dirty = True  # something to write at the next attempt, to see it work
        if kind != "full" and self._conn is not None:
            # A connection opened on a read-only disk stays read-only: open it again later.
            self._close()
        if kind == "full" and self._conn is not None:
            with contextlib.suppress(sqlite3.Error):  # a smaller WAL may be all it takes
                checkpoint(self._conn)
        if len(self._waiting) > MAX_PENDING:
            self._drop_oldest(len(self._waiting) - MAX_PENDING)

    def _recovered(self, now: float) -> None:
        log.warning(
            "storage writable again after %.0f s; %d readings could not be stored meanwhile"
            " (counted as unstored)",
            now - self._degraded_since,
            self._episode_unstored,
        )
        self.state = "ok"
        self.problem = ""

    def _fail(self, exc: BaseException) -> None:
        """A bug, not a disk fault: refuse further work and fail every waiter."""
        error = as_store_error(exc)
        self.failure = error
        log.error("store writer stopped: %s", exc, exc_info=exc)
        results: list[Result] = []
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, (Op, Delete, Release)):
                results.append((item.future, None, error))
        self._post(self._on_results, results)


def with_ts(entry: str, ts: int) -> str:
    """``entry`` (``{"ts":...,"values":{...}}``) with its ``ts`` replaced."""
    if entry.startswith('{"ts":'):
        comma = entry.find(",", 6)
        if comma > 0 and entry[6:comma].isdigit():
            return f'{{"ts":{ts}{entry[comma:]}'
    obj = json.loads(entry)
    obj["ts"] = ts
    return json.dumps(obj, separators=(",", ":"))


def ranges(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive runs of ``ids`` as inclusive ``(first, last)`` pairs."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(ids)):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _delete_ids(conn: sqlite3.Connection, ids: list[int]) -> tuple[int, int]:
    rows = size = 0
    for first, last in ranges(ids):
        n, b = _delete_range(conn, first, last)
        rows += n
        size += b
    return rows, size


def checkpoint(conn: sqlite3.Connection) -> bool:
    """``wal_checkpoint(TRUNCATE)`` that never waits for readers; True if one held it back.

    With the connection's busy timeout SQLite would wait (up to 5 s) for a
    reader on an older snapshot, e.g. a `hydrogate export` or `backup` of
    the live file, and stall the writer meanwhile; without it, it copies
    what it can now and says busy.
    """
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        (busy, _, _) = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return bool(busy)


def _stored(rows: list[Row], codec: storefile.Rows) -> list[Stored]:
    """``rows`` as the outbox keeps them (`storefile.Rows.stored`)."""
    values, keep = storefile.values_text, codec.stored
    return [(rid, device, ts, keep(values(entry)), mono) for rid, device, ts, entry, mono in rows]


def _move_ids(
    conn: sqlite3.Connection, ids: list[int], out: list[storehistory.Pending], codec: storefile.Rows
) -> tuple[int, int]:
    """Delete forwarded outbox rows, appending them (whole entries) to ``out`` for the history.

    Returns (rows, bytes) deleted, bytes as stored.
    """
    rows = size = 0
    for first, last in ranges(ids):
        found = conn.execute(
            "SELECT id, device, ts, entry FROM outbox WHERE id BETWEEN ? AND ?", (first, last)
        ).fetchall()
        if found:
            conn.execute("DELETE FROM outbox WHERE id BETWEEN ? AND ?", (first, last))
            for rid, device, ts, stored in found:
                size += len(device) + len(stored)
                try:
                    out.append((device, ts, codec.moved(rid, ts, stored)))
                except storefile.DamagedRow as exc:  # forwarded all the same: not kept
                    log.error("%s: not kept in the history", exc)
            rows += len(found)
    return rows, size


def _delete_range(conn: sqlite3.Connection, first: int, last: int) -> tuple[int, int]:
    """Delete outbox rows with ids in [first, last]; return (rows, bytes) deleted."""
    count, size = conn.execute(
        f"SELECT COUNT(*), {_SIZE} FROM outbox WHERE id BETWEEN ? AND ?", (first, last)
    ).fetchone()
    if count:
        conn.execute("DELETE FROM outbox WHERE id BETWEEN ? AND ?", (first, last))
    return int(count), int(size)


def _sync_dir(path: Path) -> None:
    """fsync a directory, so that a file just created in it survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "Batch",
    "Delete",
    "Op",
    "Opened",
    "Release",
    "Row",
    "StoreClosed",
    "StoreError",
    "Writer",
    "as_store_error",
    "ranges",
    "with_ts",
]
