"""Facts written once: every other place that needs them derives them, or is checked against them.

- node URLs: the drivers' parser (drivers/transport.py and the rule of each
  scheme) is the one rule; the config validates with it, so a URL the node
  tasks can open is a URL the config accepts, and the other way round;
- controller names: ``rules.controller.BUILTIN`` (the registry's table); the
  config accepts those, each module registers its own, the docs list them;
- run-time settings: the config's validators (``RUNTIME_KEYS``); the daemon
  takes those shared attributes and the docs list them;
- actuator names: rules/controller.py; no other module writes a list of them;
- config defaults: the dataclasses of gateway/config.py; the parsers take
  them from there and the defaults tables of docs/configuration.md are
  checked against them.
"""

from __future__ import annotations

import ast
import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rules.controller
from drivers.errors import BadUrl
from drivers.serial import STANDARD_BAUDS, serial_options
from drivers.transport import canonical_url, parse_url
from gateway import config
from gateway.config import CONTROLLER_NAMES, RUNTIME_KEYS, ConfigError, parse_config
from gateway.validators import Invalid

# --- node URLs -------------------------------------------------------------------------------

BAUDS = [*STANDARD_BAUDS, 0, 1, 300, 14400, 74880, 76800, 115201, 250000, 1000000, 11520]
URLS = [
    *(f"serial:///dev/ttyUSB0?baud={b}" for b in BAUDS),
    "serial:///dev/ttyUSB0",
    "serial:///dev/ttyUSB0?baud=0115200",
    "serial:///dev/ttyUSB0?baud=+9600",
    "serial:///dev/ttyUSB0?baud=9600&baud=9600",
    "serial:///dev/ttyUSB0?baud",
    "serial:///dev/ttyUSB0?dtr=1&rts=1",
    "serial:///dev/ttyUSB0?rts=0&baud=9600",
    "serial:///dev/ttyUSB0?dtr=2",
    "serial:///dev/ttyUSB0?parity=E",
    "serial:///dev/ttyUSB0#x",
    "serial:///",
    "serial://dev/ttyUSB0",
    "serial:dev/ttyUSB0",
    "tcp://192.168.1.50:3333",
    "tcp://192.168.1.50",
    "tcp://192.168.1.50:",
    "tcp://Node-7.local:4000",
    "tcp://[::1]:3333",
    "tcp://[::1]",
    "tcp://[::ffff:10.0.0.1]:1",
    "tcp://host:0",
    "tcp://host:65535",
    "tcp://host:65536",
    "tcp://host:x",
    "tcp://host:3333/",
    "tcp://host:3333/x",
    "tcp://host:3333?baud=9600",
    "tcp://user@host",
    "tcp://bad_host!:3333",
    "tcp://-host:3333",
    "tcp://",
    "udp://10.0.0.1:3333",
    "http://x:1",
    "/dev/ttyUSB0",
    "",
]


def drivers_accept(url: str) -> str | None:
    """The URL as the drivers write it out, or ``None`` when they refuse it."""
    try:
        parse_url(url)
        return canonical_url(url)
    except BadUrl:
        return None


def config_accepts(url: str) -> str | None:
    """The URL as the config stores it, or ``None`` when the config refuses it."""
    data = {"gateway": {"name": "gw"}, "storage": {"path": "/tmp/hydrogate-test.db"},
            "thingsboard": {"host": "localhost", "access_token": "t"},
            "nodes": [{"name": "n", "url": url}]}
    try:
        return parse_config(data).nodes[0].url
    except ConfigError as exc:
        assert [path for path, _ in exc.errors] == ["nodes[0].url"], exc.errors
        return None


def _host(host: str | None) -> object:
    """A host as compared: an address by its value (``::ffff:10.0.0.1`` is ``::ffff:a00:1``)."""
    try:
        return ipaddress.ip_address(host or "")
    except ValueError:
        return host


def check_both_ways(url: str) -> None:
    by_drivers = drivers_accept(url)
    assert config_accepts(url) == by_drivers
    if by_drivers is not None:
        assert drivers_accept(by_drivers) == by_drivers  # written out in full: a fixed point
        before, after = urlsplit(url), urlsplit(by_drivers)
        assert (before.scheme, _host(before.hostname), before.path.rstrip("/")) == (
            after.scheme, _host(after.hostname), after.path.rstrip("/")
        )
        if before.scheme == "serial":
            assert serial_options(before) == serial_options(after)


@pytest.mark.parametrize("url", URLS)
def test_config_and_drivers_accept_the_same_urls(url: str) -> None:
    check_both_ways(url)


def test_the_cases_cover_both_answers_and_every_standard_baud() -> None:
    accepted = {u for u in URLS if drivers_accept(u) is not None}
    assert 10 < len(accepted) < len(URLS) - 10
    assert {serial_options(urlsplit(u)).baud for u in accepted if u.startswith("serial")} == set(
        STANDARD_BAUDS
    )
    assert drivers_accept("serial:///dev/ttyUSB0?baud=74880") is None  # the old disagreement


