"""gateway/config.py: the CONTRACT example, every error with its path, presets, updates."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import (
    CONTROLLER_NAMES,
    RUNTIME_KEYS,
    CalibrationMap,
    Config,
    ConfigError,
    ControlConfig,
    FrozenMap,
    GatewayConfig,
    NodeConfig,
    PlantConfig,
    SafetyConfig,
    StorageConfig,
    ThingsBoardConfig,
    apply_control_update,
    control_settings,
    load_config,
    parse_config,
    summarize,
)
from gateway.crops import CROPS, find_crop

REPO = Path(__file__).resolve().parent.parent

# The configuration example of the outer contract (docs/configuration.md), verbatim.
CONTRACT_YAML = """\
gateway:
  name: greenhouse-1            # the gateway's own device name in ThingsBoard
storage:
  path: /var/lib/hydrogate/hydrogate.sqlite
thingsboard:                    # optional: without it the gateway runs offline and only buffers
  host: thingsboard.example.com
  port: 8883                    # default 1883, or 8883 when tls is true
  access_token: "..."           # the MQTT username; or access_token_file: /etc/hydrogate/token
  tls: true                     # default false; ca_file: optional
  max_payload_bytes: 65536      # largest MQTT message (default: ThingsBoard's 65536)
nodes:
  - name: tank-a                # the device name in ThingsBoard
    url: tcp://192.168.1.50:3333          # or serial:///dev/ttyUSB0?baud=115200
    poll_interval: 5            # seconds, may be fractional
    calibration:                # optional; without it values pass through unchanged
      tds: {source: tds_v, poly: [913.98, -2556.2, 2437, -416.27, 69.331], valid: [0.04, 1.58], temp_coefficient: 0.02}
      ph:  {source: ph_adc, poly: [0.0025, 3.9926]}
    plant:                      # optional; what controllers that compute doses need
      tank_volume_l: 10
      stock_ppm: 10000
      flow_ml_s: {nutrient: 1.58, ph_up: 1.58, ph_down: 1.58, refill: 1.58}
    control:                    # optional: without it the node is only monitored
      mode: auto                # auto | manual (default auto)
      controller: fuzzy         # fuzzy | rb | ml (default fuzzy; ml falls back to rb on any failure)
      tds_setpoint: 800         # ppm  } required unless `crop` gives them
      ph_setpoint: 6.0          #      }
      crop: lettuce             # optional preset of setpoints and bands
      tds_tolerance_pct: 5      # band that counts as on target (default 5)
      ph_tolerance: 0.15        # (default 0.15)
      schedule: ["09:00", "15:00", "21:00"]   # local times of day at which a control cycle starts (default [])
      interval: 30              # seconds between control evaluations in auto mode (0 = schedule only; default 30)
    safety:
      max_actuation_ms: 120000  # longest single run of any actuator (default 120000)
      max_ms_per_hour: 600000   # per actuator, rolling hour (default 600000)
"""  # noqa: E501


def base() -> dict[str, Any]:
    """A valid config with two nodes, to be broken one key at a time."""
    data: dict[str, Any] = yaml.safe_load(CONTRACT_YAML)
    data["nodes"].append(
        {"name": "tank-b", "url": "serial:///dev/ttyUSB0", "control": {"crop": "lettuce"}}
    )
    return data


def changed(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy with the value at a dotted path (``nodes.1.control.ph_setpoint``) replaced;
    the value ``DELETE`` removes the key instead."""
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    target: Any = data
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
    index: Any = int(last) if isinstance(target, list) else last
    if value is DELETE:
        del target[index]
    else:
        target[index] = value
    return data


DELETE = object()


def errors_of(data: Any, **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, **kwargs)
    return info.value.errors


# --- the CONTRACT example ----------------------------------------------------------------------


def test_contract_example_parses_to_the_expected_dataclasses() -> None:
    config = parse_config(yaml.safe_load(CONTRACT_YAML))
    assert config == Config(
        gateway=GatewayConfig(name="greenhouse-1", health_interval=60.0),
        storage=StorageConfig(path=Path("/var/lib/hydrogate/hydrogate.sqlite")),
        thingsboard=ThingsBoardConfig(
            host="thingsboard.example.com",
            access_token="...",
            port=8883,
            tls=True,
            max_payload_bytes=65536,
        ),
        nodes=(
            NodeConfig(
                name="tank-a",
                url="tcp://192.168.1.50:3333",
                poll_interval=5.0,
                calibration=FrozenMap(
                    {
                        "tds": CalibrationMap(
                            "tds",
                            "tds_v",
                            (913.98, -2556.2, 2437.0, -416.27, 69.331),
                            (0.04, 1.58),
                            0.02,
                        ),
                        "ph": CalibrationMap("ph", "ph_adc", (0.0025, 3.9926)),
                    }
                ),
                plant=PlantConfig(),
                control=ControlConfig(
                    tds_setpoint=800.0,
                    ph_setpoint=6.0,
                    controller="fuzzy",
                    crop="lettuce",
                    tds_band=(400.0, 600.0),  # the table's 560-840 are ppm on the 700 scale
                    ph_band=(6.0, 7.0),
                    schedule=(datetime.time(9), datetime.time(15), datetime.time(21)),
                    interval=30.0,
                ),
                safety=SafetyConfig(),
            ),
        ),
    )
    hash(config)  # frozen all the way down, mappings included
    assert isinstance(config.nodes[0].control.tds_setpoint, float)  # type: ignore[union-attr]


