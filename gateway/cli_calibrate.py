"""`hydrogate calibrate`: a guided probe calibration on the running tank, or a fit of points.

    hydrogate calibrate NODE ph [--buffers 7.00,4.01[,10.01]] [--yes] ...
    hydrogate calibrate NODE ec [--standards 1413[,12880]] [--yes] ...
    hydrogate calibrate --points RAW:REF ... [--order N]      (the fit, as before)

The guided form talks to the running daemon over its local socket
(gateway/localrpc.py, RPC `probe_calibrate`): it starts a session, asks the
grower to put the probe into each buffer (Enter when it is in; ``--yes``
for scripts, which must move the probe themselves), has the daemon read the
live raw value until it is stable, and prints the slope, the offset and
whether the probe is usable. The result is applied by the daemon at once.
Ctrl-C cancels the session. docs/calibration.md walks through it.

Exit codes: 0 calibrated; 1 the probe was refused (outside usable limits) or
a step failed; 2 a bad command line or config file; 3 the daemon is not
reachable; 4 the daemon refused to start (the reason is printed); 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from gateway.cli import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_NO_DAEMON,
    EXIT_OK,
    EXIT_REFUSED,
    add_config_option,
    daemon_paths,
)
from gateway.localclient import LocalClient, LocalClientError
from rules.calibration import CalibrationError, fit_poly, fit_two_point, format_fit

#: How often progress is asked for (seconds).
POLL_S = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `hydrogate calibrate` (both forms)."""
    parser.add_argument("node", nargs="?", help="guided: the node's name (nodes[].name)")
    parser.add_argument("probe", nargs="?", choices=("ph", "ec"), help="guided: the probe")
    add_config_option(parser)
    guided = parser.add_argument_group("guided calibration of a probe on the running tank")
    guided.add_argument("--buffers", type=_numbers, default=None, metavar="PH,PH[,PH]",
                        help="pH buffers in the order used (default 7.00,4.01; 3 points: "
                        "7.00,4.01,10.01)")
    guided.add_argument("--standards", type=_numbers, default=None, metavar="US[,US]",
                        help="conductivity standards in µS/cm at 25 °C (default 1413; two "
                        "points: 1413,12880)")
    guided.add_argument("--source", default=None, metavar="KEY",
                        help="pH: the raw key (default: the map's, else ph_v, ph_mv, ph_adc)")
    guided.add_argument("--mv-per-unit", type=float, default=None, metavar="G",
                        help="pH: mV of electrode potential per raw unit (ph_v: 1000)")
    guided.add_argument("--zero", type=float, default=None, metavar="RAW",
                        help="pH: the raw value at 0 mV (default 0)")
    guided.add_argument("--temp", type=float, default=None, metavar="C",
                        help="the solutions' temperature, °C (default: the water_temp reading)")
    guided.add_argument("--yes", action="store_true",
                        help="do not wait for Enter before each reading (for scripts)")
    guided.add_argument("--force", action="store_true",
                        help="stop a running control cycle to start")
    guided.add_argument("--json", action="store_true", help="print only the result, as JSON")
    guided.add_argument("--socket", type=Path, default=None, metavar="PATH",
                        help="the daemon's local socket (default: from the config)")
    add_fit_arguments(parser, required=False)  # the fit: --points/--csv, --order


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas: {text!r}"
                                         ) from None



def run(args: argparse.Namespace) -> int:
    """`hydrogate calibrate`: the fit (``--points``/``--csv``) or the guided calibration."""
    if args.points is not None or args.csv is not None:
        if args.node is not None:
            print("hydrogate calibrate: give NODE PROBE or --points/--csv, not both",
                  file=sys.stderr)
            return EXIT_CONFIG
        return run_fit(args)
    if args.node is None or args.probe is None:
        print("hydrogate calibrate: give NODE ph|ec (guided), or --points/--csv (a fit)",
              file=sys.stderr)
        return EXIT_CONFIG
    return Guided(args).run()


