"""The machines hydrogate installs on, and pip's resolution of its dependencies for each.

A target is an interpreter, not a board: CPython 3.11 of Debian 12 / Raspberry Pi
OS bookworm (glibc 2.36) with the wheel tags pip computes there. What Debian
packages (numpy, PyYAML, pyserial-asyncio, systemd-python, tqdm) is taken from the
Debian venv given (``--system-site-packages`` over Debian's own python3 with those
packages installed), exactly as scripts/install.sh builds the release venv, so
pip treats them as installed; the rest must come as wheels for the target.

Run with network by ``scripts/setup.sh --test``::

    python tests/install_targets.py download .cache/install DEBIAN_VENV

which resolves every target online and downloads the wheels chosen into
``.cache/install/wheels/<target>``. The tests then resolve again with
``--no-index`` from that folder only: a target whose wheels are missing (none
exists, or the download failed) fails its test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
#: bookworm's glibc: pip on the target accepts manylinux_2_17 ... manylinux_2_36.
GLIBC_MINOR = 36
#: The TFLite runtimes scripts/install.sh tries, in its order.
TFLITE_CANDIDATES = ("tflite-runtime", "ai-edge-litert")
#: Requirements that only build hydrogate's wheel (pyproject's build-system).
BUILD_REQUIREMENTS = ("setuptools>=77",)


@dataclass(frozen=True)
class Target:
    """One interpreter to install on: what ``uname -m`` says and the wheel tags pip accepts."""

    name: str
    machine: str  # platform_machine in markers: the kernel's uname -m
    archs: tuple[str, ...]  # wheel architectures, most specific first
    note: str

    def platforms(self) -> list[str]:
        """``--platform`` values: manylinux_2_36 down to 2_17, the legacy aliases, linux_*."""
        tags: list[str] = []
        for arch in self.archs:
            tags += [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, 16, -1)]
            tags.append(f"manylinux2014_{arch}")
            if arch == "x86_64":
                tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
        tags += [f"linux_{arch}" for arch in self.archs]
        return tags

    def environment(self) -> dict[str, str]:
        """The marker environment of the target interpreter."""
        return {
            "implementation_name": "cpython",
            "implementation_version": "3.11.2",
            "os_name": "posix",
            "platform_machine": self.machine,
            "platform_python_implementation": "CPython",
            "platform_system": "Linux",
            "python_full_version": "3.11.2",
            "python_version": "3.11",
            "sys_platform": "linux",
        }


TARGETS: tuple[Target, ...] = (
    Target("amd64", "x86_64", ("x86_64",), "Debian 12 on a PC or VM"),
    Target("aarch64", "aarch64", ("aarch64",), "64-bit Raspberry Pi OS (Pi 3/4/5, Zero 2)"),
    Target("armv7l", "armv7l", ("armv7l",), "32-bit Raspberry Pi OS on a 32-bit kernel"),
    # 32-bit Python on a 64-bit kernel: uname -m (and so platform_machine) says
    # aarch64 but no aarch64 wheel runs; pip (packaging >= 24.1) asks for armv8l,
    # then armv7l, wheels; older pip for armv7l only.
    Target("armhf-on-arm64", "aarch64", ("armv8l", "armv7l"),
           "32-bit Raspberry Pi OS on a 64-bit kernel (the default on a Pi 4/5 until 2024)"),
)


def runtime_requirements(target: Target, extras: Iterable[str] = ("systemd",)) -> list[str]:
    """hydrogate's run-time requirements (and ``extras``) that apply on ``target``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    env = target.environment()
    kept = []
    for text in wanted:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            kept.append(str(req))
    return kept


def pip_resolve(
    target: Target,
    requirements: Iterable[str],
    *,
    debian_python: Path,
    report: Path,
    find_links: Path | None = None,
    constraints: Iterable[str] = (),
) -> subprocess.CompletedProcess[str]:
    """``pip install --dry-run --report`` for ``target`` against the Debian venv's packages.

    With ``find_links`` pip looks nowhere else (offline); without it, it asks the index.
    """
    cmd = [sys.executable, "-m", "pip", "--python", str(debian_python), "install",
           "--dry-run", "--quiet", "--report", str(report), *target_flags(target)]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    if constraints:
        constraint_file = report.with_suffix(".constraints.txt")
        constraint_file.write_text("".join(f"{c}\n" for c in constraints))
        cmd += ["--constraint", str(constraint_file)]
    cmd += list(requirements)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def target_flags(target: Target) -> list[str]:
    """pip's options that make it choose wheels for ``target`` (and never build one)."""
    flags = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
             "--abi", "cp311", "--abi", "abi3", "--abi", "none",
             "--disable-pip-version-check", "--no-input"]
    for tag in target.platforms():
        flags += ["--platform", tag]
    return flags


def installs(report: Path) -> dict[str, Mapping[str, object]]:
    """What a pip report says would be installed: normalised name -> its report item."""
    data = json.loads(report.read_text())
    return {item["metadata"]["name"].lower().replace("_", "-").replace(".", "-"): item
            for item in data["install"]}


def download_url(item: Mapping[str, object]) -> str:
    """Where pip would fetch one item of its report from."""
    info = item["download_info"]
    if not isinstance(info, Mapping):
        raise TypeError(f"pip report item without download_info: {item!r}")
    return str(info["url"])


def debian_numpy(debian_python: Path) -> str:
    """The numpy version of the Debian venv (install.sh pins it while adding a runtime)."""
    return subprocess.run(
        [str(debian_python), "-c", "import numpy; print(numpy.__version__)"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()


def _download(target: Target, urls: Iterable[str], dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    failed = []
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        if (dest / name).exists():
            continue
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             *target_flags(target), "--dest", str(dest), url],
            capture_output=True, text=True, timeout=600, check=False,
        )
        if done.returncode != 0:
            failed.append(f"{name}: {done.stderr.strip()[-300:]}")
    return failed


def download(cache: Path, debian_python: Path) -> int:
    """Resolve every target online and fetch the wheels chosen; 0 when all resolved."""
    problems = []
    numpy = debian_numpy(debian_python)
    reports = cache / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    build = cache / "wheels" / "build"
    problems += _download_requirements(BUILD_REQUIREMENTS, build)
    for target in TARGETS:
        jobs = [("runtime", runtime_requirements(target))]
        jobs += [(cand, [cand]) for cand in TFLITE_CANDIDATES]
        for label, reqs in jobs:
            report = reports / f"{target.name}-{label}.json"
            done = pip_resolve(target, reqs, debian_python=debian_python, report=report,
                               constraints=[f"numpy=={numpy}"])
            if done.returncode != 0:
                # A TFLite runtime may well not exist for a target: the tests say
                # which must; the run-time requirements must resolve everywhere.
                text = f"{target.name} {label}: {done.stderr.strip()[-300:]}"
                if label == "runtime":
                    problems.append(text)
                else:
                    print(f"install_targets: (expected for some targets) {text}",
                          file=sys.stderr)
                continue
            urls = [download_url(item) for item in installs(report).values()]
            problems += _download(target, urls, cache / "wheels" / target.name)
    for problem in problems:
        print(f"install_targets: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _download_requirements(requirements: Iterable[str], dest: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         "--dest", str(dest), *requirements],
        capture_output=True, text=True, timeout=600, check=False,
    )
    return [] if done.returncode == 0 else [f"build: {done.stderr.strip()[-300:]}"]


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "download":
        sys.exit("usage: install_targets.py download CACHE DEBIAN_VENV_PYTHON")
    sys.exit(download(Path(sys.argv[2]), Path(sys.argv[3])))
