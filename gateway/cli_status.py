"""`hydrogate status [-c FILE] [--watch] [--json]`: how the running daemon is doing.

Asks the daemon over its local socket (gateway/localrpc.py; mode 0660, so
root and the ``hydrogate`` group may ask) for its ``status`` and shows it
with the screen of `hydrogate demo` (gateway/statusview.py): per node the
link and since when, the latest values and their age, severity and reason,
cycle phase, mode and controller, the last dose and the last refusal, a pH
lock; the uplink, connected or not and since when; the buffer's backlog, the
age of its oldest reading, how fast it drains, what was evicted. ``--json``
prints the reply as it is (gateway/status.py documents its fields);
``--watch`` redraws it every ``--interval`` seconds until Ctrl-C.

Exit codes (of the last status shown):

- 0: every node's link is up, and ThingsBoard is connected (or not configured);
- 2: the config file is invalid;
- 3: the daemon is not reachable (not running, no permission, or it stopped);
- 5: at least one node's link is down;
- 6: every node is up, but ThingsBoard is configured and not connected.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from gateway.cli import EXIT_NO_DAEMON, EXIT_OK, add_config_option, daemon_paths
from gateway.localclient import LocalClient, LocalClientError

EXIT_NODE_DOWN = 5
EXIT_UPLINK_DOWN = 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hydrogate status`."""
    add_config_option(parser)
    parser.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    parser.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between two redraws with --watch (default 1)")
    parser.add_argument(
        "--socket", type=Path, default=None, metavar="PATH",
        help="the daemon's local socket (default: from the config; see docs/architecture.md)",
    )


def exit_code(status: dict[str, Any]) -> int:
    """What the status says, as the command's exit code (see the module's docstring)."""
    if any(node.get("link") != "up" for node in status.get("nodes", [])):
        return EXIT_NODE_DOWN
    uplink = status.get("uplink") or {}
    if uplink.get("configured") and not uplink.get("connected"):
        return EXIT_UPLINK_DOWN
    return EXIT_OK



def run(args: argparse.Namespace) -> int:
    """Show the status (once, or until Ctrl-C); the exit code."""
    from gateway.statusview import Screen, render

    paths = daemon_paths(args)
    if isinstance(paths, int):
        return paths
    screen = Screen(sys.stdout)
    code = EXIT_OK
    try:
        with LocalClient.connect(paths, timeout=10.0) as daemon:
            while True:
                reply = daemon.call("status")
                if not reply.get("success"):
                    print(f"hydrogate: the daemon refused status: {reply.get('error')}",
                          file=sys.stderr)
                    return EXIT_NO_DAEMON
                reply.pop("success", None)
                code = exit_code(reply)
                if args.json:
                    print(json.dumps(reply, indent=None if args.watch else 2), flush=True)
                else:
                    title = (f"hydrogate {reply.get('gateway')} - {reply.get('version')} -"
                             f" up {reply.get('uptime_s', 0):.0f} s")
                    if args.watch:
                        title += " - Ctrl-C to stop"
                    screen.show(render(reply, title=title))
                if not args.watch:
                    return code
                time.sleep(max(0.1, args.interval))
    except LocalClientError as exc:
        print(f"hydrogate: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except KeyboardInterrupt:
        return code
