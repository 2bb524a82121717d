"""Run simulated NodeLink nodes standalone: ``python -m sim --tcp 127.0.0.1:3333 --name tank-a``.

``--tcp HOST:PORT`` may be repeated for several nodes; they get consecutive
names (tank-a, tank-b, ... or node1, node2, ...) and seeds. ``--pty`` adds a
node on a pseudo-terminal and prints its path. One line per node goes to
stdout (``<name> tcp <host>:<port>`` or ``<name> pty <path>``; port 0 shows
the port actually bound) so scripts can wait for it. Runs until SIGINT or
SIGTERM, then stops every actuator and closes cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import Sequence

from sim.node import SimNode
from sim.plant import PlantParams, Reservoir


def consecutive_name(base: str, index: int) -> str:
    """The ``index``-th name after ``base``: tank-a -> tank-b, node1 -> node2, x -> x-2."""
    if index == 0:
        return base
    digits = re.search(r"(\d+)$", base)
    if digits:
        number = int(digits.group(1)) + index
        return f"{base[: digits.start()]}{number:0{len(digits.group(1))}d}"
    letter = re.search(r"[-_]([a-z])$", base)
    if letter and ord(letter.group(1)) + index <= ord("z"):
        return base[:-1] + chr(ord(letter.group(1)) + index)
    return f"{base}-{index + 1}"


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sim", description=__doc__.splitlines()[0])
    parser.add_argument("--tcp", action="append", type=_address, default=[], metavar="HOST:PORT")
    parser.add_argument("--pty", action="store_true", help="also serve one node on a pty")
    parser.add_argument("--name", default="tank-a", help="name of the first node")
    parser.add_argument("--raw", action="store_true", help="send tds_v and ph_adc, not tds and ph")
    parser.add_argument("--push", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed", type=float, default=1.0, help="plant time per wall second")
    parser.add_argument("--seq", action="store_true", help="number every reading")
    parser.add_argument("--tds", type=float, default=None, help="initial TDS, ppm")
    parser.add_argument("--ph", type=float, default=None, help="initial pH")
    parser.add_argument("--volume", type=float, default=None, help="initial volume, litres")
    parser.add_argument("--thesis-rig", action="store_true", help="thesis-sized TDS pumps")
    return parser


def _plant(args: argparse.Namespace, seed: int) -> Reservoir:
    params = PlantParams.thesis_rig() if args.thesis_rig else PlantParams()
    return Reservoir.from_state(
        tds=params.initial_tds if args.tds is None else args.tds,
        ph=params.initial_ph if args.ph is None else args.ph,
        volume_l=args.volume,
        params=params,
        seed=seed,
    )


async def run(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Serve the nodes ``args`` describe until ``stop`` is set."""
    async with contextlib.AsyncExitStack() as stack:
        count = len(args.tcp) + int(args.pty)
        for index in range(count):
            name = consecutive_name(args.name, index)
            node = SimNode(
                name,
                _plant(args, args.seed + index),
                raw=args.raw,
                push_interval=args.push,
                seq=args.seq,
                speed=args.speed,
                seed=args.seed + index,
            )
            await stack.enter_async_context(node)
            if index < len(args.tcp):
                host, port = args.tcp[index]
                bound = await node.serve_tcp(host, port)
                print(f"{name} tcp {host}:{bound}", flush=True)
            else:
                print(f"{name} pty {node.open_pty()}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.tcp and not args.pty:
        args.tcp = [("127.0.0.1", 3333)]

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run(args, stop)

    try:
        asyncio.run(_main())
    except OSError as exc:
        print(f"sim: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
