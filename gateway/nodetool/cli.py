"""`hydrogate node probe|deploy|config`: the gateway's tools for NodeLink nodes."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="node_command", required=True, metavar="ACTION")

    probe = sub.add_parser("probe", help="NodeLink v1 conformance of a node; exit 0 if all pass")
    probe.add_argument("url", help="tcp://HOST[:PORT] or serial:///dev/ttyUSB0[?baud=N]")
    probe.add_argument("--watchdog", action="store_true",
                       help="also check the 30 s link watchdog (runs a pump, then waits 32 s)")
    probe.add_argument("--timeout", type=float, default=1.0, help="seconds per reply (default 1)")
    probe.add_argument("--actuator",
                       help="actuator for the timed cases (default: the first announced)")
    probe.add_argument("--duty", type=int, default=1,
                       help="duty of the test runs, 1..255 (default 1: a PWM pump barely turns)")
    probe.add_argument("--run-ms", type=int, default=1000,
                       help="length of a timed run in ms (default 1000)")
    probe.add_argument("--push-wait", type=float, default=0.0,
                       help="seconds to wait for a pushed report (default 0: check those seen)")

    deploy = sub.add_parser("deploy", help="compile firmware/, copy it and node.json to a board")
    deploy.add_argument("--port", required=True, help="serial device of the board: /dev/ttyUSB0")
    deploy.add_argument("--config", required=True, type=Path, help="the node.json to install")
    deploy.add_argument("--dry-run", action="store_true",
                        help="check and compile, print the mpremote command, copy nothing")
    deploy.add_argument("--build-dir", type=Path,
                        help="keep the compiled .mpy files here (default: a temporary directory)")
    deploy.add_argument("--force", action="store_true", help="deploy a node.json that has errors")

    config = sub.add_parser("config", help="write a starting node.json")
    config.add_argument("--name", required=True, help="the node's name (its device name)")
    config.add_argument("--board", default="esp32", choices=["esp32", "esp32s3", "esp32c3"])
    config.add_argument("--sensors", default="tds,ph,ds18b20",
                        help="comma-separated: tds,ph,ds18b20,dht22|sht3x,ultrasonic|float_switch")
    config.add_argument("--pumps", default="nutrient,ph_up,ph_down,refill",
                        help="comma-separated actuator names (default the four of NodeLink)")
    config.add_argument("--wifi-ssid", help="join this Wi-Fi and serve TCP port 3333")
    config.add_argument("--wifi-password", default="")
    config.add_argument("--push-ms", type=int, default=0, help="push a report every N ms (0: off)")
    config.add_argument("-o", "--output", type=Path, default=Path("node.json"))
    config.add_argument("--force", action="store_true", help="overwrite an existing file")


def run(args: argparse.Namespace) -> int:
    if args.node_command == "probe":
        return _probe(args)
    if args.node_command == "deploy":
        return _deploy(args)
    return _config(args)


def _probe(args: argparse.Namespace) -> int:
    from drivers.errors import TransportError
    from gateway.nodetool.probe import ProbeOptions, probe, table

    if not 1 <= args.duty <= 255 or not 50 <= args.run_ms <= 60000:
        print("hydrogate node probe: --duty must be 1..255, --run-ms 50..60000", file=sys.stderr)
        return EXIT_USAGE
    options = ProbeOptions(timeout=args.timeout, run_ms=args.run_ms, duty=args.duty,
                           actuator=args.actuator, watchdog=args.watchdog,
                           push_wait=args.push_wait)
    try:
        results = asyncio.run(probe(args.url, options))
    except (TransportError, TimeoutError, OSError) as exc:
        print(f"hydrogate node probe: cannot connect: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(table(results))
    return EXIT_FAILURE if any(r.status == "FAIL" for r in results) else EXIT_OK


def _deploy(args: argparse.Namespace) -> int:
    from gateway.nodetool.deploy import DeployError, check_config, deploy

    try:
        errors = check_config(args.config)
        if errors:
            for e in errors:
                print(f"{args.config}: {e}", file=sys.stderr)
            if not args.force:
                print("hydrogate node deploy: fix node.json (or --force)", file=sys.stderr)
                return EXIT_USAGE
        steps = deploy(args.port, args.config, dry_run=args.dry_run, build_dir=args.build_dir)
    except DeployError as exc:
        print(f"hydrogate node deploy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"compiled {len(steps.compile)} module(s) with mpy-cross")
    if args.dry_run:
        print(shlex.join(steps.upload))
    else:
        print(f"copied the firmware and {args.config} to {args.port} and reset the board")
    return EXIT_OK


def _config(args: argparse.Namespace) -> int:
    from gateway.nodetool.nodeconfig import NodeConfigError, build

    def names(text: str) -> list[str]:
        return [n.strip() for n in text.split(",") if n.strip()]

    if args.output.exists() and not args.force:
        print(f"hydrogate node config: {args.output} exists (--force to overwrite)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        doc = build(name=args.name, board=args.board, sensors=names(args.sensors),
                    pumps=names(args.pumps), wifi_ssid=args.wifi_ssid,
                    wifi_password=args.wifi_password, push_ms=args.push_ms)
    except NodeConfigError as exc:
        print(f"hydrogate node config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.output}: {len(doc['sensors'])} sensor(s), {len(doc['actuators'])} pump(s)")
    for entry in doc["sensors"] + doc["actuators"]:
        pins = {k: v for k, v in entry.items() if k in ("pin", "sda", "scl", "trig", "echo")}
        label = entry.get("name") or entry["type"]
        print(f"  {label:<12} " + " ".join(f"{k} GPIO{v}" for k, v in pins.items()))
    return EXIT_OK
