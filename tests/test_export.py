"""`hydrogate export` and `hydrogate backup` on the file of a running gateway."""

from __future__ import annotations

import asyncio
import csv
import datetime
import io
import json
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

from gateway.cli import main as cli_main
from gateway.cli_export import TimeError, parse_time
from gateway.config import load_config
from gateway.daemon import Gateway
from gateway.store import Store
from gateway.storefile import SCHEMA_VERSION
from sim.node import SimNode
from tests.conftest import Broker
from tests.gateway_harness import config_dict, hydrogate, node_entry, write_config
from tests.mqtt_recorder import Recorder

pytestmark = pytest.mark.slow



async def test_export_and_backup_while_the_gateway_runs(broker: Broker, tmp_path: Path) -> None:
    node = SimNode("tank-a", seq=True)
    try:
        entry = node_entry("tank-a", f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}")
        db = tmp_path / "gw.sqlite"
        path = write_config(tmp_path / "config.yaml", config_dict(db, [entry], broker.port))
        gateway = Gateway(load_config(path), config_path=path)
        task = asyncio.create_task(gateway.run())
        try:
            async with Recorder(broker.port) as rec:
                await rec.wait_for(lambda: len(rec.entries().get("tank-a", [])) >= 20,
                                   what="forwarded readings")
                broker.stop()  # later readings stay buffered in the outbox
                await asyncio.sleep(1.5)
                # While the gateway keeps writing: both halves, one stream, in time order.
                code, out, err = await hydrogate("export", "-c", str(path), "--node", "tank-a",
                                                 "--since", "1h")
                assert code == 0, err
                rows = list(csv.reader(io.StringIO(out)))
                header, rows = rows[0], rows[1:]
                assert header[:2] == ["time", "ts"]
                assert header[2:4] == ["tds", "ph"]  # readings first
                assert "seq" in header and "link" in header  # and the gateway's own entries
                ts = [int(r[1]) for r in rows]
                assert ts == sorted(ts) and len(set(ts)) == len(ts)
                seqs = [int(r[header.index("seq")]) for r in rows if r[header.index("seq")]]
                forwarded = sorted(int(e["values"]["seq"]) for e in rec.entries()["tank-a"]
                                   if "seq" in e["values"])
                assert set(forwarded) <= set(seqs)  # every forwarded reading is there...
                assert max(seqs) > max(forwarded)  # ...and the buffered ones after them
                assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
                when = datetime.datetime.fromisoformat(rows[0][0])
                assert abs(when.timestamp() * 1000 - ts[0]) < 1

                code, out, _ = await hydrogate("export", "-c", str(path), "--node", "tank-a",
                                               "--format", "jsonl", "-o",
                                               str(tmp_path / "a.jsonl"))
                assert code == 0 and out == ""
                lines = (tmp_path / "a.jsonl").read_text().splitlines()
                assert all(set(json.loads(x)) == {"ts", "values"} for x in lines)
                assert len(lines) >= len(rows)

                code, out, err = await hydrogate("backup", "-c", str(path),
                                                 str(tmp_path / "copy.sqlite"))
                assert code == 0, err
                assert "a consistent copy" in out
                copy = sqlite3.connect(tmp_path / "copy.sqlite")
                try:
                    assert copy.execute("PRAGMA quick_check").fetchone() == ("ok",)
                    assert copy.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] > 0
                    assert copy.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
                finally:
                    copy.close()
                code, _, err = await hydrogate("backup", "-c", str(path),
                                               str(tmp_path / "copy.sqlite"))
                assert code == 2 and "exists" in err
                folder = tmp_path / "backups"
                folder.mkdir()
                code, _, _ = await hydrogate("backup", "-c", str(path), str(folder))
                assert code == 0 and len(list(folder.glob("hydrogate-*.sqlite"))) == 1
                assert not list(folder.glob("*.partial"))

                code, _, err = await hydrogate("export", "-c", str(path), "--node", "tank-z")
                assert code == 2 and "tank-z" in err and "tank-a" in err
                code, _, err = await hydrogate("export", "-c", str(path), "--node", "tank-a",
                                               "--since", "last tuesday")
                assert code == 2 and "not a time" in err
                broker.start()
        finally:
            gateway.request_stop()
            async with asyncio.timeout(15):
                await task
    finally:
        await node.close()


async def test_a_day_of_readings_to_csv(tmp_path: Path) -> None:
    """The issue's "done when": yesterday's readings out of the Pi as CSV, one row each."""
    db = tmp_path / "gw.sqlite"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"gateway": {"name": "gw"}, "storage": {"path": str(db)},
                                      "nodes": [{"name": "tank-a", "url": "tcp://127.0.0.1:9"}]}))
    midnight = datetime.datetime.combine(datetime.date.today(), datetime.time()).astimezone()
    yesterday = midnight - datetime.timedelta(days=1)
    start = int(yesterday.timestamp() * 1000)
    async with Store.open(db, max_rows=None, max_bytes=None, history_days=7) as store:
        # A reading every 10 s from yesterday 00:00 to today 00:00, and a few of today's.
        for i in range(8640 + 6):
            store.append("tank-a", start + i * 10_000, {"tds": 800.0 + i % 7, "ph": 6.0})
            if i % 500 == 0:
                while rows := await store.peek(1000):
                    await store.ack([r.id for r in rows])
        await store.flush()  # the rest buffered, as if ThingsBoard were away
    out = tmp_path / "yesterday.csv"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "export", "-c", str(config), "--node", "tank-a",
        "--since", "yesterday", "--until", str(int(midnight.timestamp() * 1000) - 1),
        "-o", str(out), stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err
    with out.open() as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["time", "ts", "tds", "ph"]
    assert len(lines) - 1 == 8640
    assert int(lines[1][1]) == start and lines[1][0].startswith(yesterday.date().isoformat())
    assert b"8640 entries" in err


def test_time_arguments() -> None:
    now = datetime.datetime(2024, 5, 2, 15, 30).astimezone().timestamp()
    midnight = datetime.datetime(2024, 5, 2).astimezone().timestamp()
    assert parse_time("now", now) == int(now * 1000)
    assert parse_time("today", now) == int(midnight * 1000)
    assert parse_time("yesterday", now) == int((midnight - 86400) * 1000)
    assert parse_time("24h", now) == int((now - 86400) * 1000)
    assert parse_time("-90min", now) == int((now - 5400) * 1000)
    assert parse_time("7d", now) == int((now - 7 * 86400) * 1000)
    assert parse_time("2024-05-01", now) == int((midnight - 86400) * 1000)
    assert parse_time("2024-05-01T12:00:00+00:00", now) == int(
        datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.UTC).timestamp() * 1000)
    assert parse_time("1714600000000", now) == 1714600000000
    for bad in ("", "soon", "12", "2024-13-01"):
        with pytest.raises(TimeError):
            parse_time(bad, now)


@pytest.mark.parametrize("command", [["export", "--node", "tank-a"], ["backup"]])
def test_a_bad_config_is_named_and_exit_2(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("storage: [\n")
    if command == ["backup"]:
        command = ["backup", str(tmp_path / "copy.sqlite")]
    assert cli_main([*command, "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration {bad}" in err and "line 2" in err
    assert not (tmp_path / "copy.sqlite").exists()