def test_defaults_when_sections_are_left_out() -> None:
    config = parse_config(
        {
            "gateway": {"name": "gw"},
            "storage": {"path": "buffer.sqlite"},
            "nodes": [{"name": "n", "url": "tcp://10.0.0.2"}],
        }
    )
    assert config.thingsboard is None
    node = config.nodes[0]
    assert node == NodeConfig(name="n", url="tcp://10.0.0.2:3333")
    assert (node.timeout, node.retries, node.keepalive) == (1.0, 2, 10.0)
    assert node.plant is None and node.control is None and len(node.calibration) == 0
    assert config.storage == StorageConfig(Path("buffer.sqlite"), 2_000_000, None, 0.02)


def test_tls_changes_the_default_port() -> None:
    tb = {"host": "tb.local", "access_token": "t"}
    data = changed(base(), "thingsboard", tb)
    assert parse_config(data).thingsboard.port == 1883  # type: ignore[union-attr]
    data = changed(base(), "thingsboard", {**tb, "tls": True})
    assert parse_config(data).thingsboard.port == 8883  # type: ignore[union-attr]


def test_the_token_stays_out_of_repr() -> None:
    config = parse_config(changed(base(), "thingsboard.access_token", "s3cret-token"))
    assert config.thingsboard is not None and config.thingsboard.access_token == "s3cret-token"
    assert "s3cret-token" not in repr(config)


def test_frozen() -> None:
    config = parse_config(base())
    with pytest.raises(AttributeError):
        config.gateway.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.nodes[0].calibration["x"] = None  # type: ignore[index]


# --- one bad value, one error with its exact path ----------------------------------------------

