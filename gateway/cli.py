"""The `hydrogate` command: run, check-config, demo, calibrate, evaluate, node, titrate,
pump, status, export, backup, storage."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import __version__

if TYPE_CHECKING:
    from gateway.config import Config

DEFAULT_CONFIG = "/etc/hydrogate/config.yaml"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NO_DAEMON = 3  # a command for the running daemon found none (gateway/localclient.py)
EXIT_REFUSED = 4  # the daemon refused the command (the reason is printed)


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        type=Path,
        metavar="FILE",
        help=f"YAML configuration file (default {DEFAULT_CONFIG})",
    )


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``-c/--config FILE``, for commands in other modules that read the config file."""
    _add_config_option(parser)


def daemon_paths(args: argparse.Namespace) -> list[Path] | int:
    """The running daemon's socket paths (``--socket``, else from the config), or EXIT_CONFIG.

    For the commands that talk to the daemon (status, titrate, calibrate, pump).
    """
    if args.socket is not None:
        return [args.socket]
    from gateway.localrpc import client_paths

    config = load_config_or_exit(args)
    return config if isinstance(config, int) else client_paths(config)


def load_config_or_exit(args: argparse.Namespace) -> Config | int:
    """The config of ``-c FILE``, or EXIT_CONFIG once the reason is printed.

    For the commands that only read the config (export, backup, the socket lookup).
    """
    from gateway.config import ConfigError, load_config

    try:
        return load_config(args.config)
    except ConfigError as exc:
        print(f"hydrogate: invalid configuration {args.config}:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG


def _cmd_run(args: argparse.Namespace) -> int:
    """The daemon. A config it cannot run is exit 2, which the unit does not restart."""
    import faulthandler
    import logging

    from gateway.config import ConfigError, load_config
    from gateway.daemon import run_daemon
    from gateway.preflight import preflight
    from gateway.service import notify, setup_logging

    setup_logging(args.log_level)
    # On the watchdog's SIGABRT (or a crash), every thread's stack goes to stderr, i.e.
    # the journal: where the hung thread was stuck.
    faulthandler.enable()
    log = logging.getLogger("hydrogate")
    try:
        config = load_config(args.config)
        findings = preflight(config, service_user=None, ml=False)  # as the user we run as
    except ConfigError as exc:
        errors = [f"{path}: {message}" if path else message for path, message in exc.errors]
    else:
        for finding in findings:
            if not finding.error:
                log.warning("%s", finding)
        errors = [str(f) for f in findings if f.error]
    if errors:
        log.error(
            "cannot start: %s has %d error%s; fix %s, check it with "
            "`hydrogate check-config -c %s`, then start the service again:\n%s",
            args.config, len(errors), "s" if len(errors) != 1 else "",
            "it" if len(errors) == 1 else "them", args.config, "\n".join(errors),
        )
        notify(f"STATUS=invalid configuration: {errors[0]}")
        return EXIT_CONFIG
    return asyncio.run(run_daemon(config, config_path=args.config))


def _cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_config, summarize
    from gateway.preflight import preflight

    try:
        config = load_config(args.config)
        findings = preflight(config)
    except ConfigError as exc:
        count = len(exc.errors)
        print(f"{args.config}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    errors = [f for f in findings if f.error]
    for finding in findings:
        kind = "error" if finding.error else "warning"
        print(f"{args.config}: {kind}: {finding}", file=sys.stderr)
    if errors:
        count = len(errors)
        print(f"{args.config}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
        return EXIT_CONFIG
    if not args.quiet:
        print(f"{args.config}: OK")
        print(summarize(config))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo
    from gateway.service import setup_logging

    setup_logging(args.log_level)
    return asyncio.run(run_demo(args))


def _lazy(module: str, attr: str) -> Callable[..., object]:
    def call(*args: object) -> object:
        mod = __import__(module, fromlist=[attr])
        return getattr(mod, attr)(*args)

    return call


#: Subcommands whose options live in a module heavy to import (the simulator,
#: numpy, matplotlib): their options are added only when that command runs,
#: so `hydrogate run` never loads them.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("gateway.demo", "demo"),
    "calibrate": ("gateway.cli_calibrate", "calibrate"),
    "evaluate": ("sim.evaluate_cli", "evaluate"),
    "node": ("gateway.nodetool.cli", "node"),
    "titrate": ("gateway.cli_titrate", "titrate"),
    "pump": ("gateway.cli_pump", "pump"),
    "status": ("gateway.cli_status", "status"),
    "export": ("gateway.cli_export", "export"),
    "backup": ("gateway.cli_backup", "backup"),
    "storage": ("gateway.cli_storage", "storage"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module is imported for its options."""
    parser = argparse.ArgumentParser(
        prog="hydrogate",
        description="Edge gateway: NodeLink nodes -> SQLite buffer -> ThingsBoard, "
        "with edge control of pH and nutrients.",
    )
    parser.add_argument("--version", action="version", version=f"hydrogate {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway daemon until SIGTERM/SIGINT")
    _add_config_option(run)
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser(
        "check-config",
        help="validate a configuration file and that this machine can run it",
    )
    _add_config_option(check)
    check.add_argument(
        "-q", "--quiet", action="store_true", help="print only errors and warnings"
    )
    check.set_defaults(func=_cmd_check_config)

    helps = {
        "demo": "three simulated tanks, a local buffer, no cloud account needed",
        "calibrate": "calibrate a probe with buffers on the running tank (NODE ph|ec), or fit "
        "a calibration map from reference points (--points)",
        "evaluate": "run every controller on the simulated plant and compare them",
        "node": "tools for NodeLink nodes: probe URL, deploy firmware, write node.json",
        "titrate": "measure a pH solution's strength on the running tank (guided titration)",
        "pump": "pump calibrate NODE ACTUATOR --ms N: measure a pump's real flow",
        "status": "the running daemon's state: nodes, values, control, uplink, buffer",
        "export": "one node's readings from the buffer and the local history, as CSV or JSONL",
        "backup": "a consistent copy of the database, while the daemon runs",
        "storage": "storage downgrade --to N: the buffer file written back for an older release",
    }
    for name, (module, _) in LAZY_COMMANDS.items():
        lazy = sub.add_parser(name, help=helps[name])
        if name == command:
            _lazy(module, "add_arguments")(lazy)
        lazy.set_defaults(func=_cmd_demo if name == "demo" else _lazy(module, "run"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hydrogate` console script."""
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if w in LAZY_COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(words)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(result) if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
