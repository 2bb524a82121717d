"""What this test process holds open: file descriptors and child processes.

The autouse fixture in conftest takes a `snapshot` before each test and fails
the test if, after it, `leaked` still finds something new: an open socket,
pipe or file, or a child process (running or a zombie nobody waited for).
Linux only: it reads ``/proc``.

A descriptor is named by what it points to (``socket:[123]``, a path,
``pipe:[456]``), so a number closed and reused for something else counts as
new. Whatever exists before the test — pytest's own files, the capture files,
module- and session-scoped fixtures (set up before the first test's
snapshot) — is in both snapshots and never reported. Files of the Python
installation itself (the venv and the interpreter's prefix) are not reported
either: a library may keep its own data open for the life of the process
(matplotlib caches the font files it rendered with), which is no test's leak.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

FD_DIR = "/proc/self/fd"
LIBRARY_DIRS = tuple({os.path.join(os.path.realpath(p), "") for p in (sys.prefix, sys.base_prefix)})
"""Where the interpreter and the installed packages live (each ending with a separator)."""
GRACE_S = 5.0
"""How long what a test leaves gets to close or exit by itself before the test fails."""


@dataclass(frozen=True)
class Snapshot:
    """The open descriptors (number -> target) and the children (pid -> description)."""

    fds: dict[int, str]
    children: dict[int, str]


def open_fds() -> dict[int, str]:
    """This process's descriptors and what each points to."""
    fds: dict[int, str] = {}
    for name in os.listdir(FD_DIR):
        try:
            fds[int(name)] = os.readlink(f"{FD_DIR}/{name}")
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            continue
    return fds


def _stat(pid: str) -> tuple[int, str, str] | None:
    """(parent pid, state, command name) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    head, _, tail = text.rpartition(")")
    fields = tail.split()
    return int(fields[1]), fields[0], head.partition("(")[2]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _child_pids() -> list[int]:
    """The pids of this process's children, from each thread's ``children`` list (zombies
    included), or by scanning /proc on a kernel without those lists."""
    try:
        pids: list[int] = []
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        return pids
    except FileNotFoundError:  # a thread gone meanwhile, or no CONFIG_PROC_CHILDREN
        me = os.getpid()
        return [int(n) for n in os.listdir("/proc")
                if n.isdigit() and (stat := _stat(n)) is not None and stat[0] == me]


def child_processes() -> dict[int, str]:
    """This process's children, running or zombie, each with its state and command line."""
    children: dict[int, str] = {}
    for pid in _child_pids():
        stat = _stat(str(pid))
        if stat is None:  # reaped meanwhile
            continue
        _, state, comm = stat
        children[pid] = f"pid {pid} [{state}] {_cmdline(pid) or comm}"
    return children


def snapshot() -> Snapshot:
    """What the process holds right now."""
    return Snapshot(open_fds(), child_processes())


def leaked(before: Snapshot, after: Snapshot) -> list[str]:
    """What ``after`` holds that ``before`` did not, one readable line each."""
    fds = [
        f"fd {fd} -> {target}"
        for fd, target in sorted(after.fds.items())
        if before.fds.get(fd) != target and not target.startswith(LIBRARY_DIRS)
    ]
    children = [
        f"child {text}" for pid, text in sorted(after.children.items()) if pid not in before.children
    ]
    return fds + children