BAD = [
    ("nodes.1.control.ph_setpoint", 9.5, "nodes[1].control.ph_setpoint", "must be between 3 and 9"),
    (
        "nodes.1.control.ph_setpoint",
        "6.0",
        "nodes[1].control.ph_setpoint",
        "must be a number, not a string",
    ),
    (
        "nodes.0.control.tds_setpoint",
        True,
        "nodes[0].control.tds_setpoint",
        "must be a number, not a boolean",
    ),
    (
        "nodes.0.control.tds_setpoint",
        20,
        "nodes[0].control.tds_setpoint",
        "must be between 50 and 5000",
    ),
    ("thingsboard.port", 70000, "thingsboard.port", "must be between 1 and 65535"),
    ("thingsboard.port", True, "thingsboard.port", "must be an integer, not a boolean"),
    ("thingsboard.port", 88.5, "thingsboard.port", "must be an integer, not a number"),
    ("thingsboard.tls", "yes", "thingsboard.tls", "must be true or false, not a string"),
    (
        "thingsboard.host",
        "mqtt://tb.example.com",
        "thingsboard.host",
        "must be a host name, not a URL: 'mqtt://tb.example.com'",
    ),
    (
        "thingsboard.host",
        "tb example",
        "thingsboard.host",
        "must be a host name or IP address, not 'tb example'",
    ),
    (
        "thingsboard.max_payload_bytes",
        100,
        "thingsboard.max_payload_bytes",
        "must be between 1024 bytes and 268435455 bytes",
    ),
    ("thingsboard.keepalive", 0, "thingsboard.keepalive", "must be between 1 s and 65535 s"),
    ("thingsboard.access_token", "   ", "thingsboard.access_token", "must not be empty"),
    (
        "thingsboard.access_token",
        DELETE,
        "thingsboard.access_token",
        "is required (or access_token_file)",
    ),
    (
        "thingsboard.access_token_file",
        "/tmp/t",
        "thingsboard.access_token_file",
        "give access_token or this, not both",
    ),
    (
        "thingsboard.ca_file",
        "/nonexistent/ca.pem",
        "thingsboard.ca_file",
        "/nonexistent/ca.pem does not exist",
    ),
    ("gateway.name", DELETE, "gateway.name", "is required"),
    ("gateway.name", "tank-a", "nodes[0].name", "is the gateway's own name (gateway.name)"),
    (
        "gateway.health_interval",
        "1d",
        "gateway.health_interval",
        "must be a duration such as 5, 500ms, 5s, 2min or 1h; not '1d'",
    ),
    ("storage.path", DELETE, "storage.path", "is required"),
    ("storage.path", 5, "storage.path", "must be a string, not an integer"),
    ("storage.path", "/tmp", "storage.path", "/tmp is a directory, not a file"),
    (
        "storage.path",
        "~nosuchuser/b.sqlite",
        "storage.path",
        "cannot expand '~nosuchuser/b.sqlite': no such home directory",
    ),
    (
        "storage.max_bytes",
        "lots",
        "storage.max_bytes",
        "must be a size such as 65536, 500MB or 2GiB; not 'lots'",
    ),
    ("storage.max_bytes", 1000, "storage.max_bytes", "must be at least 1048576 bytes"),
    ("storage.sync_interval", -1, "storage.sync_interval", "must be between 0 s and 3600 s"),
    ("storage.clock_sync_wait", 700000, "storage.clock_sync_wait",
     "must be between 0 s and 604800 s"),
    ("storage.max_rows", 0, "storage.max_rows", "must be between 1 and 1000000000"),
    ("nodes", [], "nodes", "must list at least one node"),
    ("nodes", {"name": "x"}, "nodes", "must be a list of nodes"),
    ("nodes", DELETE, "nodes", "is required (a list of nodes)"),
    ("nodes.1.name", "tank-a", "nodes[1].name", "repeats the name of nodes[0]"),
    ("nodes.0.name", "", "nodes[0].name", "must not be empty"),
    ("nodes.0.name", "x" * 256, "nodes[0].name", "must be at most 255 characters long (is 256)"),
    ("nodes.0.name", " tank", "nodes[0].name", "must not start or end with whitespace"),
    ("nodes.0.name", "tank\n", "nodes[0].name", "must not contain control characters"),
    (
        "nodes.0.url",
        "http://x:1",
        "nodes[0].url",
        "unknown transport scheme (known: serial://, tcp://)",
    ),
    (
        "nodes.0.url",
        "tcp://10.0.0.1:70000",
        "nodes[0].url",
        "has a bad port: Port out of range 0-65535",
    ),
    ("nodes.0.url", "tcp://10.0.0.1:0", "nodes[0].url", "port must be between 1 and 65535, not 0"),
    ("nodes.0.url", "tcp://:3333", "nodes[0].url", "needs a host: tcp://host:port"),
    (
        "nodes.0.url",
        "tcp://10.0.0.1:3333/x",
        "nodes[0].url",
        "must be tcp://host:port with nothing else",
    ),
    (
        "nodes.0.url",
        "serial://dev/ttyUSB0",
        "nodes[0].url",
        "needs an absolute device path: serial:///dev/ttyUSB0 (three slashes)",
    ),
    (
        "nodes.0.url",
        "serial:///dev/ttyUSB0?baud=12345",
        "nodes[0].url",
        "baud must be one of 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, "
        "460800, 921600; not '12345'",
    ),
    (
        "nodes.0.url",
        "serial:///dev/ttyUSB0?bad=9600",
        "nodes[0].url",
        "unknown serial option 'bad' (did you mean 'baud'?)",
    ),
    (
        "nodes.0.poll_interval",
        0,
        "nodes[0].poll_interval",
        "must be more than 0 s and at most 3600 s",
    ),
    (
        "nodes.0.poll_interval",
        "fast",
        "nodes[0].poll_interval",
        "must be a duration such as 5, 500ms, 5s, 2min or 1h; not 'fast'",
    ),
    (
        "nodes.0.poll_interval",
        "5m",
        "nodes[0].poll_interval",
        "must be a duration such as 5, 500ms, 5s, 2min or 1h; not '5m'",
    ),
    (
        "nodes.0.poll_interval",
        None,
        "nodes[0].poll_interval",
        "must be a duration in seconds (or 500ms, 2min), not null",
    ),
    ("nodes.0.retries", 2.5, "nodes[0].retries", "must be an integer, not a number"),
    ("nodes.0.keepalive", 30, "nodes[0].keepalive", "must be more than 0 s and less than 30 s"),
    (
        "nodes.0.calibration.tds.poly",
        [],
        "nodes[0].calibration.tds.poly",
        "must have 1 to 10 coefficients, not 0",
    ),
    (
        "nodes.0.calibration.tds.poly",
        [1, "a"],
        "nodes[0].calibration.tds.poly[1]",
        "must be a number, not a string",
    ),
    (
        "nodes.0.calibration.tds.poly",
        [1, float("nan")],
        "nodes[0].calibration.tds.poly[1]",
        "must be a finite number",
    ),
    (
        "nodes.0.calibration.tds.poly",
        DELETE,
        "nodes[0].calibration.tds.poly",
        "is required (or points)",
    ),
    (
        "nodes.0.calibration.tds.valid",
        [1.58, 0.04],
        "nodes[0].calibration.tds.valid",
        "must be [low, high] with low < high, not [1.58, 0.04]",
    ),
    (
        "nodes.0.calibration.tds.valid",
        [1],
        "nodes[0].calibration.tds.valid",
        "must be a pair [low, high], not 1 numbers",
    ),
    (
        "nodes.0.calibration.tds.temp_coefficient",
        0.5,
        "nodes[0].calibration.tds.temp_coefficient",
        "must be between 0 and 0.1",
    ),
    (
        "nodes.0.calibration.tds.source",
        "tds v",
        "nodes[0].calibration.tds.source",
        "must be a key of letters, digits and '_' starting with a letter: 'tds v'",
    ),
    (
        "nodes.0.calibration.tds.points",
        [[0, 0], [1, 1]],
        "nodes[0].calibration.tds",
        "give poly or points, not both",
    ),
    ("nodes.0.calibration.tds", "x", "nodes[0].calibration.tds", "must be a mapping, not a string"),
    (
        "nodes.0.calibration.t-d-s",
        {"source": "tds_v", "poly": [1]},
        "nodes[0].calibration.t-d-s",
        "must be a key of letters, digits and '_' starting with a letter: 't-d-s'",
    ),
    (
        "nodes.0.plant.tank_volume_l",
        0,
        "nodes[0].plant.tank_volume_l",
        "must be more than 0 L and at most 100000 L",
    ),
    (
        "nodes.0.plant.flow_ml_s.refill",
        0,
        "nodes[0].plant.flow_ml_s.refill",
        "must be more than 0 ml/s and at most 1000 ml/s",
    ),
    (
        "nodes.0.plant.flow_ml_s.nutrent",
        1.0,
        "nodes[0].plant.flow_ml_s.nutrent",
        "unknown key (did you mean 'nutrient'?)",
    ),
    (
        "nodes.0.control.mode",
        "automatic",
        "nodes[0].control.mode",
        "must be one of auto, manual; not 'automatic'",
    ),
    (
        "nodes.0.control.mode",
        True,
        "nodes[0].control.mode",
        "must be one of auto, manual; not a boolean",
    ),
    (
        "nodes.0.control.controller",
        "pid",
        "nodes[0].control.controller",
        "must be one of fuzzy, rb, ml, adaptive, closeloop, mamdani; not 'pid'",
    ),
    (
        "nodes.0.control.crop",
        "letuce",
        "nodes[0].control.crop",
        "is not a known crop (did you mean 'lettuce'?); known: " + ", ".join(CROPS),
    ),
    (
        "nodes.0.control.tds_tolerance_pct",
        0,
        "nodes[0].control.tds_tolerance_pct",
        "must be more than 0 and at most 50",
    ),
    (
        "nodes.0.control.ph_tolerance",
        2.5,
        "nodes[0].control.ph_tolerance",
        "must be more than 0 and at most 2",
    ),
    (
        "nodes.0.control.schedule",
        ["25:00"],
        "nodes[0].control.schedule[0]",
        "must be a time of day \"HH:MM\" (00:00 to 23:59), not '25:00'",
    ),
    (
        "nodes.0.control.schedule",
        ["09:00", 900],
        "nodes[0].control.schedule[1]",
        'must be a time of day "HH:MM" in quotes, not the number 900',
    ),
    (
        "nodes.0.control.schedule",
        ["09:00", "9:00"],
        "nodes[0].control.schedule[1]",
        "repeats 09:00",
    ),
    (
        "nodes.0.control.schedule",
        {"a": 1},
        "nodes[0].control.schedule",
        'must be a list of times "HH:MM", not a mapping',
    ),
    (
        "nodes.0.control.interval",
        0.5,
        "nodes[0].control.interval",
        "must be 0 (schedule only) or between 1 s and 86400 s",
    ),
    (
        "nodes.0.control.rb_variant",
        "mid",
        "nodes[0].control.rb_variant",
        "must be one of band, target, documented; not 'mid'",
    ),
    (
        "nodes.0.control.tds_average_s",
        0,
        "nodes[0].control.tds_average_s",
        "must be between 1 s and 600 s",
    ),
    (
        "nodes.0.control.max_cycle_s",
        300,
        "nodes[0].control.max_cycle_s",
        "must be at least tds_hold_s + ph_hold_s (480 s), or no cycle could ever finish",
    ),
    ("nodes.0.control.crop", DELETE, "nodes[0].control.crop", None),  # still valid: setpoints given
    (
        "nodes.1.control",
        {"tds_setpoint": 700},
        "nodes[1].control.ph_setpoint",
        "is required (or give a crop)",
    ),
    (
        "nodes.0.control.contrller",
        "rb",
        "nodes[0].control.contrller",
        "unknown key (did you mean 'controller'?)",
    ),
    (
        "nodes.0.safety.max_actuation_ms",
        0,
        "nodes[0].safety.max_actuation_ms",
        "must be between 1 ms and 600000 ms",
    ),
    (
        "nodes.0.safety.max_actuation_ms",
        "1.0005s",
        "nodes[0].safety.max_actuation_ms",
        "must be a whole number of milliseconds, not '1.0005s'",
    ),
    (
        "nodes.0.safety.max_ms_per_hour",
        60000,
        "nodes[0].safety.max_ms_per_hour",
        "must be at least max_actuation_ms (120000 ms)",
    ),
    (
        "nodes.0.safety.stale_after_s",
        5,
        "nodes[0].safety.stale_after_s",
        "must be more than poll_interval (5 s)",
    ),
    (
        "nodes.0.safety.stuck_after_s",
        2,
        "nodes[0].safety.stuck_after_s",
        "must be 0 (off) or more than poll_interval (5 s)",
    ),
    ("nodes.0.safety.ph_range", [5, 20], "nodes[0].safety.ph_range[1]", "must be between 0 and 14"),
    (
        "nodes.0.safety.tds_range",
        [0, 700],
        "nodes[0].control.tds_setpoint",
        "800 ppm is outside safety.tds_range [0, 700]",
    ),
    ("nodes.0.safety", [], "nodes[0].safety", "must be a mapping, not a list"),
    (
        "nodes.0.control.schedule",
        "09:00,25:61",
        "nodes[0].control.schedule[1]",
        "must be a time of day \"HH:MM\" (00:00 to 23:59), not '25:61'",
    ),
    ("extra", 1, "extra", "unknown key"),
]


