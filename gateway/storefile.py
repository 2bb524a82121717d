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

For the same reason an outbox row keeps a reading's values only, not the
``{"ts":…,"values":…}`` entry ThingsBoard is sent (its ts is a column
already), and keeps them as a JSON array after the id of their key list
(``[3,701.66,5.99]`` for ``{"tds":701.66,"ph":5.99}``; the lists are rows of
``keysets``): the keys were half of a row. `Rows` writes that form and reads
every form. Rows of older versions stay as they were written, so an upgrade
rewrites nothing: up to version 4 a row kept the whole entry (told apart by
id, `bare_from`); version 5 kept the values as an object (told apart by its
first character), as a row still does when its key list would be one too
many (`MAX_KEYSETS`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway import storepages
from gateway.tbmsg import compact_json

log = logging.getLogger("hydrogate.store")

SCHEMA_VERSION = 6
#: Page size of new files (bytes).
PAGE_SIZE = 1024
#: Files with another page size are converted (VACUUM) at start when no larger than this.
CONVERT_MAX_BYTES = 16 << 20
#: Files up to this size get a full ``PRAGMA quick_check`` at start.
QUICK_CHECK_MAX_BYTES = 64 << 20
#: The WAL file is cut back to this size whenever SQLite restarts it.
WAL_KEEP_BYTES = 1 << 20
#: Lifetime counters kept in ``meta``.
COUNTERS = ("received", "forwarded", "evicted", "duplicates_resent", "unstored")
#: Key lists a file keeps at most: a reading with yet another list is kept as an object.
MAX_KEYSETS = 4096
#: Entries a peek keeps until their rows move to the history (`Rows.entry`): more
#: than the uplink has in flight (gateway/uplink.py, PEEK_ROWS), a few MB at most.
KEPT_ENTRIES = 32_768

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
# Version 4: forwarded readings kept for `hydrogate export` (gateway/history.py), outside
# the outbox. One row is a chunk of one device's entries, committed together: a zlib'd
# JSON array of entries (as the outbox keeps them) sorted by ts, with its first and last
# ts and how many it holds. Chunks keep the bytes written per reading small (a handful
# of pages per commit, whatever the number of readings) and the file a fifth of the size.
_HISTORY = """
CREATE TABLE history (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    ts_first INTEGER NOT NULL,
    ts_last INTEGER NOT NULL,
    n INTEGER NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX history_device_ts ON history (device, ts_first);
"""
# Version 5: outbox rows hold the values only (see the module's docstring). Rows with
# an id below meta 'bare_from' hold the whole entry, as versions up to 4 wrote them.
_V5 = """
INSERT INTO meta (key, value) SELECT 'bare_from', COALESCE(MAX(id), 0) + 1 FROM outbox
    WHERE true ON CONFLICT (key) DO UPDATE SET value = excluded.value;
"""
# Version 6: the key lists of rows that keep their values as an array (see the module's
# docstring), ``keys`` a JSON array of strings. A list is written with the first row
# that uses it, in the same transaction, and never changed or deleted.
_KEYSETS = """
CREATE TABLE keysets (id INTEGER PRIMARY KEY, keys TEXT NOT NULL);
"""
#: The schema of a new file (version SCHEMA_VERSION).
_SCHEMA = _OUTBOX + _REST + _LEARNED + _HISTORY + _V5 + _KEYSETS
#: Each script brings a file from the version it is keyed by to the next one.
_MIGRATIONS: Mapping[int, str] = {1: _LEARNED, 2: _V3, 3: _HISTORY, 4: _V5, 5: _KEYSETS}
#: `bare_from` of a file older than version 5: every row holds its whole entry.
ALL_WRAPPED = 1 << 62
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


def values_text(entry: str) -> str:
    """The values part of an entry as `gateway.tbmsg.encode_entry` writes it (what a row keeps).

    ``'{"ts":1,"values":{"ph":6.1}}'`` gives ``'{"ph":6.1}'``: the text between
    the wrapper's ``"values":`` and its closing brace, found without parsing.
    """
    return entry[entry.index("{", 1) : -1]


def bare_from(conn: sqlite3.Connection) -> int:
    """The first outbox id whose row holds the values only (`ALL_WRAPPED` for an older file)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'bare_from'").fetchone()
    if row is not None:
        return int(row[0] or 0)
    return 0 if _first(conn, "PRAGMA user_version") >= 5 else ALL_WRAPPED


class DamagedRow(ValueError):
    """An outbox row that does not read as any version wrote it."""


class Rows:
    """Outbox rows both ways, for one connection: values to what a row keeps, and back.

    What a row keeps depends on the version that wrote it (the module's
    docstring); `entry` and `values` read every form. `stored` writes the
    current one, adding a new key list to ``keysets`` in the caller's open
    transaction; the writer then calls `committed` or `rolled_back`, so that a
    list that did not reach the file is never used.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.bare_from = bare_from(conn)
        self._keys: dict[int, tuple[str, ...]] = {}
        self._ids: dict[tuple[str, ...], int] = {}
        self._new: list[int] = []
        self._top = 0  # the highest id in the table, a row that does not read included
        self._templates: dict[str, tuple[str, int] | None] = {}  # see _template
        self._kept: dict[int, tuple[int, str]] = {}  # id -> (ts, entry), see entry(keep=True)
        self._load()

    def _load(self) -> None:
        try:
            found = self._conn.execute("SELECT id, keys FROM keysets").fetchall()
        except sqlite3.OperationalError:  # a file older than version 6, read as it is
            found = []
        for kid, text in found:
            self._top = max(self._top, kid)
            keys = key_list(text)
            if keys is not None and kid not in self._keys:
                self._keys[kid] = keys
                self._ids.setdefault(keys, kid)

    # ------------------------------------------------------------- writing
    def stored(self, values_text: str) -> str:
        """What a row keeps of an entry's values (`values_text`: a JSON object).

        Never raises: values it cannot put against a key list are kept as they
        came, an object, which reads as well.
        """
        try:
            values = orjson.loads(values_text)
        except orjson.JSONDecodeError:
            return values_text
        if not isinstance(values, dict):
            return values_text
        keys = tuple(values)
        kid = self._ids.get(keys)
        if kid is None:
            if len(self._keys) >= MAX_KEYSETS:
                return values_text
            kid = self._top + 1
            self._conn.execute(
                "INSERT INTO keysets (id, keys) VALUES (?, ?)", (kid, compact_json(list(keys)))
            )
            self._keys[kid] = keys
            self._ids[keys] = kid
            self._new.append(kid)
            self._top = kid
        return compact_json([kid, *values.values()])

    def committed(self) -> None:
        """The transaction `stored` wrote in was committed."""
        self._new.clear()

    def rolled_back(self) -> None:
        """The transaction `stored` wrote in was rolled back: the lists it added are gone."""
        if self._new:
            self._top = self._new[0] - 1
        for kid in self._new:
            del self._ids[self._keys.pop(kid)]
            self._templates.pop(str(kid), None)
        self._new.clear()

    # ------------------------------------------------------------- reading
    def entry(self, rid: int, ts: int, stored: str, *, keep: bool = False) -> str:
        """The entry (``{"ts":…,"values":{…}}``) of outbox row ``rid`` stamped ``ts``, as sent.

        With ``keep`` (a peek, while forwarded rows go to the history), the entry
        is also kept for `moved`, so that a row is not put together twice; at
        most KEPT_ENTRIES, the oldest given up first. Raises DamagedRow for a
        row that does not read.
        """
        text = self._entry(rid, ts, stored)
        if keep:
            kept = self._kept
            kept[rid] = (ts, text)
            if len(kept) > KEPT_ENTRIES:
                del kept[next(iter(kept))]
        return text

    def moved(self, rid: int, ts: int, stored: str) -> str:
        """`entry` of a row leaving the outbox for the history: the one a peek kept, if any."""
        found = self._kept.pop(rid, None)
        if found is not None and found[0] == ts:
            return found[1]
        return self._entry(rid, ts, stored)

    def _entry(self, rid: int, ts: int, stored: str) -> str:
        if rid < self.bare_from:
            return stored
        if stored[:1] != "[":
            return f'{{"ts":{ts},"values":{stored}}}'
        # Numbers only (no string, array or object among the values): the array's
        # own texts go into the entry as they are, without parsing them.
        if '"' not in stored and "{" not in stored and stored.count("[") == 1:
            parts = stored[1:-1].split(",")
            head = parts[0]
            found = self._templates[head] if head in self._templates else self._template(head)
            if found is not None and found[1] == len(parts):
                parts[0] = str(ts)
                return found[0] % tuple(parts)
        return compact_json({"ts": ts, "values": self._from_array(rid, stored)})

    def _template(self, head: str) -> tuple[str, int] | None:
        """The entry of the key list whose id is written ``head``, as a %-template.

        The template takes the ts and the value texts; with it, how many parts
        the array splits into. None when the entry cannot be put together that
        way and stay what `compact_json` writes: a list not known, or a key that
        is not ASCII (an entry with one is written by the standard encoder,
        whose numbers may read differently).
        """
        keys = self._keys.get(int(head)) if head.isdigit() else None
        if keys is None:
            return None  # perhaps written since the lists were read: not remembered
        template = None
        if all(map(str.isascii, keys)):
            # A value of "\0" is written "\u0000"; ':"' occurs in no key (its quotes
            # are escaped), so the text splits exactly where the values go.
            text = compact_json({"ts": 0, "values": dict.fromkeys(keys, "\0")})
            pieces = [piece.replace("%", "%%") for piece in text.split(':"\\u0000"')]
            if len(pieces) == len(keys) + 1 and pieces[0].startswith('{"ts":0,'):
                template = ('{"ts":%s' + pieces[0][len('{"ts":0'):] + "".join(
                    ":%s" + piece for piece in pieces[1:]
                ), len(keys) + 1)
        self._templates[head] = template
        return template

    def values(self, rid: int, ts: int, stored: str) -> dict[str, Any]:
        """The values of outbox row ``rid``; raises DamagedRow if it does not read."""
        if rid >= self.bare_from and stored[:1] == "[":
            return self._from_array(rid, stored)
        try:
            obj = orjson.loads(self.entry(rid, ts, stored))
        except orjson.JSONDecodeError as exc:
            raise DamagedRow(f"outbox row {rid}: {exc}") from exc
        values = obj.get("values") if isinstance(obj, dict) else None
        if not isinstance(values, dict):
            raise DamagedRow(f"outbox row {rid}: no values")
        return values

    def _from_array(self, rid: int, stored: str) -> dict[str, Any]:
        try:
            array = orjson.loads(stored)
        except orjson.JSONDecodeError as exc:
            raise DamagedRow(f"outbox row {rid}: {exc}") from exc
        kid = array[0] if isinstance(array, list) and array else None
        if type(kid) is not int:
            raise DamagedRow(f"outbox row {rid}: no key list")
        keys = self._keys.get(kid)
        if keys is None:
            self._load()  # written by another connection since this one read the lists
            keys = self._keys.get(kid)
        if keys is None or len(keys) != len(array) - 1:
            raise DamagedRow(f"outbox row {rid}: its key list {kid} does not read")
        return dict(zip(keys, array[1:], strict=True))


def key_list(text: Any) -> tuple[str, ...] | None:
    """A ``keysets`` row's keys, or None if it is not a JSON array of strings."""
    try:
        keys = orjson.loads(text)
    except (TypeError, orjson.JSONDecodeError):
        return None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return None
    return tuple(keys)


def outbox_values(conn: sqlite3.Connection) -> Iterator[tuple[int, str, int, dict[str, Any]]]:
    """Every outbox row as ``(id, device, ts, values)``, in id order, whatever its version.

    For tools and tests that read a file directly; the gateway reads rows itself.
    """
    rows = Rows(conn)
    for rid, device, ts, stored in conn.execute(
        "SELECT id, device, ts, entry FROM outbox ORDER BY id"
    ):
        yield rid, device, ts, rows.values(rid, ts, stored)


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
            _check(conn, path)
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


def _check(conn: sqlite3.Connection, path: Path) -> None:
    """``PRAGMA quick_check`` (every page reads back, every b-tree is well formed).

    A file over QUICK_CHECK_MAX_BYTES (seconds to read on an SD card, at every
    start) gets the checks that catch a truncated file or a broken header:
    its size against its page count, both ends of the outbox, the counters.
    """
    page, pages = _first(conn, "PRAGMA page_size"), _first(conn, "PRAGMA page_count")
    size = path.stat().st_size
    if size > QUICK_CHECK_MAX_BYTES:
        wal = Path(f"{path}-wal")
        if size < page * pages and not _nonempty(wal):
            raise DamagedFile(f"truncated: {size} bytes, its header says {page * pages}")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if tables >= _TABLES:
            conn.execute("SELECT MIN(id), MAX(id) FROM outbox").fetchone()
            conn.execute("SELECT COUNT(*) FROM meta").fetchone()
        return
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


# ------------------------------------------------------------ older releases
class FileInUse(Exception):
    """Another connection (a running daemon) has the file open."""


#: Rows rewritten per statement when a step rewrites rows.
_DOWN_CHUNK = 10_000


def _down_to_5(conn: sqlite3.Connection) -> int:
    """Version 6 to 5: rows that keep an array keep an object again; ``keysets`` goes.

    Returns the rows dropped because they did not read.
    """
    rows = Rows(conn)
    after, dropped = rows.bare_from - 1, 0
    while True:
        found = conn.execute(
            "SELECT id, ts, entry FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after, _DOWN_CHUNK),
        ).fetchall()
        if not found:
            break
        after = found[-1][0]
        updates, damaged = [], []
        for rid, ts, stored in found:
            if stored[:1] != "[":
                continue
            try:
                updates.append((values_text(rows.entry(rid, ts, stored)), rid))
            except DamagedRow:
                damaged.append((rid,))
        conn.executemany("UPDATE outbox SET entry = ? WHERE id = ?", updates)
        conn.executemany("DELETE FROM outbox WHERE id = ?", damaged)
        dropped += len(damaged)
    conn.execute("DROP TABLE keysets")
    return dropped


#: Each step brings a file from the version it is keyed by back to the one before.
_DOWNGRADES: Mapping[int, Callable[[sqlite3.Connection], int]] = {6: _down_to_5}
#: The oldest version this release can write a file back to.
OLDEST_DOWNGRADE = min(_DOWNGRADES) - 1


def downgrade(path: Path, version: int) -> tuple[int, int]:
    """Write the file at ``path`` back to schema ``version``, for an older release.

    What the installer does when it puts the previous release back after the
    new one failed: the new one may have migrated the file already, and an
    older gateway refuses a newer file (`NewerSchema`). One exclusive
    transaction; nothing else may have the file open (the daemon stopped).
    Returns (the version the file had, rows dropped because they did not
    read). Raises FileInUse, ValueError for a version this release cannot
    write, NewerSchema, sqlite3.Error for a disk or file that refuses.
    """
    if version < OLDEST_DOWNGRADE:
        raise ValueError(
            f"this release writes files back to schema version {OLDEST_DOWNGRADE} at the oldest"
        )
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        try:
            conn.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError as exc:
            if error_kind(exc) == "busy":
                raise FileInUse(
                    f"{path} is open in another process (is the daemon running?)"
                ) from exc
            raise
        had = int(_first(conn, "PRAGMA user_version"))
        if had > SCHEMA_VERSION:
            raise NewerSchema(f"{path}: schema version {had}, this gateway knows {SCHEMA_VERSION}")
        dropped = 0
        for step in range(had, version, -1):
            dropped += _DOWNGRADES[step](conn)
        conn.execute(f"PRAGMA user_version = {min(had, version)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    finally:
        conn.close()
    return had, dropped


# ------------------------------------------------------------ damaged files
@dataclass
class Salvage:
    """What could still be read from a damaged file."""

    rows: list[tuple[int, str, int, str, int | None]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    settings: list[tuple[str, str, str]] = field(default_factory=list)
    actuations: list[tuple[str, str, float, int]] = field(default_factory=list)
    learned: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    history: list[tuple[int, str, int, int, int, int, bytes]] = field(default_factory=list)
    keysets: list[tuple[int, str]] = field(default_factory=list)
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
    """Read what still reads from the damaged file at ``path`` (never raises, never writes it).

    A file shorter than its header says is read up to its end; a file whose
    header is garbage is read through a copy with a sound header put back.
    Outbox rows below an interior page that does not read are read from
    their leaf pages (gateway/storepages.py).
    """
    out = Salvage()
    source = path
    conn = _open_damaged(path)
    if conn is None:
        repaired = _with_sound_header(path)
        conn = _open_damaged(repaired) if repaired is not None else None
        if conn is None or repaired is None:
            out.lost.append("everything (not readable as a database)")
            return out
        source = repaired
    try:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if not names:
            out.lost.append("everything (no tables)")
            return out
        _salvage_meta(conn, out)
        _salvage_outbox(conn, out, chunk, source)
        for name, sql, target in (
            ("settings", "SELECT node, key, value FROM settings", out.settings),
            ("actuations", "SELECT node, actuator, ts, ms FROM actuations", out.actuations),
            ("learned", "SELECT node, controller, state, plant, updated FROM learned",
             out.learned),
            ("history", "SELECT id, device, ts_first, ts_last, n, size, data FROM history",
             out.history),
            ("keysets", "SELECT id, keys FROM keysets", out.keysets),
        ):
            if name in ("history", "keysets") and name not in names:  # an older file
                continue
            try:
                target.extend(conn.execute(sql))
            except sqlite3.Error as exc:
                out.lost.append(f"{name} ({exc})")
    except sqlite3.Error as exc:
        out.lost.append(f"everything ({exc})")
    finally:
        conn.close()
        _cleanup(path)
    return out


def _open_damaged(path: Path) -> sqlite3.Connection | None:
    """A read-only connection that reads a truncated file up to its end, or None."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        # Trust the file's size over its header's page count (else every read fails).
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        return None
    return conn


def _with_sound_header(path: Path) -> Path | None:
    """A copy of ``path`` whose first 100 bytes (the header) are rebuilt, if one reads; else None.

    The header holds the page size, which is guessed: 1 KiB (this gateway's)
    first, then SQLite's other usual sizes.
    """
    try:
        body = path.read_bytes()
    except OSError:
        return None
    for page in (PAGE_SIZE, 4096, 512, 2048, 8192, 16384, 32768, 65536):
        if len(body) < page or len(body) % page:
            continue
        header = bytearray(_template_header(page))
        header[28:32] = b"\0\0\0\0"  # page count unknown: SQLite then uses the file size
        header[32:40] = b"\0" * 8  # no freelist: its pages are not needed to read
        copy = path.with_name(f"{path.name}.header-{page}")
        copy.write_bytes(bytes(header) + body[100:])
        conn = _open_damaged(copy)
        if conn is not None:
            conn.close()
            return copy
        copy.unlink(missing_ok=True)
    return None


def _cleanup(path: Path) -> None:
    for copy in path.parent.glob(f"{path.name}.header-*"):
        copy.unlink(missing_ok=True)


def _template_header(page: int) -> bytes:
    """The header of a new file of this schema with ``page``-byte pages."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(f"PRAGMA page_size = {page}")
        conn.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
        data: bytes = conn.serialize()
        return data[:100]
    finally:
        conn.close()


def _salvage_meta(conn: sqlite3.Connection, out: Salvage) -> None:
    try:
        out.meta = dict(conn.execute("SELECT key, value FROM meta"))
    except sqlite3.Error as exc:
        out.lost.append(f"counters ({exc})")


def _salvage_outbox(conn: sqlite3.Connection, out: Salvage, chunk: int, source: Path) -> None:
    """Outbox rows by id ranges, split finer around unreadable pages: one costs only its rows.

    The ranges SQLite cannot reach are then looked for in ``source``'s leaf pages.
    """
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(outbox)")}
    except sqlite3.Error as exc:
        out.lost.append(f"the outbox ({exc})")
        return
    mono = "mono" if "mono" in columns else "NULL"
    select = (
        f"SELECT id, device, ts, entry, {mono} FROM outbox WHERE id >= ? AND id < ? ORDER BY id"
    )
    try:
        top = conn.execute("SELECT MAX(id) FROM outbox").fetchone()[0]
    except sqlite3.Error:
        top = None
    if top is None:
        try:
            top = int(out.meta.get("next_id", 0)) - 1
        except (TypeError, ValueError):
            top = 0
    if top <= 0:  # no bound: read in order until it breaks
        try:
            out.rows.extend(conn.execute(select, (0, 1 << 62)))
        except sqlite3.Error as exc:
            last = out.rows[-1][0] if out.rows else 0
            out.lost.append(f"outbox rows after id {last} ({exc})")
        return
    bad: list[tuple[int, int]] = []

    def read(lo: int, hi: int) -> None:
        try:
            rows = conn.execute(select, (lo, hi)).fetchall()
        except sqlite3.Error:
            if hi - lo <= 1:
                if bad and bad[-1][1] == lo:
                    bad[-1] = (bad[-1][0], hi)
                else:
                    bad.append((lo, hi))
                return
            step = max(1, (hi - lo) // 10)
            for start in range(lo, hi, step):
                read(start, min(hi, start + step))
        else:
            out.rows.extend(rows)

    for start in range(0, top + 1, chunk):
        read(start, min(top + 1, start + chunk))
    if not bad:
        return
    scanned = storepages.outbox_rows(source, _first(conn, "PRAGMA page_size"), bad)
    out.rows = sorted([*out.rows, *scanned.values()])
    for lo, hi in bad:
        n = sum(lo <= rid < hi for rid in scanned)
        note = f"; {n} read from their leaf pages" if n else ""
        out.lost.append(f"outbox ids {lo}-{hi - 1} (unreadable pages{note})")


def check_entry(entry: str) -> bool:
    """True if ``entry`` is a telemetry entry as the store writes them."""
    try:
        obj = json.loads(entry)
    except (TypeError, ValueError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("ts"), int) and isinstance(
        obj.get("values"), dict
    )


def check_values(stored: str, keysets: Mapping[int, tuple[str, ...]]) -> bool:
    """True if ``stored`` is what an outbox row of version 5 or later keeps.

    That is a non-empty JSON object, or an array of values after the id of
    their key list in ``keysets``.
    """
    try:
        obj = json.loads(stored)
    except (TypeError, ValueError):
        return False
    if isinstance(obj, list):
        keys = keysets.get(obj[0]) if obj and type(obj[0]) is int else None
        return keys is not None and len(keys) == len(obj) - 1
    return isinstance(obj, dict) and bool(obj)


def _bare_row(
    row: tuple[int, str, int, str, int | None],
    wrapped: bool | None,
    keysets: Mapping[int, tuple[str, ...]],
) -> tuple[int, str, int, str, int | None] | None:
    """A salvaged row as version 5 or later keeps it, or None if it does not read.

    ``wrapped`` says whether the damaged file kept the whole entry in this row
    (None: its counters did not read; then a row that is exactly an entry
    stamped with its own ts is taken as one).
    """
    rid, device, ts, text, mono = row
    if not isinstance(text, str):
        return None
    if wrapped is None:
        wrapped = text.startswith(f'{{"ts":{ts},"values":{{') and check_entry(text)
    if not wrapped:
        return row if check_values(text, keysets) else None
    if not check_entry(text):
        return None
    obj = json.loads(text)
    values = json.dumps(obj["values"], separators=(",", ":"), ensure_ascii=False)
    return (rid, device, int(obj["ts"]), values, mono)


def restore(conn: sqlite3.Connection, found: Salvage) -> int:
    """Write what was salvaged into the fresh file at ``conn`` (one transaction); rows kept.

    Rows go in as version 5 or later keeps them (values only), whatever the
    damaged file's version was, with the key lists they use.
    """
    meta = {k: v for k, v in found.meta.items() if isinstance(k, str)}
    first: int | None = None  # the damaged file's first row holding values only
    if "bare_from" in meta:
        with contextlib.suppress(TypeError, ValueError):
            first = int(meta["bare_from"] or 0)
    elif "next_id" in meta:  # its counters read, without the key: older than version 5
        first = ALL_WRAPPED
    meta["bare_from"] = 0
    keysets = {kid: keys for kid, keys in ((kid, key_list(text)) for kid, text in found.keysets)
               if type(kid) is int and keys is not None}
    rows = [
        r for r in (_bare_row(row, None if first is None else row[0] < first, keysets)
                    for row in found.rows) if r is not None
    ]
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
        conn.executemany(
            "INSERT INTO keysets (id, keys) VALUES (?, ?)",
            [(kid, compact_json(list(keys))) for kid, keys in keysets.items()],
        )
        conn.executemany(
            "INSERT OR IGNORE INTO history (id, device, ts_first, ts_last, n, size, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            found.history,
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    return len(rows)
