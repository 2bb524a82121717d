"""The `hydrogate` command: run, check-config, demo, calibrate, evaluate."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway import __version__

DEFAULT_CONFIG = "/etc/hydrogate/config.yaml"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        type=Path,
        metavar="FILE",
        help=f"YAML configuration file (default {DEFAULT_CONFIG})",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_config
    from gateway.daemon import run_daemon
    from gateway.systemd import setup_logging

    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"hydrogate: invalid configuration {args.config}:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(run_daemon(config, config_path=args.config))


def _cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_config, summarize

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        count = len(exc.errors)
        print(f"{args.config}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config}: OK")
    print(summarize(config))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo
    from gateway.systemd import setup_logging

    setup_logging(args.log_level)
    return asyncio.run(run_demo(args))


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from gateway.demo import add_arguments

    add_arguments(parser)


def _lazy(module: str, attr: str) -> Callable[..., object]:
    def call(*args: object) -> object:
        mod = __import__(module, fromlist=[attr])
        return getattr(mod, attr)(*args)

    return call


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; subcommands import their modules only when used."""
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

    check = sub.add_parser("check-config", help="validate a configuration file")
    _add_config_option(check)
    check.set_defaults(func=_cmd_check_config)

    demo = sub.add_parser(
        "demo", help="three simulated tanks, a local buffer, no cloud account needed"
    )
    _add_demo_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    calibrate = sub.add_parser(
        "calibrate", help="fit a calibration map from reference points and print it"
    )
    _lazy("rules.calibration", "add_arguments")(calibrate)
    calibrate.set_defaults(func=_lazy("rules.calibration", "run"))

    evaluate = sub.add_parser(
        "evaluate", help="run every controller on the simulated plant and compare them"
    )
    _lazy("rules.evaluate", "add_arguments")(evaluate)
    evaluate.set_defaults(func=_lazy("rules.evaluate", "run"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hydrogate` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(result) if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