@pytest.mark.parametrize(
    ("key", "value", "path", "message"), BAD, ids=[f"{b[0]}={b[1]!r}"[:60] for b in BAD]
)
def test_one_bad_value_gives_one_error_with_its_path(
    key: str, value: Any, path: str, message: str | None
) -> None:
    data = changed(base(), key, value)
    if message is None:
        parse_config(data)
    else:
        assert errors_of(data) == [(path, message)]


def test_a_whole_bad_config_reports_every_error_in_order() -> None:
    data = base()
    data["gateway"]["nam"] = "x"
    data["thingsboard"]["port"] = -1
    data["nodes"][0]["contrl"] = {}
    data["nodes"][0]["control"]["ph_setpoint"] = 12
    data["nodes"][1]["control"]["schedule"] = ["9", "10:00", "10:00"]
    data["nodes"][1]["poll_interval"] = "-1s"
    errors = errors_of(data)
    assert errors == [
        ("gateway.nam", "unknown key (did you mean 'name'?)"),
        ("thingsboard.port", "must be between 1 and 65535"),
        ("nodes[0].control.ph_setpoint", "must be between 3 and 9"),
        ("nodes[0].contrl", "unknown key (did you mean 'control'?)"),
        (
            "nodes[1].poll_interval",
            "must be a duration such as 5, 500ms, 5s, 2min or 1h; not '-1s'",
        ),
        (
            "nodes[1].control.schedule[0]",
            "must be a time of day \"HH:MM\" (00:00 to 23:59), not '9'",
        ),
        ("nodes[1].control.schedule[2]", "repeats 10:00"),
    ]
    text = str(ConfigError(errors))
    assert text.splitlines()[2] == "nodes[0].control.ph_setpoint: must be between 3 and 9"
    assert len(text.splitlines()) == len(errors)


