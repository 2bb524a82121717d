"""A load generator: many push-mode NodeLink nodes in one process, for the benchmark.

Each node listens on 127.0.0.1, answers the gateway's requests (hello, read,
stop, ping, state) and pushes `report` events at its share of the total rate.
Every report carries `seq` (per node, from 1) and `t` (epoch ms when it was
written), so the receiving side can prove nothing was lost and measure
latency. The rate is set on stdin while it runs: `rate N` (readings/s over
all nodes), `quit`. On exit it prints the last seq of every node as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import contextlib
import json
import sys
import time

from drivers.nodelink import FrameError, LineSplitter
from sim.node import parse_request

TICK_S = 0.005


def frame(text: str) -> bytes:
    data = text.encode()
    return data + b"*%04X\n" % binascii.crc_hqx(data, 0xFFFF)


class PushNode:
    """One node: a TCP server that answers requests and pushes reports."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = 0
        self.rate = 0.0
        self.writer: asyncio.StreamWriter | None = None
        self.started = time.monotonic()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = writer
        splitter = LineSplitter()
        try:
            while data := await reader.read(65536):
                for line in splitter.feed(data):
                    with contextlib.suppress(FrameError):
                        self._answer(writer, parse_request(line))
        except ConnectionError:
            pass
        finally:
            if self.writer is writer:
                self.writer = None
            writer.close()

    def _answer(self, writer: asyncio.StreamWriter, req: dict[str, object]) -> None:
        rid, op = req.get("id"), req.get("op")
        body: dict[str, object] = {"id": rid, "ok": True}
        if op == "hello":
            body.update(node=self.name, fw="bench-1", proto=1,
                        sensors=["tds", "ph", "seq", "t"], actuators=[])
        elif op == "read":
            body.update(uptime_ms=int((time.monotonic() - self.started) * 1000),
                        values={"tds": 800.0, "ph": 6.0})
        elif op == "state":
            body.update(actuators={})
        writer.write(frame(json.dumps(body, separators=(",", ":"))))

    def push(self, count: int) -> None:
        writer = self.writer
        if writer is None or count <= 0 or writer.is_closing():
            return
        now_ms = time.time() * 1000.0
        uptime = int((time.monotonic() - self.started) * 1000)
        parts = []
        seq = self.seq
        for _ in range(count):
            seq += 1
            parts.append(frame(
                f'{{"event":"report","uptime_ms":{uptime},"values":'
                f'{{"seq":{seq},"t":{now_ms:.3f},"tds":801.5,"ph":6.02,"water_temp":24.1}}}}'
            ))
        self.seq = seq
        writer.write(b"".join(parts))


async def main_async(args: argparse.Namespace) -> None:
    nodes = [PushNode(f"bench-{i:03d}") for i in range(args.nodes)]
    servers = []
    for i, node in enumerate(nodes):
        servers.append(await asyncio.start_server(node.handle, "127.0.0.1", args.base_port + i))
    print("ready", flush=True)
    rate = float(args.rate)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stdin() -> None:
        nonlocal rate
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            stop.set()
        elif line.startswith("rate"):
            rate = float(line.split()[1])
            for n in nodes:
                n.started = time.monotonic()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    credit = [0.0] * len(nodes)
    last = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(TICK_S)
        now = time.monotonic()
        share = rate * (now - last) / len(nodes)
        last = now
        for i, node in enumerate(nodes):
            if node.writer is None:
                continue
            credit[i] += share
            whole = int(credit[i])
            credit[i] -= whole
            node.push(whole)
    loop.remove_reader(sys.stdin.fileno())
    for server in servers:
        server.close()
    for node in nodes:
        if node.writer is not None:
            node.writer.close()
    await asyncio.sleep(0.2)  # let the handlers see EOF and end on their own
    print(json.dumps({n.name: n.seq for n in nodes}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--base-port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
