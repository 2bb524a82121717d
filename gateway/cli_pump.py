"""`hydrogate pump calibrate NODE ACTUATOR --ms N [--ml V]`: measure a pump's real flow.

Talks to the running daemon over its local socket (RPC `pump_calibrate`):
the grower puts the pump's outlet into a measuring cup, the daemon runs the
pump for ``--ms`` milliseconds (every safety check applies; refused in auto
mode unless ``--force``), the command asks how many ml came out (or takes
``--ml``) and the daemon applies and keeps the flow. docs/calibration.md.

Exit codes: 0 measured; 1 the ml was refused or the calibration ended
otherwise; 2 a bad config file; 3 the daemon is not reachable; 4 the daemon
refused to run the pump (the reason is printed); 130 Ctrl-C (the pump is
stopped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from gateway.cli import (
    EXIT_FAILURE,
    EXIT_NO_DAEMON,
    EXIT_OK,
    EXIT_REFUSED,
    add_config_option,
    daemon_paths,
)
from gateway.localclient import LocalClient, LocalClientError

POLL_S = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`hydrogate pump` and its one subcommand, `calibrate`."""
    sub = parser.add_subparsers(dest="pump_command", required=True, metavar="COMMAND")
    cal = sub.add_parser("calibrate", help="run a pump into a measuring cup, keep its real flow")
    cal.add_argument("node", help="the node's name (nodes[].name)")
    cal.add_argument("actuator", help="the pump, e.g. nutrient_a, ph_down")
    cal.add_argument("--ms", type=int, required=True, metavar="N",
                     help="how long to run it, ms (a minute or so measures well)")
    cal.add_argument("--ml", type=float, default=None, metavar="V",
                     help="the ml that came out (default: asked once the pump stopped)")
    add_config_option(cal)
    cal.add_argument("--force", action="store_true",
                     help="run in auto mode (automatic cycles wait), take an unlikely ml")
    cal.add_argument("--yes", action="store_true", help="do not wait for Enter before the run")
    cal.add_argument("--json", action="store_true", help="print only the result, as JSON")
    cal.add_argument("--socket", type=Path, default=None, metavar="PATH",
                     help="the daemon's local socket (default: from the config)")


def run(args: argparse.Namespace) -> int:
    """Run the pump, take the ml, print the flow; the exit code."""
    paths = daemon_paths(args)
    if isinstance(paths, int):
        return paths

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    node, pump = args.node, args.actuator
    try:
        with LocalClient.connect(paths) as daemon:
            state = daemon.call("get_state", device=node)
            flow = (state.get("flow_ml_s") or {}).get(pump) if state.get("success") else None
            about = f" (about {flow * args.ms / 1000:.3g} ml at the {flow:g} ml/s in use)" \
                if isinstance(flow, int | float) else ""
            say(f"{node} {pump}: put the pump's outlet in a measuring cup; it runs "
                f"{args.ms / 1000:g} s{about}")
            if not args.yes:
                print("Press Enter to start (Ctrl-C cancels).", flush=True)
                if not sys.stdin.readline():
                    return 130
            params: dict[str, Any] = {"actuator": pump, "ms": args.ms}
            if args.force:
                params["force"] = True
            reply = daemon.call("pump_calibrate", params, device=node)
            if not reply["success"]:
                return _refused(args, reply)
            try:
                _wait(daemon, node, say)
                return _measure(daemon, args, say)
            except KeyboardInterrupt:
                daemon.call("pump_calibrate", {"cancel": True}, device=node)
                print(f"\n{node}: pump calibration cancelled, the pump stopped", file=sys.stderr)
                return 130
    except LocalClientError as exc:
        print(f"hydrogate: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON


def _refused(args: argparse.Namespace, reply: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps({"node": args.node, **reply}, indent=2))
    else:
        print(f"hydrogate: {args.node}: pump calibration refused: {reply.get('error')}",
              file=sys.stderr)
    return EXIT_REFUSED


def _wait(daemon: LocalClient, node: str, say: Any) -> None:
    """Until the daemon says the run is over."""
    shown = None
    while True:
        state = daemon.call("get_state", device=node)
        status = state.get("pump_calibration") if state.get("success") else None
        if not isinstance(status, dict):
            raise LocalClientError(f"the calibration of {node} is gone from the daemon's state")
        if status.get("state") != "running":
            if status.get("state") != "measure":
                raise LocalClientError(f"the calibration ended: {status.get('error')}")
            return
        left = status.get("left_s")
        if isinstance(left, int | float) and (shown is None or shown - left >= 5):
            shown = left
            say(f"  running, {left:.0f} s left")
        time.sleep(POLL_S)


def _measure(daemon: LocalClient, args: argparse.Namespace, say: Any) -> int:
    node, pump = args.node, args.actuator
    while True:
        ml = args.ml
        if ml is None:
            print("How many ml came out?", flush=True)
            line = sys.stdin.readline()
            if not line:
                raise KeyboardInterrupt
            try:
                ml = float(line.strip().replace(",", "."))
            except ValueError:
                print(f"  not a number: {line.strip()!r}", flush=True)
                continue
        params: dict[str, Any] = {"actuator": pump, "ml": ml}
        if args.force:
            params["force"] = True
        reply = daemon.call("pump_calibrate", params, device=node)
        if reply["success"]:
            break
        print(f"hydrogate: {node}: {reply.get('error')}", file=sys.stderr)
        if args.ml is not None:
            return EXIT_FAILURE
    if args.json:
        print(json.dumps({"node": node, **{k: v for k, v in reply.items()
                                           if k != "pump_calibration"}}, indent=2))
        return EXIT_OK
    old, flow = reply.get("previous_flow_ml_s"), reply["flow_ml_s"]
    was = "" if old is None else f" (was {old:g}, {reply['change_pct']:+.1f} %)"
    say(f"{node} {pump}: {flow:g} ml/s{was}; applied, and kept until "
        f"plant.flow_ml_s.{pump} is edited in the config file")
    say("")
    say(f"To keep it in the config file (under the node {node}):")
    say("    plant:")
    say(f"      flow_ml_s: {{{pump}: {flow:g}}}")
    return EXIT_OK