@pytest.mark.parametrize(
    ("data", "kind"), [(None, None), ([], "a list"), ("gateway: x", "a string"), (5, "an integer")]
)
def test_not_a_mapping(data: Any, kind: str | None) -> None:
    errors = errors_of(data)
    if kind is not None:
        assert errors[0] == ("", f"must be a mapping, not {kind}")
    assert ("gateway.name", "is required") in errors
    assert ("storage.path", "is required") in errors
    assert ("nodes", "is required (a list of nodes)") in errors


def test_unknown_key_without_a_close_match_and_non_string_keys() -> None:
    data = base()
    data["nodes"][0]["zzzzzz"] = 1
    data[7] = "x"  # type: ignore[index]  # a YAML key that is no string, on purpose
    assert errors_of(data) == [("nodes[0].zzzzzz", "unknown key"), ("7", "unknown key")]


def test_a_registry_of_controllers_can_be_passed_in() -> None:
    data = changed(base(), "nodes.0.control.controller", "pid")
    config = parse_config(data, controllers=(*CONTROLLER_NAMES, "pid"))
    assert config.nodes[0].control.controller == "pid"  # type: ignore[union-attr]
    assert errors_of(data, controllers=("fuzzy",)) == [
        ("nodes[0].control.controller", "must be one of fuzzy; not 'pid'")
    ]


# --- URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("tcp://192.168.1.50:3333", "tcp://192.168.1.50:3333"),
        ("tcp://192.168.1.50", "tcp://192.168.1.50:3333"),
        ("TCP://Node-7.local:4000", "tcp://node-7.local:4000"),
        ("tcp://[::1]:3333", "tcp://[::1]:3333"),
        ("serial:///dev/ttyUSB0", "serial:///dev/ttyUSB0?baud=115200"),
        ("serial:///dev/ttyACM1?baud=9600", "serial:///dev/ttyACM1?baud=9600"),
        ("serial:///dev/pts/7?baud=921600", "serial:///dev/pts/7?baud=921600"),
    ],
)
def test_node_urls_are_normalised(url: str, normalised: str) -> None:
    assert parse_config(changed(base(), "nodes.0.url", url)).nodes[0].url == normalised


# --- crop presets -------------------------------------------------------------------------------


def test_crop_gives_setpoints_and_bands_and_explicit_setpoints_win() -> None:
    config = parse_config(base())
    preset = config.nodes[1].control
    assert preset is not None
    # The table's 560-840 ppm are on the 700 scale: 0.8-1.2 mS/cm, 400-600 ppm (500 scale).
    assert (preset.tds_setpoint, preset.ph_setpoint) == (500.0, 6.5)
    assert (preset.tds_band, preset.ph_band, preset.crop) == ((400.0, 600.0), (6.0, 7.0), "lettuce")
    explicit = config.nodes[0].control
    assert explicit is not None
    assert (explicit.tds_setpoint, explicit.ph_setpoint, explicit.tds_band) == (
        800.0,
        6.0,
        (400.0, 600.0),
    )
    one = parse_config(
        changed(base(), "nodes.1.control", {"crop": "lettuce", "ph_setpoint": 6.2})
    ).nodes[1]
    assert one.control is not None and (one.control.tds_setpoint, one.control.ph_setpoint) == (
        500.0,
        6.2,
    )


@pytest.mark.parametrize(
    ("name", "canonical", "ph", "tds"),
    [
        ("Brussels sprouts", "brussels_sprouts", 6.5, 1375.0),  # 1925 ppm on the 700 scale
        ("kangkung", "water_spinach", 6.0, 875.0),
        ("pak-choi", "pak_choi", 7.0, 875.0),
        ("broccoli", "broccoli", 6.4, 1575.0),
    ],
)
def test_crop_names_and_aliases(name: str, canonical: str, ph: float, tds: float) -> None:
    control = parse_config(changed(base(), "nodes.1.control.crop", name)).nodes[1].control
    assert control is not None and control.crop == canonical
    assert control.ph_setpoint == pytest.approx(ph) and control.tds_setpoint == tds


def test_crop_table_matches_the_reference() -> None:
    assert len(CROPS) == 16
    lettuce = find_crop("lettuce")
    assert lettuce is not None and (lettuce.ph, lettuce.ppm()) == ((6.0, 7.0), (560.0, 840.0))
    assert (lettuce.ec, lettuce.ppm("ppm500"), lettuce.ppm("ppm640")) == (
        (0.8, 1.2), (400.0, 600.0), (512.0, 768.0))
    assert find_crop("endive") is not None and find_crop("endive").ph == (5.5, 5.5)  # type: ignore[union-attr]
    for crop in CROPS.values():  # every preset must pass the config's own setpoint bounds
        assert 3 <= crop.ph_setpoint <= 9 and 50 <= crop.tds_setpoint <= 5000


