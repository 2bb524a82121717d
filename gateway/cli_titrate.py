"""`hydrogate titrate NODE ph_up|ph_down`: measure a pH solution's strength on the running tank.

Talks to the running daemon over its local socket (gateway/localrpc.py): it
starts the titration (RPC `titrate`), follows it in `get_state`, prints the
result and the config lines a grower may copy. Ctrl-C cancels it (RPC `stop`:
every pump of the node off). docs/titration.md says what the numbers mean.

Exit codes: 0 measured; 1 the titration failed or was cancelled; 2 the config
file is invalid; 3 the daemon is not reachable (not running, no permission,
or it stopped meanwhile); 4 the daemon refused to start it (the reason is
printed: no fresh pH reading, a cycle running, an actuator not announced…);
130 cancelled with Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from gateway.cli import (
    EXIT_FAILURE,
    EXIT_NO_DAEMON,
    EXIT_OK,
    EXIT_REFUSED,
    add_config_option,
    daemon_paths,
)
from gateway.localclient import LocalClient, LocalClientError
from rules.controller import PH_PUMPS

#: How often the progress is asked for (seconds).
POLL_S = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hydrogate titrate`."""
    parser.add_argument("node", help="the node's name (nodes[].name)")
    parser.add_argument("actuator", choices=PH_PUMPS, help="the pH pump to titrate")
    add_config_option(parser)
    parser.add_argument(
        "--move", type=float, default=0.1,
        help="pH change to aim at in each step (0.05-0.3, default 0.1)",
    )
    parser.add_argument(
        "--force", action="store_true", help="abort a running control cycle to start it"
    )
    parser.add_argument("--json", action="store_true", help="print only the result, as JSON")
    parser.add_argument(
        "--socket", type=Path, default=None, metavar="PATH",
        help="the daemon's local socket (default: from the config; see docs/architecture.md)",
    )



def run(args: argparse.Namespace) -> int:
    """Start the titration, follow it, print the result; the exit code."""
    paths = daemon_paths(args)
    if isinstance(paths, int):
        return paths
    out: TextIO = sys.stdout

    def say(text: str) -> None:
        if not args.json:
            print(text, file=out, flush=True)

    params: dict[str, Any] = {"actuator": args.actuator, "move": args.move}
    if args.force:
        params["force"] = True
    try:
        with LocalClient.connect(paths) as daemon:
            reply = daemon.call("titrate", params, device=args.node)
            if not reply["success"]:
                return _refused(args, reply)
            started = reply["started"]
            say(f"{args.node}: titration of {args.actuator} started (Ctrl-C cancels it and "
                "stops the node's pumps)")
            try:
                status, state = _follow(daemon, args.node, started, say)
            except KeyboardInterrupt:
                return _cancel(paths, args)
    except LocalClientError as exc:
        print(f"hydrogate: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    if args.json:
        print(json.dumps({"node": args.node, "titration": status}, indent=2), file=out)
    elif status.get("state") == "done":
        _report(args.node, status, state, say)
    else:
        print(f"{args.node}: titration {status.get('state')}: {status.get('error')}",
              file=sys.stderr)
    return EXIT_OK if status.get("state") == "done" else EXIT_FAILURE


def _refused(args: argparse.Namespace, reply: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps({"node": args.node, **reply}, indent=2))
    else:
        print(f"hydrogate: {args.node}: titration refused: {reply.get('error')}",
              file=sys.stderr)
    return EXIT_REFUSED


def _follow(
    daemon: LocalClient, node: str, started: int, say: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Poll `get_state` until our titration ends; print its steps as they come."""
    begun = time.monotonic()
    shown = ""
    while True:
        state = daemon.call("get_state", device=node)
        status = state.get("titration") if state.get("success") else None
        if not isinstance(status, dict) or status.get("started") != started:
            raise LocalClientError(f"the titration of {node} is gone from the daemon's state")
        line = _progress(status)
        if line != shown:
            shown = line
            say(f"  [{time.monotonic() - begun:5.0f} s] {line}")
        if status.get("state") in ("done", "failed", "cancelled"):
            return status, state
        time.sleep(POLL_S)


def _progress(status: dict[str, Any]) -> str:
    doses = status.get("doses") or []
    ph = status.get("ph")
    where = f"pH {ph:.3f}" if isinstance(ph, float | int) else "pH not steady yet"
    if doses:
        where += f", {len(doses)} dose{'s' if len(doses) != 1 else ''} " \
                 f"({sum(d.get('per_l') or 0 for d in doses):.3g} ml/L)"
    return f"{status.get('detail') or status.get('state')} — {where}"


def _cancel(paths: list[Path], args: argparse.Namespace) -> int:
    """Ctrl-C: stop the node (which cancels the titration), on a fresh connection."""
    try:
        with LocalClient.connect(paths) as daemon:
            reply = daemon.call("stop", device=args.node)
    except LocalClientError as exc:
        print(f"\nhydrogate: could not cancel the titration: {exc}", file=sys.stderr)
        return 130
    if reply["success"]:
        print(f"\n{args.node}: titration cancelled, every pump stopped", file=sys.stderr)
    else:
        print(f"\n{args.node}: cancel: {reply.get('error')}", file=sys.stderr)
    return 130


def _report(
    node: str, status: dict[str, Any], state: dict[str, Any], say: Callable[[str], None]
) -> None:
    result = status.get("result") or {}
    pump = result.get("actuator", status.get("actuator"))
    strength = result.get("ml_per_l_per_unit")
    say("")
    per_l = result.get("per_l") or 0.0
    volume = result.get("volume_l") or 0.0
    say(f"{node} {pump}: {strength:g} ml per litre of tank per pH unit "
        f"(±{result.get('uncertainty_pct', 0):g} %), measured from pH "
        f"{result.get('ph_from'):.2f} to {result.get('ph_to'):.2f} with "
        f"{per_l:g} ml/L ({per_l * volume:.3g} ml) in {result.get('doses')} dose(s)")
    wait = result.get("mixing_wait_s")
    have = status.get("mixing_wait_s")
    if wait is not None:
        now = f" (the node has {have:g})" if isinstance(have, int | float) else ""
        say(f"mixing: dead time {result.get('dead_time_s'):g} s, lag {result.get('lag_s'):g} s;"
            f" mixing_wait_s {wait:g} is recommended{now}")
    if result.get("warning"):
        say(f"warning: {result['warning']}")
    say(f"{'applied' if result.get('applied') else 'not applied'}: {result.get('note')}")
    strengths = result.get("ph_ml_per_l_per_unit") or {}
    if result.get("applied") and strengths:
        inline = ", ".join(f"{p}: {v:g}" for p, v in sorted(strengths.items(), reverse=True))
        say("")
        say(f"To keep it in the config file (under the node {node}):")
        say("    plant:")
        say(f"      ph_ml_per_l_per_unit: {{{inline}}}")
        if wait is not None and wait != have and state.get("mode") is not None:
            say("    control:")
            say(f"      mixing_wait_s: {wait:g}")
