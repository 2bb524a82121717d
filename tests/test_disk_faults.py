"""Disk faults: a full disk, a read-only one, damaged files. The gateway goes on, and recovers.

The full and read-only disks are real: a small tmpfs the test mounts itself
(root only; the test is skipped, visibly, where mounting is not allowed).
Damaged files are real files damaged the way disks and power cuts damage
them. `python -m bench.faults disk` runs the longer loops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import gateway.storewriter as storewriter
from bench.common import Gateway, SimNodes, config_data, until, write_config
from gateway import storefile
from gateway.store import Store
from sim.node import SimNode
from tests.gateway_harness import config_dict, node_entry, running_gateway


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test, unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = Path(tempfile.mkdtemp(prefix="hydrogate-disk-"))
    try:
        _mount("-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(where))
    except subprocess.CalledProcessError as exc:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {exc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)
        where.rmdir()


def fill(disk: Path) -> Path:
    """Fill ``disk`` up with one file; its path (delete it to give the space back)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def seqs(db: Path) -> set[tuple[str, int]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {
            (device, values["seq"])
            for _, device, _, values in storefile.outbox_values(conn)
            if "seq" in values
        }
    finally:
        conn.close()


async def wait(predicate: object, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("fault", ["full", "read-only"])
async def test_a_disk_that_refuses_writes_mid_run_stops_nothing_and_recovers(
    small_disk: Path, fault: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(storewriter, "MAX_PENDING", 20)  # so that some readings are dropped
    caplog.set_level(logging.INFO)
    db = small_disk / "gw.sqlite"
    a, b = SimNode("tank-a", seq=True), SimNode("tank-b", seq=True)
    nodes = [node_entry(n.name, f"tcp://127.0.0.1:{await n.serve_tcp()}", poll_interval=0.05)
             for n in (a, b)]
    data = config_dict(db, nodes)
    data["storage"]["sync_interval"] = 0.2
    try:
        async with running_gateway(data) as gw:
            assert gw.store is not None
            store = gw.store
            await wait(lambda: store.stats.depth >= 20)
            await store.flush()
            committed = seqs(db)
            filler = fill(small_disk) if fault == "full" else None
            if fault == "read-only":
                # Linux refuses to remount a filesystem read-only while files on it are
                # open for writing (EBUSY), and only a failing device makes the kernel do
                # it (errors=remount-ro). SQLite's own switch gives the same error here.
                await store._submit(read=lambda c: c.execute("PRAGMA query_only = 1"))  # noqa: SLF001
            polled = sum(r.readings for r in gw.runners.values())
            await wait(lambda: store.storage == fault)
            await wait(lambda: store.stats.unstored > 0)  # counted, not claimed
            assert sum(r.readings for r in gw.runners.values()) > polled + 20  # polling goes on
            assert all(r.link_up for r in gw.runners.values())
            if filler is not None:
                filler.unlink()
            else:
                await store._submit(read=lambda c: c.execute("PRAGMA query_only = 0"))  # noqa: SLF001
            await wait(lambda: store.storage == "ok")
            depth = store.stats.depth
            await wait(lambda: store.stats.depth > depth + 10)  # stored again
            unstored = store.stats.unstored
    finally:
        await a.close()
        await b.close()
    errors = [r.getMessage() for r in caplog.records if f"storage {fault}" in r.getMessage()]
    assert len(errors) == 1, errors  # a clear error, once
    assert any("writable again" in r.getMessage() for r in caplog.records)
    after = seqs(db)
    assert committed <= after  # nothing committed was lost
    assert unstored > 0
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta WHERE key = 'unstored'").fetchone()[0] >= unstored
    conn.close()


def test_a_read_only_disk_at_start_still_polls_recovers_and_stops_on_sigterm(
    small_disk: Path, tmp_path: Path
) -> None:
    sims = SimNodes(2)
    db = small_disk / "gw.sqlite"
    logs = tmp_path
    gateways: list[Gateway] = []
    try:
        config = write_config(logs / f"{small_disk.name}.yaml",
                              config_data(db, sims.nodes, poll=0.1, clock_sync_wait=0))
        first = Gateway(config, log=logs / f"{small_disk.name}-1.log")
        gateways.append(first)
        until(lambda: "running" in first.log_text(), 30, "a first run")
        until(lambda: db.exists() and len(seqs(db)) > 0, 15, "rows")
        assert first.stop() == 0
        before = seqs(db)
        _mount("-o", "remount,ro", str(small_disk))
        gw = Gateway(config, log=logs / f"{small_disk.name}-2.log")
        gateways.append(gw)
        until(lambda: "running" in gw.log_text(), 30, "the gateway to start read-only")
        until(lambda: gw.log_text().count("link up") >= 2, 15, "the nodes to be polled")
        assert "storage " in gw.log_text() and "Traceback" not in gw.log_text()
        _mount("-o", "remount,rw", str(small_disk))
        until(lambda: "writable again" in gw.log_text(), 15, "the store to recover")
        until(lambda: len(seqs(db)) > len(before) + 10, 15, "readings stored again")
        assert gw.stop(timeout=10) == 0
        assert before <= seqs(db)
        # Read-only all along: SIGTERM still stops it, at once.
        _mount("-o", "remount,ro", str(small_disk))
        third = Gateway(config, log=logs / f"{small_disk.name}-3.log")
        gateways.append(third)
        until(lambda: "running" in third.log_text(), 30, "the gateway to start read-only")
        assert third.stop(timeout=10) == 0
    finally:
        for gw in gateways:
            gw.stop()
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=False)
        sims.stop()


async def test_the_wal_is_checkpointed_small_once_the_buffer_is_empty(
    broker: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storewriter, "IDLE_CHECKPOINT_S", 1.0)
    node = SimNode("tank-a", seq=True)
    url = f"tcp://127.0.0.1:{await node.serve_tcp()}"
    db = tmp_path / "gw.sqlite"
    data = config_dict(db, [node_entry("tank-a", url, poll_interval=0.05)], broker.port)  # type: ignore[attr-defined]
    try:
        async with running_gateway(data) as gw:
            assert gw.store is not None
            store = gw.store
            # Readings written while ThingsBoard is away, then forwarded.
            assert gw.uplink is not None
            await wait(lambda: store.stats.forwarded > 50)
            await store.flush()
            wal = Path(f"{db}-wal")
            for runner in gw.runners.values():
                await runner.shutdown()
            await gw._stop_task("node:tank-a")  # noqa: SLF001 - no more readings
            await wait(lambda: store.stats.depth == 0 and store.stats.pending == 0)
            await wait(lambda: wal.stat().st_size == 0, timeout=10)
    finally:
        await node.close()


# ------------------------------------------------------------ damaged files
async def _make(path: Path, rows: int = 3000) -> None:
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        for i in range(rows):
            store.append("tank-a", 1_700_000_000_000 + i, {"seq": i, "pad": "x" * 50})
        await store.save_settings("tank-a", {"mode": "manual"})


def _damage(path: Path, kind: str) -> None:
    size = path.stat().st_size
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "half-truncated":
        os.truncate(path, size // 2)
    elif kind == "last-page-cut":
        os.truncate(path, size - 1024)
    elif kind == "garbage-header":
        with open(path, "r+b") as f:
            f.write(b"\xa5" * 100)
    elif kind == "garbage-page":
        with open(path, "r+b") as f:
            f.seek(size // 2 // 1024 * 1024)
            f.write(b"\xa5" * 1024)
    elif kind == "zeros":
        path.write_bytes(b"\0" * size)
    elif kind == "not-a-database":
        path.write_text("this is not a database\n" * 200)
    elif kind == "garbage-wal":
        Path(f"{path}-wal").write_bytes(b"\xa5" * 5000)


# kind -> (fewest readings recovered, counters readable, moved aside)
DAMAGE = {
    "empty": (0, False, True),
    "half-truncated": (1000, True, True),
    "last-page-cut": (2900, True, True),
    "garbage-header": (3000, True, True),
    "garbage-page": (2900, True, True),
    "zeros": (0, False, True),
    "not-a-database": (0, False, True),
    "garbage-wal": (3000, True, False),  # SQLite ignores frames that do not check out
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
async def test_a_damaged_file_is_moved_aside_with_what_it_held_and_a_fresh_one_started(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    least, counted, aside = DAMAGE[kind]
    path = tmp_path / "gw.sqlite"
    await _make(path)
    _damage(path, kind)
    caplog.set_level(logging.INFO, logger="hydrogate.store")
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        recovered = store.stats.depth
        assert least <= recovered <= 3000
        store.append("tank-a", 1_800_000_000_000, {"seq": -1})  # and it works
        await store.flush()
        assert store.stats.depth == recovered + 1
        if recovered:
            assert await store.load_settings("tank-a") == {"mode": "manual"}
    lines = [r.getMessage() for r in caplog.records if "was damaged" in r.getMessage()]
    moved = sorted(p.name for p in tmp_path.glob("gw.sqlite.damaged-*") if "-" not in p.suffix[1:])
    if not aside:
        assert lines == [] and moved == []
        return
    [line] = lines
    assert "moved aside to gw.sqlite.damaged-" in line
    assert f"{recovered} recovered into a fresh file" in line
    assert ("it held 3000 buffered readings" in line) == counted
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("gw.sqlite.damaged-")]) >= 1


def test_a_damaged_file_never_makes_the_daemon_exit(tmp_path: Path) -> None:
    """Under Restart=on-failure, a refusal to start would be a crash loop."""
    path = tmp_path / "gw.sqlite"
    asyncio.run(_make(path, rows=500))
    _damage(path, "half-truncated")
    sims = SimNodes(1)
    gw = None
    try:
        config = write_config(tmp_path / "gw.yaml",
                              config_data(path, sims.nodes, poll=0.1, clock_sync_wait=0))
        gw = Gateway(config)
        until(lambda: "running" in gw.log_text(), 30, "the gateway to start")
        until(lambda: "link up" in gw.log_text(), 15, "the node to be polled")
        assert gw.stop() == 0
    finally:
        if gw is not None:
            gw.stop()
        sims.stop()
    text = gw.log_text()
    assert "was damaged" in text and "Traceback" not in text


@pytest.mark.parametrize("kind", ["half-truncated", "last-page-cut", "garbage-header"])
async def test_a_large_file_gets_the_cheap_checks_and_they_catch_truncation_and_headers(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.storefile as storefile

    path = tmp_path / "gw.sqlite"
    await _make(path)
    _damage(path, kind)
    monkeypatch.setattr(storefile, "QUICK_CHECK_MAX_BYTES", 0)  # as if it were big
    async with Store.open(path, max_rows=None, max_bytes=None) as store:
        assert 1000 <= store.stats.depth <= 3000
    assert list(tmp_path.glob("gw.sqlite.damaged-*"))


async def test_the_wal_never_fills_a_small_disk_by_itself(small_disk: Path) -> None:
    """Once a WAL has filled the disk it can never be checkpointed (the file would have
    to grow): it is checkpointed early enough, as the free space shrinks."""
    path = small_disk / "gw.sqlite"
    wal = Path(f"{path}-wal")
    largest = 0
    async with Store.open(path, max_rows=3000, max_bytes=None, sync_interval=0.1) as store:
        for second in range(60):  # ~6 MB of readings through a 4 MiB disk
            for i in range(300):
                store.append("tank-a", 1_800_000_000_000 + second * 1000 + i,
                             {"seq": i, "pad": "x" * 200})
            await store.flush()
            largest = max(largest, wal.stat().st_size)
            assert store.storage == "ok", f"after {second} s"
        assert store.stats.depth == 3000
    assert largest <= (4 << 20) // 4 + (256 << 10)


async def test_a_version_4_file_on_a_read_only_disk_is_read_as_it_is_then_migrated(
    small_disk: Path,
) -> None:
    from tests.test_store import _v4_file, _wrapped

    db = small_disk / "gw.db"
    t = 1_900_000_000_000
    _v4_file(db, [(1, "tank-a", t, _wrapped(t, {"seq": 1}), None)], {"next_id": 2})
    _mount("-o", "remount,ro", str(small_disk))
    try:
        async with Store.open(db, max_rows=None, max_bytes=None) as store:
            assert store.storage != "ok"
            store.append("tank-a", t + 1, {"seq": 2})  # waits in memory
            rows = await store.peek(10)  # from a read-only view of the version 4 file...
            rows += await store.peek(10, rows[-1].id)  # ...then from memory
            assert [r.entry for r in rows] == [_wrapped(t, {"seq": 1}), _wrapped(t + 1, {"seq": 2})]
            _mount("-o", "remount,rw", str(small_disk))
            await wait(lambda: store.storage == "ok")
            await store.flush()
            rows = await store.peek(10)  # from the file, migrated: one row of each kind
            assert [r.entry for r in rows] == [_wrapped(t, {"seq": 1}), _wrapped(t + 1, {"seq": 2})]
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=False)
    assert seqs(db) == {("tank-a", 1), ("tank-a", 2)}