# --- durations and sizes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (2.5, 2.5),
        (3, 3.0),
        ("500ms", 0.5),
        ("5s", 5.0),
        ("5 sec", 5.0),
        ("2min", 120.0),
        ("1h", 3600.0),
        (".25s", 0.25),
    ],
)
def test_durations(value: Any, seconds: float) -> None:
    control = parse_config(changed(base(), "nodes.0.control.mixing_wait_s", value)).nodes[0].control
    assert control is not None and control.mixing_wait_s == seconds


def test_durations_for_milliseconds_fields() -> None:
    data = changed(base(), "nodes.0.safety.max_actuation_ms", "90s")
    assert parse_config(data).nodes[0].safety.max_actuation_ms == 90_000


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1 << 20, 1 << 20),
        ("500MB", 500_000_000),
        ("2GiB", 2 << 30),
        ("1.5 GB", 1_500_000_000),
        ("64M", 64_000_000),
    ],
)
def test_sizes(value: Any, size: int) -> None:
    assert parse_config(changed(base(), "storage.max_bytes", value)).storage.max_bytes == size


@pytest.mark.parametrize("value", ["10XB", "-5MB", "1.5", "MB", True, 2.5e6 + 0.5])
def test_bad_sizes(value: Any) -> None:
    [(path, _)] = errors_of(changed(base(), "storage.max_bytes", value))
    assert path == "storage.max_bytes"


def test_payload_limit_as_a_size() -> None:
    data = changed(base(), "thingsboard.max_payload_bytes", "32KiB")
    assert parse_config(data).thingsboard.max_payload_bytes == 32768  # type: ignore[union-attr]


# --- calibration --------------------------------------------------------------------------------


def test_two_point_calibration_becomes_a_line() -> None:
    data = changed(
        base(), "nodes.0.calibration.ph", {"source": "ph_adc", "points": [[7, 4.01], [1152, 6.86]]}
    )
    ph = parse_config(data).nodes[0].calibration["ph"]
    slope, offset = ph.poly
    assert slope == pytest.approx(0.0025, abs=2e-5) and offset == pytest.approx(3.9926, abs=1e-3)
    assert slope * 7 + offset == pytest.approx(4.01) and slope * 1152 + offset == pytest.approx(
        6.86
    )
    assert ph.valid is None


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([[1, 2], [1, 3]], "must have two different x values"),
        ([[1, 2]], "must be two points [[x1, y1], [x2, y2]]"),
        ([[1, 2, 3], [4, 5, 6]], "must be two points [[x1, y1], [x2, y2]]"),
        ([[0, -1e308], [1e-300, 1e308]], "give a line too steep to compute"),
    ],
)
def test_bad_points(points: Any, message: str) -> None:
    data = changed(base(), "nodes.0.calibration.ph", {"source": "ph_adc", "points": points})
    assert errors_of(data) == [("nodes[0].calibration.ph.points", message)]


# --- files: YAML, tokens, relative paths --------------------------------------------------------


