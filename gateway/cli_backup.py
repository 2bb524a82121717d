"""`hydrogate backup [-c FILE] OUT`: a consistent copy of the daemon's database, while it runs.

SQLite's online backup API copies the file a few pages at a time inside one
read snapshot (gateway/history.py): the copy is the file as it was when the
backup started, whatever the daemon writes meanwhile, and the daemon is
never stopped or slowed (docs/benchmarks.md). The copy is checked (``PRAGMA
quick_check``), synced, and only then renamed to OUT; it gets the original
file's permissions. OUT may be a folder: the copy is then named
``hydrogate-<date>T<time>.sqlite`` in it. An existing file is not
overwritten without ``--force``.

The copy is a complete buffer: stop the daemon, put it in place of
``storage.path`` and start it again to restore.

Exit codes: 0 copied; 1 the copy failed (nothing is left at OUT); 2 an
invalid config, or OUT exists.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from gateway.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, add_config_option, load_config_or_exit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hydrogate backup`."""
    add_config_option(parser)
    parser.add_argument("out", type=Path, metavar="OUT", help="the copy to write (or a folder)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")


def target_path(out: Path, now: datetime.datetime | None = None) -> Path:
    """Where the copy goes: ``out``, or a dated name inside it if it is a folder."""
    if out.is_dir():
        stamp = (now or datetime.datetime.now()).strftime("%Y%m%dT%H%M%S")
        return out / f"hydrogate-{stamp}.sqlite"
    return out


def run(args: argparse.Namespace) -> int:
    """Back up; the exit code."""
    from tqdm import tqdm

    from gateway.history import HistoryError, HistoryFile, step_aside

    step_aside()
    config = load_config_or_exit(args)
    if isinstance(config, int):
        return config
    source = config.storage.path
    target = target_path(args.out)
    if target.exists() and not args.force:
        print(f"hydrogate backup: {target} exists (--force replaces it)", file=sys.stderr)
        return EXIT_CONFIG
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        with HistoryFile(source) as db, tqdm(
            total=None, unit=" pages", desc="backup", file=sys.stderr, delay=1.0, disable=None,
            leave=False,
        ) as bar:

            def progress(copied: int, total: int) -> None:
                bar.total = total
                bar.update(copied - bar.n)

            db.backup(partial, progress=progress)
            with db.snapshot():
                summary = db.summary()
        os.chmod(partial, os.stat(source).st_mode & 0o777)
        _fsync(partial)
        os.replace(partial, target)
        _fsync(target.parent)
    except (HistoryError, OSError) as exc:
        partial.unlink(missing_ok=True)
        print(f"hydrogate backup: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    size = target.stat().st_size
    print(
        f"{target}: {size / 1048576:.1f} MiB, a consistent copy of {source}: "
        f"{summary['buffered']} readings buffered, {summary['history']} forwarded readings "
        f"kept, {summary['received']} received in all"
    )
    return EXIT_OK


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
