"""The daemon's local control socket: the real daemon, a real Unix socket, hostile clients."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.localclient import DaemonUnreachable, LocalClient
from gateway.localrpc import MAX_CLIENTS, MAX_LINE, SOCKET_NAME, client_paths, socket_path
from sim.node import SimNode
from tests.gateway_harness import config_dict, node_entry, running_gateway
from tests.localsock import call, exchange, until

pytestmark = pytest.mark.slow


def config(tmp_path: Path, url: str, **gateway: Any) -> dict[str, Any]:
    node = node_entry("tank-a", url, control={"mode": "manual", "tds_setpoint": 800,
                                              "ph_setpoint": 6.0, "interval": 0})
    data = config_dict(tmp_path / "gw.sqlite", [node])
    data["gateway"].update(gateway)
    return data


def test_where_the_socket_is() -> None:
    data = config_dict(Path("/var/lib/hydrogate/hydrogate.sqlite"), [node_entry("a", "tcp://h")])
    cfg = parse_config(data)
    beside = Path("/var/lib/hydrogate") / SOCKET_NAME
    assert socket_path(cfg, {}) == beside
    assert socket_path(cfg, {"RUNTIME_DIRECTORY": "/run/hydrogate"}) == Path(
        "/run/hydrogate/hydrogate.sock")
    assert socket_path(cfg, {"RUNTIME_DIRECTORY": "/run/a:/run/b"}) == Path("/run/a") / SOCKET_NAME
    assert client_paths(cfg, {}) == [beside, Path("/run/hydrogate") / SOCKET_NAME]
    data["gateway"]["socket"] = "/srv/gw.sock"
    cfg = parse_config(data)
    assert socket_path(cfg, {"RUNTIME_DIRECTORY": "/run/hydrogate"}) == Path("/srv/gw.sock")
    assert client_paths(cfg, {}) == [Path("/srv/gw.sock")]
    data["gateway"]["socket"] = "/" + "s" * 120
    with pytest.raises(Exception, match=r"gateway\.socket.*107"):
        parse_config(data)


async def test_every_rpc_works_locally_and_bad_input_harms_nothing(tmp_path: Path) -> None:
    node = SimNode("tank-a")
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        sock = tmp_path / "gw.sock"
        async with running_gateway(config(tmp_path, url, socket=str(sock))) as gw:
            await until(lambda: gw.runners["tank-a"].latest, what="a reading")
            await until(lambda: gw.local is not None and gw.local.serving.is_set(),
                        what="socket served")
            local = gw.local
            assert local is not None
            mode = stat.S_IMODE(os.stat(sock).st_mode)
            assert stat.S_ISSOCK(os.stat(sock).st_mode) and mode == 0o660
            assert os.stat(sock).st_gid == os.getegid()

            # docs/thingsboard.md's RPCs, answered as ThingsBoard's are.
            ping = await call(sock, "ping")
            assert ping["success"] and ping["gateway"] == "gw-test"
            assert ping["nodes"] == ["tank-a"]
            state = await call(sock, "get_state", device="tank-a")
            assert state["success"] and state["link"] == "up" and "ph" in state["values"]
            dose = await call(sock, "actuate", {"actuator": "nutrient", "ms": 200},
                              device="tank-a")
            assert dose == {"success": True, "actuator": "nutrient", "ms": 200, "duty": 255}
            assert (await call(sock, "set_mode", {"mode": "auto"}, device="tank-a")) == {
                "success": True, "mode": "auto"}
            assert (await call(sock, "force_stop", device="tank-a"))["success"]
            assert (await call(sock, "stop", device="tank-a")) == {"success": True}

            # Bad input: an error reply each, on the same connection.
            bad = [
                b"not json\n",
                b"[1, 2]\n",
                b'{"method": 5}\n',
                b'{"method": ""}\n',
                b'{"method": "get_state", "device": 7}\n',
                b'{"method": "get_state", "device": "tank-z"}\n',
                b'{"method": "reboot", "device": "tank-a"}\n',
                b'{"method": "reboot"}\n',
                b'{"method": "ping", "extra": 1}\n',
                b'{"method": "ping", "id": {"a": 1}}\n',
                b'{"method": "actuate", "device": "tank-a", "params": {"actuator": "x", "ms": 1e9}}\n',
                b'\xff\xfe\n',
            ]
            replies = await exchange(sock, *bad)
            assert len(replies) == len(bad)
            for line, reply in zip(bad, replies, strict=True):
                assert reply["success"] is False and reply["error"], (line, reply)
            assert "unknown device" in replies[5]["error"]
            assert "unknown gateway method" in replies[7]["error"]
            # Blank lines are skipped; ids are echoed; the connection goes on.
            replies = await exchange(sock, b'\n\n{"method": "ping", "id": 7}\n',
                                     b'{"method": "ping", "id": "x"}\n')
            assert [r.get("id") for r in replies] == [7, "x"]

            # Too long: told so, and that connection is closed.
            long = b'{"method": "ping", "params": "' + b"x" * (MAX_LINE + 10) + b'"}\n'
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(long + b'{"method": "ping"}\n')
            reply = json.loads(await reader.readline())
            assert reply["success"] is False and "longer than" in reply["error"]
            assert await reader.read() == b"", "and that connection is closed"
            writer.close()

            # A client that connects and says nothing, many of them: bounded.
            held = [await asyncio.open_unix_connection(str(sock)) for _ in range(MAX_CLIENTS)]
            await until(lambda: len(local._clients) == MAX_CLIENTS, what="all held")
            extra_reader, extra_writer = await asyncio.open_unix_connection(str(sock))
            refused = json.loads(await extra_reader.readline())
            assert refused["success"] is False and "too many connections" in refused["error"]
            assert await extra_reader.read() == b"", "and it is closed"
            extra_writer.close()
            for _, writer in held:
                writer.close()
            await until(lambda: not local._clients, what="released")
            # A client that vanishes mid-request does no harm either.
            _, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(b'{"method": "get_st')
            writer.close()

            # The daemon is unharmed: polling, answering, counting.
            before = gw.runners["tank-a"].readings
            assert (await call(sock, "ping"))["success"]
            await until(lambda: gw.runners["tank-a"].readings > before, what="still polling")
            assert local.bad == 10, "eight malformed, one too long, one cut short"

            # The blocking client the commands use.
            with await asyncio.to_thread(LocalClient.connect, [tmp_path / "nope", sock]) as c:
                reply = await asyncio.to_thread(c.call, "get_state", None, device="tank-a")
                assert reply["success"] and reply["link"] == "up"
        assert not sock.exists(), "removed at a clean stop"
    finally:
        await node.close()


async def test_a_stale_socket_is_replaced_a_live_one_or_a_file_is_not(tmp_path: Path) -> None:
    node = SimNode("tank-a")
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        sock = tmp_path / "gw.sock"
        # A crash leaves the socket file behind: nobody listens on it.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(sock))
        stale.close()
        assert sock.exists()
        data = config(tmp_path, url, socket=str(sock))
        async with running_gateway(data) as gw:
            await until(lambda: gw.local is not None and gw.local.serving.is_set(),
                        what="socket served")
            assert (await call(sock, "ping"))["success"]
            # A second daemon on the same path does not take it from the first.
            other = dict(data, storage={"path": str(tmp_path / "other.sqlite")})
            async with running_gateway(other) as second:
                assert second.local is not None
                await until(second._tasks["local"].done, what="gave up")
                assert not second.local.serving.is_set()
            assert (await call(sock, "ping"))["gateway"] == "gw-test", "still the first's"
        assert not sock.exists()
        # Something that is not a socket is never removed; the daemon runs without one.
        sock.write_text("a grower's notes")
        async with running_gateway(data) as gw:
            await until(gw._tasks["local"].done, what="gave up")
            await until(lambda: gw.runners["tank-a"].latest, what="the node still runs")
        assert sock.read_text() == "a grower's notes"
        with pytest.raises(DaemonUnreachable, match="no socket"):
            LocalClient.connect([tmp_path / "missing.sock"])
    finally:
        await node.close()


async def test_the_default_socket_is_beside_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    node = SimNode("tank-a")
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        async with running_gateway(config(tmp_path, url)) as gw:
            await until(lambda: gw.local is not None and gw.local.serving.is_set(),
                        what="socket served")
            assert (await call(tmp_path / SOCKET_NAME, "ping"))["success"]
        run = tmp_path / "run"
        run.mkdir()
        monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
        async with running_gateway(config(tmp_path, url)) as gw:
            await until(lambda: gw.local is not None and gw.local.serving.is_set(),
                        what="socket served")
            assert (await call(run / SOCKET_NAME, "ping"))["success"]
    finally:
        await node.close()
