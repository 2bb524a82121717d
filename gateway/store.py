"""SQLite store-and-forward: the outbox of readings, counters, settings, actuation ledger,
and what controllers learned about each tank.

One dedicated writer thread ("hydrogate-store") owns the only sqlite3
connection. The event loop never touches SQLite: `Store.append` validates and
serializes a reading (cheap, synchronous) and puts it on a queue; everything
else is an operation on the same queue whose result comes back as a future.
The writer groups what it finds on the queue into one transaction per
``commit_interval`` (sooner when someone waits for an answer), so 50,000
appends per second cost about fifty commits.

A reading counts as received once its transaction commits. The database runs
in WAL mode with ``synchronous=NORMAL``: a commit is a ``write()`` of the
transaction's pages to the WAL file, without fsync. That write is in the
kernel's page cache the moment COMMIT returns, so a crash or SIGKILL of this
process loses nothing committed; only a power cut or kernel crash can lose the
last transactions (never corrupt the file). ``synchronous=FULL`` would add one
fsync per commit, tens of milliseconds on the SD cards gateways run from, for
a guarantee (power loss) the requirement does not ask for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from gateway import tbmsg
from gateway.tbmsg import InvalidMessage, OutboxRow

__all__ = [
    "Actuation",
    "InvalidMessage",
    "OutboxRow",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreStats",
]

log = logging.getLogger("hydrogate.store")

SCHEMA_VERSION = 2
# AUTOINCREMENT: without it SQLite reuses the ids of deleted rows once the
# outbox is empty, and the uplink, which reads on "after the last id it sent",
# would skip the new rows.
_SCHEMA_V1 = """
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
# What a controller learned about a node's tank (rules.controller.Learner), as JSON,
# with the plant constants it was learned under (JSON too): knowledge learned
# for another tank volume or other pumps would mislead, so the caller compares them.
_LEARNED = """
CREATE TABLE learned (
    node TEXT NOT NULL,
    controller TEXT NOT NULL,
    state TEXT NOT NULL,
    plant TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (node, controller)
);
"""
#: The schema of a new file (version SCHEMA_VERSION).
_SCHEMA = _SCHEMA_V1 + _LEARNED
#: Each script brings a file from the version it is keyed by to the next one.
_MIGRATIONS: Mapping[int, str] = {1: _LEARNED}

#: Counters persisted in ``meta`` so that they survive restarts.
COUNTERS = ("received", "forwarded", "evicted", "duplicates_resent")
#: Most queue items the writer puts in one transaction.
MAX_BATCH = 10_000
#: Committed rows kept in memory for the uplink (about 100 bytes each): the
#: drain reads them from here instead of reading back what was just written.
TAIL_ROWS = 50_000
#: How long actuations stay in the ledger (the safety budget looks back one hour).
ACTUATION_KEEP_S = 86_400.0
#: An eviction episode ends once the outbox is back under this share of its limits.
EVICTION_HYSTERESIS = 0.9

_SIZE = "COALESCE(SUM(length(device) + length(entry)), 0)"
_UPSERT_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


class StoreError(Exception):
    """The store cannot do what was asked (database error, closed, bad data)."""


