"""The firmware under MicroPython: mpy-cross syntax, and the protocol core byte for byte.

The protocol core (firmware/nlframe.py, nlnode.py, nlconfig.py, nlsense.py)
runs the conformance table tests/data/nodelink_conformance.json -- frames in,
frames and pin changes out -- under the official MicroPython WebAssembly
port and under CPython; both must give exactly the table's frames. The table
goes through the places where the two runtimes differ (a trailing comma that
MicroPython's json takes, invalid UTF-8 without UnicodeDecodeError, NaN,
integers beyond 64 bits, dict order of the replies), and
``test_the_runtimes_really_differ`` checks that they still do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drivers.nodelink import Event, Reply, decode
from tests.mpy_runtime import (
    ESP32_HEAP,
    FIRMWARE,
    MPY_DIR,
    ROOT,
    mpy_cross,
    run_cpython,
    run_micropython,
)

TABLE = ROOT / "tests" / "data" / "nodelink_conformance.json"
CORE = [FIRMWARE / n for n in ("nlframe.py", "nlnode.py", "nlconfig.py", "nlsense.py")]
HARDWARE_MODULES = {"machine", "network", "onewire", "ds18x20", "dht", "socket", "select"}
RUN_TABLE = "import conformance\nconformance.main(%r)\n"


def expected_lines() -> list[str]:
    table = json.loads(TABLE.read_text())
    lines = [
        json.dumps({"out": s["out"], "pins": s["pins"]}, separators=(",", ":"), ensure_ascii=True)
        for s in table["steps"]
    ]
    lines.append(json.dumps({"bad": table["bad"]}, separators=(",", ":"), sort_keys=True))
    return lines


def test_every_firmware_file_compiles_with_the_pinned_mpy_cross(tmp_path: Path) -> None:
    files = sorted(FIRMWARE.glob("*.py"))
    assert {f.name for f in files} >= {"main.py", "app.py", "hw.py", "net.py", *(c.name for c in CORE)}
    for source in files:
        proc = mpy_cross(source, tmp_path / (source.stem + ".mpy"))
        assert proc.returncode == 0, f"{source.name}: {proc.stderr}"
        assert (tmp_path / (source.stem + ".mpy")).read_bytes()[:2] == b"M\x06"


def test_mpy_cross_rejects_cpython_only_syntax(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x):\n    match x:\n        case 1:\n            return 2\n")
    proc = mpy_cross(bad, tmp_path / "bad.mpy")
    assert proc.returncode != 0 and "SyntaxError" in proc.stderr


def test_the_protocol_core_imports_no_hardware() -> None:
    import ast

    for path in CORE:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {node.module or ""}
            else:
                continue
            assert not names & HARDWARE_MODULES, f"{path.name} imports {names}"


def test_crc_check_value_in_both_runtimes() -> None:
    code = "from nlframe import crc16\nprint('%04X' % crc16(b'123456789'))\n"
    assert run_micropython(code, [FIRMWARE / "nlframe.py"]).strip() == "29B1"
    assert run_cpython(code, [FIRMWARE]).strip() == "29B1"


def test_conformance_table_under_cpython() -> None:
    out = run_cpython(RUN_TABLE % str(TABLE), [FIRMWARE, MPY_DIR]).splitlines()
    assert out == expected_lines()


def test_conformance_table_under_micropython_in_an_esp32_sized_heap() -> None:
    files = [*CORE[:2], MPY_DIR / "conformance.py", TABLE]
    code = RUN_TABLE % ("/fw/" + TABLE.name)
    out = run_micropython(code, files, heap=ESP32_HEAP).splitlines()
    assert out == expected_lines()


def test_every_frame_the_table_expects_is_valid_for_the_gateway_codec() -> None:
    table = json.loads(TABLE.read_text())
    replies = events = 0
    for step in table["steps"]:
        for text in step["out"]:
            raw = text.encode()
            assert raw.endswith(b"\n") and raw[-5:-1] == raw[-5:-1].upper()
            msg = decode(raw[:-1])
            replies += type(msg) is Reply
            events += type(msg) is Event
    assert replies > 30 and events > 10


def test_the_runtimes_really_differ() -> None:
    """The table's tricky inputs matter only while MicroPython really behaves differently."""
    code = (
        "import json\n"
        "print(json.loads('{\"a\":1,}'))\n"
        "print(json.dumps(float('nan')))\n"
        "try:\n    b'\\xff'.decode()\nexcept Exception as e:\n    print(type(e).__name__)\n"
        "d = {}\nfor k in ('ok', 'id', 'values', 'uptime_ms', 'error'):\n    d[k] = 1\n"
        "print(list(d) == ['ok', 'id', 'values', 'uptime_ms', 'error'])\n"
        "print(isinstance(True, int))\n"
    )
    mp = run_micropython(code, []).splitlines()
    assert mp == ["{'a': 1}", "nan", "UnicodeError", "False", "False"]
    with pytest.raises(ValueError):
        json.loads('{"a":1,}')
    assert json.dumps(float("nan")) == "NaN"


def test_config_validation_is_the_same_in_both_runtimes() -> None:
    code = "import config_cases\nconfig_cases.main()\n"
    files = [FIRMWARE / "nlframe.py", FIRMWARE / "nlconfig.py", MPY_DIR / "config_cases.py"]
    mp = run_micropython(code, files)
    cp = run_cpython(code, [FIRMWARE, MPY_DIR])
    assert mp == cp
    assert "GPIO 25 is on ADC2" in cp and "strapping pin" in cp and "not valid JSON" in cp


def test_sensor_arithmetic_is_the_same_in_both_runtimes() -> None:
    code = (
        "import nlsense as s\n"
        "print('%02X' % s.sht_crc8(b'\\xbe\\xef'))\n"
        "print(s.sht_convert(bytes([0x66, 0x66, s.sht_crc8(bytes([0x66, 0x66])), 0x80, 0x00,"
        " s.sht_crc8(bytes([0x80, 0x00]))])))\n"
        "print(s.sht_convert(b'\\x66\\x66\\x00\\x80\\x00\\x00'))\n"
        "print(s.median([5, 1, 4, 2, 3]), s.level_litres(s.echo_to_cm(1160), 40, 0.5, 15))\n"
        "print(s.float_litres(0, True, 2.0, 0.8), s.ds_valid(85.0, True), s.ds_valid(85.0, False))\n"
    )
    mp = run_micropython(code, [FIRMWARE / "nlsense.py"])
    assert mp == run_cpython(code, [FIRMWARE])
    assert mp.splitlines()[0] == "92"  # the Sensirion datasheet's example
