"""A real systemd (the machine's own, 252 on Debian 12) as PID 1 of a private namespace.

The test machine does not boot with systemd, but root can start
``/lib/systemd/systemd --system`` as the first process of a new PID and mount
namespace, the way a container manager does (``container=`` in its
environment). Inside it, ``systemctl``, ``journalctl``, the unit's whole
sandbox (namespaces, seccomp, cgroup device rules), ``WatchdogSec=``,
``Restart=`` and ``ExecReload=`` are the real thing.

What the namespace changes so nothing leaks onto the machine or between two
test runs: systemd knows none of the machine's units (its sysinit.target
would run systemd-tmpfiles, which empties the shared /tmp, and the rest of a
boot), only journald's and stub targets; ``/etc``, ``/var`` and
``/usr/local`` are overlays (useradd,
/var/lib/hydrogate and the /usr/local/bin link land in the overlay), ``/opt``
and ``/run`` are fresh tmpfs (``/tmp`` is the machine's, so the namespace
sees the tests' files; units clean their PrivateTmp= folders when they
stop), ``/dev`` a tmpfs with the few device
nodes a service needs plus the machine's ``/dev/pts`` (where the tests' serial
ptys live), journald keeps its journal in memory, and systemd's cgroup tree is
a fresh sub-tree of the test process's own cgroup, removed at the end. The
network is the machine's: a service inside reaches a broker and simulated
nodes on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SYSTEMD = Path("/lib/systemd/systemd")

_BOOT = r"""#!/bin/bash
# PID 1 of the new namespaces until it execs systemd.
set -euo pipefail
T="$1"
mount --make-rprivate /
for d in etc var usr/local; do
  name="${d//\//-}"
  mkdir -p "$T/$name-up" "$T/$name-work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/$name-up,workdir=$T/$name-work" "/$d"
done
# systemd sees no unit and no generator of this machine, only the few below: the
# machine's sysinit.target would run systemd-tmpfiles (which empties the shared
# /tmp), sysctl, udev and the rest of a boot.
mkdir -p "$T/units"
for u in systemd-journald.service systemd-journald.socket systemd-journald-dev-log.socket \
         systemd-journald-audit.socket; do
  cp "/usr/lib/systemd/system/$u" "$T/units/"
done
for t in sysinit basic sockets network network-online time-set time-sync multi-user \
         shutdown local-fs paths timers; do
  printf '[Unit]\nDescription=%s (test stub)\nDefaultDependencies=no\n' "$t" \
    > "$T/units/$t.target"
