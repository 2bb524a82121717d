"""What `check-config` and `run` verify beyond the YAML: the machine can run this config.

A valid file can still be unusable here: the buffer's folder may not be
writable by the user the service runs as (a typo'd path, a folder created by
root, a path outside the service's sandbox), or a node configured with
``controller: ml`` may be on a machine where no TFLite runtime could be
installed. The first is an error (the daemon would fail at start, and
systemd would restart it in a loop); the second a warning (the ``ml``
controller then decides with ``rb``, which is safe, but the grower should
know).

Each finding names the YAML path it is about, like a `ConfigError`.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config

#: The user the systemd unit runs the daemon as (systemd/hydrogate.service).
SERVICE_USER = "hydrogate"
#: The only folder the unit's sandbox lets the service write (StateDirectory=).
SERVICE_STATE_DIR = Path("/var/lib/hydrogate")


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: the YAML path it is about, what is wrong, and whether it stops the daemon."""

    path: str
    message: str
    error: bool

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True, slots=True)
class _Who:
    name: str
    uid: int
    gids: frozenset[int]


def _current_user() -> _Who:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return _Who(name, uid, frozenset((os.getegid(), *os.getgroups())))


def _service_user(name: str) -> _Who | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    gids = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
    return _Who(name, entry.pw_uid, frozenset(gids))


def _may_write(st: os.stat_result, who: _Who, *, directory: bool) -> bool:
    """Whether ``who`` may write (and, for a folder, enter) by the permission bits."""
    if who.uid == 0:
        return True
    mode = st.st_mode
    if st.st_uid == who.uid:
        bits = stat.S_IWUSR | (stat.S_IXUSR if directory else 0)
    elif st.st_gid in who.gids:
        bits = stat.S_IWGRP | (stat.S_IXGRP if directory else 0)
    else:
        bits = stat.S_IWOTH | (stat.S_IXOTH if directory else 0)
    return mode & bits == bits


def storage_problems(path: Path, *, service_user: str | None = SERVICE_USER) -> list[str]:
    """Why the SQLite buffer at ``path`` could not be written; empty when it can.

    SQLite needs the file, its ``-wal`` and ``-shm`` companions, and so the
    folder itself to be writable. Checked for the current user with
    ``access(2)`` (which also sees a read-only mount, as under the unit's
    ``ProtectSystem=strict``); when run as root and ``service_user`` exists,
    also for that user from the permission bits, since root's own check
    would pass where the service fails.
    """
    folder = path.parent
    if path.is_dir():
        return [f"{path} is a folder, not a database file"]
    if not folder.exists():
        return [f"folder {folder} does not exist (create it, owned by the service's user)"]
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    users = [_current_user()]
    if users[0].uid == 0 and service_user is not None:
        service = _service_user(service_user)
        if service is not None:
            users.append(service)
    problems: list[str] = []
    for who in users:
        native = who.uid == os.geteuid()
        for target, directory in [(folder, True)] + [
            (Path(f"{path}{suffix}"), False) for suffix in ("", "-wal", "-shm")
        ]:
            if directory:
                ok = (
                    os.access(target, os.W_OK | os.X_OK)
                    if native
                    else _may_write(target.stat(), who, directory=True)
                )
            elif target.exists():
                ok = (
                    os.access(target, os.R_OK | os.W_OK)
                    if native
                    else _may_write(target.stat(), who, directory=False)
                )
            else:
                continue
            if not ok:
                what = "folder" if directory else "file"
                problems.append(f"user {who.name} cannot write the {what} {target}")
                break
    return problems


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def ml_problem(config: Config) -> str | None:
    """Why the ``ml`` controller cannot run its model here, when some node is configured with it."""
    if not any(n.control and n.control.controller == "ml" for n in config.nodes):
        return None
    from rules.mlruntime import Model, ModelError  # imports numpy: only when ml is used

    try:
        Model.load()
    except ModelError as exc:
        return str(exc)
    return None


def preflight(
    config: Config, *, service_user: str | None = SERVICE_USER, ml: bool = True
) -> list[Finding]:
    """Every reason this machine cannot run ``config`` as it says (errors) or fully (warnings).

    ``ml=False`` skips loading the model (the daemon's ml controllers say it themselves).
    """
    # A read-only filesystem where the buffer belongs (its own folder, or any folder
    # outside systemd's sandbox) is a disk fault, not a mistake: the store keeps
    # readings in memory and writes once it can (docs/reliability.md). Under the
    # unit, a folder outside the sandbox is read-only for good: that stays an error.
    path = config.storage.path
    transient = _read_only_mount(path.parent) and (
        path.is_relative_to(SERVICE_STATE_DIR) or "INVOCATION_ID" not in os.environ
    )
    findings = [
        Finding(
            "storage.path",
            problem + (" (a read-only filesystem: readings wait in memory until it is"
                       " writable)" if transient else ""),
            error=not transient,
        )
        for problem in storage_problems(path, service_user=service_user)
    ]
    if (
        os.geteuid() == 0
        and service_user is not None
        and _service_user(service_user) is not None
        and not config.storage.path.is_relative_to(SERVICE_STATE_DIR)
    ):
        findings.append(Finding(
            "storage.path",
            f"{config.storage.path} is outside {SERVICE_STATE_DIR}, the only folder the "
            "service's sandbox may write: add ReadWritePaths= for its folder with "
            "`systemctl edit hydrogate`",
            error=False,
        ))
    reason = ml_problem(config) if ml else None
    if reason is not None:
        for i, node in enumerate(config.nodes):
            if node.control and node.control.controller == "ml":
                findings.append(Finding(
                    f"nodes[{i}].control.controller",
                    f"ml cannot run its model on this machine ({reason}); node {node.name} "
                    "will decide with rb until a TFLite runtime is installed "
                    "(see docs/install-raspberry-pi.md)",
                    error=False,
                ))
    return findings
