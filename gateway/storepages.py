"""Outbox rows read straight from a damaged file's pages, where SQLite cannot reach them.

SQLite finds a row through the b-tree's interior pages. When one of those is
lost (a file cut short, a page of garbage), every row below it is out of
SQLite's reach although the leaf page that holds it is intact. This module
reads leaf pages directly, as the file format documents them
(https://www.sqlite.org/fileformat2.html), and keeps the records that have
the outbox's shape: ``(NULL, device TEXT, ts INTEGER, entry TEXT, mono
INTEGER|NULL)``, a shape no other table of the store has.

Pages are read as SQLite would: the WAL's copy of a page, up to its last
commit whose checksums hold, before the file's. Pages on the freelist are
skipped (a freed page may keep rows that were forwarded and deleted; Debian's
SQLite zeroes them, others need not). The salvage (gateway/storefile.py)
asks only for ids it could not read through SQLite.
"""

from __future__ import annotations

import bisect
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

Row = tuple[int, str, int, str, int | None]  # id, device, ts, entry, mono

_LEAF_TABLE = 0x0D
_WAL_BIG_ENDIAN = 0x377F0683
_WAL_LITTLE_ENDIAN = 0x377F0682
#: Bounds on what a damaged file can make this read (pages of a freelist, overflow chain).
_MAX_CHAIN = 1 << 16


class _Bad(Exception):
    """A cell or record that does not read."""


def outbox_rows(path: Path, page_size: int, wanted: list[tuple[int, int]]) -> dict[int, Row]:
    """Outbox rows with ids in the half-open ranges ``wanted``, read from leaf pages."""
    if not wanted:
        return {}
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _scan(data, Path(f"{path}-wal"), page_size, sorted(wanted))
    except (OSError, ValueError):  # unreadable, or empty (mmap refuses 0 bytes)
        return {}


def _scan(
    data: mmap.mmap, wal: Path, page_size: int, wanted: list[tuple[int, int]]
) -> dict[int, Row]:
    newer, pages = _wal_pages(wal, page_size)
    pages = pages or len(data) // page_size
    first = newer.get(1, data[:page_size])
    if pages == 0 or len(first) < 100:
        return {}
    file = _File(data, newer, page_size, page_size - first[20], pages)
    free = file.freelist()
    starts = [lo for lo, _ in wanted]
    found: dict[int, Row] = {}
    for number in range(1, pages + 1):
        if number in free:
            continue
        for rid, record in file.cells(number):
            i = bisect.bisect_right(starts, rid) - 1
            if rid in found or i < 0 or rid >= wanted[i][1]:
                continue
            row = _outbox_record(rid, record)
            if row is not None:
                found[rid] = row
    return found


def _wal_pages(wal: Path, page_size: int) -> tuple[dict[int, bytes], int]:
    """The WAL's newest copy of each page up to its last valid commit, and the pages then.

    Valid as SQLite takes it: frames carry the header's salt and a running
    checksum that holds; frames after the last commit frame are ignored.
    """
    try:
        data = wal.read_bytes()
    except OSError:
        return {}, 0
    if len(data) < 32:
        return {}, 0
    magic, _, size, _, salt1, salt2 = struct.unpack_from(">IIIIII", data, 0)
    if magic not in (_WAL_BIG_ENDIAN, _WAL_LITTLE_ENDIAN) or size != page_size:
        return {}, 0
    order = ">" if magic == _WAL_BIG_ENDIAN else "<"
    sums = _checksum(data[:24], order, (0, 0))
    if sums != struct.unpack_from(">II", data, 24):
        return {}, 0
    pages: dict[int, bytes] = {}
    pending: dict[int, bytes] = {}
    committed_size = 0
    for start in range(32, len(data) - 24 - page_size + 1, 24 + page_size):
        number, commit, s1, s2, c1, c2 = struct.unpack_from(">IIIIII", data, start)
        if (s1, s2) != (salt1, salt2):
            break
        page = data[start + 24 : start + 24 + page_size]
        sums = _checksum(data[start : start + 8] + page, order, sums)
        if sums != (c1, c2):
            break
        pending[number] = page
        if commit:
            pages.update(pending)
            pending = {}
            committed_size = commit
    return pages, committed_size


