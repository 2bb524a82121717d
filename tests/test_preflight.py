"""check-config and run say what this machine cannot do: an unwritable buffer, no TFLite runtime."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import rules.mlruntime
from gateway.cli import EXIT_CONFIG, main
from gateway.config import load_config
from gateway.preflight import preflight, storage_problems
from tests.gateway_harness import config_dict, node_entry

HYDROGATE = [sys.executable, "-m", "gateway.cli"]


def write(path: Path, storage: Path, **control: object) -> Path:
    node = node_entry("tank-a", "tcp://127.0.0.1:1")
    if control:
        node["control"] = {"tds_setpoint": 700, "ph_setpoint": 6.0, **control}
    path.write_text(yaml.safe_dump(config_dict(storage, [node])))
    return path


def test_a_writable_folder_has_no_problem(tmp_path: Path) -> None:
    assert storage_problems(tmp_path / "gw.sqlite", service_user=None) == []


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    assert storage_problems(tmp_path / "nope" / "gw.sqlite", service_user=None) == [
        f"folder {tmp_path / 'nope'} does not exist (create it, owned by the service's user)"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="checks on behalf of another user need root")
def test_root_checks_for_the_service_user_too(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir(mode=0o755)
    # root may write there; "nobody" (the stand-in for the service's user) may not.
    assert storage_problems(folder / "gw.sqlite", service_user=None) == []
    assert storage_problems(folder / "gw.sqlite", service_user="nobody") == [
        f"user nobody cannot write the folder {folder}"
    ]
    os.chown(folder, 65534, 65534)
    assert storage_problems(folder / "gw.sqlite", service_user="nobody") == []
    db = folder / "gw.sqlite"
    db.write_bytes(b"")
    db.chmod(0o644)  # root's file in nobody's folder: SQLite could not write it
    assert storage_problems(db, service_user="nobody") == [
        f"user nobody cannot write the file {db}"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_check_config_as_the_user_names_the_path() -> None:
    # Outside pytest's 0700 folders, so that "nobody" can read the config.
    with tempfile.TemporaryDirectory(prefix="hydrogate-preflight-") as name:
        base = Path(name)
        base.chmod(0o755)
        folder = base / "ro"
        folder.mkdir(mode=0o755)
        config = write(base / "gw.yaml", folder / "gw.sqlite")
        config.chmod(0o644)
        _check_as_nobody(config, folder)


def _check_as_nobody(config: Path, folder: Path) -> None:
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *HYDROGATE,
         "check-config", "-c", str(config)],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert f"storage.path: user nobody cannot write the folder {folder}" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_refuses_a_storage_it_cannot_use_with_exit_2(tmp_path: Path) -> None:
    config = write(tmp_path / "gw.yaml", tmp_path / "missing" / "gw.sqlite")
    done = subprocess.run([*HYDROGATE, "run", "-c", str(config)], capture_output=True,
                          text=True, timeout=60, check=False, cwd=tmp_path.parent.parent)
    assert done.returncode == EXIT_CONFIG
    assert "cannot start:" in done.stderr and f"{tmp_path / 'missing'} does not exist" in done.stderr
    assert "check-config" in done.stderr and "Traceback" not in done.stderr


def test_run_says_what_to_fix_in_a_bad_file(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("gateway: {name: gw}\nstorage: {path: x.sqlite}\n"
                      "nodes: [{name: tank-a, url: 'tcp://127.0.0.1:1', poll_interval: -1}]\n")
    done = subprocess.run([*HYDROGATE, "run", "-c", str(config)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == EXIT_CONFIG
    assert f"cannot start: {config} has 1 error; fix it" in done.stderr
    assert "nodes[0].poll_interval" in done.stderr


def test_check_config_warns_when_ml_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path / "gw.yaml", tmp_path / "gw.sqlite", controller="ml")
    assert main(["check-config", "-c", str(config)]) == 0
    assert "ml cannot run" not in capsys.readouterr().err

    monkeypatch.setattr(rules.mlruntime, "_BACKENDS", ("no_such_tflite.interpreter",))
    assert main(["check-config", "-c", str(config)]) == 0  # a warning, not an error
    err = capsys.readouterr().err
    assert "warning: nodes[0].control.controller: ml cannot run its model on this machine" in err
    assert "no TFLite interpreter installed" in err and "node tank-a will decide with rb" in err


def test_preflight_says_nothing_about_ml_when_no_node_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules.mlruntime, "_BACKENDS", ("no_such_tflite.interpreter",))
    config = load_config(write(tmp_path / "gw.yaml", tmp_path / "gw.sqlite", controller="rb"))
    assert preflight(config, service_user=None) == []
