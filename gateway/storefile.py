"""The SQLite file behind the store: its schema, migrations, checks, and damaged files.

`connect` opens the file (creating it with the current schema), checks it
(``PRAGMA quick_check``) and migrates an older one. It raises `DamagedFile`
when the file cannot be used as it is (not a database, truncated, a page
that does not read back, an empty file); the store then moves it aside
(`move_aside`), salvages what still reads (`salvage`) into a fresh file
(`restore`) and says so in one log line, instead of refusing to start. Errors
of the disk itself (full, read-only, unreadable) are plain `sqlite3.Error`s
that `error_kind` names; the store retries those.

The file uses 1 KiB pages: the store syncs a small transaction about once a
second, and every page it touches is written whole, so small pages are what
keeps the bytes written per reading low (docs/benchmarks.md). Files created
with larger pages are converted at start while they are small.
"""

from __future__ import annotations

import datetime
import json
import logging
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("hydrogate.store")

SCHEMA_VERSION = 3
#: Page size of new files (bytes).
PAGE_SIZE = 1024
#: Files with another page size are converted (VACUUM) at start when no larger than this.
CONVERT_MAX_BYTES = 16 << 20
#: The WAL file is cut back to this size whenever SQLite restarts it.
WAL_KEEP_BYTES = 1 << 20
#: Lifetime counters kept in ``meta``.
COUNTERS = ("received", "forwarded", "evicted", "duplicates_resent", "unstored")

_OUTBOX = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    ts INTEGER NOT NULL,
    entry TEXT NOT NULL,
    mono INTEGER
);
CREATE INDEX outbox_held ON outbox (id) WHERE mono IS NOT NULL;
"""
# ids are given by the store (meta 'next_id'), never reused, so the uplink, which
# reads "after the last id it sent", never skips a row. A row's mono is set while
# it waits for the system clock to be synchronised (see gateway/clock.py): its
# monotonic time in ms, from which it is re-stamped.
_REST = """
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
# Version 3: the outbox without AUTOINCREMENT (whose sqlite_sequence page was one
# more page written by every commit), with the mono column; ids carry on from
# sqlite_sequence.
_V3 = """
CREATE TABLE outbox_v3 (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    ts INTEGER NOT NULL,
    entry TEXT NOT NULL,
    mono INTEGER
);
INSERT INTO outbox_v3 (id, device, ts, entry) SELECT id, device, ts, entry FROM outbox;
INSERT INTO meta (key, value) SELECT 'next_id', seq + 1 FROM sqlite_sequence
    WHERE name = 'outbox' ON CONFLICT (key) DO UPDATE SET value = excluded.value;
DROP TABLE outbox;
ALTER TABLE outbox_v3 RENAME TO outbox;
CREATE INDEX outbox_held ON outbox (id) WHERE mono IS NOT NULL;
"""
#: The schema of a new file (version SCHEMA_VERSION).
_SCHEMA = _OUTBOX + _REST + _LEARNED
#: Each script brings a file from the version it is keyed by to the next one.
_MIGRATIONS: Mapping[int, str] = {1: _LEARNED, 2: _V3}
_TABLES = {"outbox", "meta", "settings", "actuations"}

# Result codes (primary, the low byte of sqlite_errorcode).
_KINDS = {
    5: "busy",  # SQLITE_BUSY
    6: "busy",  # SQLITE_LOCKED
    8: "read-only",  # SQLITE_READONLY
    10: "I/O error",  # SQLITE_IOERR
    11: "damaged",  # SQLITE_CORRUPT
    13: "full",  # SQLITE_FULL
    14: "cannot open",  # SQLITE_CANTOPEN
    23: "cannot open",  # SQLITE_AUTH
    26: "damaged",  # SQLITE_NOTADB
}


class DamagedFile(Exception):
    """The file cannot be used as it is; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NewerSchema(Exception):
    """The file was written by a newer gateway (refused: moving it aside would lose data)."""


def error_kind(exc: BaseException) -> str:
    """What a sqlite3 error says about the disk: ``full``, ``read-only``, ``damaged``, ..."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _KINDS.get(code & 0xFF, "error")
    if isinstance(exc, OSError):
        return "I/O error"
    return "error"


