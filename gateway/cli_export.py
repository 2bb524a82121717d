"""`hydrogate export --node NAME [--since T] [--until T] [--format csv|jsonl]`: readings out.

Streams one node's readings from the daemon's SQLite file, while the daemon
runs: those ThingsBoard acknowledged (kept ``storage.history_days``) and
those still buffered, in time order (gateway/history.py). It first asks a
running daemon to write the forwarded readings it still holds in memory (at
most a minute's worth), so the export is complete up to now; a daemon that
is not running has nothing in memory.

CSV: a header ``time,ts,<keys…>`` (``time`` in ISO 8601 with the local
offset, ``ts`` in ms since the epoch as ThingsBoard stores it; readings
first, then every other key in alphabetical order) and one row per entry,
empty cells for the keys an entry lacks. JSONL: one ``{"ts":…,"values":{…}}``
per line, exactly as ThingsBoard received it. Times (``--since``,
``--until``): ``now``, ``today``, ``yesterday`` (local midnight), a
duration ago (``24h``, ``7d``, ``90min``), an ISO date or date-time (local
time unless it carries an offset), or ms since the epoch. Default: the last
24 hours.

A progress bar (tqdm, on stderr) appears when an export takes more than a
second and stderr is a terminal.

Exit codes: 0 written (also when there was nothing to write: stderr says
so); 1 the file cannot be read or the output cannot be written; 2 an invalid
config, time or node name.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from gateway.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, add_config_option, load_config_or_exit

#: Columns that come first in a CSV, in this order, when present (readings).
FIRST_KEYS = ("tds", "ec", "ph", "water_temp", "water_level", "air_temp", "humidity")
#: Seconds an export must take before its progress bar shows.
PROGRESS_DELAY_S = 1.0

_AGO = re.compile(r"-?\s*([0-9]+(?:\.[0-9]*)?)\s*(s|sec|min|m|h|d|w)\s*")
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TimeError(ValueError):
    """A time argument that cannot be read."""


def parse_time(text: str, now: float | None = None) -> int:
    """A time argument as ms since the epoch (see the module's docstring for the forms)."""
    now = time.time() if now is None else now
    word = text.strip().lower()
    midnight = datetime.datetime.fromtimestamp(now).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    if word == "now":
        return int(now * 1000)
    if word == "today":
        return int(midnight.timestamp() * 1000)
    if word == "yesterday":
        return int((midnight - datetime.timedelta(days=1)).timestamp() * 1000)
    match = _AGO.fullmatch(word)
    if match:
        return int((now - float(match.group(1)) * _UNITS[match.group(2)]) * 1000)
    if word.isdigit() and len(word) >= 11:  # ms since the epoch (after 1973)
        return int(word)
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise TimeError(
            f"{text!r} is not a time: use now, today, yesterday, 24h, 7d, an ISO date such as"
            " 2024-05-01 or 2024-05-01T12:00, or ms since the epoch"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return int(when.timestamp() * 1000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hydrogate export`."""
    add_config_option(parser)
    parser.add_argument("--node", required=True, help="the node's name (nodes[].name)")
    parser.add_argument("--since", default="24h", help="from this time (default: 24h ago)")
    parser.add_argument("--until", default="now", help="up to this time (default: now)")
    parser.add_argument("--format", choices=("csv", "jsonl"), default="csv",
                        help="csv (default) or jsonl")
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                        help="write here (default: standard output)")


def run(args: argparse.Namespace) -> int:
    """Export; the exit code."""
    from gateway.history import HistoryError, HistoryFile, step_aside

    step_aside()
    config = load_config_or_exit(args)
    if isinstance(config, int):
        return config
    try:
        since, until = parse_time(args.since), parse_time(args.until)
    except TimeError as exc:
        print(f"hydrogate export: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if since > until:
        print(f"hydrogate export: --since {args.since} is after --until {args.until}",
              file=sys.stderr)
        return EXIT_CONFIG
    _flush_daemon(config)
    try:
        with HistoryFile(config.storage.path) as db, db.snapshot():
            known = {n.name for n in config.nodes} | set(db.devices())
            if args.node not in known:
                print(f"hydrogate export: no node {args.node!r} in {args.config} or "
                      f"{config.storage.path} (known: {', '.join(sorted(known)) or 'none'})",
                      file=sys.stderr)
                return EXIT_CONFIG
            total = db.count(args.node, since, until)
            with _output(args.output) as out:
                if args.format == "jsonl":
                    written = write_jsonl(out, _progress(db.entries(args.node, since, until),
                                                         total, "export"))
                else:
                    keys = collect_keys(_progress(db.entries(args.node, since, until),
                                                  total, "keys"))
                    written = write_csv(out, keys, _progress(
                        db.entries(args.node, since, until), total, "export"))
    except HistoryError as exc:
        print(f"hydrogate export: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"hydrogate export: cannot write {args.output or 'the output'}: {exc}",
              file=sys.stderr)
        return EXIT_FAILURE
    span = f"{_local(since)} to {_local(until)}"
    if written:
        print(f"{args.node}: {written} entries from {span}", file=sys.stderr)
    else:
        print(f"{args.node}: no readings from {span}", file=sys.stderr)
    return EXIT_OK


def _flush_daemon(config: Any) -> None:
    """Ask a running daemon to write the forwarded readings it holds in memory (best effort)."""
    from gateway.localclient import LocalClient, LocalClientError
    from gateway.localrpc import client_paths

    with contextlib.suppress(LocalClientError, OSError), LocalClient.connect(
        client_paths(config), timeout=10.0
    ) as daemon:
        daemon.call("flush")


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    """Standard output, or ``path`` written through a temporary file renamed at the end.

    A path that exists and is not a regular file (``/dev/null``, a pipe) is
    written as it is.
    """
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    if path.exists() and not path.is_file():
        with open(path, "w", encoding="utf-8", newline="") as out:
            yield out
        return
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8", newline="") as out:
            yield out
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _progress(entries: Iterable[dict[str, Any]], total: int, what: str) -> Iterator[dict[str, Any]]:
    """``entries`` with a progress bar on stderr, shown only for long exports on a terminal."""
    from tqdm import tqdm

    with tqdm(entries, total=total or None, desc=what, unit=" entries", file=sys.stderr,
              delay=PROGRESS_DELAY_S, disable=None, leave=False, mininterval=0.5) as bar:
        yield from bar


def collect_keys(entries: Iterable[dict[str, Any]]) -> list[str]:
    """Every value key of ``entries``, readings first (`FIRST_KEYS`), then alphabetical."""
    seen: set[str] = set()
    for entry in entries:
        seen.update(entry["values"])
    first = [k for k in FIRST_KEYS if k in seen]
    return first + sorted(seen - set(first))


def write_csv(out: IO[str], keys: list[str], entries: Iterable[dict[str, Any]]) -> int:
    """The CSV header and one row per entry; how many rows."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["time", "ts", *keys])
    rows = 0
    for entry in entries:
        values = entry["values"]
        ts = entry["ts"]
        writer.writerow([_local(ts), ts, *(_cell(values.get(k)) for k in keys)])
        rows += 1
    return rows


def write_jsonl(out: IO[str], entries: Iterable[dict[str, Any]]) -> int:
    """One JSON object per line; how many lines."""
    lines = 0
    for entry in entries:
        out.write(json.dumps({"ts": entry["ts"], "values": entry["values"]},
                             separators=(",", ":")) + "\n")
        lines += 1
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, int | str):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def _local(ts_ms: int) -> str:
    """ISO 8601 in local time with its offset, to the millisecond."""
    return datetime.datetime.fromtimestamp(ts_ms / 1000).astimezone().isoformat(
        timespec="milliseconds"
    )
