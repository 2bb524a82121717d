"""The leak check itself: it names what a test leaves open, and fails that test."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import leaks

ROOT = Path(__file__).resolve().parent.parent


def test_a_socket_a_pipe_and_a_file_are_named_until_closed(tmp_path: Path) -> None:
    before = leaks.snapshot()
    sock = socket.socket()
    r, w = os.pipe()
    f = open(tmp_path / "kept.txt", "w")  # noqa: SIM115 - left open on purpose
    found = leaks.leaked(before, leaks.snapshot())
    assert any("socket:[" in line for line in found), found
    assert sum("pipe:[" in line for line in found) == 2, found
    assert any(line.endswith("kept.txt") for line in found), found
    assert len(found) == 4, found
    sock.close()
    os.close(r)
    os.close(w)
    f.close()
    assert leaks.leaked(before, leaks.snapshot()) == []


def test_a_number_closed_and_reused_for_something_else_is_new(tmp_path: Path) -> None:
    first = open(tmp_path / "first", "w")  # noqa: SIM115
    before = leaks.snapshot()
    number = first.fileno()
    first.close()
    second = open(tmp_path / "second", "w")  # noqa: SIM115
    try:
        assert second.fileno() == number  # the lowest free number, as POSIX says
        assert leaks.leaked(before, leaks.snapshot()) == [f"fd {number} -> {tmp_path}/second"]
    finally:
        second.close()


def test_files_of_the_python_installation_are_the_libraries_business() -> None:
    before = leaks.snapshot()
    with open(os.__file__, "rb"):  # a file of the interpreter's own installation
        assert leaks.leaked(before, leaks.snapshot()) == []


def test_a_running_child_and_an_unreaped_one_are_named_until_waited_for() -> None:
    before = leaks.snapshot()
    running = subprocess.Popen(["sleep", "30"])
    exited = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        # Until `true` has exited and `sleep` runs (not yet exec'd, or not yet asleep,
        # on a loaded machine, it shows as this interpreter, or [R]).
        while not {f"pid {exited.pid} [Z] true", f"pid {running.pid} [S] sleep 30"} <= set(
            leaks.child_processes().values()
        ):
            assert time.monotonic() < deadline, "`true` did not exit or `sleep` did not start"
            time.sleep(0.01)
        found = leaks.leaked(before, leaks.snapshot())
        assert f"child pid {running.pid} [S] sleep 30" in found, found
        assert f"child pid {exited.pid} [Z] true" in found, found
    finally:
        running.kill()
        running.wait()
        exited.wait()
    assert leaks.leaked(before, leaks.snapshot()) == []


LEAKY_TESTS = '''
import socket
import subprocess

KEPT = []


def test_leaves_a_socket():
    KEPT.append(socket.socket())


def test_leaves_a_child():
    KEPT.append(subprocess.Popen(["sleep", "30"]))
    with open("child.pid", "w") as f:
        f.write(str(KEPT[-1].pid))


def test_closes_what_it_opens():
    with socket.socket():
        pass
    subprocess.run(["true"], check=True)
'''


def test_the_fixture_fails_the_tests_that_leak(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest(
        "from tests import leaks\n"
        "from tests.conftest import no_leaked_resources  # noqa: F401\n"
        "leaks.GRACE_S = 0.5  # the leaks here are for good\n"
    )
    pytester.makepyfile(test_leaky=LEAKY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_leaves_a_socket*",
        "*test left behind: fd * -> socket:[[]*",
        "*ERROR at teardown of test_leaves_a_child*",
        "*test left behind: child pid * sleep 30*",
    ])
    # The left child was killed and reaped once reported: nothing of it outlives the run.
    pid = int((pytester.path / "child.pid").read_text())
    assert not Path(f"/proc/{pid}").exists()


HANGING_TESTS = """
import asyncio


async def test_waits_for_nothing() -> None:
    never = asyncio.Event()

    async def waiter() -> None:
        await never.wait()

    await asyncio.create_task(waiter(), name="the-stuck-waiter")


def test_never_runs() -> None:
    pass
"""


def test_a_hung_test_ends_the_run_showing_where_it_waits(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("HYDROGATE_TEST_LIMIT_S", "2")
    pytester.makeconftest(
        "from tests.conftest import pytest_configure, pytest_unconfigure  # noqa: F401\n"
        "from tests.conftest import pytest_runtest_protocol  # noqa: F401\n"
    )
    pytester.makepyfile(test_hangs=HANGING_TESTS)
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
        "-o", "asyncio_default_fixture_loop_scope=function", timeout=60,
    )
    assert result.ret == 3
    assert time.monotonic() - started < 30
    result.stderr.fnmatch_lines([
        "*test_hangs.py::test_waits_for_nothing still runs after 2 s:*",
        "*--- task the-stuck-waiter*",
        "*in waiter*",
        "*HUNG: test_hangs.py::test_waits_for_nothing (limit 2 s); the run ends here*",
    ])
    assert "test_never_runs" not in result.stdout.str() + result.stderr.str()