def connect(path: Path, *, check: bool = True) -> sqlite3.Connection:
    """Open ``path`` (created if missing) at the current schema, in WAL mode.

    Raises DamagedFile when the file must be set aside, NewerSchema for a
    file of a newer gateway, sqlite3.Error when the disk refuses (see
    `error_kind`).
    """
    wal = Path(f"{path}-wal")
    if path.exists() and path.stat().st_size == 0 and not _nonempty(wal):
        raise DamagedFile("the file is empty (0 bytes)")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # only takes effect on a new file
        mode = _first(conn, "PRAGMA journal_mode = WAL")
        if mode != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL journal (got {mode})")
        # Commits are not synced by SQLite: the store syncs the WAL itself, once
        # per sync_interval; SQLite still syncs around its checkpoints.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # the store checkpoints
        conn.execute(f"PRAGMA journal_size_limit = {WAL_KEEP_BYTES}")
        if check:
            _check(conn)
        _upgrade(conn, path)
        _convert_pages(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if error_kind(exc) == "damaged":
            raise DamagedFile(str(exc)) from exc
        raise
    except BaseException:
        conn.close()
        raise
    return conn


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _first(conn: sqlite3.Connection, sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    return None if row is None else row[0]


def _check(conn: sqlite3.Connection) -> None:
    """``PRAGMA quick_check``: every page reads back and every b-tree is well formed."""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise DamagedFile("; ".join(problems))


def _upgrade(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema in a new file, or migrate an older one step by step.

    Each step is one transaction that also sets ``user_version``, so a
    crash leaves the file at one version or the next, never in between;
    what the older version held (outbox, counters, settings) stays.
    """
    version = _first(conn, "PRAGMA user_version")
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if version == 0:
        if tables:
            raise DamagedFile(f"not a hydrogate buffer (tables {sorted(tables)}, no version)")
        _script(conn, _SCHEMA, SCHEMA_VERSION)
        return
    if version > SCHEMA_VERSION:
        raise NewerSchema(f"{path}: schema version {version}, this gateway knows {SCHEMA_VERSION}")
    if version < 1 or not tables >= _TABLES:
        raise DamagedFile(f"schema version {version} without its tables ({sorted(tables)})")
    while version < SCHEMA_VERSION:
        _script(conn, _MIGRATIONS[version], version + 1)
        log.info("%s: schema migrated from version %d to %d", path, version, version + 1)
        version += 1


def _script(conn: sqlite3.Connection, sql: str, version: int) -> None:
    """Run ``sql`` and set ``user_version`` to ``version``, in one transaction."""
    try:
        conn.executescript(f"BEGIN IMMEDIATE;{sql}PRAGMA user_version = {version};COMMIT;")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise


def _convert_pages(conn: sqlite3.Connection, path: Path) -> None:
    """Rewrite a small file made with another page size to PAGE_SIZE (VACUUM)."""
    size = _first(conn, "PRAGMA page_size")
    if size == PAGE_SIZE or path.stat().st_size > CONVERT_MAX_BYTES:
        return
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("VACUUM")
    conn.execute("PRAGMA journal_mode = WAL")
    log.info("%s: converted from %d-byte to %d-byte pages", path, size, PAGE_SIZE)


# ------------------------------------------------------------ damaged files
@dataclass
class Salvage:
    """What could still be read from a damaged file."""

    rows: list[tuple[int, str, int, str, int | None]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    settings: list[tuple[str, str, str]] = field(default_factory=list)
    actuations: list[tuple[str, str, float, int]] = field(default_factory=list)
    learned: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    #: Parts that could not be read (e.g. ``outbox rows 1000-1999``).
    lost: list[str] = field(default_factory=list)

    @property
    def held(self) -> int | None:
        """How many readings the file held by its own counters (None if unreadable)."""
        meta = self.meta
        try:
            return int(meta["received"]) - int(meta.get("forwarded", 0)) - int(
                meta.get("evicted", 0)
            )
        except (KeyError, TypeError, ValueError):
            return None


def move_aside(path: Path, now: datetime.datetime | None = None) -> Path:
    """Rename ``path`` and its -wal/-shm to ``<path>.damaged-<time>``; the new name."""
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            source.rename(Path(f"{target}{suffix}"))
    return target


def salvage(path: Path, *, chunk: int = 1000) -> Salvage:
    """Read what still reads from the damaged file at ``path`` (read-only; never raises)."""
    out = Salvage()
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        out.lost.append(f"everything ({exc})")
        return out
    try:
        _salvage_meta(conn, out)
        _salvage_outbox(conn, out, chunk)
        for name, sql, target in (
            ("settings", "SELECT node, key, value FROM settings", out.settings),
            ("actuations", "SELECT node, actuator, ts, ms FROM actuations", out.actuations),
            ("learned", "SELECT node, controller, state, plant, updated FROM learned",
             out.learned),
        ):
            try:
                target.extend(conn.execute(sql))
            except sqlite3.Error as exc:
                out.lost.append(f"{name} ({exc})")
    finally:
        conn.close()
    return out


def _salvage_meta(conn: sqlite3.Connection, out: Salvage) -> None:
    try:
        out.meta = dict(conn.execute("SELECT key, value FROM meta"))
    except sqlite3.Error as exc:
        out.lost.append(f"counters ({exc})")


def _salvage_outbox(conn: sqlite3.Connection, out: Salvage, chunk: int) -> None:
    """Outbox rows in id ranges, so that one unreadable page costs only its range."""
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    except sqlite3.Error as exc:
        out.lost.append(f"the outbox ({exc})")
        return
    mono = "mono" if "mono" in columns else "NULL"
    select = f"SELECT id, device, ts, entry, {mono} FROM outbox"
    try:
        top = conn.execute("SELECT MAX(id) FROM outbox").fetchone()[0]
    except sqlite3.Error:
        top = None
    if top is None:  # the b-tree cannot be walked to its end: read in order until it breaks
        try:
            for row in conn.execute(select + " ORDER BY id"):
                out.rows.append(row)
        except sqlite3.Error as exc:
            out.lost.append(f"outbox rows after id {out.rows[-1][0] if out.rows else 0} ({exc})")
        return
    start = 0
    while start <= top:
        try:
            out.rows.extend(
                conn.execute(select + " WHERE id >= ? AND id < ? ORDER BY id",
                             (start, start + chunk))
            )
        except sqlite3.Error as exc:
            out.lost.append(f"outbox rows {start}-{start + chunk - 1} ({exc})")
        start += chunk


def check_entry(entry: str) -> bool:
    """True if ``entry`` is a telemetry entry as the store writes them."""
    try:
        obj = json.loads(entry)
    except (TypeError, ValueError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("ts"), int) and isinstance(
        obj.get("values"), dict
    )


def restore(conn: sqlite3.Connection, found: Salvage) -> int:
    """Write what was salvaged into the fresh file at ``conn`` (one transaction); rows kept."""
    rows = [r for r in found.rows if isinstance(r[3], str) and check_entry(r[3])]
    meta = {k: v for k, v in found.meta.items() if isinstance(k, str)}
    if rows:
        meta["next_id"] = max(int(meta.get("next_id", 0) or 0), rows[-1][0] + 1)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "INSERT OR IGNORE INTO outbox (id, device, ts, entry, mono) VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(meta.items())
        )
        conn.executemany(
            "INSERT OR REPLACE INTO settings (node, key, value) VALUES (?, ?, ?)", found.settings
        )
        conn.executemany(
            "INSERT INTO actuations (node, actuator, ts, ms) VALUES (?, ?, ?, ?)",
            found.actuations,
        )
        conn.executemany(
            "INSERT OR REPLACE INTO learned (node, controller, state, plant, updated)"
            " VALUES (?, ?, ?, ?, ?)",
            found.learned,
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    return len(rows)
