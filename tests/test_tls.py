"""The uplink over TLS with an access token, against Mosquitto with a test CA."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.daemon import Gateway
from sim.node import SimNode
from tests.conftest import MOSQUITTO, free_port, wait_port
from tests.gateway_harness import config_dict, node_entry, running_gateway

pytestmark = pytest.mark.slow


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca_and_server(d: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name} test CA", "-keyout", f"{name}-ca.key",
             "-out", f"{name}-ca.pem", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", f"{name}-server.key", "-out", f"{name}-server.csr", cwd=d)
    (d / f"{name}-san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", f"{name}-server.csr", "-CA", f"{name}-ca.pem",
             "-CAkey", f"{name}-ca.key", "-CAcreateserial", "-days", "2",
             "-extfile", f"{name}-san.cnf", "-out", f"{name}-server.pem", cwd=d)
    return d / f"{name}-ca.pem", d / f"{name}-server.pem", d / f"{name}-server.key"


@pytest.fixture
def tls_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = tmp_path / "tls"
    d.mkdir()
    ca, cert, key = make_ca_and_server(d, "good")
    port = free_port()
    log = d / "mosquitto.log"
    conf = d / "mosquitto.conf"
    conf.write_text(
        "user root\n"  # see conftest.Broker: pytest's tmp dirs are 0700
        f"listener {port} 127.0.0.1\n"
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        "allow_anonymous true\nconnection_messages true\n"
        f"log_type all\nlog_dest file {log}\n"
    )
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, ca, log, d
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_telemetry_over_tls_with_the_access_token(tls_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port, ca, log, _ = tls_broker
    node = SimNode("tank-a")
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        data = config_dict(tmp_path / "gw.sqlite", [node_entry("tank-a", url)], port,
                           tls=True, ca_file=str(ca))
        data["thingsboard"]["access_token"] = "s3cret-gateway-token"
        async with running_gateway(data) as gw:
            assert gw.store is not None and gw.uplink is not None
            for _ in range(200):
                if gw.store.stats.forwarded >= 5:
                    break
                await asyncio.sleep(0.05)
            assert gw.store.stats.forwarded >= 5, "readings acknowledged over TLS"
    finally:
        await node.close()
    text = log.read_text()
    assert "u's3cret-gateway-token'" in text, "the access token is the MQTT username"


async def test_a_server_the_ca_does_not_vouch_for_is_refused(tls_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port, _, _, d = tls_broker
    other_ca, _, _ = make_ca_and_server(d, "other")
    node = SimNode("tank-a")
    try:
        url = f"tcp://127.0.0.1:{await node.serve_tcp('127.0.0.1', 0)}"
        data = config_dict(tmp_path / "gw.sqlite", [node_entry("tank-a", url)], port,
                           tls=True, ca_file=str(other_ca))
        # running_gateway waits for a session, which must never come: run it by hand.
        gw = Gateway(parse_config(data))
        task = asyncio.create_task(gw.run())
        try:
            await asyncio.wait_for(gw.ready.wait(), 10)
            await asyncio.sleep(3.0)
            assert gw.uplink is not None and not gw.uplink.connected
            assert gw.store is not None and gw.store.stats.forwarded == 0
            assert gw.store.stats.received > 0, "readings are still buffered"
        finally:
            gw.request_stop()
            await asyncio.wait_for(task, 15)
    finally:
        await node.close()