@settings(max_examples=300, deadline=None)
@given(
    scheme=st.sampled_from(["tcp", "serial", "TCP", "udp"]),
    host=st.sampled_from(["", "h", "10.0.0.1", "[::1]", "a_b", "x-", "node.local."]),
    port=st.one_of(st.none(), st.integers(-1, 70000).map(str), st.sampled_from(["", "x"])),
    path=st.sampled_from(["", "/", "/dev/ttyUSB0", "/dev/pts/7", "dev"]),
    query=st.lists(
        st.tuples(st.sampled_from(["baud", "dtr", "rts", "bad"]),
                  st.one_of(st.sampled_from(BAUDS).map(str), st.sampled_from(["0", "1", "", "x"]))),
        max_size=3,
    ),
)
def test_generated_urls_get_the_same_answer(
    scheme: str, host: str, port: str | None, path: str, query: list[tuple[str, str]]
) -> None:
    netloc = host if port is None else f"{host}:{port}"
    url = f"{scheme}://{netloc}{path}"
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query)
    check_both_ways(url)


def test_host_names_follow_the_drivers_rule() -> None:
    from gateway.validators import host_name

    assert host_name("[::ffff:10.0.0.1]") == "::ffff:a00:1"
    with pytest.raises(Invalid, match="host name or IP address"):
        host_name("bad_host!")


# --- controller names, run-time keys, actuators -------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _doc_row(doc: str, key: str) -> set[str]:
    """The backticked words in the value cells of the table row ``| `key` | ...`` of ``doc``."""
    rows = [line for line in (ROOT / "docs" / doc).read_text(encoding="utf-8").splitlines()
            if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, (doc, key, rows)
    return set(re.findall(r"`([a-z_]+)`", rows[0].split("|", 2)[2]))


def _doc_table_keys(doc: str, heading: str) -> list[str]:
    """The first column's keys of the first table under ``heading`` in ``doc``."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    section = text[text.index(heading):]
    keys: list[str] = []
    for line in section.splitlines()[1:]:
        if keys and not line.startswith("|"):
            break
        if m := re.match(r"\| `([a-z_]+)` \|", line):
            keys.append(m.group(1))
    return keys


def test_the_registry_holds_exactly_the_builtin_controllers_each_from_its_module() -> None:
    assert rules.controller.names() == tuple(sorted(rules.controller.BUILTIN))
    for name, module in rules.controller.BUILTIN.items():
        factory = rules.controller._REGISTRY[name]
        assert factory.__module__ == module, (name, factory.__module__)
    assert tuple(rules.controller.BUILTIN) == CONTROLLER_NAMES


def test_the_docs_list_the_builtin_controllers() -> None:
    names = set(rules.controller.BUILTIN)
    assert _doc_row("configuration.md", "controller") == names
    assert _doc_row("thingsboard.md", "controller") == names


def test_the_daemon_takes_the_configs_runtime_keys_and_the_docs_list_them() -> None:
    from gateway import daemon

    assert daemon.SHARED_KEYS is RUNTIME_KEYS
    assert set(RUNTIME_KEYS) == {"mode", "controller", "tds_setpoint", "ec_setpoint",
                                 "ph_setpoint", "schedule", "interval"}  # CONTRACT: these names
    assert _doc_table_keys("thingsboard.md", "## Shared attributes") == list(RUNTIME_KEYS)


ACTUATOR_NAMES = frozenset(
    {*rules.controller.ACTUATORS, *rules.controller.NUTRIENT_PARTS}
)


def test_no_module_writes_its_own_list_of_actuators() -> None:
    """A tuple, list or set of two or more actuator names written out is a second source."""
    found = []
    for pkg in ("gateway", "drivers", "rules", "models", "sim"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path == ROOT / "rules" / "controller.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                    names = [e.value for e in node.elts
                             if isinstance(e, ast.Constant) and e.value in ACTUATOR_NAMES]
                    if len(names) >= 2:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {names}")
    assert found == []


# --- config defaults ----------------------------------------------------------------------------

#: The tables of docs/configuration.md, by heading, and the dataclass whose defaults they show.
DEFAULT_TABLES: dict[str, type[Any]] = {
    "## `gateway`": config.GatewayConfig,
    "## `storage`": config.StorageConfig,
    "## `units`": config.UnitsConfig,
    "## `thingsboard`": config.ThingsBoardConfig,
    "## `nodes[]`": config.NodeConfig,
    "### `nodes[].plant`": config.PlantConfig,
    "### `nodes[].control`": config.ControlConfig,
    "### `nodes[].safety`": config.SafetyConfig,
}
#: Fields that are not keys of their section's table: the node's unit comes from `units`,
#: `safety` has its own table.
NOT_IN_TABLE = {
    (config.ControlConfig, "conductivity"),
    (config.NodeConfig, "conductivity"),
    (config.NodeConfig, "safety"),
}
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def _table(heading: str) -> dict[str, str]:
    """``key → default cell`` of the table under ``heading`` (``a` / `b`` rows split in two)."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    lines = text[text.index(heading + " ") if heading + " " in text else text.index(heading):]
    rows: dict[str, str] = {}
    for line in lines.splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([a-z_]+)`", cells[0])
        values = _outside_parentheses(cells[1], " / ") if len(keys) > 1 else [cells[1]]
        if len(values) != len(keys):  # `access_token` / `access_token_file`: one cell for both
            values = values * len(keys)
        rows.update(zip(keys, values, strict=True))
    return rows


def _outside_parentheses(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` where it is not inside parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and text.startswith(separator, i):
            parts.append(text[start:i])
            start = i + len(separator)
    return [*parts, text[start:]]


def _written(cell: str) -> object:
    """What a default cell says: a number, a bool, a word, a pair, or None for prose."""
    if cell in ("false", "true"):
        return cell == "true"
    if m := re.fullmatch(r"`([a-z0-9_-]+)`", cell):
        return m.group(1)
    if cell == "`[]`":
        return ()
    if m := re.fullmatch(r"\[(.+), (.+)\]", cell):
        return (float(m.group(1)), float(m.group(2)))
    if m := _NUMBER.match(cell):
        return float(m.group(0).replace(",", ""))
    return None


def _meant(value: object) -> object:
    """A dataclass default as the doc would show it."""
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, tuple):
        return tuple(_meant(v) for v in value)
    if dataclasses.is_dataclass(value):  # recalibrate_after_days: one number for all
        values = {_meant(v) for v in dataclasses.asdict(value).values()}  # type: ignore[arg-type]
        return values.pop() if len(values) == 1 else values
    if isinstance(value, Mapping):  # flow_ml_s: "1.58 each"; an empty map: prose ("none")
        values = {_meant(v) for v in value.values()}
        return values.pop() if len(values) == 1 else (values or None)
    raise AssertionError(f"no rule for {value!r}")


