"""Pieces the fault and write benchmarks share: a gateway process, simulated nodes, a broker.

Everything runs on 127.0.0.1, every wait is bounded. ``code`` is the checkout
whose gateway runs (its ``gateway/`` is imported first), so a benchmark can
measure another version of the code with the same harness (e.g. ``main`` in a
second git worktree) in the same session.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.throughput import Broker, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
STRACE = shutil.which("strace") or "/usr/bin/strace"

__all__ = [
    "ROOT",
    "STRACE",
    "Broker",
    "Gateway",
    "SimNodes",
    "config_data",
    "free_port",
    "outbox_seqs",
    "wait_for",
    "write_config",
]


class SimNodes:
    """``python -m sim`` serving ``count`` numbered nodes (``--seq``) over TCP."""

    def __init__(self, count: int, *, name: str = "node01", push: float | None = None) -> None:
        args = [sys.executable, "-m", "sim", "--name", name, "--seq"]
        for _ in range(count):
            args += ["--tcp", "127.0.0.1:0"]
        if push is not None:
            args += ["--push", str(push)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        self.nodes: list[tuple[str, str]] = []
        for _ in range(count):
            name_, _, address = self.proc.stdout.readline().split()
            self.nodes.append((name_, f"tcp://{address}"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def config_data(
    storage: Path,
    nodes: Sequence[tuple[str, str]],
    *,
    broker_port: int | None = None,
    poll: float = 1.0,
    **storage_keys: Any,
) -> dict[str, Any]:
    """A gateway config: these nodes polled every ``poll`` s, optionally a broker."""
    data: dict[str, Any] = {
        "gateway": {"name": "bench-gw", "health_interval": 3600},
        "storage": {"path": str(storage), **storage_keys},
        "nodes": [{"name": n, "url": u, "poll_interval": poll} for n, u in nodes],
    }
    if broker_port is not None:
        data["thingsboard"] = {"host": "127.0.0.1", "port": broker_port, "access_token": "b"}
    return data


def write_config(path: Path, data: dict[str, Any], code: Path = ROOT) -> Path:
    """Write ``data``; keys that ``code``'s gateway does not know are left out (an older one)."""
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    check = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "-c", str(path)],
        cwd=code, capture_output=True, text=True, check=False,
    )
    if check.returncode != 0 and "unknown key" in check.stdout + check.stderr:
        storage = dict(data["storage"])
        for key in ("sync_interval", "clock_sync_wait"):
            storage.pop(key, None)
        path.write_text(yaml.safe_dump({**data, "storage": storage}, sort_keys=False))
    return path


class Gateway:
    """``hydrogate run`` as a child process (optionally under strace or an LD_PRELOAD)."""

    def __init__(
        self,
        config: Path,
        *,
        code: Path = ROOT,
        log: Path | None = None,
        strace: Path | None = None,
        env: dict[str, str] | None = None,
        level: str = "INFO",
    ) -> None:
        args = [sys.executable, "-m", "gateway.cli", "--log-level", level, "run", "-c", str(config)]
        if strace is not None:
            args = [STRACE, "-f", "--seccomp-bpf", "-ttt", "-T", "-y",
                    "-e", "trace=fsync,fdatasync", "-o", str(strace), *args]
        self.log = log or config.with_suffix(".log")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                args, cwd=code, stdout=subprocess.DEVNULL, stderr=out,
                env={**os.environ, "PYTHONPATH": str(code), **(env or {})},
            )
        self.traced = strace is not None

    @property
    def pid(self) -> int:
        """The gateway's own pid (strace's child when traced)."""
        if not self.traced:
            return self.proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with_pid = children.read_text().split() if children.exists() else []
            if with_pid:
                return int(with_pid[0])
            time.sleep(0.05)
        raise TimeoutError("strace did not start the gateway")

    def write_bytes(self) -> int:
        """Bytes this process caused to be written to storage (``/proc/PID/io``)."""
        for line in Path(f"/proc/{self.pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "write_bytes":
                return int(value)
        raise RuntimeError("no write_bytes in /proc/PID/io")

    def wait_open(self, path: Path, timeout: float = 60.0) -> bool:
        """Wait until the gateway has ``path`` open (its store is up); False if it never did.

        Start-up (imports, config, preflight) takes from a fraction of a second to
        several on a loaded machine; a fault injected before the store is open
        tests nothing.
        """
        target = str(path.resolve())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            fds = Path(f"/proc/{self.pid}/fd")
            try:
                if any(os.readlink(fd) == target for fd in fds.iterdir()):
                    return True
            except OSError:
                pass  # a descriptor closed while listed, or the process just ended
            time.sleep(0.05)
        return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the gateway itself (not strace) and wait for it to end."""
        if self.proc.poll() is None:
            os.kill(self.pid if self.traced else self.proc.pid, sig)
        self.proc.wait(30)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, and its exit code (killed after ``timeout``: returns -9)."""
        if self.proc.poll() is None:
            os.kill(self.pid if self.traced else self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def outbox_seqs(db: Path) -> dict[str, list[int]]:
    """Every node's ``seq`` values in the outbox of the file at ``db`` (read-only)."""
    from gateway import storefile

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out: dict[str, list[int]] = {}
        for _, device, _, values in storefile.outbox_values(conn):
            seq = values.get("seq")
            if seq is not None:
                out.setdefault(device, []).append(int(seq))
        return out
    finally:
        conn.close()


def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """`wait_for` under the name the fault benchmarks use."""
    wait_for(pred, timeout, what)
