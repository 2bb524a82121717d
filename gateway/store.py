"""SQLite store-and-forward: the outbox of readings, counters, settings, actuation ledger,
and what controllers learned about each tank.

The event loop never touches SQLite. `Store.append` validates, stamps and
serializes a reading (cheap, synchronous); once per ``commit_interval`` the
readings appended so far are handed, as one list, both to the uplink (the
in-memory tail it peeks from) and to the writer thread (gateway/storewriter.py),
which owns the only connection. Everything else is an operation queued to
the writer whose answer comes back as a future.

What is promised (docs/reliability.md has the proof):

- every reading is, at most ``sync_interval`` after it arrived, either on
  stable storage (committed and the WAL fdatasync'ed) or acknowledged by
  ThingsBoard (PUBACK); a reading ThingsBoard acknowledged first is never
  written at all;
- a crash of the process (SIGKILL) loses nothing committed, and a power cut
  nothing older than ``sync_interval``;
- a full, read-only or unreadable disk never stops the gateway: readings
  wait in memory and are still forwarded, what cannot be kept is counted
  (``unstored``), and the store writes again by itself once it can; a
  damaged file is moved aside and what still reads carried into a fresh one.

Timestamps: each device's stamps are unique (gateway/clock.py, `Stamps`).
While the system clock is not synchronised (`hold`), readings are kept back
from the uplink with their monotonic time; `release` re-stamps them from it
once the clock is right.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from gateway import storefile, tbmsg
from gateway.clock import Clock, Stamps, SystemClock, boot_id
from gateway.storefile import COUNTERS, SCHEMA_VERSION
from gateway.storewriter import (
    ACTUATION_KEEP_S,
    Batch,
    Delete,
    Op,
    Opened,
    Release,
    Result,
    Row,
    StoreClosed,
    StoreError,
    Writer,
    as_store_error,
)
from gateway.tbmsg import InvalidMessage, OutboxRow

__all__ = [
    "COUNTERS",
    "SCHEMA_VERSION",
    "Actuation",
    "InvalidMessage",
    "OutboxRow",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreStats",
]

log = logging.getLogger("hydrogate.store")

#: Most readings handed to the writer (and the uplink) in one list.
MAX_BATCH = 10_000
#: Rows kept in memory for the uplink (about 100 bytes each): the drain reads
#: them from here instead of reading back what was just written.
TAIL_ROWS = 50_000


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of the store's counters.

    ``received`` (committed, or acknowledged by ThingsBoard before it had to
    be), ``forwarded``, ``evicted``, ``duplicates_resent`` and ``unstored``
    (readings the disk refused and memory could not keep) are lifetime
    totals, written to the file at least every 10 s; ``depth`` and
    ``bytes`` describe the outbox on disk now (``bytes`` counts the stored
    device and entry text); ``pending`` is what waits in memory; ``storage``
    is ``ok`` or what the disk said (``full``, ``read-only``, ...).
    """

    received: int
    forwarded: int
    evicted: int
    duplicates_resent: int
    depth: int
    bytes: int
    pending: int
    unstored: int = 0
    storage: str = "ok"
    #: Forwarded readings kept for export (gateway/storehistory.py): how many, compressed bytes.
    history_readings: int = 0
    history_bytes: int = 0


