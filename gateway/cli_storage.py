"""`hydrogate storage downgrade [-c FILE] --to N`: the buffer written back for an older release.

A new release migrates the buffer to its schema when it starts, and an
older release refuses a file of a newer schema. So putting the previous
release back (scripts/install.sh does, when the new one fails to start)
needs the file written back first: the new release knows both schemas, the
old one only its own. Stop the daemon first; the old release's schema
version is ``python -c 'from gateway.store import SCHEMA_VERSION;
print(SCHEMA_VERSION)'`` run with its interpreter. Nothing buffered is lost:
rows are rewritten in the older form, in one transaction.

Exit codes: 0 written back (or already at that version or older); 1 the file
is open in another process (the daemon still runs) or could not be written;
2 an invalid config, or a version this release cannot write.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys

from gateway.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, add_config_option, load_config_or_exit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hydrogate storage`."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    down = sub.add_parser("downgrade", help="write the buffer file back to an older schema version")
    add_config_option(down)
    down.add_argument("--to", type=int, required=True, metavar="N",
                      help="the schema version of the release that will open the file")


def run(args: argparse.Namespace) -> int:
    """Write the file back; the exit code."""
    from gateway import storefile

    config = load_config_or_exit(args)
    if isinstance(config, int):
        return config
    path = config.storage.path
    if not path.exists():
        print(f"hydrogate storage: {path}: no buffer file, nothing to write back")
        return EXIT_OK
    try:
        had, dropped = storefile.downgrade(path, args.to)
    except ValueError as exc:
        print(f"hydrogate storage: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (storefile.FileInUse, sqlite3.Error, OSError) as exc:
        print(f"hydrogate storage: {path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if had <= args.to:
        print(f"hydrogate storage: {path} is at schema version {had} already")
    else:
        rows = "row that does not" if dropped == 1 else "rows that do not"
        lost = f"; dropped {dropped} {rows} read" if dropped else ""
        print(f"hydrogate storage: {path} written back from schema version {had}"
              f" to {args.to}{lost}")
    return EXIT_OK