def _checksum(data: bytes, order: str, sums: tuple[int, int]) -> tuple[int, int]:
    """The WAL's running checksum over ``data`` (a multiple of 8 bytes), from ``sums``."""
    s0, s1 = sums
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    """The varint at ``at`` and the offset after it."""
    value = 0
    for i in range(8):
        if at + i >= len(buf):
            raise _Bad("varint past the end")
        byte = buf[at + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    if at + 8 >= len(buf):
        raise _Bad("varint past the end")
    return (value << 8) | buf[at + 8], at + 9


@dataclass(frozen=True)
class _File:
    data: mmap.mmap  # the file
    newer: dict[int, bytes]  # the WAL's copies
    page_size: int
    usable: int  # bytes of a page that hold content (the page less its reserved tail)
    pages: int

    def page(self, number: int) -> bytes:
        """Page ``number`` as SQLite would read it (short or empty past the file's end)."""
        copy = self.newer.get(number)
        if copy is not None:
            return copy
        start = (number - 1) * self.page_size
        return self.data[start : start + self.page_size]

    def freelist(self) -> set[int]:
        """The freelist's pages (trunks and leaves), as far as it reads."""
        out: set[int] = set()
        (trunk,) = struct.unpack_from(">I", self.page(1), 32)
        while 0 < trunk <= self.pages and trunk not in out and len(out) < _MAX_CHAIN:
            out.add(trunk)
            page = self.page(trunk)
            if len(page) < 8:
                break
            following, count = struct.unpack_from(">II", page, 0)
            count = min(count, (len(page) - 8) // 4)
            out.update(struct.unpack_from(f">{count}I", page, 8))
            trunk = following
        return out

    def cells(self, number: int) -> list[tuple[int, bytes]]:
        """``(rowid, record)`` of each cell that reads, if page ``number`` is a table leaf."""
        page = self.page(number)
        header = 100 if number == 1 else 0
        if len(page) < self.page_size or page[header] != _LEAF_TABLE:
            return []
        (count,) = struct.unpack_from(">H", page, header + 3)
        out = []
        most = self.usable - 35  # a larger payload spills to overflow pages
        least = (self.usable - 12) * 32 // 255 - 23
        for i in range(min(count, (len(page) - header - 8) // 2)):
            (at,) = struct.unpack_from(">H", page, header + 8 + 2 * i)
            try:
                size, at = _varint(page, at)
                rid, at = _varint(page, at)
                local = size
                if size > most:
                    local = least + (size - least) % (self.usable - 4)
                    local = local if local <= most else least
                payload = page[at : at + local]
                if len(payload) != local:
                    raise _Bad("payload past the end")
                if size > local:
                    (first,) = struct.unpack_from(">I", page, at + local)
                    payload += self._overflow(first, size - local)
                out.append((rid, payload))
            except (_Bad, struct.error):
                continue
        return out

    def _overflow(self, number: int, more: int) -> bytes:
        """``more`` bytes of a payload from the overflow chain starting at page ``number``."""
        parts: list[bytes] = []
        for _ in range(_MAX_CHAIN):
            if more <= 0:
                return b"".join(parts)
            page = self.page(number) if 0 < number <= self.pages else b""
            if len(page) < self.page_size:
                raise _Bad("overflow page missing")
            (number,) = struct.unpack_from(">I", page, 0)
            take = min(more, self.usable - 4)
            parts.append(page[4 : 4 + take])
            more -= take
        raise _Bad("overflow chain too long")


def _outbox_record(rid: int, record: bytes) -> Row | None:
    """The row if ``record`` has the outbox's shape, else None."""
    try:
        values = _record(record)
    except (_Bad, struct.error, UnicodeDecodeError):
        return None
    if len(values) == 4:
        values.append(None)
    if len(values) != 5:
        return None
    alias, device, ts, entry, mono = values
    if (
        alias is None
        and isinstance(device, str)
        and type(ts) is int
        and isinstance(entry, str)
        and (mono is None or type(mono) is int)
    ):
        return (rid, device, ts, entry, mono)
    return None


_INT_SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def _record(record: bytes) -> list[object]:
    """The values of a record (the serial types of the file format)."""
    size, at = _varint(record, 0)
    if not 0 < size <= len(record):
        raise _Bad("record header")
    kinds = []
    while at < size:
        kind, at = _varint(record, at)
        kinds.append(kind)
    values: list[object] = []
    at = size
    for kind in kinds:
        if kind == 0:
            values.append(None)
        elif kind in _INT_SIZES:
            n = _INT_SIZES[kind]
            values.append(int.from_bytes(record[at : at + n], "big", signed=True))
            at += n
        elif kind == 7:
            values.append(struct.unpack_from(">d", record, at)[0])
            at += 8
        elif kind in (8, 9):
            values.append(kind - 8)
        elif kind >= 12:
            n = (kind - 12) // 2
            raw = record[at : at + n]
            values.append(raw.decode() if kind % 2 else raw)
            at += n
        else:
            raise _Bad("reserved serial type")
        if at > len(record):
            raise _Bad("record past the end")
    return values