class Actuation(NamedTuple):
    """One ledger entry: ``actuator`` ran (or was commanded) at ``ts`` (wall s) for ``ms``."""

    actuator: str
    ts: float
    ms: int


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
        sync_interval: float,
        clock: Clock | None = None,
        history_days: float = 0.0,
        history_max_bytes: int | None = None,
    ) -> None:
        """Use `Store.open`; this only records the settings."""
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        if commit_interval < 0:
            raise ValueError(f"commit_interval must be >= 0, got {commit_interval}")
        if sync_interval < 0:
            raise ValueError(f"sync_interval must be >= 0, got {sync_interval}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_payload_bytes = max_payload_bytes
        self.sync_interval = sync_interval
        self._payload_limit = tbmsg.payload_limit(max_payload_bytes)
        self._commit_interval = commit_interval
        self._clock = clock or SystemClock()
        self._loop = asyncio.get_running_loop()
        self._writer = Writer(
            self.path,
            max_rows=max_rows,
            max_bytes=max_bytes,
            sync_interval=sync_interval,
            boot=boot_id(),
            post=self._post,
            on_results=self._deliver,
            on_dropped=self._tail_forget,
            on_restamped=self._restamped,
            on_evicted=self._tail_forget_upto,
            history_days=history_days,
            history_max_bytes=history_max_bytes,
            wall=self._clock.time,
        )
        # Readings appended on the event loop, handed over as one list per commit_interval.
        self._rows: list[Row] = []
        self._rows_since = 0.0
        self._handover: asyncio.TimerHandle | None = None
        self._handed = 0  # readings handed to the writer so far
        self._next_id = 1
        self._stamps = Stamps()
        # Readings held until the clock is synchronised: stamped in monotonic time.
        self._holding = False
        self._held_stamps = Stamps()
        self._hold_from: int | None = None
        # The newest rows (waiting in memory or committed, not yet deleted), at most
        # TAIL_ROWS of them: every such row with an id >= _tail_from is here.
        self._tail: dict[int, OutboxRow] = {}
        self._tail_from: int | None = None
        self._thread = threading.Thread(target=self._run, name="hydrogate-store", daemon=True)
        self._ready: asyncio.Future[Opened] = self._loop.create_future()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._closed = False
        #: Set whenever new readings can be peeked (they need not be committed yet).
        self.committed = asyncio.Event()
        # Device names already checked (a handful; checked once, not per reading).
        self._devices: set[str] = set()

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
        sync_interval: float = 1.0,
        clock: Clock | None = None,
        history_days: float = 0.0,
        history_max_bytes: int | None = None,
    ) -> AsyncIterator[Store]:
        """Open (creating if needed) the store at ``path``; close it, committed, on exit.

        Raises StoreError if the folder does not exist or the file belongs to
        a newer gateway; a disk that refuses the file (read-only, full, ...)
        leaves the store open and retrying. With ``history_days`` > 0,
        forwarded readings are kept that long (and within
        ``history_max_bytes``) for export (gateway/storehistory.py).
        """
        store = cls(
            path,
            max_rows=max_rows,
            max_bytes=max_bytes,
            max_payload_bytes=max_payload_bytes,
            commit_interval=commit_interval,
            sync_interval=sync_interval,
            clock=clock,
            history_days=history_days,
            history_max_bytes=history_max_bytes,
        )
        await store._start()
        try:
            yield store
        finally:
            await store.close()

    async def _start(self) -> None:
        if not self.path.parent.is_dir():
            raise StoreError(f"{self.path}: the folder {self.path.parent} does not exist")
        self._thread.start()
        try:
            opened = await self._ready
        except BaseException:
            self._closed = True
            await self._join()
            raise
        self._next_id = opened.next_id
        for device, ts in opened.last_ts.items():
            self._stamps.seed(device, ts)
        if opened.hold_from is not None:
            self._holding = True
            self._hold_from = opened.hold_from

    def _run(self) -> None:
        """The writer thread: open the file, then run the writer until the stop marker."""
        writer = self._writer
        try:
            opened = writer.open()
            if writer.state != "ok":
                opened.next_id = _unused_id(self.path)
        except BaseException as exc:  # noqa: BLE001 - handed to the opener as StoreError
            self._post(self._opened, None, as_store_error(exc))
            self._post(self._finished)
            return
        self._post(self._opened, opened, None)
        try:
            writer.run()
        finally:
            self._post(self._finished)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(fn, *args)

    def _opened(self, opened: Opened | None, error: BaseException | None) -> None:
        if error is not None:
            self._ready.set_exception(error)
        else:
            assert opened is not None
            self._ready.set_result(opened)

    def _finished(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    async def close(self) -> None:
        """Commit and sync everything appended so far, then stop the writer and close the file."""
        if not self._closed:
            self._closed = True
            self._hand_over()
            self._writer.queue.put(Op(None, stop=True))
        await self._join()

    async def _join(self) -> None:
        # The writer resolves _done as its very last act (after closing the file).
        await self._done
        self._thread.join()

    @property
    def storage(self) -> str:
        """``ok``, or what the disk said last (``full``, ``read-only``, ``I/O error``, ...)."""
        return self._writer.state

    # ---------------------------------------------------------------- hot path
    def append(self, device: str, ts_ms: int, values: Mapping[str, Any]) -> None:
        """Validate one reading and queue it; it is forwarded and committed from there.

        ``ts_ms`` is made unique for the device (gateway/clock.py, `Stamps`):
        ThingsBoard keeps only the last of two entries with the same ``ts``.
        While readings are held (`hold`), their monotonic time is kept too.
        Raises InvalidMessage at once for anything ThingsBoard would refuse.
        """
        if self._closed or self._writer.failure is not None:
            raise StoreClosed("store is closed or failed") from self._writer.failure
        if device not in self._devices:
            self._devices.add(tbmsg.check_device(device))
        ts = tbmsg.check_ts(ts_ms)
        mono: int | None = None
        stamps = self._stamps
        if self._holding:
            offset = round((self._clock.time() - self._clock.monotonic()) * 1000)
            stamps = self._held_stamps
            mono = stamps.unique(device, ts - offset)
            ts = mono + offset
        else:
            ts = stamps.unique(device, ts)
        try:
            entry = tbmsg.encode_entry(device, ts, values, self._payload_limit)
        except InvalidMessage:
            stamps.give_back(device, ts if mono is None else mono)  # a refused reading takes none
            raise
        rows = self._rows
        rows.append((self._next_id, device, ts, entry, mono))
        self._next_id += 1
        if len(rows) >= MAX_BATCH:
            self._hand_over()
        elif self._handover is None:
            self._rows_since = time.monotonic()
            self._handover = self._loop.call_later(self._commit_interval, self._hand_over)

    def _hand_over(self) -> None:
        """Give the readings appended so far to the uplink's tail and to the writer."""
        if self._handover is not None:
            self._handover.cancel()
            self._handover = None
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        self._handed += len(rows)
        self._tail_add(rows)
        self._writer.queue.put(
            Batch(self._rows_since, rows, held=rows[0][4] is not None, last=self._stamps.newest())
        )
        self.committed.set()

    @property
    def stats(self) -> StoreStats:
        """Counters as of now (cheap: kept in memory)."""
        w = self._writer
        c = w.counts
        return StoreStats(
            received=c["received"],
            forwarded=c["forwarded"],
            evicted=c["evicted"],
            duplicates_resent=c["duplicates_resent"],
            depth=w.depth,
            bytes=w.bytes,
            pending=len(self._rows) + self._handed - w.taken + w.waiting,
            unstored=c["unstored"],
            storage=w.state,
            history_readings=w.history_readings,
            history_bytes=w.history_bytes,
        )

    # ------------------------------------------------------------ the clock
    @property
    def holding(self) -> bool:
        """True while new readings are held for the clock to be synchronised."""
        return self._holding

    def hold(self) -> None:
        """Hold new readings back from the uplink until `release` (the clock is not trusted)."""
        if not self._holding:
            self._hand_over()  # a batch is held, or not, as a whole
            self._holding = True
            if self._hold_from is None:
                self._hold_from = self._next_id

    async def release(self, offset_ms: int) -> int:
        """Re-stamp every held reading as ``monotonic + offset_ms`` and let them go; how many.

        ``offset_ms`` is wall minus monotonic time (ms) of a clock that is now
        right. Readings appended from now on are stamped by the clock.
        """
        self._holding = False
        self._held_stamps.forget()
        if self._hold_from is None:
            return 0
        self._hand_over()
        future: asyncio.Future[int] = self._loop.create_future()
        self._writer.queue.put(Release(future, int(offset_ms)))
        return await future

    def _restamped(self, upto: int, done: bool) -> None:
        """Held rows up to ``upto`` have their true stamps in the file: peek them from there."""
        if upto >= 0:
            self._tail_forget_upto(upto)
            if self._tail_from is not None:
                self._tail_from = max(self._tail_from, upto + 1)
        if done:
            self._hold_from = None if not self._holding else self._hold_from
        else:
            self._hold_from = upto + 1
        self.committed.set()

    # -------------------------------------------------------------- operations
    def _submit(
        self,
        *,
        write: Callable[[sqlite3.Connection], Any] | None = None,
        read: Callable[[sqlite3.Connection], Any] | None = None,
        fallback: Callable[[], Any] | None = None,
        deferrable: bool = False,
        history: bool = False,
        quiet: bool = False,
    ) -> Any:
        if self._closed or self._writer.failure is not None:
            raise StoreClosed("store is closed or failed") from self._writer.failure
        future: asyncio.Future[Any] = self._loop.create_future()
        self._hand_over()  # what was appended before this operation goes first
        self._writer.queue.put(
            Op(future, write=write, read=read, fallback=fallback, deferrable=deferrable,
               history=history, quiet=quiet)
        )
        return future

    async def flush(self) -> None:
        """Wait until everything appended before this call is committed (or the disk refused it)."""
        await self._submit(read=lambda conn: None, fallback=lambda: None)

    async def flush_history(self) -> None:
        """Commit everything appended so far and write the forwarded readings waiting for the
        history (they otherwise wait up to a minute), so that an export sees them."""
        await self._submit(read=lambda conn: None, fallback=lambda: None, history=True)

    async def oldest(self) -> int | None:
        """The ``ts`` (ms) of the oldest reading not forwarded yet, or None if there is none.

        Reads only what is committed (nothing is committed for it): cheap
        enough to ask every second.
        """

        def read(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT ts FROM outbox ORDER BY id LIMIT 1").fetchone()
            return None if row is None else int(row[0])

        on_disk: int | None = await self._submit(read=read, fallback=lambda: None, quiet=True)
        if on_disk is not None:
            return on_disk
        for row in self._tail.values():  # deleted from here once acknowledged
            return row.ts
        return self._rows[0][2] if self._rows else None

    async def peek(
        self, limit: int, after_id: int = 0, max_bytes: int | None = None
    ) -> list[OutboxRow]:
        """Up to ``limit`` rows with ``id > after_id``, in id order, held rows excepted.

        With ``max_bytes``, stops before the row that would take the device
        and entry text past it (but returns at least one row). Recent rows
        come from memory, committed or not; older ones (after a restart, or
        an outage longer than TAIL_ROWS) from SQLite.
        """
        self._hand_over()  # what was appended so far can be forwarded now
        upto = self._hold_from
        damaged: list[int] = []

        def read(conn: sqlite3.Connection) -> list[OutboxRow]:
            # Asked of the file read (the writer's, or a read-only view of a file that
            # could not be opened for writing, perhaps not migrated yet).
            stored_rows = self._writer.rows_for(conn)
            keep = self._writer.history_days > 0  # their entries go to the history once sent
            cur = conn.execute(
                "SELECT id, device, ts, entry FROM outbox WHERE id > ? AND id < ?"
                " ORDER BY id LIMIT ?",
                (after_id, upto if upto is not None else 1 << 62, limit),
            )
            rows: list[OutboxRow] = []
            total = 0
            for rid, device, ts, stored in cur:
                try:
                    entry = stored_rows.entry(rid, ts, stored, keep=keep)
                except storefile.DamagedRow as exc:
                    log.error("%s: discarded", exc)
                    damaged.append(rid)
                    continue
                total += len(device) + len(entry)
                if rows and max_bytes is not None and total > max_bytes:
                    break
                rows.append(OutboxRow(rid, device, ts, entry))
            cur.close()
            return rows

        if self._tail_from is not None and after_id + 1 >= self._tail_from:
            return self._tail_peek(limit, after_id, max_bytes)
        result: list[OutboxRow] = await self._submit(read=read, fallback=list)
        if damaged:  # never sendable: gone, counted as evicted
            await self.discard(damaged)
        if not result:  # nothing on disk beyond after_id (or no disk): what waits in memory
            return self._tail_peek(limit, after_id, max_bytes)
        return result

    async def ack(self, ids: Iterable[int]) -> int:
        """Delete forwarded rows (after the broker's PUBACK); returns how many were still there.

        Rows already gone (evicted meanwhile) are not counted as forwarded.
        Rows not committed yet are never written; the others are deleted with
        the next commit, which this waits for (at most ``sync_interval``).
        """
        return await self._delete(ids, counter="forwarded")

    async def discard(self, ids: Iterable[int]) -> int:
        """Delete rows that can never be sent (e.g. the size limit shrank); counted as evicted."""
        rows = await self._delete(ids, counter="evicted")
        if rows:
            log.warning("discarded %d outbox rows that cannot be sent", rows)
        return rows

    async def _delete(self, ids: Iterable[int], *, counter: str) -> int:
        if self._closed or self._writer.failure is not None:
            raise StoreClosed("store is closed or failed") from self._writer.failure
        ids = list(ids)
        tail = self._tail
        for rid in ids:
            tail.pop(rid, None)
        self._hand_over()
        future: asyncio.Future[int] = self._loop.create_future()
        self._writer.queue.put(Delete(future, ids, counter))
        return await future

    def count_resent(self, rows: int) -> None:
        """Count rows sent again after a connection dropped before their PUBACK (maybe twice)."""
        if rows <= 0:
            return
        self._writer.queue.put(Delete(None, [], "duplicates_resent", gone=rows))

    # --------------------------------------------------------------- the tail
    def _tail_add(self, rows: list[Row]) -> None:
        tail = self._tail
        if self._tail_from is None:
            self._tail_from = rows[0][0]
        for rid, device, ts, entry, _ in rows:
            tail[rid] = OutboxRow(rid, device, ts, entry)
        excess = len(tail) - TAIL_ROWS
        if excess > 0:  # an outage: the oldest rows are read back from SQLite later
            oldest = list(itertools.islice(tail, excess))
            for rid in oldest:
                del tail[rid]
            self._tail_from = oldest[-1] + 1

    def _tail_forget(self, ids: list[int]) -> None:
        for rid in ids:
            self._tail.pop(rid, None)

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
        hold = self._hold_from
        for rid, row in self._tail.items():
            if rid <= after_id:
                continue
            if hold is not None and rid >= hold:
                break
            if max_bytes is not None:
                total += len(row.device) + len(row.entry)
                if rows and total > max_bytes:
                    break
            rows.append(row)
            if len(rows) >= limit:
                break
        return rows

    def _deliver(self, results: list[Result]) -> None:
        for future, value, error in results:
            if future is None or future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    # ------------------------------------------------------ settings, ledger
    async def load_settings(self, node: str) -> dict[str, Any]:
        """The settings last saved for ``node`` (empty if none, or if no file can be read)."""

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            cur = conn.execute("SELECT key, value FROM settings WHERE node = ?", (node,))
            return {key: json.loads(value) for key, value in cur}

        result: dict[str, Any] = await self._submit(read=read, fallback=dict)
        return result

    async def save_settings(self, node: str, settings: Mapping[str, Any]) -> None:
        """Replace every saved setting of ``node`` with ``settings`` (JSON values).

        Committed before it returns, or, while the disk refuses, kept to be
        written once it takes writes again.
        """
        try:
            rows = [
                (node, key, json.dumps(value, allow_nan=False)) for key, value in settings.items()
            ]
        except (TypeError, ValueError) as exc:
            raise StoreError(f"settings of {node} are not JSON: {exc}") from exc

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM settings WHERE node = ?", (node,))
            conn.executemany("INSERT INTO settings (node, key, value) VALUES (?, ?, ?)", rows)

        await self._submit(write=write, deferrable=True)

    async def save_learned(
        self,
        node: str,
        controller: str,
        state: Mapping[str, Any],
        plant: Mapping[str, Any],
        *,
        ts: float | None = None,
    ) -> None:
        """Replace what ``controller`` learned about ``node``'s tank (as `save_settings`).

        ``state`` is the controller's snapshot, ``plant`` the plant constants
        it was learned under (both JSON objects); ``ts`` the wall time (s) of
        the save, now by default. Raises StoreError for values that are not JSON.
        """
        try:
            state_json = json.dumps(dict(state), allow_nan=False, sort_keys=True)
            plant_json = json.dumps(dict(plant), allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"what {controller} learned about {node} is not JSON: {exc}") from exc
        updated = self._clock.time() if ts is None else float(ts)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO learned (node, controller, state, plant, updated)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (node, controller) DO UPDATE SET"
                " state = excluded.state, plant = excluded.plant, updated = excluded.updated",
                (node, controller, state_json, plant_json, updated),
            )

        await self._submit(write=write, deferrable=True)

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

        result: tuple[dict[str, Any], dict[str, Any]] | None = await self._submit(
            read=read, fallback=lambda: None
        )
        return result

    async def forget_learned(self, node: str, controller: str | None = None) -> None:
        """Delete what was learned about ``node``'s tank (by every controller or one)."""

        def write(conn: sqlite3.Connection) -> None:
            if controller is None:
                conn.execute("DELETE FROM learned WHERE node = ?", (node,))
            else:
                conn.execute(
                    "DELETE FROM learned WHERE node = ? AND controller = ?", (node, controller)
                )

        await self._submit(write=write, deferrable=True)

    async def record_actuation(self, node: str, actuator: str, ts: float, ms: int) -> None:
        """Add a run of ``actuator`` at wall time ``ts`` (s) for ``ms`` to the ledger.

        Committed before it returns, or, while the disk refuses, kept to be
        written later (the safety guard has it in memory meanwhile). Entries
        older than a day (`ACTUATION_KEEP_S`) are pruned on the way.
        """

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO actuations (node, actuator, ts, ms) VALUES (?, ?, ?, ?)",
                (node, actuator, float(ts), int(ms)),
            )
            conn.execute(
                "DELETE FROM actuations WHERE node = ? AND ts < ?", (node, ts - ACTUATION_KEEP_S)
            )

        await self._submit(write=write, deferrable=True)

    async def actuations_since(self, node: str, ts: float) -> list[Actuation]:
        """Ledger entries of ``node`` at or after wall time ``ts`` (s), oldest first."""

        def read(conn: sqlite3.Connection) -> list[Actuation]:
            cur = conn.execute(
                "SELECT actuator, ts, ms FROM actuations WHERE node = ? AND ts >= ? ORDER BY ts",
                (node, float(ts)),
            )
            return list(map(Actuation._make, cur))

        result: list[Actuation] = await self._submit(read=read, fallback=list)
        return result


def _unused_id(path: Path) -> int:
    """A first id for readings when the file cannot be opened: past anything it may hold."""
    with contextlib.suppress(sqlite3.Error, OSError):
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
        try:
            top = conn.execute("SELECT MAX(id) FROM outbox").fetchone()[0]
            (nxt,) = conn.execute("SELECT value FROM meta WHERE key = 'next_id'").fetchone() or (0,)
            return max(int(top or 0), int(nxt or 0)) + 1_000_000
        finally:
            conn.close()
    return int(time.time() * 1_000_000)  # far above the ids of any file written so far
