"""LD_PRELOAD shims the fault benchmarks and tests build with gcc: see each .c file.

- ``clockshift``: steps the wall clock of one process (and its NTP state), not
  its monotonic clock, from a file;
- ``powercut``: journals every write and sync to the gateway's database files,
  so the files as a power cut would leave them can be rebuilt (bench/powercut.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(name: str, out_dir: Path) -> Path:
    """Compile ``<name>.c`` into ``out_dir/<name>.so`` (once per content) and return its path."""
    source = HERE / f"{name}.c"
    target = out_dir / f"{name}-{int(source.stat().st_mtime_ns)}.so"
    if not target.exists():
        gcc = shutil.which("gcc") or "gcc"
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            [gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
             "-o", str(tmp), str(source), "-ldl", "-lpthread"],
            check=True,
        )
        tmp.rename(target)
    return target


def set_clock(path: Path, offset_s: float, synced: bool) -> None:
    """Tell the clockshift shim reading ``path``: wall clock = real + offset, NTP synced or not."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{offset_s:.6f} {1 if synced else 0}\n")
    tmp.rename(path)
