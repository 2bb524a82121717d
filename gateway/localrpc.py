"""The local control socket: how `hydrogate` commands reach the running daemon.

A Unix stream socket, ``hydrogate.sock``, in the daemon's runtime directory
(``$RUNTIME_DIRECTORY``, which systemd sets from the unit's
``RuntimeDirectory=hydrogate``: ``/run/hydrogate``), else beside the database
file, or wherever ``gateway.socket`` says. It is mode 0660, so the daemon's
user and group (``hydrogate``) may use it and nobody else; a socket file left
by a crash is replaced at start, the file is removed at a clean stop.

**Protocol.** One JSON object per line, UTF-8, at most :data:`MAX_LINE`
bytes; one JSON line answers each, in order::

    {"device": "tank-a", "method": "get_state", "params": {}, "id": 7}
    {"id": 7, "success": true, "values": {...}, ...}

``device`` names a node: the request goes to the very handler that answers
ThingsBoard's server-side RPCs (``Gateway.on_rpc``), so every RPC of
docs/thingsboard.md works here, with the same reply ``data``: ``{"success": true,
...}`` or ``{"success": false, "error": "..."}``. Without ``device`` (or with
``null``) the request is for the gateway itself (``Gateway.on_gateway_rpc``:
``ping``, ``status``, ``flush``). Both look the method up in the one table of
gateway/rpc.py; this module only checks the request's shape. ``params``
is optional, any JSON; ``id``, optional, is echoed back. Bad input (not JSON,
too long, wrong types, an unknown device or method) gets ``success: false``
with the reason and never harms the daemon; a line that is too long also
ends the connection. At most :data:`MAX_CLIENTS` connections at once (one
more is told so and closed); a connection idle for :data:`IDLE_S` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from gateway.config import Config

log = logging.getLogger("hydrogate.local")

SOCKET_NAME = "hydrogate.sock"
#: The unit's ``RuntimeDirectory=hydrogate``: where a client looks when nothing else says.
SYSTEMD_RUNTIME_DIR = Path("/run/hydrogate")
SOCKET_MODE = 0o660
MAX_LINE = 16 * 1024
MAX_CLIENTS = 8
IDLE_S = 300.0
SEND_S = 10.0
MAX_METHOD_CHARS = 64
_KEYS = frozenset({"device", "method", "params", "id"})


class LocalSocketError(Exception):
    """The local socket cannot be served (its path is taken, unusable or too long)."""


class LocalHandler(Protocol):
    """What answers the socket's requests: the daemon's `Gateway`."""

    @property
    def stopping(self) -> bool: ...

    async def on_rpc(self, device: str, method: str, params: Any) -> dict[str, Any]: ...

    async def on_gateway_rpc(self, method: str, params: Any) -> dict[str, Any]: ...


def socket_path(config: Config, environ: Mapping[str, str] | None = None) -> Path:
    """Where the daemon serves its socket: ``gateway.socket``, the runtime dir, by the database."""
    env = os.environ if environ is None else environ
    if config.gateway.socket is not None:
        return config.gateway.socket
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / SOCKET_NAME
    return config.storage.path.parent / SOCKET_NAME


def client_paths(config: Config, environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where a command looks for the daemon's socket, in order.

    A command is not started by systemd, so it cannot know the daemon's
    ``$RUNTIME_DIRECTORY``: it tries beside the database (a daemon started by
    hand), then the unit's runtime directory.
    """
    env = os.environ if environ is None else environ
    if config.gateway.socket is not None:
        return [config.gateway.socket]
    paths = [config.storage.path.parent / SOCKET_NAME]
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        paths.append(Path(runtime) / SOCKET_NAME)
    paths.append(SYSTEMD_RUNTIME_DIR / SOCKET_NAME)
    return list(dict.fromkeys(paths))


def encode(reply: Mapping[str, Any]) -> bytes:
    """One reply line; a reply that is not JSON becomes an error reply, never an exception."""
    try:
        text = json.dumps(reply, allow_nan=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError) as exc:
        text = json.dumps({"success": False, "error": f"reply not encodable: {exc}"})
    return text.encode() + b"\n"


def _error(message: str) -> dict[str, Any]:
    return {"success": False, "error": message}