class Guided:
    """The guided calibration's conversation: prompts, progress, the result."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.node: str = args.node
        self.probe: str = args.probe

    def say(self, text: str) -> None:
        if not self.args.json:
            print(text, flush=True)

    def ask(self, text: str) -> None:
        """Wait for Enter (unless ``--yes``); the prompt ends its line, for pipes."""
        if self.args.yes:
            return
        print(text, flush=True)
        if not sys.stdin.readline():
            raise KeyboardInterrupt  # stdin closed: nobody will ever press Enter

    def params(self) -> dict[str, Any]:
        a = self.args
        params: dict[str, Any] = {"probe": self.probe, "step": "start"}
        for key, value in (("buffers", a.buffers), ("standards", a.standards),
                           ("source", a.source), ("mv_per_unit", a.mv_per_unit),
                           ("zero", a.zero), ("temp", a.temp)):
            if value is not None:
                params[key] = value
        if a.force:
            params["force"] = True
        return params

    def run(self) -> int:
        paths = daemon_paths(self.args)
        if isinstance(paths, int):
            return paths
        try:
            with LocalClient.connect(paths) as daemon:
                reply = daemon.call("probe_calibrate", self.params(), device=self.node)
                if not reply["success"]:
                    return self._refused(reply)
                try:
                    status = self._steps(daemon, reply["probe_calibration"])
                except KeyboardInterrupt:
                    daemon.call("probe_calibrate", {"probe": self.probe, "step": "cancel"},
                                device=self.node)
                    print(f"\n{self.node}: {self.probe} calibration cancelled; the calibration "
                          "in use is unchanged", file=sys.stderr)
                    return 130
        except LocalClientError as exc:
            print(f"hydrogate: {exc}", file=sys.stderr)
            return EXIT_NO_DAEMON
        if self.args.json:
            print(json.dumps({"node": self.node, "probe_calibration": status}, indent=2))
        else:
            self._report(status)
        return EXIT_OK if status.get("state") == "done" else EXIT_FAILURE

    def _refused(self, reply: dict[str, Any]) -> int:
        if self.args.json:
            print(json.dumps({"node": self.node, **reply}, indent=2))
        else:
            print(f"hydrogate: {self.node}: {self.probe} calibration refused: "
                  f"{reply.get('error')}", file=sys.stderr)
        return EXIT_REFUSED

    def _steps(self, daemon: LocalClient, status: dict[str, Any]) -> dict[str, Any]:
        """Each point in turn: prompt, read until stable; the final status."""
        self.say(f"{self.node}: {self.probe} calibration, reading {status['source']} "
                 f"({len(status['steps'])} point{'s' if len(status['steps']) != 1 else ''}); "
                 "Ctrl-C cancels")
        while status.get("state") == "waiting":
            step = status["next"]
            if status.get("error"):
                self.say(f"  {status['error']}")
            if self.probe == "ph":
                what = f"the pH {step:.2f} buffer"
            else:
                what = f"the {step:g} µS/cm standard"
            self.ask(f"Rinse the probe and put it, with the temperature probe, in {what}; "
                     "press Enter when it is in.")
            reply = daemon.call("probe_calibrate", {"probe": self.probe, "step": "read"},
                                device=self.node)
            if not reply["success"]:
                raise LocalClientError(f"the daemon refused the reading: {reply.get('error')}")
            status = self._follow(daemon, what)
            if status.get("state") == "waiting" and status.get("error") and self.args.yes:
                break  # a script cannot retry by itself
        return status

    def _follow(self, daemon: LocalClient, what: str) -> dict[str, Any]:
        """Poll `get_state` while the daemon reads; print the live value now and then."""
        begun = time.monotonic()
        shown = -10.0
        while True:
            state = daemon.call("get_state", device=self.node)
            status = state.get("probe_calibration") if state.get("success") else None
            if not isinstance(status, dict):
                raise LocalClientError(f"the calibration of {self.node} is gone from the state")
            if status.get("state") != "reading":
                points = status.get("points") or []
                failed = status.get("state") == "waiting" and status.get("error")
                if points and not failed:
                    self.say(f"  {what}: {_point(points[-1])}")
                return status
            elapsed = time.monotonic() - begun
            raw = status.get("raw")
            if elapsed - shown >= 5.0 and raw is not None:
                shown = elapsed
                self.say(f"  [{elapsed:4.0f} s] {status['source']} {raw:.6g}, waiting until it "
                         "is stable")
            time.sleep(POLL_S)

    def _report(self, status: dict[str, Any], say: Callable[[str], None] | None = None) -> None:
        out = say or self.say
        result = status.get("result") or {}
        state = status.get("state")
        if state in ("failed", "cancelled") or (state == "waiting" and status.get("error")):
            print(f"{self.node}: {self.probe} calibration {state}: {status.get('error')}",
                  file=sys.stderr)
            return
        out("")
        if self.probe == "ph" and "slope_pct" in result:
            out(f"slope {result['slope_pct']:.1f} % of Nernst, offset {result['offset_mv']:+.1f}"
                f" mV at pH 7 (at {result['temp_c']:.1f} °C; usable: 85–105 %, ±30 mV)")
        elif "scale" in result:
            out(f"the probe read {1 / result['scale']:.3f} times the standard")
        if state == "refused":
            for problem in result.get("problems") or [status.get("error")]:
                print(f"refused: {problem}", file=sys.stderr)
            print("the calibration in use is unchanged", file=sys.stderr)
            return
        key, source = result.get("key"), result.get("source")
        poly = ", ".join(f"{c:.6g}" for c in result.get("poly") or [])
        out(f"applied: {key} from {source}, poly [{poly}]; it stays until "
            f"nodes[{self.node}].calibration.{key} is edited in the config file")
        out("")
        out(f"To keep it in the config file (under the node {self.node}):")
        out("    calibration:")
        extra = ""
        if result.get("valid") is not None:
            extra += f", valid: [{', '.join(f'{v:.6g}' for v in result['valid'])}]"
        if result.get("temp_coefficient") is not None:
            extra += f", temp_coefficient: {result['temp_coefficient']:g}"
        out(f"      {key}: {{source: {source}, poly: [{poly}]{extra}}}")


def _point(point: dict[str, Any]) -> str:
    text = f"{point['raw']:.6g} at {point['temp_c']:.1f} °C"
    if "ph" in point:
        text += f" (the buffer is pH {point['ph']:.3f} there)"
    if point.get("note"):
        text += f"; {point['note']}"
    return text


# ---------------------------------------------------------------- the fit of points


def _raw_ref(text: str) -> tuple[float, float]:
    """One ``RAW:REF`` point of ``--points``."""
    try:
        raw, ref = text.split(":")
        return float(raw), float(ref)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RAW:REFERENCE, got {text!r}") from None


def add_fit_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Options of ``hydrogate calibrate --points`` (``required``: one of --points, --csv)."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument(
        "--points", nargs="+", type=_raw_ref, metavar="RAW:REF",
        help="calibration points, raw reading and reference value, e.g. 0.04:57 0.49:198",
    )
    group.add_argument(
        "--csv", type=Path, metavar="FILE",
        help="CSV file of raw,reference rows (a header row is skipped)",
    )
    parser.add_argument(
        "--order", type=int, default=1,
        help="polynomial order (default 1: with two points, the two-point line)",
    )
    parser.add_argument(
        "--digits", type=int, default=6, help="significant digits printed (default 6)"
    )


def _read_csv(path: Path) -> list[tuple[float, float]]:
    """The (raw, reference) rows of a CSV file; a first row that is not numbers is a header."""
    points = []
    with path.open(newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].lstrip().startswith("#"):
                continue
            try:
                points.append((float(row[0]), float(row[1])))
            except (ValueError, IndexError):
                if n == 1:
                    continue  # header
                raise CalibrationError(f"{path}:{n}: expected two numbers, got {row}") from None
    return points


def run_fit(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``hydrogate calibrate --points/--csv``: fit, print; 0 on success, 2 on bad input."""
    stream = out if out is not None else sys.stdout
    try:
        points: list[tuple[float, float]] = (
            list(args.points) if args.points is not None else _read_csv(args.csv)
        )
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        if args.order == 1 and len(points) == 2:
            fit = fit_two_point(xs[0], ys[0], xs[1], ys[1])
        else:
            fit = fit_poly(xs, ys, args.order)
    except (CalibrationError, OSError) as exc:
        print(f"hydrogate calibrate: {exc}", file=sys.stderr)
        return 2
    print(format_fit(fit, args.digits), file=stream)
    return 0