done
# The machine's units stay readable there, for `systemd-analyze verify` (see host_units).
mkdir -p "$T/host-units"
mount --bind /usr/lib/systemd/system "$T/host-units"
mount -t tmpfs -o mode=0755 tmpfs /usr/lib/systemd/system
mount -t tmpfs -o mode=0755 tmpfs /usr/lib/systemd/system-generators
mount -t tmpfs -o mode=0755 tmpfs /etc/systemd/system
cp "$T"/units/* /usr/lib/systemd/system/
mount -t tmpfs -o mode=0755 tmpfs /opt
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p "$T/hostdev"
mount --rbind /dev "$T/hostdev"
mount -t tmpfs -o mode=0755,nosuid tmpfs /dev
for n in null zero full random urandom tty; do
  touch "/dev/$n"; mount --bind "$T/hostdev/$n" "/dev/$n"
done
mkdir -p /dev/pts /dev/shm
mount --bind "$T/hostdev/pts" /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -s pts/ptmx /dev/ptmx
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin; ln -s /proc/self/fd/1 /dev/stdout; ln -s /proc/self/fd/2 /dev/stderr
umount -l "$T/hostdev"
mkdir -p /run/systemd/system /run/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\nRateLimitBurst=0\n' > /run/systemd/journald.conf.d/test.conf
cat > /run/systemd/system/hydrogate-test.target <<'UNIT'
[Unit]
Description=hydrogate test namespace
DefaultDependencies=no
Wants=systemd-journald.service
UNIT
export container=hydrogate-test
exec /lib/systemd/systemd --system --unit=hydrogate-test.target --log-target=journal \
  --show-status=no
"""


class SystemdError(RuntimeError):
    """The namespace could not be set up, or a command in it failed."""


def _cgroup_mounts() -> dict[str, Path]:
    """Each writable cgroup hierarchy (as named in /proc/self/cgroup) -> its mount point."""
    mounts: dict[str, Path] = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, fstype, opts = line.split()[:4]
        if fstype == "cgroup2":
            mounts[""] = Path(where)
        elif fstype == "cgroup":
            options = opts.split(",")
            if "ro" in options:
                continue
            names = [o for o in options if o not in ("rw", "relatime", "nosuid", "nodev",
                                                     "noexec", "xattr", "clone_children")]
            mounts[",".join(sorted(names))] = Path(where)
    return mounts


class SystemdNamespace:
    """systemd as PID 1 of a private PID+mount namespace; commands run inside with nsenter."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._cgroups: list[Path] = []

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> None:
        """Boot systemd and wait until it answers systemctl."""
        if os.geteuid() != 0:
            raise SystemdError("a systemd namespace needs root")
        self.workdir.mkdir(parents=True, exist_ok=True)
        boot = self.workdir / "boot.sh"
        boot.write_text(_BOOT)
        boot.chmod(0o755)
        self._make_cgroups()
        cgroups = list(self._cgroups)

        def enter_cgroups() -> None:  # in the child, before exec
            for d in cgroups:
                (d / "cgroup.procs").write_text(str(os.getpid()))

        self._proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--uts", "--ipc",
             "--kill-child", "--",
             str(boot), str(self.workdir)],
            preexec_fn=enter_cgroups,  # noqa: PLW1509 - single-threaded enough: only writes
            stdout=open(self.workdir / "boot.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SystemdError(f"systemd namespace exited: {self._boot_log()}")
            self.pid = self._find_init()
            if self.pid is not None and self._answers():
                return
            time.sleep(0.1)
        raise SystemdError(f"systemd did not come up in {timeout} s: {self._boot_log()}")

    def stop(self) -> None:
        """Stop the services gracefully, then end the namespace and remove its cgroups."""
        if self.pid is not None:
            with contextlib.suppress(SystemdError, subprocess.TimeoutExpired):
                self.run(["systemctl", "stop", "hydrogate.service"], check=False, timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # init gone: the kernel kills the rest
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            self._proc.wait(timeout=30)
        for root in self._cgroups:
            self._remove_cgroup(root)
        self.pid = None

    def __enter__(self) -> SystemdNamespace:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------- commands
    def run(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 120.0,
        input: str | None = None,  # noqa: A002 - as subprocess.run
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace (mounts and PIDs), as root."""
        if self.pid is None:
            raise SystemdError("not started")
        full_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        full_env.update(env or {})
        done = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "--", "env", "-i",
             *(f"{k}={v}" for k, v in full_env.items()), *argv],
            capture_output=True, text=True, timeout=timeout, check=False, input=input,
        )
        if check and done.returncode != 0:
            raise SystemdError(
                f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` inside."""
        return self.run(["systemctl", *args], check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit``."""
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *match: str) -> list[dict[str, Any]]:
        """Journal entries (``journalctl -o json``) matching ``match``, oldest first."""
        out = self.run(["journalctl", "--no-pager", "-o", "json", *match]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    @property
    def host_units(self) -> Path:
        """The machine's own unit folder, as seen inside (for ``SYSTEMD_UNIT_PATH``)."""
        return self.workdir / "host-units"

    def path(self, inside: str) -> Path:
        """A path inside the namespace, as seen from the test (through /proc/PID/root)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def wait_for(self, what: str, check: Any, timeout: float = 60.0, step: float = 0.2) -> Any:
        """Poll ``check()`` until it returns something true; that value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(step)
        raise TimeoutError(f"{what}: not within {timeout} s")

    # ------------------------------------------------------------ internals
    def _find_init(self) -> int | None:
        assert self._proc is not None
        children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return None
        for pid in pids:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/exe").resolve() == SYSTEMD.resolve():
                    return int(pid)
        return None

    def _answers(self) -> bool:
        with contextlib.suppress(subprocess.TimeoutExpired):
            done = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
            return done.stdout.strip() in ("running", "degraded")
        return False

    def _boot_log(self) -> str:
        try:
            return (self.workdir / "boot.log").read_text()[-2000:]
        except OSError:
            return ""

    def _make_cgroups(self) -> None:
        """The same fresh path in every hierarchy, under this process's memory cgroup."""
        own: dict[str, str] = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            own[",".join(sorted(names.split(","))) if names else ""] = path
        base = own.get("memory", "/").rstrip("/")
        rel = f"{base}/hydrogate-test-{uuid.uuid4().hex[:8]}".lstrip("/")
        for names, mount in _cgroup_mounts().items():
            if names not in own or not os.access(mount / "cgroup.procs", os.W_OK):
                continue
            d = mount / rel
            d.mkdir(parents=True, exist_ok=True)
            if "cpuset" in names.split(","):  # a v1 cpuset must be given cpus and mems
                part = mount
                for piece in rel.split("/"):
                    part = part / piece
                    for knob in ("cpuset.cpus", "cpuset.mems"):
                        if not (part / knob).read_text().strip():
                            (part / knob).write_text((part.parent / knob).read_text())
            self._cgroups.append(d)

    @staticmethod
    def _remove_cgroup(root: Path, timeout: float = 30.0) -> None:
        """Remove ``root`` and its sub-groups once the killed processes have left them."""
        deadline = time.monotonic() + timeout
        while root.exists() and time.monotonic() < deadline:
            subs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for d in [*subs, root]:
                with contextlib.suppress(OSError):
                    d.rmdir()
            if root.exists():
                time.sleep(0.1)


def available() -> str | None:
    """Why a systemd namespace cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed"
    return None
