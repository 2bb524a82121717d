"""The install resolves on every target: Debian's packages plus wheels pip really has.

Offline: pip resolves from the wheels ``scripts/setup.sh --test`` downloaded for
each target (``tests/install_targets.py``) and nothing else, against a venv of
Debian's own python3 with its system site packages, as scripts/install.sh
builds the release venv. A target whose wheels are missing fails here.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.install_targets import (
    ROOT,
    TARGETS,
    TFLITE_CANDIDATES,
    Target,
    debian_numpy,
    installs,
    pip_resolve,
    runtime_requirements,
)

CACHE = ROOT / ".cache" / "install"
DEBIAN_PYTHON = CACHE / "debian-venv" / "bin" / "python"
#: Distributions Debian bookworm ships (python3-numpy, -yaml, -serial-asyncio, -serial,
#: -systemd, -tqdm): pip must find them installed, never fetch them.
FROM_DEBIAN = {"numpy", "pyyaml", "pyserial-asyncio", "pyserial", "systemd-python", "tqdm"}
#: What pip may add on top of Debian (bookworm has no aiomqtt 2 and no orjson;
#: its paho-mqtt 1.6 is older than aiomqtt 2 needs).
FROM_PYPI = {"aiomqtt", "paho-mqtt", "orjson", "typing-extensions"}
#: The TFLite runtime scripts/install.sh ends up with on each target (its first choice
#: that has a wheel there), as PyPI stands today.
EXPECTED_TFLITE = {
    "amd64": "tflite-runtime",
    "aarch64": "tflite-runtime",
    "armv7l": "tflite-runtime",
    "armhf-on-arm64": "tflite-runtime",
}


@pytest.fixture(scope="module")
def debian_python() -> Path:
    if not DEBIAN_PYTHON.exists():
        pytest.fail(f"{DEBIAN_PYTHON} is missing: run scripts/setup.sh --test")
    return DEBIAN_PYTHON


def _wheels(target: Target) -> Path:
    folder = CACHE / "wheels" / target.name
    if not folder.is_dir():
        pytest.fail(f"no wheels downloaded for {target.name}: run scripts/setup.sh --test")
    return folder


def _debian_version(debian_python: Path, dist: str) -> str:
    done = subprocess.run(
        [str(debian_python), "-c",
         f"import importlib.metadata as m; d = m.distribution({dist!r}); "
         "print(d.version); print(d.locate_file(''))"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    version, location = done.stdout.split()
    assert location.startswith("/usr/lib/python3/dist-packages"), (dist, location)
    return version


def test_debian_packages_meet_the_floors(debian_python: Path) -> None:
    floors = {Requirement(r).name.lower(): Requirement(r)
              for r in runtime_requirements(TARGETS[0])}
    for dist in ("numpy", "pyyaml", "pyserial-asyncio", "systemd-python", "tqdm"):
        version = _debian_version(debian_python, dist)
        assert floors[dist].specifier.contains(version), (dist, version, floors[dist])


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_the_runtime_resolves_from_debian_and_wheels(
    target: Target, debian_python: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    done = pip_resolve(target, runtime_requirements(target), debian_python=debian_python,
                       report=report, find_links=_wheels(target))
    assert done.returncode == 0, f"{target.name} ({target.note}) does not install:\n{done.stderr}"
    added = installs(report)
    assert set(added) <= FROM_PYPI, added.keys()
    assert not set(added) & FROM_DEBIAN, "pip would replace Debian's packages"
    for name, item in added.items():
        url = str(item["download_info"]["url"])  # type: ignore[index]
        assert url.startswith("file://") and url.endswith(".whl"), (name, url)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_a_tflite_runtime_resolves_where_a_wheel_exists(
    target: Target, debian_python: Path, tmp_path: Path
) -> None:
    numpy = debian_numpy(debian_python)
    chosen = None
    for cand in TFLITE_CANDIDATES:  # install.sh's order
        report = tmp_path / f"{cand}.json"
        done = pip_resolve(target, [cand], debian_python=debian_python, report=report,
                           find_links=_wheels(target), constraints=[f"numpy=={numpy}"])
        if done.returncode == 0:
            assert "numpy" not in installs(report)  # Debian's numpy stays
            chosen = cand
            break
    assert chosen == EXPECTED_TFLITE[target.name], (target.name, chosen)


def test_the_old_marker_broke_32_bit_userland_on_a_64_bit_kernel(
    debian_python: Path, tmp_path: Path
) -> None:
    """Why the runtime is no longer a dependency with a platform_machine marker."""
    target = next(t for t in TARGETS if t.name == "armhf-on-arm64")
    old = Requirement("ai-edge-litert>=1.2; platform_machine == 'x86_64' or "
                      "platform_machine == 'aarch64'")
    assert old.marker is not None and old.marker.evaluate(target.environment())
    done = pip_resolve(target, ["ai-edge-litert>=1.2"], debian_python=debian_python,
                       report=tmp_path / "r.json", find_links=_wheels(target))
    assert done.returncode != 0
    assert not any("litert" in r or "tflite" in r for r in runtime_requirements(target))


def test_the_test_venv_has_what_the_suite_needs() -> None:
    """The dev/test venv (setup.sh --test) carries a TFLite runtime for the ml tests."""
    assert importlib.metadata.version("ai-edge-litert")
