"""The client side of the local control socket (gateway/localrpc.py), for `hydrogate` commands.

Plain blocking sockets: a command sends a request, waits for its reply, and
that is all it does meanwhile. ::

    with LocalClient.connect(client_paths(config)) as daemon:
        state = daemon.call("get_state", device="tank-a")
        if not state["success"]: ...

:class:`DaemonUnreachable` says why no daemon answered (no socket, nobody
listening, no permission); :class:`LocalClientError` covers a connection that
broke or a reply that is not one.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import socket
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from gateway.localrpc import MAX_LINE

__all__ = ["DEFAULT_TIMEOUT_S", "DaemonUnreachable", "LocalClient", "LocalClientError"]

#: How long a command waits for one reply (a `stop` may take the node's few seconds).
DEFAULT_TIMEOUT_S = 30.0
_MAX_REPLY = 16 * MAX_LINE


class LocalClientError(Exception):
    """The daemon's socket broke off or answered something that is not a reply."""


class DaemonUnreachable(LocalClientError):
    """No daemon answers on any of the socket paths tried; ``reasons`` says why, per path."""

    def __init__(self, reasons: list[tuple[Path, str]]) -> None:
        self.reasons = reasons
        tried = "; ".join(f"{path}: {why}" for path, why in reasons) or "no socket path"
        super().__init__(f"the hydrogate daemon is not reachable ({tried})")


class LocalClient:
    """One connection to the daemon's local socket."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.path = path
        self._sock = sock
        self._file = sock.makefile("rb")
        self._ids = itertools.count(1)

    @classmethod
    def connect(
        cls, paths: Iterable[Path], *, timeout: float = DEFAULT_TIMEOUT_S
    ) -> LocalClient:
        """Connect to the first path where a daemon listens; :class:`DaemonUnreachable` if none."""
        reasons: list[tuple[Path, str]] = []
        for path in paths:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(path))
            except OSError as exc:
                sock.close()
                reasons.append((path, _why(exc)))
                continue
            return cls(sock, path)
        raise DaemonUnreachable(reasons)

    def call(
        self, method: str, params: Any = None, *, device: str | None = None
    ) -> dict[str, Any]:
        """Send one request and return its reply (``success`` and the rest)."""
        rid = next(self._ids)
        request: dict[str, Any] = {"method": method, "id": rid}
        if device is not None:
            request["device"] = device
        if params is not None:
            request["params"] = params
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            line = self._file.readline(_MAX_REPLY)
        except OSError as exc:
            raise LocalClientError(f"the daemon's socket broke off: {_why(exc)}") from exc
        if not line:
            raise LocalClientError("the daemon closed the connection (is it stopping?)")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise LocalClientError(f"the daemon's reply is not JSON: {exc}") from exc
        if not isinstance(reply, dict) or not isinstance(reply.get("success"), bool):
            raise LocalClientError(f"not a reply: {line[:200]!r}")
        reply.pop("id", None)
        return reply

    def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()

    def __enter__(self) -> LocalClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _why(exc: OSError) -> str:
    """A short reason a grower can act on."""
    if isinstance(exc, FileNotFoundError):
        return "no socket (the daemon is not running here)"
    if isinstance(exc, ConnectionRefusedError):
        return "nobody listens (the daemon stopped)"
    if isinstance(exc, PermissionError) or exc.errno == errno.EACCES:
        return "permission denied (run as root or as a member of the hydrogate group)"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return exc.strerror or str(exc)
