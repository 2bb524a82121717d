"""Simulated power cuts: what survives of the buffer when the power goes at any instant.

    python -m bench.powercut [--rounds 20] [--model synced|torn] [--nodes 10] [--poll 0.05]

No device-mapper here (dm-log-writes, dm-flakey), so the cut is simulated
one level up: the gateway runs offline (every reading is written) with
bench/shims/powercut.c preloaded, which journals every write and truncate of
its database files and marks every fsync/fdatasync. After a random 2-5 s the
gateway is SIGKILLed at ``t_cut``, and the files are rebuilt as the disk
would hold them after a power cut at that instant:

- ``synced``: exactly what was synced (every write after the last sync lost);
- ``torn``: that, plus a random half of the later writes, in any order
  (what a disk may have written back on its own).

The rebuilt files must pass ``PRAGMA integrity_check`` and open as a store;
every node's newest surviving reading must have arrived (its ``ts``) at most
``sync_interval`` + one poll before ``t_cut``, and its readings of the round
must survive without a gap (numbered by the node, ``seq``), so nothing older
than the window is lost; a reading the gateway had committed (the files as
the SIGKILL left them) may be missing only if younger than ``sync_interval``;
nothing may appear that was not committed. The rebuilt
files are the disk of the next round, as on a gateway whose power keeps
failing. Prints one line per cut and a summary; exit status 1 if any cut
broke the promise.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, Gateway, SimNodes, config_data, until, write_config
from bench.shims import build
from gateway import storefile

#: Lateness allowed beyond sync_interval for scheduling on a loaded machine (s).
TOLERANCE_S = 0.5


def replay(base: Path, journal: Path, out: Path, *, model: str, rng: random.Random) -> None:
    """Rebuild ``out`` from ``base`` and ``journal`` as a power cut after the journal's end would.

    ``synced`` applies every record up to the last sync mark; ``torn`` also
    applies each later record with probability 1/2.
    """
    data = bytearray(base.read_bytes()) if base.exists() else bytearray()
    ops: list[tuple[str, int, bytes]] = []
    synced_upto = 0
    raw = journal.read_bytes() if journal.exists() else b""
    i = 0
    while i < len(raw):
        kind = chr(raw[i])
        i += 1
        if kind == "W":
            if i + 12 > len(raw):
                break
            offset, length = struct.unpack_from("<qI", raw, i)
            i += 12
            ops.append(("W", offset, bytes(raw[i : i + length])))
            i += length
        elif kind == "T":
            (size,) = struct.unpack_from("<q", raw, i)
            i += 8
            ops.append(("T", size, b""))
        else:
            synced_upto = len(ops)
    chosen = ops[:synced_upto]
    if model == "torn":
        chosen += [op for op in ops[synced_upto:] if rng.random() < 0.5]
    for kind, value, payload in chosen:
        if kind == "T":
            del data[value:]
            data.extend(b"\0" * max(0, value - len(data)))
        else:
            if len(data) < value:
                data.extend(b"\0" * (value - len(data)))
            data[value : value + len(payload)] = payload
    if base.exists() or journal.exists():
        out.write_bytes(bytes(data))


def readings(db: Path) -> dict[tuple[str, int], int]:
    """``(device, seq) -> ts`` of every reading in a copy of the files at ``db``."""
    conn = sqlite3.connect(db)
    try:
        out: dict[tuple[str, int], int] = {}
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "outbox" not in tables:  # the schema itself did not survive
            return out
        for _, device, ts, values in storefile.outbox_values(conn):
            seq = values.get("seq")
            if seq is not None:
                out[(device, int(seq))] = int(ts)
        return out
    finally:
        conn.close()


def copy_files(src: Path, dst: Path) -> None:
    for suffix in ("", "-wal"):
        f = Path(f"{src}{suffix}")
        if f.exists():
            shutil.copyfile(f, Path(f"{dst}{suffix}"))


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


async def _opens(db: Path) -> int:
    from gateway.store import Store

    async with Store.open(db, max_rows=None, max_bytes=None) as store:
        return store.stats.depth


@dataclass
class Cut:
    """One simulated power cut and what it showed."""

    committed: int  # readings the SIGKILL left committed
    survived: int
    lost_in_window: int  # committed, lost, younger than sync_interval (allowed)
    lost_beyond: int  # committed, lost, older than sync_interval + tolerance (broken promise)
    phantoms: int  # in the rebuilt file, never committed
    holes: int  # readings of the round missing while a later one of the node survived
    window_s: float  # the largest age at t_cut of a node's newest surviving reading
    limit_s: float  # what window_s may be: sync_interval + one poll + tolerance
    integrity: str
    opened: bool

    @property
    def ok(self) -> bool:
        return (self.lost_beyond == 0 and self.phantoms == 0 and self.holes == 0
                and self.window_s <= self.limit_s and self.integrity == "ok" and self.opened)


def one_cut(
    db: Path, nodes: list[tuple[str, str]], shim: Path, *, sync_interval: float, poll: float,
    seconds: float, model: str, rng: random.Random, code: Path = ROOT,
) -> Cut:
    """Run the gateway under the shim for ``seconds``, cut, rebuild, check; rebuilt files stay."""
    work = db.parent
    before = readings(db) if db.exists() else {}
    for suffix in (".base", ".journal", "-wal.base", "-wal.journal", "-journal.base",
                   "-journal.journal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    config = write_config(work / "gw.yaml", config_data(
        db, nodes, poll=poll, sync_interval=sync_interval, clock_sync_wait=0), code)
    gw = Gateway(config, code=code, env={"LD_PRELOAD": str(shim), "POWERCUT_PATH": str(db)},
                 level="INFO")
    try:
        until(lambda: "running" in gw.log_text(), 30, "the gateway to start")
        if not gw.wait_open(db):  # a cut before the store is open would test nothing
            raise RuntimeError(f"the gateway never opened {db}: see {gw.log}")
        time.sleep(seconds)
        t_cut = time.time()
        gw.kill()
    finally:
        if gw.proc.poll() is None:
            gw.kill()
    crashed, rebuilt = work / "crashed", work / "rebuilt"
    for d in (crashed, rebuilt):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    copy_files(db, crashed / db.name)
    for suffix in ("", "-wal"):
        replay(Path(f"{db}{suffix}.base"), Path(f"{db}{suffix}.journal"),
               rebuilt / f"{db.name}{suffix}", model=model, rng=rng)
    committed = readings(crashed / db.name)
    cut_db = rebuilt / db.name
    check = integrity(cut_db) if cut_db.exists() else "missing"
    survived = readings(cut_db) if check == "ok" else {}
    lost = {k: ts for k, ts in committed.items() if k not in survived}
    ages = [t_cut - ts / 1000 for ts in lost.values()]
    holes = 0
    window = 0.0
    for device, _ in nodes:
        start = max((s for d, s in before if d == device), default=0)
        fresh = sorted(s for d, s in survived if d == device and s > start)
        holes += sum(b - a - 1 for a, b in zip(fresh, fresh[1:], strict=False))
        newest = max((ts for (d, _), ts in survived.items() if d == device), default=None)
        window = max(window, t_cut - newest / 1000 if newest is not None else seconds)
    try:
        asyncio.run(_opens(cut_db))
        opened = True
    except Exception as exc:  # noqa: BLE001 - reported as a failed cut
        print(f"    the rebuilt file does not open: {exc}", file=sys.stderr)
        opened = False
    for suffix in ("", "-wal", "-shm"):  # the rebuilt files are the next round's disk
        Path(f"{db}{suffix}").unlink(missing_ok=True)
        rebuilt_file = Path(f"{cut_db}{suffix}")
        if rebuilt_file.exists():
            rebuilt_file.rename(Path(f"{db}{suffix}"))
    return Cut(
        committed=len(committed),
        survived=len(survived),
        lost_in_window=sum(1 for a in ages if a <= sync_interval + TOLERANCE_S),
        lost_beyond=sum(1 for a in ages if a > sync_interval + TOLERANCE_S),
        phantoms=sum(1 for k in survived if k not in committed),
        holes=holes,
        window_s=window,
        limit_s=sync_interval + poll + TOLERANCE_S,
        integrity=check,
        opened=opened,
    )


def run_cuts(
    work: Path, rounds: int, *, nodes: int = 10, poll: float = 0.05, sync_interval: float = 1.0,
    model: str = "synced", seed: int = 1, seconds: tuple[float, float] = (2.0, 5.0),
    code: Path = ROOT,
) -> list[Cut]:
    """``rounds`` cuts in a row on one buffer file in ``work``; one result per cut."""
    rng = random.Random(seed)
    shim = build("powercut", work)
    sims = SimNodes(nodes)
    db = work / "gw.sqlite"
    cuts: list[Cut] = []
    try:
        for i in range(rounds):
            m = model if model != "both" else ("synced", "torn")[i % 2]
            cut = one_cut(db, sims.nodes, shim, sync_interval=sync_interval, poll=poll,
                          seconds=rng.uniform(*seconds), model=m, rng=rng, code=code)
            cuts.append(cut)
            print(f"cut {i + 1:3} ({m:6}): {cut.survived} of {cut.committed} committed survive,"
                  f" newest of each node at most {cut.window_s:.2f} s old (limit"
                  f" {cut.limit_s:.2f}), {cut.lost_in_window} committed lost within the window,"
                  f" {cut.lost_beyond} beyond, {cut.phantoms} phantoms, {cut.holes} holes,"
                  f" integrity {cut.integrity}, {'opens' if cut.opened else 'DOES NOT OPEN'}",
                  flush=True)
    finally:
        sims.stop()
    return cuts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--model", choices=("synced", "torn", "both"), default="both")
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between reads per node")
    parser.add_argument("--sync-interval", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="checkout whose gateway runs (e.g. a worktree of an older version)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hydrogate-powercut-", dir="/var/tmp") as tmp:
        cuts = run_cuts(Path(tmp), args.rounds, nodes=args.nodes, poll=args.poll,
                        sync_interval=args.sync_interval, model=args.model, seed=args.seed,
                        code=args.code.resolve())
    bad = [c for c in cuts if not c.ok]
    print(f"\n{len(cuts)} cuts: newest surviving reading at most"
          f" {max((c.window_s for c in cuts), default=0):.2f} s old at the cut (limit"
          f" {args.sync_interval + args.poll + TOLERANCE_S:.2f}),"
          f" {sum(c.lost_in_window for c in cuts)} committed readings lost within the window,"
          f" {sum(c.lost_beyond for c in cuts)} beyond it, {sum(c.phantoms for c in cuts)}"
          f" phantoms, {sum(c.holes for c in cuts)} holes, {len(bad)} cuts failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