class LocalServer:
    """The socket's server: one task (its owner's), a child task per connection."""

    def __init__(
        self,
        path: Path,
        handler: LocalHandler,
        *,
        max_clients: int = MAX_CLIENTS,
        max_line: int = MAX_LINE,
        idle_s: float = IDLE_S,
    ) -> None:
        self.path = path
        self._handler = handler
        self._max_clients = max_clients
        self._max_line = max_line
        self._idle_s = idle_s
        self._tg: asyncio.TaskGroup | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._count = 0
        self.serving = asyncio.Event()
        #: Requests answered, refused connections, bad requests: for tests and logs.
        self.answered = 0
        self.refused = 0
        self.bad = 0

    async def run(self) -> None:
        """Serve until cancelled; a socket that cannot be set up is logged, never raised."""
        try:
            sock = await self._bind()
        except (LocalSocketError, OSError) as exc:
            log.error(
                "local control socket %s not served: %s; `hydrogate` commands cannot reach "
                "this daemon (set gateway.socket to a usable path)", self.path, exc,
            )
            return
        inode = os.stat(self.path).st_ino
        server: asyncio.Server | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                try:
                    server = await asyncio.start_unix_server(
                        self._accept, sock=sock, limit=self._max_line
                    )
                    log.info("local control socket %s", self.path)
                    self.serving.set()
                    await asyncio.get_running_loop().create_future()  # until cancelled
                finally:
                    self._tg = None
                    if server is not None:
                        server.close()  # no new connections; the group ends the open ones
        finally:
            self.serving.clear()
            if server is None:
                sock.close()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await server.wait_closed()
            self._remove(inode)

    async def _bind(self) -> socket.socket:
        """A listening-ready socket at :attr:`path`, mode 0660; a stale file is replaced."""
        path = self.path
        await self._clear_stale()
        path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # Before listen(), nobody can connect: the mode is set before anyone could.
            os.chmod(path, SOCKET_MODE)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def _clear_stale(self) -> None:
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise LocalSocketError(f"{path} exists and is not a socket; it is left alone")
        try:
            async with asyncio.timeout(2.0):
                _, writer = await asyncio.open_unix_connection(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # nobody listens: left by a crash
            log.info("stale local control socket %s replaced", path)
            return
        except (OSError, TimeoutError) as exc:
            raise LocalSocketError(f"cannot tell whether {path} is in use: {exc}") from exc
        writer.close()
        raise LocalSocketError(f"another process serves {path} (is a second daemon running?)")

    def _remove(self, inode: int) -> None:
        """Remove the socket file, if it is still ours."""
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == inode:
                os.unlink(self.path)

    # ------------------------------------------------------------ connections
    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tg = self._tg
        if tg is None or len(self._clients) >= self._max_clients:
            self.refused += 1
            why = "the gateway is stopping" if tg is None else (
                f"too many connections to the local socket (at most {self._max_clients})"
            )
            writer.write(encode(_error(why)))
            writer.close()  # the transport sends what it holds, then closes
            return
        self._count += 1
        task = tg.create_task(self._serve(reader, writer), name=f"local-client-{self._count}")
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one connection's requests in order until it closes, idles or misbehaves."""
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_s):
                        line = await reader.readline()
                except TimeoutError:
                    break
                except ValueError:  # longer than the limit: no telling where the next begins
                    self.bad += 1
                    await self._send(writer, _error(
                        f"request longer than {self._max_line} bytes; connection closed"
                    ))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                await self._send(writer, await self.answer(line))
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or does not read its replies
        finally:
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, reply: Mapping[str, Any]) -> None:
        writer.write(encode(reply))
        async with asyncio.timeout(SEND_S):
            await writer.drain()

    # --------------------------------------------------------------- requests
    async def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line (never raises but for cancellation)."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            self.bad += 1
            return _error(f"request is not JSON: {exc}")
        if not isinstance(request, dict):
            self.bad += 1
            return _error("request must be a JSON object with method, device, params")
        rid = request.get("id")
        reply = await self._dispatch(request)
        self.answered += 1
        if "id" in request and (rid is None or isinstance(rid, str | int | float)):
            reply = {"id": rid, **reply}
        return reply

    async def _dispatch(self, request: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(request) - _KEYS)
        method, device = request.get("method"), request.get("device")
        problem = None
        if unknown:
            problem = f"unknown keys {', '.join(unknown)} (known: device, method, params, id)"
        elif not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD_CHARS:
            problem = f"method must be a name of at most {MAX_METHOD_CHARS} characters"
        elif device is not None and not isinstance(device, str):
            problem = "device must be a node's name (or absent, for the gateway itself)"
        elif isinstance(request.get("id"), dict | list | bool):
            problem = "id must be a number or a string"
        if problem is not None:
            self.bad += 1
            return _error(problem)
        assert isinstance(method, str)
        if self._handler.stopping:
            return _error("the gateway is stopping")
        params = request.get("params")
        try:
            if device is None:
                return await self._handler.on_gateway_rpc(method, params)
            return await self._handler.on_rpc(device, method, params)
        except Exception as exc:  # noqa: BLE001 - a fault answering one request must not end others
            log.error("local request %s to %s failed: %s", method, device or "the gateway", exc,
                      exc_info=exc)
            return _error(f"internal error: {type(exc).__name__}: {exc}")