def test_load_config_resolves_relative_paths_and_reads_the_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  A1b2C3d4\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    data = base()
    data["storage"]["path"] = "data/buffer.sqlite"
    data["thingsboard"] = {
        "host": "tb.local",
        "tls": True,
        "access_token_file": "token",
        "ca_file": "ca.pem",
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    config = load_config(tmp_path / "config.yaml")
    assert config.storage.path == tmp_path / "data" / "buffer.sqlite"
    assert config.thingsboard is not None
    assert config.thingsboard.access_token == "A1b2C3d4"
    assert config.thingsboard.ca_file == tmp_path / "ca.pem"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read {path}: No such file or directory"),
        ("  \n", "{path} is empty"),
        ("x" * 5000, "{path} is larger than 4096 bytes; is it really a token?"),
        (b"\xff\xfe", "{path} is not UTF-8 text"),
    ],
)
def test_bad_token_files(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    path = tmp_path / "token"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    data = changed(base(), "thingsboard", {"host": "tb.local", "access_token_file": str(path)})
    assert errors_of(data) == [("thingsboard.access_token_file", message.format(path=path))]


def test_a_directory_is_not_a_token_file(tmp_path: Path) -> None:
    data = changed(base(), "thingsboard", {"host": "tb.local", "access_token_file": str(tmp_path)})
    assert errors_of(data) == [
        ("thingsboard.access_token_file", f"{tmp_path} is a directory, not a file")
    ]


def test_ca_file_needs_tls(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    data = changed(base(), "thingsboard.tls", False)
    data["thingsboard"]["ca_file"] = str(tmp_path / "ca.pem")
    assert errors_of(data) == [("thingsboard.ca_file", "is only used with tls: true")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gateway:\n  name: gw: x\n", "line 2, column 11: mapping values are not allowed here"),
        (
            "gateway:\n  name: gw\n storage: x\n",
            "line 3, column 2: expected <block end>, but found '<block mapping start>'",
        ),
        ("a: b\n\tc: d\n", "line 2, column 1: found character '\\t' that cannot start any token"),
        ("gateway: {name: gw\n", "line 2, column 1: expected ',' or '}', but got '<stream end>'"),
        ("gateway:\n  name: a\n  name: b\n", "line 3, column 3: found duplicate key 'name'"),
        ("a: [1\n", "line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    ],
)
def test_yaml_syntax_errors_name_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [(str(path), message)]
    assert str(info.value) == f"{path}: {message}"
    assert isinstance(info.value.__cause__, yaml.YAMLError)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.errors == [
        (str(tmp_path / "nope.yaml"), "cannot read: No such file or directory")
    ]


def test_unquoted_times_stay_times_of_day(tmp_path: Path) -> None:
    """YAML 1.1 reads 15:00 as 900; the loader keeps it the string the user meant."""
    text = CONTRACT_YAML.replace('["09:00", "15:00", "21:00"]', "[09:00, 15:00, 21:00]")
    assert text != CONTRACT_YAML
    (tmp_path / "c.yaml").write_text(text)
    control = load_config(tmp_path / "c.yaml").nodes[0].control
    assert control is not None
    assert control.schedule == (datetime.time(9), datetime.time(15), datetime.time(21))
    assert yaml.safe_load("x: 15:00")["x"] == 900  # what plain safe_load would have done
    (tmp_path / "n.yaml").write_text("a: 12\nb: 1.5\nc: 0x1F\nd: .inf\ne: 1_000\n")
    with pytest.raises(ConfigError):
        load_config(tmp_path / "n.yaml")  # numbers still load as numbers:
    assert yaml.safe_load((tmp_path / "n.yaml").read_text()) == {
        "a": 12,
        "b": 1.5,
        "c": 31,
        "d": float("inf"),
        "e": 1000,
    }


def test_shipped_configs_are_valid(tmp_path: Path) -> None:
    assert load_config(REPO / "config" / "minimal.yaml").thingsboard is None
    shutil.copy(REPO / "config" / "example.yaml", tmp_path / "config.yaml")
    (tmp_path / "token").write_text("example-token\n")
    config = load_config(tmp_path / "config.yaml")
    assert [n.url for n in config.nodes] == [
        "tcp://192.168.1.50:3333",
        "serial:///dev/ttyUSB0?baud=115200",
    ]
    assert config.nodes[0].calibration["ph"].poly[1] == pytest.approx(3.9926, abs=1e-3)
    assert config.nodes[0].control is not None and config.nodes[1].control is None
    assert config.thingsboard is not None and config.thingsboard.access_token == "example-token"


# --- run-time updates ---------------------------------------------------------------------------


def control() -> ControlConfig:
    result = parse_config(base()).nodes[0].control
    assert result is not None
    return result


def test_update_is_applied_with_the_same_validators() -> None:
    before = control()
    after = apply_control_update(
        before, {"tds_setpoint": 900, "mode": "manual", "interval": "1min"}
    )
    assert (after.tds_setpoint, after.mode, after.interval) == (900.0, "manual", 60.0)
    assert after.ph_setpoint == before.ph_setpoint and after.crop == before.crop
    assert before.tds_setpoint == 800.0


@pytest.mark.parametrize(
    "value",
    [["15:00", "09:00"], '["09:00", "15:00"]', "09:00,15:00", " 09:00 , 15:00 "],
)
def test_schedule_updates_in_every_thingsboard_shape(value: Any) -> None:
    after = apply_control_update(control(), {"schedule": value})
    assert after.schedule == (datetime.time(9), datetime.time(15))


@pytest.mark.parametrize("value", ["", "[]", []])
def test_empty_schedule_update(value: Any) -> None:
    assert apply_control_update(control(), {"schedule": value, "interval": 30}).schedule == ()


def test_update_is_refused_as_a_whole() -> None:
    with pytest.raises(ConfigError) as info:
        apply_control_update(
            control(),
            {
                "tds_setpoint": 900,
                "ph_setpoint": 10,
                "controller": "pid",
                "colour": "red",
                "schedule": "[9",
                "intervall": 5,
            },
            path_prefix="tank-a",
        )
    assert info.value.errors == [
        ("tank-a.controller", "must be one of fuzzy, rb, ml, adaptive, closeloop, mamdani; not 'pid'"),
        ("tank-a.ph_setpoint", "must be between 3 and 9"),
        (
            "tank-a.schedule",
            "must be a list of times; this JSON is broken: "
            "Expecting ',' delimiter: line 1 column 3 (char 2)",
        ),
        ("tank-a.colour", "unknown key"),
        ("tank-a.intervall", "unknown key (did you mean 'interval'?)"),
    ]


def test_update_without_prefix_and_with_safety_ranges() -> None:
    with pytest.raises(ConfigError) as info:
        apply_control_update(control(), {"mode": None})
    assert info.value.errors == [("mode", "must be one of auto, manual; not null")]
    safety = SafetyConfig(tds_range=(0.0, 2000.0))
    with pytest.raises(ConfigError) as info:
        apply_control_update(control(), {"tds_setpoint": 2500}, safety=safety, path_prefix="tank-a")
    assert info.value.errors == [
        ("tank-a.tds_setpoint", "2500 ppm is outside safety.tds_range [0, 2000]")
    ]
    assert (
        apply_control_update(control(), {"tds_setpoint": 1500}, safety=safety).tds_setpoint == 1500
    )


def test_update_must_be_a_mapping_and_crop_is_not_a_runtime_key() -> None:
    with pytest.raises(ConfigError) as info:
        apply_control_update(control(), ["mode"])  # type: ignore[arg-type]
    assert info.value.errors == [("", "must be a mapping, not a list")]
    with pytest.raises(ConfigError) as info:
        apply_control_update(control(), {"crop": "leek"})
    assert info.value.errors == [("crop", "unknown key")]


def test_control_settings_hold_exactly_the_runtime_keys() -> None:
    # The setpoint goes once, in the node's unit: ec_setpoint with units.conductivity ec.
    assert tuple(control_settings(control())) == tuple(
        k for k in RUNTIME_KEYS if k != "ec_setpoint")
    in_ec = dataclasses.replace(control(), conductivity="ec")
    assert tuple(control_settings(in_ec)) == tuple(k for k in RUNTIME_KEYS if k != "tds_setpoint")


def test_control_settings_round_trip_through_json() -> None:
    other = apply_control_update(
        control(),
        {
            "mode": "manual",
            "controller": "rb",
            "ph_setpoint": 5.8,
            "schedule": ["21:30", "06:05"],
            "interval": 0,
        },
    )
    settings_json = json.dumps(control_settings(other))
    assert json.loads(settings_json) == {
        "mode": "manual",
        "controller": "rb",
        "tds_setpoint": 800.0,
        "ph_setpoint": 5.8,
        "schedule": ["06:05", "21:30"],
        "interval": 0.0,
    }
    assert apply_control_update(control(), json.loads(settings_json)) == other


# --- summary ------------------------------------------------------------------------------------


def test_summary() -> None:
    data = changed(base(), "storage.max_bytes", "2GiB")
    text = summarize(parse_config(data))
    assert text.splitlines() == [
        "gateway      greenhouse-1 (health every 60 s)",
        "storage      /var/lib/hydrogate/hydrogate.sqlite (at most 2000000 rows or 2 GiB, synced every 1 s)",
        "thingsboard  thingsboard.example.com:8883 tls, max payload 64 KiB",
        "units        conductivity ppm500 (telemetry key tds)",
        "nodes        2",
        "  tank-a: tcp://192.168.1.50:3333, poll 5 s, calibrated: ph, tds; "
        "auto fuzzy, tds 800 ppm, pH 6 (lettuce), every 30 s, at 09:00 15:00 21:00",
        "  tank-b: serial:///dev/ttyUSB0?baud=115200, poll 5 s, calibrated: none; "
        "auto adaptive, tds 500 ppm, pH 6.5 (lettuce), every 30 s",
    ]
    offline = parse_config(
        changed(changed(base(), "thingsboard", DELETE), "nodes.1.control", DELETE)
    )
    lines = summarize(offline).splitlines()
    assert lines[2] == "thingsboard  offline (buffer only)"
    assert lines[-1].endswith("calibrated: none; monitor only")


# --- Hypothesis: junk never raises anything but ConfigError -------------------------------------

KEYS = [
    "gateway",
    "storage",
    "thingsboard",
    "nodes",
    "name",
    "path",
    "url",
    "host",
    "port",
    "access_token",
    "access_token_file",
    "tls",
    "ca_file",
    "poll_interval",
    "calibration",
    "tds",
    "ph",
    "source",
    "poly",
    "points",
    "valid",
    "temp_coefficient",
    "plant",
    "flow_ml_s",
    "control",
    "mode",
    "controller",
    "crop",
    "schedule",
    "interval",
    "safety",
    "max_bytes",
    "max_actuation_ms",
    "max_ms_per_hour",
    "ph_range",
    "tds_range",
    "keepalive",
    "retries",
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "5s",
            "500MB",
            "09:00",
            "tcp://h",
            "serial:///dev/x?baud=9600",
            "lettuce",
            "auto",
            "/",
            "\0",
            "~nosuchuser",
            '["09:00"]',
        ]
    )
)
JUNK = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(KEYS) | st.text(max_size=6) | st.integers(), children, max_size=5
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(JUNK)
def test_junk_never_raises_anything_but_config_error(data: Any) -> None:
    try:
        parse_config(data)
    except ConfigError as err:
        assert err.errors and all(isinstance(p, str) and isinstance(m, str) for p, m in err.errors)


LEAVES = [
    "gateway.name",
    "storage.path",
    "storage.max_bytes",
    "thingsboard.port",
    "thingsboard.host",
    "thingsboard.access_token",
    "nodes.0.url",
    "nodes.0.poll_interval",
    "nodes.0.calibration.tds.poly",
    "nodes.0.calibration.tds.valid",
    "nodes.0.calibration",
    "nodes.0.plant.flow_ml_s",
    "nodes.0.control.schedule",
    "nodes.0.control.crop",
    "nodes.0.control",
    "nodes.0.safety",
    "nodes.0.safety.ph_range",
    "nodes.1.control.tds_setpoint",
    "nodes.1",
    "nodes.0.name",
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(LEAVES), JUNK)
def test_one_junk_value_in_a_good_config_is_reported_or_accepted(leaf: str, junk: Any) -> None:
    try:
        config = parse_config(changed(base(), leaf, junk))
    except ConfigError as err:
        assert err.errors
    else:
        hash(config)
        summarize(config)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*KEYS, "tds_setpoint", "ph_setpoint"]) | st.text(max_size=5),
        JUNK,
        max_size=4,
    )
)
def test_junk_updates_are_refused_whole_or_applied(update: dict[str, Any]) -> None:
    before = control()
    try:
        after = apply_control_update(before, update)
    except ConfigError as err:
        assert err.errors
    else:
        assert apply_control_update(before, control_settings(after)) == after