class StoreClosed(StoreError):
    """The store was closed (or its writer stopped after an error)."""


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of the store's counters.

    ``received``, ``forwarded``, ``evicted`` and ``duplicates_resent`` are
    lifetime totals persisted in the file; ``depth`` and ``bytes`` describe the
    outbox now (``bytes`` counts the stored device and entry text, not SQLite's
    own overhead); ``pending`` is what is queued but not committed yet.
    """

    received: int
    forwarded: int
    evicted: int
    duplicates_resent: int
    depth: int
    bytes: int
    pending: int


class Actuation(NamedTuple):
    """One ledger entry: ``actuator`` ran (or was commanded) at ``ts`` (wall s) for ``ms``."""

    actuator: str
    ts: float
    ms: int


@dataclass
class _Delta:
    """What one transaction changes in the in-memory counters (applied after COMMIT)."""

    received: int = 0
    forwarded: int = 0
    evicted: int = 0
    duplicates_resent: int = 0
    depth: int = 0
    bytes: int = 0
    evicted_upto: int = 0  # rows with ids up to this one were evicted


_Write = Callable[[sqlite3.Connection, _Delta], Any]
_Read = Callable[[sqlite3.Connection], Any]


class _Op:
    """A queued operation: a write inside the transaction or a read after COMMIT."""

    __slots__ = ("future", "read", "stop", "write")

    def __init__(
        self,
        future: asyncio.Future[Any] | None,
        *,
        write: _Write | None = None,
        read: _Read | None = None,
        stop: bool = False,
    ) -> None:
        self.future = future
        self.write = write
        self.read = read
        self.stop = stop


_Row = tuple[str, int, str]
_Item = list[_Row] | _Op


def _ranges(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive runs of ``ids`` as inclusive ``(first, last)`` pairs."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(ids)):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def _delete_range(conn: sqlite3.Connection, first: int, last: int) -> tuple[int, int]:
    """Delete outbox rows with ids in [first, last]; return (rows, bytes) deleted."""
    count, size = conn.execute(
        f"SELECT COUNT(*), {_SIZE} FROM outbox WHERE id BETWEEN ? AND ?", (first, last)
    ).fetchone()
    if count:
        conn.execute("DELETE FROM outbox WHERE id BETWEEN ? AND ?", (first, last))
    return int(count), int(size)


class Store:
    """The gateway's SQLite file: outbox, counters, settings, actuation ledger, learned state.

    Open it with ``async with Store.open(path, max_rows=..., max_bytes=...) as store``.
    All methods are called from the event loop that opened it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_rows: int | None,
        max_bytes: int | None,
        max_payload_bytes: int,
        commit_interval: float,
    ) -> None:
        """Use `Store.open`; this only records the settings."""
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        if commit_interval < 0:
            raise ValueError(f"commit_interval must be >= 0, got {commit_interval}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_payload_bytes = max_payload_bytes
        self._payload_limit = tbmsg.payload_limit(max_payload_bytes)
        self._commit_interval = commit_interval
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        # Rows appended on the event loop, handed to the writer as one list per
        # commit_interval: one wake-up of the writer thread per batch, not per row.
        self._rows: list[_Row] = []
        self._handover: asyncio.TimerHandle | None = None
        self._handed = 0  # rows handed to the writer (loop side)
        self._written = 0  # of those, rows committed (writer side)
        # The committed rows not yet deleted, newest TAIL_ROWS of them, on the
        # loop side: every row with an id >= _tail_from still in the outbox is
        # here, so peeks beyond _tail_from need no trip to SQLite.
        self._tail: dict[int, OutboxRow] = {}
        self._tail_from: int | None = None
        self._thread = threading.Thread(target=self._run, name="hydrogate-store", daemon=True)
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._closed = False
        self._failure: BaseException | None = None
        #: Set (from the writer, through the loop) after every commit that added rows.
        self.committed = asyncio.Event()
        # Last timestamp given to each device: touched only on the event loop.
        self._last_ts: dict[str, int] = {}
        # Device names already checked (a handful; checked once, not per reading).
        self._devices: set[str] = set()
        # Counters: written only by the writer thread, read anywhere.
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._depth = 0
        self._bytes = 0
        self._evicting = False
        self._episode_evicted = 0

    # ------------------------------------------------------------ lifecycle
    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        path: str | Path,
        *,
        max_rows: int | None,
        max_bytes: int | None,
        max_payload_bytes: int = 65536,
        commit_interval: float = 0.02,
    ) -> AsyncIterator[Store]:
        """Open (creating if needed) the store at ``path``; close it, committed, on exit."""
        store = cls(
            path,
            max_rows=max_rows,
            max_bytes=max_bytes,
            max_payload_bytes=max_payload_bytes,
            commit_interval=commit_interval,
        )
        await store._start()
        try:
            yield store
        finally:
            await store.close()

    async def _start(self) -> None:
        self._thread.start()
        try:
            await self._ready
        except BaseException:
            self._closed = True
            await self._join()
            raise

    async def close(self) -> None:
        """Commit everything queued so far, then stop the writer and close the file."""
        if not self._closed:
            self._closed = True
            self._hand_over()
            self._queue.put(_Op(None, stop=True))
        await self._join()

    async def _join(self) -> None:
        # The writer resolves _done as its very last act (after closing the
        # connection, which checkpoints the WAL), so join() returns at once.
        await self._done
        self._thread.join()

    # ---------------------------------------------------------------- hot path
    def append(self, device: str, ts_ms: int, values: Mapping[str, Any]) -> None:
        """Validate one reading and queue it for the next commit.

        The timestamp is raised to one past the device's previous one when
        needed, so every entry of a device has its own ``ts`` (ThingsBoard keeps
        only the last of two entries with the same ``ts``). Raises
        InvalidMessage at once for anything ThingsBoard would refuse.
        """
        if self._closed or self._failure is not None:
            raise StoreClosed("store is closed or failed") from self._failure
        if device not in self._devices:
            self._devices.add(tbmsg.check_device(device))
        ts = tbmsg.check_ts(ts_ms)
        last = self._last_ts.get(device)
        if last is not None and ts <= last:
            ts = last + 1
        entry = tbmsg.encode_entry(device, ts, values, self._payload_limit)
        self._last_ts[device] = ts
        self._rows.append((device, ts, entry))
        if len(self._rows) >= MAX_BATCH:
            self._hand_over()
        elif self._handover is None:
            self._handover = self._loop.call_later(self._commit_interval, self._hand_over)

    def _hand_over(self) -> None:
        """Give the rows appended so far to the writer, as one item, in order."""
        if self._handover is not None:
            self._handover.cancel()
            self._handover = None
        if self._rows:
            rows, self._rows = self._rows, []
            self._handed += len(rows)
            self._queue.put(rows)

    @property
    def stats(self) -> StoreStats:
        """Counters as of the last commit (cheap: kept in memory)."""
        c = self._counts
        return StoreStats(
            received=c["received"],
            forwarded=c["forwarded"],
            evicted=c["evicted"],
            duplicates_resent=c["duplicates_resent"],
            depth=self._depth,
            bytes=self._bytes,
            pending=len(self._rows) + self._handed - self._written,
        )

    # -------------------------------------------------------------- operations
    def _submit(self, *, write: _Write | None = None, read: _Read | None = None) -> Any:
        if self._closed or self._failure is not None:
            raise StoreClosed("store is closed or failed") from self._failure
        future: asyncio.Future[Any] = self._loop.create_future()
        self._hand_over()  # what was appended before this operation goes first
        self._queue.put(_Op(future, write=write, read=read))
        return future

    async def flush(self) -> None:
        """Wait until everything appended before this call is committed."""
        await self._submit(read=lambda conn: None)

    async def peek(
        self, limit: int, after_id: int = 0, max_bytes: int | None = None
    ) -> list[OutboxRow]:
        """Up to ``limit`` committed outbox rows with ``id > after_id``, in id order.

        With ``max_bytes``, stops before the row that would take the device
        and entry text past it (but returns at least one row). Sees every
        commit and every ack made before the call (`flush` first to include
        rows just appended). Recent rows come from memory; older ones (after
        a restart, or an outage longer than TAIL_ROWS) from SQLite.
        """

        def read(conn: sqlite3.Connection) -> list[OutboxRow]:
            cur = conn.execute(
                "SELECT id, device, ts, entry FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
            if max_bytes is None:
                return list(map(OutboxRow._make, cur))
            rows: list[OutboxRow] = []
            total = 0
            for row in cur:
                total += len(row[1]) + len(row[3])
                if rows and total > max_bytes:
                    break
                rows.append(OutboxRow._make(row))
            cur.close()
            return rows

        if self._tail_from is not None and after_id + 1 >= self._tail_from:
            return self._tail_peek(limit, after_id, max_bytes)
        result: list[OutboxRow] = await self._submit(read=read)
        return result

    async def ack(self, ids: Iterable[int]) -> int:
        """Delete forwarded rows (after the broker's PUBACK); returns how many were still there.

        Rows already gone (evicted meanwhile) are not counted as forwarded.
        """
        return await self._delete(ids, counter="forwarded")

    async def discard(self, ids: Iterable[int]) -> int:
        """Delete rows that can never be sent (e.g. the size limit shrank); counted as evicted."""
        rows = await self._delete(ids, counter="evicted")
        if rows:
            log.warning("discarded %d outbox rows that cannot be sent", rows)
        return rows

    async def _delete(self, ids: Iterable[int], *, counter: str) -> int:
        """Delete outbox rows by id (in runs of consecutive ids), counting them in ``counter``."""
        ids = list(ids)
        tail = self._tail
        for rid in ids:
            tail.pop(rid, None)
        ranges = _ranges(ids)

        def write(conn: sqlite3.Connection, delta: _Delta) -> int:
            rows = size = 0
            for first, last in ranges:
                n, b = _delete_range(conn, first, last)
                rows += n
                size += b
            setattr(delta, counter, getattr(delta, counter) + rows)
            delta.depth -= rows
            delta.bytes -= size
            return rows

        result: int = await self._submit(write=write)
        return result

    # --------------------------------------------------------------- the tail
    def _tail_add(self, first_id: int, rows: list[_Row]) -> None:
        tail = self._tail
        if self._tail_from is None:
            self._tail_from = first_id
        for offset, (device, ts, entry) in enumerate(rows):
            rid = first_id + offset
            tail[rid] = OutboxRow(rid, device, ts, entry)
        excess = len(tail) - TAIL_ROWS
        if excess > 0:  # an outage: the oldest rows are read back from SQLite later
            oldest = list(itertools.islice(tail, excess))
            for rid in oldest:
                del tail[rid]
            self._tail_from = oldest[-1] + 1

    def _tail_forget_upto(self, last_id: int) -> None:
        tail = self._tail
        while tail:
            rid = next(iter(tail))
            if rid > last_id:
                break
            del tail[rid]

    def _tail_peek(self, limit: int, after_id: int, max_bytes: int | None) -> list[OutboxRow]:
        rows: list[OutboxRow] = []
        total = 0
        for rid, row in self._tail.items():
            if rid <= after_id:
                continue
            if max_bytes is not None:
                total += len(row.device) + len(row.entry)
                if rows and total > max_bytes:
                    break
            rows.append(row)
            if len(rows) >= limit:
                break
        return rows

    def count_resent(self, rows: int) -> None:
        """Count rows sent again after a connection dropped before their PUBACK (maybe twice)."""
        if rows <= 0:
            return

        def write(conn: sqlite3.Connection, delta: _Delta) -> None:
            delta.duplicates_resent += rows

        self._hand_over()
        self._queue.put(_Op(None, write=write))

    async def load_settings(self, node: str) -> dict[str, Any]:
        """The settings last saved for ``node`` (empty if none)."""

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            cur = conn.execute("SELECT key, value FROM settings WHERE node = ?", (node,))
            return {key: json.loads(value) for key, value in cur}

        result: dict[str, Any] = await self._submit(read=read)
        return result

    async def save_settings(self, node: str, settings: Mapping[str, Any]) -> None:
        """Replace every saved setting of ``node`` with ``settings`` (JSON values), committed."""
        try:
            rows = [
                (node, key, json.dumps(value, allow_nan=False)) for key, value in settings.items()
            ]
        except (TypeError, ValueError) as exc:
            raise StoreError(f"settings of {node} are not JSON: {exc}") from exc

        def write(conn: sqlite3.Connection, delta: _Delta) -> None:
            conn.execute("DELETE FROM settings WHERE node = ?", (node,))
            conn.executemany("INSERT INTO settings (node, key, value) VALUES (?, ?, ?)", rows)

        await self._submit(write=write)

    async def save_learned(
        self,
        node: str,
        controller: str,
        state: Mapping[str, Any],
        plant: Mapping[str, Any],
        *,
        ts: float | None = None,
    ) -> None:
        """Replace what ``controller`` learned about ``node``'s tank, committed.

        ``state`` is the controller's snapshot, ``plant`` the plant constants
        it was learned under (both JSON objects); ``ts`` the wall time (s) of
        the save, now by default. Raises StoreError for values that are not JSON.
        """
        try:
            state_json = json.dumps(dict(state), allow_nan=False, sort_keys=True)
            plant_json = json.dumps(dict(plant), allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"what {controller} learned about {node} is not JSON: {exc}") from exc
        updated = time.time() if ts is None else float(ts)

        def write(conn: sqlite3.Connection, delta: _Delta) -> None:
            conn.execute(
                "INSERT INTO learned (node, controller, state, plant, updated)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (node, controller) DO UPDATE SET"
                " state = excluded.state, plant = excluded.plant, updated = excluded.updated",
                (node, controller, state_json, plant_json, updated),
            )

        await self._submit(write=write)

    async def load_learned(
        self, node: str, controller: str
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(state, plant)`` last saved for ``controller`` on ``node``, or None.

        Raises StoreError if the stored text is not a JSON object (a damaged row).
        """

        def read(conn: sqlite3.Connection) -> tuple[dict[str, Any], dict[str, Any]] | None:
            row = conn.execute(
                "SELECT state, plant FROM learned WHERE node = ? AND controller = ?",
                (node, controller),
            ).fetchone()
            if row is None:
                return None
            state, plant = json.loads(row[0]), json.loads(row[1])
            if not isinstance(state, dict) or not isinstance(plant, dict):
                raise ValueError(f"learned state of {controller} on {node} is not a JSON object")
            return state, plant

        result: tuple[dict[str, Any], dict[str, Any]] | None = await self._submit(read=read)
        return result

    async def forget_learned(self, node: str, controller: str | None = None) -> None:
        """Delete what was learned about ``node``'s tank (by every controller or one), committed."""

        def write(conn: sqlite3.Connection, delta: _Delta) -> None:
            if controller is None:
                conn.execute("DELETE FROM learned WHERE node = ?", (node,))
            else:
                conn.execute(
                    "DELETE FROM learned WHERE node = ? AND controller = ?", (node, controller)
                )

        await self._submit(write=write)

    async def record_actuation(self, node: str, actuator: str, ts: float, ms: int) -> None:
        """Add a run of ``actuator`` at wall time ``ts`` (s) for ``ms`` to the ledger, committed.

        Entries older than a day (`ACTUATION_KEEP_S`) are pruned on the way.
        """

        def write(conn: sqlite3.Connection, delta: _Delta) -> None:
            conn.execute(
                "INSERT INTO actuations (node, actuator, ts, ms) VALUES (?, ?, ?, ?)",
                (node, actuator, float(ts), int(ms)),
            )
            conn.execute(
                "DELETE FROM actuations WHERE node = ? AND ts < ?", (node, ts - ACTUATION_KEEP_S)
            )

        await self._submit(write=write)

    async def actuations_since(self, node: str, ts: float) -> list[Actuation]:
        """Ledger entries of ``node`` at or after wall time ``ts`` (s), oldest first."""

        def read(conn: sqlite3.Connection) -> list[Actuation]:
            cur = conn.execute(
                "SELECT actuator, ts, ms FROM actuations WHERE node = ? AND ts >= ? ORDER BY ts",
                (node, float(ts)),
            )
            return list(map(Actuation._make, cur))

        result: list[Actuation] = await self._submit(read=read)
        return result

    # ---------------------------------------------------------- writer thread
    def _run(self) -> None:
        """The writer thread: open the file, then commit batches until told to stop."""
        try:
            conn = self._connect()
        except BaseException as exc:  # noqa: BLE001 - handed to the opener as StoreError
            self._post([(self._ready, None, _as_store_error(exc)), (self._done, None, None)])
            return
        self._post([(self._ready, None, None)])
        try:
            while not self._commit(conn, self._collect()):
                pass
        except BaseException as exc:  # noqa: BLE001 - recorded, reported to every waiter
            self._fail(exc)
        finally:
            conn.close()
            self._post([(self._done, None, None)])

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: cannot use WAL journal (got {mode})")
            conn.execute("PRAGMA synchronous = NORMAL")  # see the module docstring
            self._upgrade(conn)
            for key, value in conn.execute("SELECT key, value FROM meta"):
                if key in self._counts:
                    self._counts[key] = int(value)
                elif key.startswith("last_ts:"):
                    self._last_ts[key[len("last_ts:") :]] = int(value)
            count, size = conn.execute(f"SELECT COUNT(*), {_SIZE} FROM outbox").fetchone()
            self._depth, self._bytes = int(count), int(size)
            # Limits may have shrunk since the last run.
            self._commit(conn, [])
        except BaseException:
            conn.close()
            raise
        return conn

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a new file, or migrate an older one step by step.

        Each step is one transaction that also sets ``user_version``, so a
        crash leaves the file at one version or the next, never in between;
        what the older version held (outbox, counters, settings) stays.
        """
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:  # new file: the whole schema in one transaction
            self._script(conn, _SCHEMA, SCHEMA_VERSION)
            return
        if not 1 <= version <= SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version}, this gateway knows {SCHEMA_VERSION}"
            )
        while version < SCHEMA_VERSION:
            self._script(conn, _MIGRATIONS[version], version + 1)
            log.info("%s: schema migrated from version %d to %d", self.path, version, version + 1)
            version += 1

    @staticmethod
    def _script(conn: sqlite3.Connection, sql: str, version: int) -> None:
        """Run ``sql`` and set ``user_version`` to ``version``, in one transaction."""
        try:
            conn.executescript(f"BEGIN IMMEDIATE;{sql}PRAGMA user_version = {version};COMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise

    def _collect(self) -> list[_Item]:
        """Block for the first item, then take whatever else is already queued.

        Rows arrive already gathered for ``commit_interval`` by the event
        loop (`_hand_over`), so everything queued goes into one transaction.
        """
        q = self._queue
        batch = [q.get()]
        rows = len(batch[0]) if type(batch[0]) is list else 0
        while rows < MAX_BATCH:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            if type(item) is list:
                rows += len(item)
        return batch

    def _commit(self, conn: sqlite3.Connection, batch: list[_Item]) -> bool:
        """One transaction for ``batch``, then the reads; returns True on the stop marker."""
        rows: list[_Row] = []
        ops: list[_Op] = []
        for item in batch:
            if type(item) is list:
                rows.extend(item)
            else:
                assert isinstance(item, _Op)
                ops.append(item)
        delta = _Delta()
        results: list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            first_id = 0
            if rows:
                conn.executemany("INSERT INTO outbox (device, ts, entry) VALUES (?, ?, ?)", rows)
                # AUTOINCREMENT ids of one transaction of this only writer are consecutive.
                (last_id,) = conn.execute("SELECT last_insert_rowid()").fetchone()
                first_id = last_id - len(rows) + 1
                delta.received = delta.depth = len(rows)
                delta.bytes = sum(len(device) + len(entry) for device, _, entry in rows)
            for op in ops:
                if op.write is not None:
                    results.append((op.future, op.write(conn, delta), None))
            self._evict(conn, delta)
            self._save_meta(conn, delta, rows)
            conn.execute("COMMIT")
            self._written += len(rows)
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            for op in ops:
                self._queue.put(op)  # let _fail() answer them
            raise
        self._apply(delta)
        stop = False
        for op in ops:
            if op.read is not None:
                try:
                    results.append((op.future, op.read(conn), None))
                except (sqlite3.Error, ValueError) as exc:
                    results.append((op.future, None, _as_store_error(exc)))
            elif op.write is None:
                results.append((op.future, None, None))
            stop = stop or op.stop
        self._post(
            results, committed=bool(rows), tail=(first_id, rows), evicted_upto=delta.evicted_upto
        )
        return stop

    def _evict(self, conn: sqlite3.Connection, delta: _Delta) -> None:
        """Delete the oldest rows while the outbox is over max_rows or max_bytes."""
        depth = self._depth + delta.depth
        size = self._bytes + delta.bytes
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
        delta.evicted_upto = max(delta.evicted_upto, cutoff)
        delta.evicted += rows
        delta.depth -= rows
        delta.bytes -= freed_bytes

    def _save_meta(
        self, conn: sqlite3.Connection, delta: _Delta, rows: list[tuple[str, int, str]]
    ) -> None:
        updates = [
            (key, self._counts[key] + getattr(delta, key))
            for key in COUNTERS
            if getattr(delta, key)
        ]
        # The last ts per device, so that timestamps stay increasing across restarts.
        last: dict[str, int] = {}
        for device, ts, _ in rows:
            last[device] = ts
        updates.extend((f"last_ts:{device}", ts) for device, ts in last.items())
        if updates:
            conn.executemany(_UPSERT_META, updates)

    def _apply(self, delta: _Delta) -> None:
        """Make a committed transaction's changes visible in the counters; log evictions."""
        for key in COUNTERS:
            self._counts[key] += getattr(delta, key)
        self._depth += delta.depth
        self._bytes += delta.bytes
        if delta.evicted:
            self._episode_evicted += delta.evicted
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
        rows_ok = self.max_rows is None or self._depth <= self.max_rows * EVICTION_HYSTERESIS
        bytes_ok = self.max_bytes is None or self._bytes <= self.max_bytes * EVICTION_HYSTERESIS
        return rows_ok and bytes_ok

    def _fail(self, exc: BaseException) -> None:
        """The writer cannot go on: refuse further work and fail every waiter."""
        error = _as_store_error(exc)
        self._failure = error
        log.error("store writer stopped: %s", exc, exc_info=exc)
        results: list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Op):
                results.append((item.future, None, error))
        self._post(results)

    def _post(
        self,
        results: list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]],
        *,
        committed: bool = False,
        tail: tuple[int, list[_Row]] | None = None,
        evicted_upto: int = 0,
    ) -> None:
        """Hand results to the event loop (one wake-up per commit)."""
        results = [r for r in results if r[0] is not None]
        if not results and not committed and not evicted_upto:
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(
                self._deliver, results, committed, tail, evicted_upto
            )

    def _deliver(
        self,
        results: list[tuple[asyncio.Future[Any] | None, Any, BaseException | None]],
        committed: bool,
        tail: tuple[int, list[_Row]] | None = None,
        evicted_upto: int = 0,
    ) -> None:
        # The tail first, so whoever the results wake up sees the rows committed;
        # then the eviction of the same transaction, which may include them.
        if tail is not None and tail[1]:
            self._tail_add(*tail)
        if evicted_upto:
            self._tail_forget_upto(evicted_upto)
        for future, value, error in results:
            if future is None or future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)
        if committed:
            self.committed.set()


def _as_store_error(exc: BaseException) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    error = StoreError(f"store failed: {exc}")
    error.__cause__ = exc
    return error
