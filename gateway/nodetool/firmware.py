"""Where the firmware lives, and its config validation run on the gateway.

``hydrogate node config`` and ``node deploy`` check a node.json with the very
code the board runs at boot (firmware/nlconfig.py), loaded from the firmware
directory, so the gateway and the node never disagree about what is valid.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

FIRMWARE_DIR = Path(__file__).resolve().parents[2] / "firmware"
"""firmware/ of this checkout (scripts/install.sh copies the whole tree to /opt/hydrogate)."""

ENTRY = "main.py"
"""Kept as source: MicroPython runs main.py (never main.mpy) at boot."""


def modules(firmware: Path = FIRMWARE_DIR) -> list[Path]:
    """The firmware's modules, compiled to .mpy on deploy (everything but main.py)."""
    return sorted(p for p in firmware.glob("*.py") if p.name != ENTRY)


def _load(name: str, firmware: Path) -> ModuleType:
    # The firmware imports its modules by bare name (nlframe, ...): load them
    # under private names so they cannot clash with anything of the gateway.
    spec = importlib.util.spec_from_file_location(f"_hydronode_{name}", firmware / f"{name}.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(firmware / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validate(text: bytes, firmware: Path = FIRMWARE_DIR) -> tuple[dict[str, Any], list[str]]:
    """Validate node.json as the node will at boot: (what it keeps, every error)."""
    import sys

    frame = _load("nlframe", firmware)
    saved = sys.modules.get("nlframe")
    sys.modules["nlframe"] = frame
    try:
        config = _load("nlconfig", firmware)
    finally:
        if saved is None:
            del sys.modules["nlframe"]
        else:
            sys.modules["nlframe"] = saved
    kept, errors = config.load(text)
    return kept, list(errors)
