"""systemd glue in-process: sd_notify on a real socket, the watchdog, reload status, journal fields."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.service import (
    NODE,
    JournalFields,
    NodeFormatter,
    journal_handler,
    notify,
    run_watchdog,
    watchdog_interval,
)
from gateway.store import Store
from sim.node import SimNode
from sim.plant import Reservoir
from tests.gateway_harness import config_dict, node_entry, running_gateway

# ------------------------------------------------------------------ helpers


class NotifySocket:
    """A datagram socket bound where NOTIFY_SOCKET points: what systemd would receive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        """Read whatever arrived; every message so far, oldest first."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            self.messages.append((time.monotonic(), data.decode()))
        return [m for _, m in self.messages]

    async def wait_for(self, predicate: Any, what: str, timeout: float = 10.0,
                       start: int = 0) -> str:
        """The first message from the ``start``-th on for which ``predicate`` holds."""
        async with asyncio.timeout(timeout):
            while True:
                for message in self.drain()[start:]:
                    if predicate(message):
                        return message
                await asyncio.sleep(0.01)
        raise AssertionError(what)  # pragma: no cover - the timeout raises first

    def pings_since(self, t: float) -> int:
        self.drain()
        return sum(1 for at, m in self.messages if at >= t and m == "WATCHDOG=1")

    async def wait_pings(self, since: float, count: int, timeout: float = 10.0) -> None:
        """Wait (bounded) until ``count`` pings arrived at ``since`` or later."""
        async with asyncio.timeout(timeout):
            while self.pings_since(since) < count:
                await asyncio.sleep(0.02)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    try:
        yield sock
    finally:
        sock.close()



def one_node(storage: Path) -> dict[str, Any]:
    """A config with one node nobody answers for (the gateway needs one)."""
    return config_dict(storage, [node_entry("tank-x", "tcp://127.0.0.1:1")])


def hang_writer(store: Store) -> threading.Event:
    """Block the store's writer thread (as a stuck disk would) until the event is set.

    A fault injected through the store's own queue: the writer runs this
    operation like any other and does not come back until released.
    """
    release = threading.Event()
    store._submit(read=lambda conn: release.wait(30))  # noqa: SLF001 - fault injection
    return release


# ------------------------------------------------------------------ sd_notify


def test_watchdog_interval_follows_watchdog_usec_and_pid() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}, pid=7) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "7"}, pid=7) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, pid=7) is None


def test_notify_speaks_to_a_path_or_an_abstract_socket(tmp_path: Path) -> None:
    sock = NotifySocket(tmp_path / "n.sock")
    try:
        assert notify("READY=1\nSTATUS=hi", {"NOTIFY_SOCKET": str(sock.path)})
        assert sock.drain() == ["READY=1\nSTATUS=hi"]
    finally:
        sock.close()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"hydrogate-test-{id(abstract)}"
    abstract.bind("\0" + name)
    try:
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert abstract.recv(100) == b"WATCHDOG=1"
    finally:
        abstract.close()
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})


async def test_the_watchdog_pings_only_while_the_writer_answers(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    async with Store.open(tmp_path / "w.sqlite", max_rows=None, max_bytes=None) as store:
        task = asyncio.create_task(run_watchdog(0.05, store.flush), name="watchdog")
        try:
            await notify_socket.wait_pings(0, 5)
            release = hang_writer(store)
            await asyncio.sleep(0.1)  # a probe sent before the hang may still answer
            hung_at = time.monotonic()
            await asyncio.sleep(0.5)
            assert notify_socket.pings_since(hung_at) == 0
            release.set()
            await notify_socket.wait_pings(hung_at, 3)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_failed_store_withholds_the_pings() -> None:
    sent: list[str] = []

    async def failing() -> None:
        raise OSError("disk gone")

    task = asyncio.create_task(run_watchdog(0.02, failing, send=sent.append), name="watchdog")
    await asyncio.sleep(0.2)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert sent == []


async def test_the_daemon_says_ready_and_pings_while_its_writer_lives(
    tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(one_node(tmp_path / "gw.sqlite")))
    async with running_gateway(path, connected=False) as gw:
        ready = await notify_socket.wait_for(lambda m: m.startswith("READY=1"), "READY=1")
        assert "STATUS=0/1 nodes up · backlog 0 · offline (buffer only)" in ready
        await notify_socket.wait_pings(0, 3)
        assert gw.store is not None
        release = hang_writer(gw.store)
        await asyncio.sleep(0.1)
        hung_at = time.monotonic()
        await asyncio.sleep(0.4)
        assert notify_socket.pings_since(hung_at) == 0
        assert any("has not answered" in r.getMessage() and r.levelno == logging.ERROR
                   for r in caplog.records)
        release.set()
        await notify_socket.wait_pings(hung_at, 2)
    assert any(m.startswith("STOPPING=1") for m in notify_socket.drain())


async def test_without_watchdog_usec_there_are_no_pings(
    tmp_path: Path, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(one_node(tmp_path / "gw.sqlite")))
    async with running_gateway(path, connected=False):
        await notify_socket.wait_for(lambda m: m.startswith("READY=1"), "READY=1")
        await asyncio.sleep(0.2)
    assert "WATCHDOG=1" not in notify_socket.drain()


async def test_reload_says_reloading_then_ready_with_what_was_refused(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    path = tmp_path / "gw.yaml"
    good = one_node(tmp_path / "gw.sqlite")
    path.write_text(yaml.safe_dump(good))
    async with running_gateway(path, connected=False) as gw:
        await notify_socket.wait_for(lambda m: m.startswith("READY=1"), "READY=1")
        bad = dict(good, gateway={"name": "gw", "health_interval": -5})
        path.write_text(yaml.safe_dump(bad))
        gw.request_reload()
        reloading = await notify_socket.wait_for(lambda m: m.startswith("RELOADING=1"),
                                                 "RELOADING=1")
        usec = int(re.search(r"MONOTONIC_USEC=(\d+)", reloading).group(1))  # type: ignore[union-attr]
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 5
        refused = await notify_socket.wait_for(
            lambda m: m.startswith("READY=1") and "reload refused" in m, "refusal")
        assert "STATUS=reload refused: gateway.health_interval:" in refused
        assert gw.config.gateway.health_interval == good["gateway"]["health_interval"]

        path.write_text(yaml.safe_dump(dict(good, gateway={"name": "gw-test",
                                                           "health_interval": 2})))
        start = len(notify_socket.drain())
        gw.request_reload()
        await notify_socket.wait_for(lambda m: re.match(r"READY=1\nSTATUS=\d/1 nodes up", m),
                                     "READY after a good reload", start=start)
        assert gw.config.gateway.health_interval == 2


# ------------------------------------------------------------------ journal fields


class Captured:
    """What the journal handler hands to journald: the message and every field."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def __call__(self, text: str, /, **fields: Any) -> None:
        """journal.send's signature: MESSAGE first, then every field by name."""
        self.sent.append({**fields, "MESSAGE": text})

    def about(self, text: str) -> list[dict[str, Any]]:
        return [f for f in self.sent if text in f["MESSAGE"]]


