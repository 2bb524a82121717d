"""Installed size of the runtime: today's release venv against the venv of an older revision.

    .venv/bin/python -m bench.install_size --before 2f7f65a

*After*: ``scripts/install.sh`` as on a Pi, inside a systemd namespace
(tests/systemd_harness.py), with the network; the size of the release venv
(``du -sm``) and of the Debian packages it relies on (their ``Installed-Size``,
shared with the rest of the system).

*Before* (``--before REV``): that revision's install, which ran ``scripts/setup.sh``
(a venv of Debian's python3 without system site packages, ``pip install -e
.[systemd]``), rebuilt the same way in a temporary folder.

Needs root and the network. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.systemd_harness import SystemdNamespace

ROOT = Path(__file__).resolve().parent.parent
DEBIAN = ("python3-numpy", "python3-yaml", "python3-serial", "python3-serial-asyncio",
          "python3-systemd", "libblas3", "liblapack3", "libgfortran5")


def du_mib(path: Path | str) -> int:
    """``du -sm`` of a folder, in MiB."""
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def debian_kib() -> dict[str, int]:
    """Installed-Size (KiB) of the Debian packages the release relies on."""
    sizes = {}
    for pkg in DEBIAN:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Installed-Size}", pkg],
                              capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip():
            sizes[pkg] = int(done.stdout)
    return sizes


def after() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="hydrogate-size-") as tmp:
        ns = SystemdNamespace(Path(tmp) / "ns")
        ns.start()
        try:
            done = ns.run([str(ROOT / "scripts" / "install.sh")], check=False, timeout=900)
            if done.returncode != 0:
                sys.exit(f"install.sh failed:\n{done.stdout}\n{done.stderr}")
            release = ns.run(["readlink", "-f", "/opt/hydrogate/venv"]).stdout.strip()
            venv = int(ns.run(["du", "-sm", release + "/"]).stdout.split()[0])
            top = ns.run(["sh", "-c", f"du -sm {release}/lib/python3*/site-packages/* | sort -n"
                          " | tail -5"]).stdout.split("\n")
        finally:
            ns.stop()
    debian = debian_kib()
    return {"release_venv_mib": venv, "largest": [t for t in top if t],
            "debian_packages_mib": round(sum(debian.values()) / 1024, 1), "debian": debian}


def before(rev: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="hydrogate-before-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        venv = src / ".venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "-e", ".[systemd]"], cwd=src, check=True)
        top = subprocess.run(
            ["sh", "-c", f"du -sm {venv}/lib/python3*/site-packages/* | sort -n | tail -5"],
            capture_output=True, text=True, check=True).stdout.split("\n")
        return {"rev": rev, "venv_mib": du_mib(venv), "largest": [t for t in top if t]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", metavar="REV", help="also measure this revision's venv")
    args = parser.parse_args()
    result: dict[str, object] = {"after": after()}
    if args.before:
        result["before"] = before(args.before)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
