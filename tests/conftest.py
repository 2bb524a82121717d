"""Shared fixtures: a real Mosquitto broker on a free loopback port, and leak checks.

Every test fails if it leaves behind descriptors (sockets, pipes, files), child
processes, threads or asyncio tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import faulthandler
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import leaks

pytest_plugins = ["pytester"]  # tests/test_leaks.py runs the leak check on leaky tests

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
TEST_LIMIT_S = float(os.environ.get("HYDROGATE_TEST_LIMIT_S", "300"))
"""Longest any one test may take, fixtures included (the slowest take about a minute)."""
_terminal_stderr: list[int] = []  # a copy of the real descriptor 2, taken while not captured


def pytest_configure(config: pytest.Config) -> None:
    # Output capture is paused here; while a test runs, descriptor 2 is pytest's file,
    # which a process ended by the hang guard never prints.
    _terminal_stderr.append(os.dup(sys.stderr.fileno()))


def pytest_unconfigure(config: pytest.Config) -> None:
    while _terminal_stderr:
        os.close(_terminal_stderr.pop())


def _hung(nodeid: str, fd: int) -> None:
    """Print where a hung test is (each thread, each asyncio task), then end the run."""
    with contextlib.suppress(BaseException), os.fdopen(os.dup(fd), "w") as out:
        print(f"\n\n{nodeid} still runs after {TEST_LIMIT_S:.0f} s:", file=out)
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            print(f"\n--- thread {names.get(ident, ident)}, innermost calls", file=out)
            traceback.print_stack(frame, limit=10, file=out)
        loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
        for task in (t for loop in loops if loop.is_running() for t in asyncio.all_tasks(loop)):
            print(f"\n--- task {task.get_name()}", file=out)
            task.print_stack(limit=10, file=out)
        print(f"\nHUNG: {nodeid} (limit {TEST_LIMIT_S:.0f} s); the run ends here", file=out)
    os._exit(3)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """A hung test ends the run with where it hung printed, instead of holding CI until
    its own time limit with nothing to show. faulthandler is the backstop for a thread
    that holds the GIL."""
    watchdog: threading.Timer | None = None
    if _terminal_stderr:
        fd = _terminal_stderr[0]
        watchdog = threading.Timer(TEST_LIMIT_S, _hung, (item.nodeid, fd))
        watchdog.name, watchdog.daemon = "test-hang-guard", True
        watchdog.start()
        faulthandler.dump_traceback_later(TEST_LIMIT_S + 30, exit=True, file=fd)
    try:
        return (yield)
    finally:
        if watchdog is not None:
            watchdog.cancel()
            watchdog.join()
        faulthandler.cancel_dump_traceback_later()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class FakeClock:
    """The tests' clock: a `gateway.clock.Clock` whose wall and monotonic time move only
    when the test says so. `advance` moves both; stepping ``wall`` alone is what NTP does.

    ``now()`` is local time like `SystemClock`'s, or in ``tz`` when one is given. For
    a component that takes a bare monotonic function (the simulated node), pass
    ``clock.monotonic``.
    """

    def __init__(
        self,
        wall: float = 1_732_200_000.0,
        mono: float = 1000.0,
        tz: datetime.tzinfo | None = None,
    ) -> None:
        self.wall = wall
        self.mono = mono
        self.tz = tz

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def now(self) -> datetime.datetime:
        when = datetime.datetime.fromtimestamp(self.wall, tz=self.tz)
        return when if self.tz is not None else when.astimezone()

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@dataclass
class Broker:
    """A Mosquitto process on 127.0.0.1 that tests can stop and start again."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            # Started as root, Mosquitto would drop to its own user, which cannot
            # reach pytest's 0700 tmp dirs (no persistence: sessions lost on
            # restart). `user root` keeps it; ignored when not started as root.
            "user root\n"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 0\n"
            "log_type error\n"
        )
        with open(self.workdir / "mosquitto.log", "ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log
            )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh Mosquitto broker, stopped at the end of the test."""
    if not os.path.exists(MOSQUITTO):
        pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
    b = Broker(tmp_path / "broker")
    b.workdir.mkdir()
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(autouse=True)
def no_leaked_resources() -> Iterator[None]:
    """Fail a test that leaves descriptors or child processes behind (see tests/leaks.py).

    First of the autouse fixtures, so the others and the test's own fixtures (the
    broker, the event loop) are set up after the first snapshot and torn down
    before the second. What closes only once garbage is collected, or a few
    moments later (a child that exits after SIGTERM), is given that chance. Left
    children are killed once reported, so that the next tests do not inherit them.
    """
    before = leaks.snapshot()
    yield
    found = leaks.leaked(before, leaks.snapshot())
    if found:
        gc.collect()
    deadline = time.monotonic() + leaks.GRACE_S
    while found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = leaks.leaked(before, leaks.snapshot())
    if not found:
        return
    for pid in leaks.child_processes().keys() - before.children.keys():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    pytest.fail("test left behind: " + "; ".join(found))


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running behind it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        # asyncio_N: the event loop's default executor, shut down with the loop.
        extra = [t for t in extra if not t.name.startswith("asyncio_")]
        if not extra:
            return
        time.sleep(0.05)
    names = ", ".join(t.name for t in extra)
    pytest.fail(f"test left threads running: {names}")


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail an async test that leaves asyncio tasks running on its loop."""
    yield
    current = asyncio.current_task()
    for _ in range(50):
        others = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not others:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"test left tasks running: {[t.get_name() for t in others]}")