def _field_default(spec: dataclasses.Field[Any]) -> object:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return dataclasses.MISSING


@pytest.mark.parametrize("heading", list(DEFAULT_TABLES))
def test_the_docs_defaults_are_the_codes(heading: str) -> None:
    cls = DEFAULT_TABLES[heading]
    rows = _table(heading)
    wrong = []
    for spec in dataclasses.fields(cls):
        if (cls, spec.name) in NOT_IN_TABLE or spec.name not in rows:
            default = _field_default(spec)
            if (cls, spec.name) not in NOT_IN_TABLE and default is not dataclasses.MISSING and (
                _meant(default) not in (None, ())
            ):
                wrong.append(f"{spec.name}: default {default!r} is not in the table")
            continue
        default = _field_default(spec)
        cell = rows[spec.name]
        if default is dataclasses.MISSING:
            if "required" not in cell and "crop" not in cell:
                wrong.append(f"{spec.name}: required in the code, {cell!r} in the doc")
            continue
        if _written(cell) != _meant(default):
            wrong.append(f"{spec.name}: {_meant(default)!r} in the code, {cell!r} in the doc")
    assert wrong == []


def test_the_defaults_check_sees_a_drift() -> None:
    assert _written("2,000,000") == 2_000_000.0 == _meant(2_000_000)
    assert _written("1883, or 8883 with `tls`") == 1883.0
    assert _written("[2, 12]") == _meant((2.0, 12.0))
    assert _written("`adaptive`") == _meant("adaptive")
    assert _written("5") != _meant(5.5)
    assert _written("none") is None


# --- facts cited from inside the repository -----------------------------------------------------

#: What is checked: the code, the tests, the benchmarks, the scripts and every document.
CITING = ("gateway", "drivers", "rules", "models", "sim", "tests", "bench", "docs", "scripts",
          "firmware", "systemd", "thingsboard", "config")
#: A path or name of a document outside the repository (written split so this file is clean).
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "/" + "work/", "seed " + r"0\d", r"\b[A-Z][A-Z_]+\.md\b"]))


def test_sources_and_docs_cite_only_the_repository() -> None:
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for top in CITING:
        files += [p for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix in
                  (".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".service", ".json", "")]
    found = []
    for path in files:
        if "node_modules" in path.parts or "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), start=1):
            for hit in OUTSIDE.findall(line):
                if not (ROOT / hit).is_file():  # README.md is the repository's own
                    found.append(f"{path.relative_to(ROOT)}:{n}: {hit}")
    assert found == []