@pytest.fixture
def journal() -> Iterator[Captured]:
    """The real JournalHandler of setup_logging, its send() captured instead of sent."""
    captured = Captured()
    handler = journal_handler()
    handler.send = captured  # type: ignore[attr-defined]
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_extras_become_upper_case_fields_and_node_comes_from_the_context(
    journal: Captured,
) -> None:
    log = logging.getLogger("rules.somewhere")
    log.warning("plain")
    token = NODE.set("tank-b")
    try:
        log.warning("dose refused: x", extra={"actuator": "ph_up", "reason": "hour_budget"})
    finally:
        NODE.reset(token)
    (plain,) = journal.about("plain")
    assert "NODE" not in plain
    (refused,) = journal.about("dose refused")
    assert refused["NODE"] == "tank-b" and refused["ACTUATOR"] == "ph_up"
    assert refused["REASON"] == "hour_budget" and "actuator" not in refused
    assert refused["PRIORITY"] == "4"
    assert refused["MESSAGE"] == "rules.somewhere: node tank-b: dose refused: x"


def test_the_stderr_format_names_the_node() -> None:
    record = logging.makeLogRecord({"name": "rules.cycle", "msg": "control cycle done",
                                    "levelname": "INFO", "levelno": 20})
    JournalFields().filter(record)
    assert NodeFormatter("%(name)s: %(message)s").format(record) == "rules.cycle: control cycle done"
    record.NODE = "tank-a"
    assert NodeFormatter("%(name)s: %(message)s").format(record) == (
        "rules.cycle: node tank-a: control cycle done")
    named = logging.makeLogRecord({"name": "x", "msg": "node tank-a link up", "NODE": "tank-a"})
    assert NodeFormatter("%(message)s").format(named) == "node tank-a link up"


async def test_cycle_safety_and_ml_fallback_lines_carry_node(
    tmp_path: Path, journal: Captured
) -> None:
    """A real gateway: a fuzzy node's control cycle, a refused dose, an ml node off its model."""
    fast = {"mode": "manual", "tds_setpoint": 800, "ph_setpoint": 6.0, "interval": 0,
            "tds_average_s": 1, "ph_average_s": 1, "mixing_wait_s": 1}
    node_a = SimNode("tank-a", Reservoir.from_state(tds=500, ph=6.0, seed=1))
    node_m = SimNode("tank-m", Reservoir.from_state(tds=500, ph=6.0, seed=2))
    try:
        port_a = await node_a.serve_tcp("127.0.0.1", 0)
        port_m = await node_m.serve_tcp("127.0.0.1", 0)
        plant = {"tank_volume_l": 50, "stock_ppm": 10000,
                 "flow_ml_s": {"nutrient": 1.58, "ph_up": 1.58, "ph_down": 1.58, "refill": 1.58}}
        data = config_dict(tmp_path / "gw.sqlite", [
            node_entry("tank-a", f"tcp://127.0.0.1:{port_a}", control=dict(fast, controller="rb"),
                       safety={"max_actuation_ms": 1000}),
            node_entry("tank-m", f"tcp://127.0.0.1:{port_m}", plant=plant,
                       control=dict(fast, controller="ml")),
        ])
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(data))
        async with running_gateway(path, connected=False) as gw:
            async with asyncio.timeout(10):
                while not (gw.runners["tank-a"].latest and gw.runners["tank-m"].latest):
                    await asyncio.sleep(0.05)
            assert (await gw.on_rpc("tank-a", "actuate",
                                    {"actuator": "nutrient", "ms": 5000}))["success"] is False
            for name in ("tank-a", "tank-m"):
                assert (await gw.on_rpc(name, "force_on", None))["success"]
            async with asyncio.timeout(20):
                while not (journal.about("falls back to rb")
                           and journal.about("node tank-a: nutrient")):
                    await asyncio.sleep(0.05)
    finally:
        await node_a.close()
        await node_m.close()

    (refused,) = journal.about("refused by safety")
    assert refused["NODE"] == "tank-a" and refused["ACTUATOR"] == "nutrient"
    assert refused["REASON"] == "max_actuation" and refused["PRIORITY"] == "4"
    fallback = journal.about("falls back to rb")[0]
    assert fallback["NODE"] == "tank-m" and fallback["CONTROLLER"] == "ml"
    # A 10 L simulated tank configured as 50 L: its level is outside what the model was
    # trained on, so rb decides; expected operation, logged as information.
    assert "outside the training range" in fallback["REASON"] and fallback["PRIORITY"] == "6"
    dosed = journal.about("node tank-a: nutrient")[0]
    assert dosed["NODE"] == "tank-a" and dosed["CONTROLLER"] == "rb" and dosed["PRIORITY"] == "6"
    cycle_lines = [f for f in journal.sent if f["LOGGER"].startswith("rules.")]
    assert cycle_lines, "the control cycle logged nothing"
    assert [f["MESSAGE"] for f in cycle_lines if f.get("NODE") not in ("tank-a", "tank-m")] == []
    # Every line about a node says which; no lower-case extra is left to be dropped.
    for fields in journal.sent:
        if "tank-a" in fields["MESSAGE"] or "tank-m" in fields["MESSAGE"]:
            assert fields.get("NODE") in ("tank-a", "tank-m"), fields["MESSAGE"]
        lower = {k for k in fields if k.lower() in ("node", "controller", "reason", "actuator",
                                                    "node_url", "ms", "model")}
        assert all(k.isupper() for k in lower), fields
