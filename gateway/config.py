"""The configuration: YAML validated once, at the edge, into frozen dataclasses.

:func:`load_config` reads a file, :func:`parse_config` validates already
loaded data. Both collect *every* problem with its YAML path
(``nodes[1].control.ph_setpoint: must be between 3 and 9``) and raise one
:class:`ConfigError` listing them; nothing is clamped or guessed. The keys,
defaults and messages are part of the project's outer contract
(docs/configuration.md).

Relative file paths (``storage.path``, ``thingsboard.access_token_file``,
``thingsboard.ca_file``) are relative to the folder of the config file, so a
config behaves the same whatever directory the daemon starts in.

:func:`apply_control_update` validates the run-time control settings that
ThingsBoard may change (shared attributes, RPC) with the same validators, as a
whole; :func:`control_settings` gives them back as JSON-able values to persist.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from drivers.errors import BadUrl
from drivers.transport import canonical_url
from gateway import crops
from gateway.validators import (
    ErrorList,
    Invalid,
    Section,
    Validator,
    boolean,
    device_name,
    duration,
    duration_range,
    file_path,
    fmt_number,
    host_name,
    int_range,
    key_name,
    list_of,
    milliseconds,
    num_range,
    number,
    number_pair,
    one_of,
    read_secret,
    schedule,
    size_range,
    string,
    suggest,
)
from rules import units
from rules.controller import (
    ACTUATORS,
    BUILTIN_NAMES,
    DEFAULT_FLOW_ML_S,
    NUTRIENT_PARTS,
    PH_PUMPS,
)
from rules.cycle import CycleSettings
from rules.safety import SafetyLimits

K = TypeVar("K")
T = TypeVar("T")
V = TypeVar("V")

CONTROLLER_NAMES: tuple[str, ...] = BUILTIN_NAMES
"""Controller names the config accepts unless the caller passes its own registry: the
built-in controllers of rules/controller.py (``rules.controller.BUILTIN``, the one list)."""

NODE_WATCHDOG_S = 30.0
"""A node stops its actuators after this long without a frame (docs/nodelink.md, safety duties)."""
DEFAULT_STOCK_PPM = 10000.0


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` holds every ``(yaml_path, message)``.

    The path is empty for a problem with the document as a whole, and is the
    file's name for a file that cannot be read or parsed.
    """

    def __init__(self, errors: Iterable[tuple[str, str]]) -> None:
        self.errors: list[tuple[str, str]] = list(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "\n".join(f"{path}: {message}" if path else message for path, message in self.errors)


class FrozenMap(Mapping[K, V]):
    """A read-only, hashable mapping, so that frozen config objects stay hashable."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(items)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


# --- the validated configuration ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The gateway itself: its device name in ThingsBoard, how often it reports health,
    and where its local control socket is (``None``: the default, gateway/localrpc.py)."""

    name: str
    health_interval: float = 60.0
    socket: Path | None = None


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """The SQLite store-and-forward buffer and its retention limits."""

    path: Path
    max_rows: int = 2_000_000
    max_bytes: int | None = None
    commit_interval: float = 0.02
    #: Readings are on stable storage (or acknowledged by ThingsBoard) at most this long
    #: after they arrive (seconds); 0 syncs every commit.
    sync_interval: float = 1.0
    #: While the system clock is not synchronised, readings are held back and re-stamped
    #: once it is; after this long with the uplink connected and still no sync, the
    #: clock is trusted as it is (seconds; 0: never hold).
    clock_sync_wait: float = 600.0
    #: Forwarded readings are kept this many days for `hydrogate export` (0: none kept)...
    history_days: float = 7.0
    #: ...in at most this many bytes (compressed); the oldest go first.
    history_max_bytes: int = 256 << 20


@dataclass(frozen=True, slots=True)
class UnitsConfig:
    """How conductivity is written (rules/units.py): ``ec``, ``ppm500``, ``ppm640`` or ``ppm700``.

    It names the telemetry key readings go under, and the unit of
    ``tds_setpoint`` and every other ppm key of the file (ppm500 with ``ec``).
    """

    conductivity: str = "ppm500"


@dataclass(frozen=True, slots=True)
class RecalibrateConfig:
    """Days after which a calibration raises an ``info`` severity (0: never)."""

    pumps: float = 30.0
    ph: float = 30.0
    ec: float = 30.0


@dataclass(frozen=True, slots=True)
class ThingsBoardConfig:
    """The MQTT session with ThingsBoard; the token is kept out of ``repr``."""

    host: str
    access_token: str = field(repr=False)
    port: int = 1883
    tls: bool = False
    ca_file: Path | None = None
    max_payload_bytes: int = 65536
    client_id: str | None = None
    keepalive: int = 60
    device_type: str = "hydro-node"


@dataclass(frozen=True, slots=True)
class CalibrationMap:
    """``key = polyval(poly, source)``; readings of ``source`` outside ``valid`` are flagged.

    ``poly`` is highest order first (as ``numpy.polyval`` takes it).
    ``temp_coefficient`` (per °C) compensates the result to 25 °C with
    ``water_temp``: ``value / (1 + k·(T − 25))``.
    """

    key: str
    source: str
    poly: tuple[float, ...]
    valid: tuple[float, float] | None = None
    temp_coefficient: float | None = None


def _default_flows() -> FrozenMap[str, float]:
    return FrozenMap((name, DEFAULT_FLOW_ML_S) for name in ACTUATORS)


@dataclass(frozen=True, slots=True)
class PlantConfig:
    """The physical constants that dose-computing controllers need.

    Defaults: the control documentation's plant (docs/references.md, "Control
    documentation"). ``stock_ppm`` is held on the 500 scale, whatever the file's
    unit; ``nutrient_ratio`` is empty for a single ``nutrient`` pump.
    """

    tank_volume_l: float = 10.0
    stock_ppm: float = DEFAULT_STOCK_PPM
    flow_ml_s: FrozenMap[str, float] = field(default_factory=_default_flows)
    ph_ml_per_l_per_unit: FrozenMap[str, float] = field(default_factory=FrozenMap)
    nutrient_ratio: FrozenMap[str, float] = field(default_factory=FrozenMap)


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """Edge control of one node. ``*_band`` come from a crop preset, else None.

    ``interval`` is seconds between evaluations in auto mode (0: schedule
    only); ``schedule`` holds local times of day, sorted. ``tds_setpoint`` and
    ``tds_band`` are ppm on the 500 scale (rules/units.py) whatever
    ``conductivity`` (the node's unit, for settings shown and changed) says.
    The cycle's defaults are the rules layer's own (``rules.cycle.CycleSettings``).
    """

    tds_setpoint: float
    ph_setpoint: float
    mode: str = "auto"
    controller: str = "adaptive"
    crop: str | None = None
    tds_band: tuple[float, float] | None = None
    ph_band: tuple[float, float] | None = None
    tds_tolerance_pct: float = CycleSettings.tds_tolerance_pct
    ph_tolerance: float = CycleSettings.ph_tolerance
    schedule: tuple[datetime.time, ...] = ()
    interval: float = 30.0
    rb_variant: str = "band"
    tds_average_s: float = CycleSettings.tds_average_s
    ph_average_s: float = CycleSettings.ph_average_s
    mixing_wait_s: float = CycleSettings.mixing_wait_s
    tds_hold_s: float = CycleSettings.tds_hold_s
    ph_hold_s: float = CycleSettings.ph_hold_s
    max_cycle_s: float = CycleSettings.max_cycle_s
    tds_deadband_pct: float | None = None
    ph_deadband: float | None = None
    part_pause_s: float = CycleSettings.part_pause_s
    conductivity: str = "ppm500"


@dataclass(frozen=True, slots=True)
class SafetyConfig:
    """Limits enforced below every controller and RPC, and plausibility of readings.

    A reading outside ``ph_range``/``tds_range`` is physically implausible; a
    value that does not change at all for ``stuck_after_s`` is stuck (0: off).
    ``tds_range`` is ppm on the 500 scale, whatever the file's unit. The defaults
    are the rules layer's own (``rules.safety.SafetyLimits``).
    """

    max_actuation_ms: int = SafetyLimits.max_actuation_ms
    max_ms_per_hour: int = SafetyLimits.max_ms_per_hour
    stale_after_s: float = SafetyLimits.stale_after_s
    min_water_level_l: float = SafetyLimits.min_water_level_l
    ph_range: tuple[float, float] = SafetyLimits.ph_range
    tds_range: tuple[float, float] = SafetyLimits.tds_range
    stuck_after_s: float = SafetyLimits.stuck_after_s


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """One NodeLink node; ``url`` is normalised (default port or baud made explicit)."""

    name: str
    url: str
    poll_interval: float = 5.0
    timeout: float = 1.0
    retries: int = 2
    keepalive: float = 10.0
    calibration: FrozenMap[str, CalibrationMap] = field(default_factory=FrozenMap)
    plant: PlantConfig | None = None
    control: ControlConfig | None = None
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    conductivity: str = "ppm500"  # units.conductivity, for this node's readings and settings
    recalibrate_after_days: RecalibrateConfig = field(default_factory=RecalibrateConfig)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; ``thingsboard`` is None for an offline, buffer-only gateway."""

    gateway: GatewayConfig
    storage: StorageConfig
    thingsboard: ThingsBoardConfig | None
    nodes: tuple[NodeConfig, ...]
    units: UnitsConfig = field(default_factory=UnitsConfig)


class _Taker:
    """``take(key, validator)``: ``sec.get`` with the default of ``cls``'s field ``key``."""

    def __init__(self, sec: Section, cls: type[Any]) -> None:
        self._sec = sec
        self._cls = cls

    def __call__(self, key: str, validator: Validator[T]) -> T:
        value: T = self._sec.get(key, validator, _default(self._cls, key))
        return value


def _default(cls: type[Any], name: str) -> Any:
    """The default of field ``name`` of the config dataclass ``cls``.

    The dataclasses above are the one place a config default is written: the
    section parsers below take their defaults from them, and the defaults
    table of docs/configuration.md is checked against them
    (tests/test_one_source.py).
    """
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    raise TypeError(f"{cls.__name__}.{name} has no default")


# --- node URLs ---------------------------------------------------------------------------------


def node_url(value: Any) -> str:
    """``tcp://host[:port]`` (default port 3333) or ``serial:///dev/X[?baud=N]`` (115200).

    The drivers' own parser decides (drivers/transport.py, one rule per scheme
    in drivers/tcp.py and drivers/serial.py): the config accepts exactly the
    URLs the node tasks can open, and stores them written out in full.
    """
    text = string(value).strip()
    try:
        return canonical_url(text)
    except BadUrl as exc:
        raise Invalid(exc.reason) from None


# --- sections ----------------------------------------------------------------------------------


#: Linux's limit on a Unix socket's path (108 bytes with the final NUL).
UNIX_PATH_MAX = 107


def _socket_path(base_dir: Path | None) -> Validator[Path]:
    as_path = file_path(base_dir, must_exist=False)

    def validate(value: Any) -> Path:
        path = as_path(value)
        if len(bytes(path)) > UNIX_PATH_MAX:
            raise Invalid(f"is {len(bytes(path))} bytes long; a Unix socket's path has at most "
                          f"{UNIX_PATH_MAX}")
        return path

    return validate


def _gateway(sec: Section, base_dir: Path | None) -> GatewayConfig | None:
    take = _Taker(sec, GatewayConfig)
    name = sec.require("name", device_name)
    health = take("health_interval", duration_range(1, 86400))
    socket = sec.optional("socket", _socket_path(base_dir))
    sec.finish()
    if name is None:
        return None
    return GatewayConfig(name=name, health_interval=health, socket=socket)


def _storage(sec: Section, base_dir: Path | None) -> StorageConfig | None:
    take = _Taker(sec, StorageConfig)
    path = sec.require("path", file_path(base_dir, must_exist=False))
    max_rows = take("max_rows", int_range(1, 1_000_000_000))
    max_bytes = sec.optional("max_bytes", size_range(1 << 20))
    commit_interval = take("commit_interval", duration_range(0, 10))
    sync_interval = take("sync_interval", duration_range(0, 3600))
    clock_sync_wait = take("clock_sync_wait", duration_range(0, 7 * 86400))
    history_days = take("history_days", num_range(0, 3660, unit="days"))
    history_max_bytes = take("history_max_bytes", size_range(1 << 20))
    sec.finish()
    if path is None:
        return None
    return StorageConfig(
        path, max_rows, max_bytes, commit_interval, sync_interval, clock_sync_wait,
        history_days, history_max_bytes,
    )


def _thingsboard(sec: Section, base_dir: Path | None) -> ThingsBoardConfig | None:
    take = _Taker(sec, ThingsBoardConfig)
    host = sec.require("host", host_name)
    tls = take("tls", boolean)
    default_port = 8883 if tls else _default(ThingsBoardConfig, "port")
    port = sec.get("port", int_range(1, 65535), default_port)
    token = _access_token(sec, base_dir)
    ca_file = sec.optional("ca_file", file_path(base_dir, must_exist=True))
    if ca_file is not None and not tls:
        sec.errors.add(sec.path_of("ca_file"), "is only used with tls: true")
    max_payload = take("max_payload_bytes", size_range(1024, 268_435_455))
    client_id = sec.optional("client_id", string)
    keepalive = take("keepalive", int_range(1, 65535, unit="s"))
    device_type = take("device_type", device_name)
    sec.finish()
    if host is None or token is None:
        return None
    return ThingsBoardConfig(
        host=host,
        access_token=token,
        port=port,
        tls=tls,
        ca_file=ca_file,
        max_payload_bytes=max_payload,
        client_id=client_id,
        keepalive=keepalive,
        device_type=device_type,
    )


def _access_token(sec: Section, base_dir: Path | None) -> str | None:
    inline, from_file = sec.has("access_token"), sec.has("access_token_file")
    if inline and from_file:
        sec.errors.add(sec.path_of("access_token_file"), "give access_token or this, not both")
        return None
    if from_file:
        path = sec.optional("access_token_file", file_path(base_dir, must_exist=False))
        if path is None:
            return None
        return sec.errors.check(sec.path_of("access_token_file"), read_secret, path)
    if not inline:
        sec.errors.add(sec.path_of("access_token"), "is required (or access_token_file)")
        return None
    return sec.optional("access_token", string)


def _points_to_poly(value: Any) -> tuple[float, ...]:
    """Two calibration points ``[[x1, y1], [x2, y2]]`` -> the line through them."""
    points = list_of(list_of(number))(value)
    if len(points) != 2 or any(len(p) != 2 for p in points):
        raise Invalid("must be two points [[x1, y1], [x2, y2]]")
    (x1, y1), (x2, y2) = points
    if x1 == x2:
        raise Invalid("must have two different x values")
    slope = (y2 - y1) / (x2 - x1)
    offset = y1 - slope * x1
    if not (math.isfinite(slope) and math.isfinite(offset)):
        raise Invalid("give a line too steep to compute")
    return slope, offset


def _poly(value: Any) -> tuple[float, ...]:
    coefficients = list_of(number)(value)
    if not 1 <= len(coefficients) <= 10:
        raise Invalid(f"must have 1 to 10 coefficients, not {len(coefficients)}")
    return tuple(coefficients)


def _calibration_map(sec: Section, key: str) -> CalibrationMap | None:
    source = sec.require("source", key_name)
    if sec.has("poly") and sec.has("points"):
        sec.errors.add(sec.path, "give poly or points, not both")
        poly = None
    elif sec.has("points"):
        poly = sec.optional("points", _points_to_poly)
    elif sec.has("poly"):
        poly = sec.optional("poly", _poly)
    else:
        if sec.ok:
            sec.errors.add(sec.path_of("poly"), "is required (or points)")
        poly = None
    valid = sec.optional("valid", number_pair())
    temp_coefficient = sec.optional("temp_coefficient", num_range(0, 0.1))
    sec.finish()
    if source is None or poly is None:
        return None
    return CalibrationMap(key, source, poly, valid, temp_coefficient)


def _calibration(sec: Section) -> FrozenMap[str, CalibrationMap]:
    maps: dict[str, CalibrationMap] = {}
    for raw_key in sec.data:
        key = sec.errors.check(sec.path_of(str(raw_key)), key_name, raw_key)
        if key is None:
            continue
        calibration = _calibration_map(sec.section(key), key)
        if calibration is not None:
            maps[key] = calibration
    return FrozenMap(maps)


def _plant(sec: Section, conductivity: str) -> PlantConfig:
    take = _Taker(sec, PlantConfig)
    tank = take("tank_volume_l", num_range(0, 100_000, lo_open=True, unit="L"))
    stock = sec.optional("stock_ppm", num_range(0, 10_000_000, lo_open=True, unit="ppm"))
    ratios = sec.section("nutrient_ratio")
    share = num_range(0, 1_000_000, lo_open=True)
    ratio = {name: ratios.optional(name, share) for name in NUTRIENT_PARTS}
    ratios.finish()
    flows = sec.section("flow_ml_s")
    rate = num_range(0, 1000, lo_open=True, unit="ml/s")
    flow = {name: flows.get(name, rate, DEFAULT_FLOW_ML_S) for name in ACTUATORS}
    for part in NUTRIENT_PARTS:  # a part has a flow when given, or when the ratio names it
        given = flows.optional(part, rate)
        if given is not None or ratio[part] is not None:
            flow[part] = DEFAULT_FLOW_ML_S if given is None else given
    flows.finish()
    strengths = sec.section("ph_ml_per_l_per_unit")
    strength = num_range(0, 1000, lo_open=True, unit="ml/L per pH unit")
    measured = {name: strengths.optional(name, strength) for name in PH_PUMPS}
    strengths.finish()
    sec.finish()
    return PlantConfig(
        tank_volume_l=tank,
        stock_ppm=(
            DEFAULT_STOCK_PPM if stock is None
            else units.to_internal(stock, units.ppm_scale(conductivity))
        ),
        flow_ml_s=FrozenMap(flow),
        ph_ml_per_l_per_unit=FrozenMap((k, v) for k, v in measured.items() if v is not None),
        nutrient_ratio=FrozenMap((k, v) for k, v in ratio.items() if v is not None),
    )


def _interval(value: Any) -> float:
    seconds = duration(value)
    if seconds != 0 and not 1 <= seconds <= 86400:
        raise Invalid("must be 0 (schedule only) or between 1 s and 86400 s")
    return seconds


def _runtime_validators(controllers: Collection[str]) -> dict[str, Validator[Any]]:
    """The validators of :data:`RUNTIME_KEYS`, shared by the config and run-time updates."""
    return {
        "mode": one_of("auto", "manual"),
        "controller": one_of(*controllers),
        "tds_setpoint": num_range(50, 5000),
        "ec_setpoint": num_range(0.1, 10, unit="mS/cm"),
        "ph_setpoint": num_range(3, 9),
        "schedule": schedule,
        "interval": _interval,
    }


RUNTIME_KEYS: tuple[str, ...] = tuple(_runtime_validators(CONTROLLER_NAMES))
"""Control settings that ThingsBoard may change at run time, the keys of the validators
above (``tds_setpoint`` or ``ec_setpoint``: the same setpoint, in ppm on the configured
scale or in mS/cm). The daemon takes these shared attributes and no others."""


def _crop(value: Any) -> crops.Crop:
    name = string(value)
    crop = crops.find_crop(name)
    if crop is None:
        hint = suggest(crops.canonical(name), crops.CROPS)
        raise Invalid(f"is not a known crop{hint}; known: {', '.join(crops.CROPS)}")
    return crop


def _setpoint_of(
    sec: Section, key: str, runtime: Mapping[str, Validator[Any]], conductivity: str
) -> float | None:
    """``tds_setpoint`` (ppm on the file's scale) or ``ec_setpoint`` (mS/cm), as internal ppm."""
    value = sec.optional(key, runtime[key])
    if value is None:
        return None
    unit = "ec" if key == "ec_setpoint" else units.ppm_scale(conductivity).name
    return units.to_internal(value, unit)


def _control(
    sec: Section, controllers: Collection[str], conductivity: str = "ppm500"
) -> ControlConfig | None:
    runtime = _runtime_validators(controllers)
    crop = sec.optional("crop", _crop)
    setpoints: dict[str, float | None] = {}
    has_tds, has_ec = sec.has("tds_setpoint"), sec.has("ec_setpoint")
    if has_tds and has_ec:
        sec.errors.add(sec.path_of("ec_setpoint"), "give tds_setpoint or ec_setpoint, not both")
        setpoints["tds_setpoint"] = None
    elif has_tds or has_ec:
        key = "tds_setpoint" if has_tds else "ec_setpoint"
        setpoints["tds_setpoint"] = _setpoint_of(sec, key, runtime, conductivity)
    elif crop is not None:
        setpoints["tds_setpoint"] = crop.tds_setpoint
    elif sec.has("crop"):  # a bad crop was already reported
        setpoints["tds_setpoint"] = None
    else:
        key = "ec_setpoint" if conductivity == "ec" else "tds_setpoint"
        other = "tds_setpoint" if conductivity == "ec" else "ec_setpoint"
        sec.errors.add(sec.path_of(key), f"is required (or {other}, or give a crop)")
        setpoints["tds_setpoint"] = None
    if sec.has("ph_setpoint"):
        setpoints["ph_setpoint"] = sec.optional("ph_setpoint", runtime["ph_setpoint"])
    elif crop is not None:
        setpoints["ph_setpoint"] = crop.ph_setpoint
    elif sec.has("crop"):
        setpoints["ph_setpoint"] = None
    else:
        sec.errors.add(sec.path_of("ph_setpoint"), "is required (or give a crop)")
        setpoints["ph_setpoint"] = None
    take = _Taker(sec, ControlConfig)
    config = ControlConfig(
        tds_setpoint=0.0,
        ph_setpoint=0.0,
        mode=take("mode", runtime["mode"]),
        controller=take("controller", runtime["controller"]),
        crop=None if crop is None else crop.name,
        tds_band=None if crop is None else crop.tds_band,
        ph_band=None if crop is None else crop.ph,
        tds_tolerance_pct=take("tds_tolerance_pct", num_range(0, 50, lo_open=True)),
        ph_tolerance=take("ph_tolerance", num_range(0, 2, lo_open=True)),
        schedule=take("schedule", runtime["schedule"]),
        interval=take("interval", runtime["interval"]),
        rb_variant=take("rb_variant", one_of("band", "target", "documented")),
        tds_average_s=take("tds_average_s", duration_range(1, 600)),
        ph_average_s=take("ph_average_s", duration_range(1, 600)),
        mixing_wait_s=take("mixing_wait_s", duration_range(0, 3600)),
        tds_hold_s=take("tds_hold_s", duration_range(0, 3600)),
        ph_hold_s=take("ph_hold_s", duration_range(0, 3600)),
        max_cycle_s=take("max_cycle_s", duration_range(60, 86400)),
        tds_deadband_pct=sec.optional("tds_deadband_pct", num_range(0, 50)),
        ph_deadband=sec.optional("ph_deadband", num_range(0, 2)),
        part_pause_s=take("part_pause_s", duration_range(1, 3600)),
        conductivity=conductivity,
    )
    for key, tolerance in (
        ("tds_deadband_pct", config.tds_tolerance_pct),
        ("ph_deadband", config.ph_tolerance),
    ):
        value = getattr(config, key)
        if value is not None and value > tolerance:
            tol_key = "tds_tolerance_pct" if key == "tds_deadband_pct" else "ph_tolerance"
            sec.errors.add(
                sec.path_of(key),
                f"must be at most {tol_key} ({fmt_number(tolerance)}): no dose is made inside "
                "the deadband, which lies inside the band",
            )
    least = config.tds_hold_s + config.ph_hold_s
    if config.max_cycle_s < least:
        sec.errors.add(
            sec.path_of("max_cycle_s"),
            f"must be at least tds_hold_s + ph_hold_s ({fmt_number(least)} s), "
            "or no cycle could ever finish",
        )
    sec.finish()
    tds, ph = setpoints["tds_setpoint"], setpoints["ph_setpoint"]
    if tds is None or ph is None:
        return None
    return dataclasses.replace(config, tds_setpoint=tds, ph_setpoint=ph)


def _safety(sec: Section, poll_interval: float, conductivity: str = "ppm500") -> SafetyConfig:
    take = _Taker(sec, SafetyConfig)
    scale = units.ppm_scale(conductivity)
    tds_range = take("tds_range", number_pair(lo=0, hi=100_000))
    if sec.has("tds_range"):
        tds_range = (units.to_internal(tds_range[0], scale), units.to_internal(tds_range[1], scale))
    config = SafetyConfig(
        max_actuation_ms=take("max_actuation_ms", milliseconds(1, 600_000)),
        max_ms_per_hour=take("max_ms_per_hour", milliseconds(1, 3_600_000)),
        stale_after_s=take("stale_after_s", duration_range(0, 86400, lo_open=True)),
        min_water_level_l=take("min_water_level_l", num_range(0, 100_000, unit="L")),
        ph_range=take("ph_range", number_pair(lo=0, hi=14)),
        tds_range=tds_range,
        stuck_after_s=take("stuck_after_s", duration_range(0, 7 * 86400)),
    )
    if sec.has("max_ms_per_hour") and config.max_ms_per_hour < config.max_actuation_ms:
        sec.errors.add(
            sec.path_of("max_ms_per_hour"),
            f"must be at least max_actuation_ms ({config.max_actuation_ms} ms)",
        )
    elif config.max_ms_per_hour < config.max_actuation_ms:
        sec.errors.add(
            sec.path_of("max_actuation_ms"),
            f"must be at most max_ms_per_hour ({config.max_ms_per_hour} ms)",
        )
    poll = fmt_number(poll_interval)
    if config.stale_after_s <= poll_interval:
        sec.errors.add(sec.path_of("stale_after_s"), f"must be more than poll_interval ({poll} s)")
    if 0 < config.stuck_after_s <= poll_interval:
        sec.errors.add(
            sec.path_of("stuck_after_s"), f"must be 0 (off) or more than poll_interval ({poll} s)"
        )
    sec.finish()
    return config


def _check_setpoints(
    control: ControlConfig,
    safety: SafetyConfig,
    errors: ErrorList,
    path: str,
    given: Collection[str] = (),
) -> None:
    """Setpoints must lie within the safety layer's plausible ranges, or control would fight it.

    ``given`` names the keys the user wrote: an ``ec_setpoint`` is reported as one.
    """
    scale = units.ppm_scale(control.conductivity)
    tds_key = "ec_setpoint" if "ec_setpoint" in given else "tds_setpoint"
    unit = units.unit("ec") if tds_key == "ec_setpoint" else scale
    for key, value, limits, limits_key in (
        (tds_key, control.tds_setpoint, safety.tds_range, "tds_range"),
        ("ph_setpoint", control.ph_setpoint, safety.ph_range, "ph_range"),
    ):
        if not limits[0] <= value <= limits[1]:
            if key == "ph_setpoint":
                text, low, high = fmt_number(value), limits[0], limits[1]
            else:
                text = units.unit(unit.name).text(units.from_internal(value, unit))
                low, high = (units.from_internal(v, scale) for v in limits)
            shown = f"[{fmt_number(low)}, {fmt_number(high)}]"
            errors.add(
                f"{path}.{key}" if path else key,
                f"{text} is outside safety.{limits_key} {shown}",
            )


def _recalibrate(sec: Section) -> RecalibrateConfig:
    """``recalibrate_after_days``: one number for everything, or ``{pumps, ph, ec}``."""
    raw = sec.raw("recalibrate_after_days")
    days = num_range(0, 3650, unit="days")
    if raw is None:
        return RecalibrateConfig()
    if not isinstance(raw, Mapping):
        value = sec.errors.check(sec.path_of("recalibrate_after_days"), days, raw)
        return RecalibrateConfig() if value is None else RecalibrateConfig(value, value, value)
    each = sec.section("recalibrate_after_days")
    take_each = _Taker(each, RecalibrateConfig)
    config = RecalibrateConfig(
        pumps=take_each("pumps", days), ph=take_each("ph", days),
        ec=take_each("ec", days),
    )
    each.finish()
    return config


def _node(
    sec: Section, controllers: Collection[str], conductivity: str = "ppm500"
) -> NodeConfig | None:
    name = sec.require("name", device_name)
    take = _Taker(sec, NodeConfig)
    url = sec.require("url", node_url)
    poll = take("poll_interval", duration_range(0, 3600, lo_open=True))
    timeout = take("timeout", duration_range(0, 60, lo_open=True))
    retries = take("retries", int_range(0, 10))
    keepalive = take("keepalive", duration_range(0, NODE_WATCHDOG_S, lo_open=True, hi_open=True))
    calibration = _calibration(sec.section("calibration"))
    plant = _plant(sec.section("plant"), conductivity) if "plant" in sec.data else None
    control = (
        _control(sec.section("control"), controllers, conductivity)
        if "control" in sec.data else None
    )
    safety = _safety(sec.section("safety"), poll, conductivity)
    recalibrate = _recalibrate(sec)
    if control is not None:
        given = sec.data["control"] if isinstance(sec.data["control"], Mapping) else {}
        _check_setpoints(control, safety, sec.errors, sec.path_of("control"), given)
    sec.finish()
    if name is None or url is None:
        return None
    return NodeConfig(
        name=name,
        url=url,
        poll_interval=poll,
        timeout=timeout,
        retries=retries,
        keepalive=keepalive,
        calibration=calibration,
        plant=plant,
        control=control,
        safety=safety,
        conductivity=conductivity,
        recalibrate_after_days=recalibrate,
    )


def _nodes(
    root: Section, controllers: Collection[str], conductivity: str = "ppm500"
) -> tuple[NodeConfig, ...]:
    raw = root.raw("nodes")
    if raw is None:
        root.errors.add("nodes", "is required (a list of nodes)")
        return ()
    if not isinstance(raw, list):
        root.errors.add("nodes", "must be a list of nodes")
        return ()
    if not raw:
        root.errors.add("nodes", "must list at least one node")
    nodes: list[NodeConfig] = []
    for i, item in enumerate(raw):
        node = _node(Section(root.errors, f"nodes[{i}]", item), controllers, conductivity)
        if node is not None:
            nodes.append(node)
    return tuple(nodes)


def _check_names(raw_nodes: Any, gateway_name: str | None, errors: ErrorList) -> None:
    """Device names are unique: no two nodes alike, and none named like the gateway."""
    if not isinstance(raw_nodes, list):
        return
    first: dict[str, int] = {}
    for i, item in enumerate(raw_nodes):
        name = item.get("name") if isinstance(item, Mapping) else None
        if not isinstance(name, str):
            continue
        if name == gateway_name:
            errors.add(f"nodes[{i}].name", "is the gateway's own name (gateway.name)")
        if name in first:
            errors.add(f"nodes[{i}].name", f"repeats the name of nodes[{first[name]}]")
        first.setdefault(name, i)


# --- public API --------------------------------------------------------------------------------


def parse_config(
    data: Any,
    *,
    base_dir: str | Path | None = None,
    controllers: Collection[str] = CONTROLLER_NAMES,
) -> Config:
    """Validate loaded YAML (or any equal data) into a :class:`Config`.

    ``base_dir`` anchors relative file paths (default: the working directory);
    ``controllers`` are the controller names to accept. Raises
    :class:`ConfigError` with every problem found.
    """
    base = None if base_dir is None else Path(base_dir)
    errors = ErrorList()
    root = Section(errors, "", data)
    gateway = _gateway(root.section("gateway"), base)
    storage = _storage(root.section("storage"), base)
    thingsboard = (
        _thingsboard(root.section("thingsboard"), base) if "thingsboard" in root.data else None
    )
    units_config = _units(root.section("units"))
    nodes = _nodes(root, controllers, units_config.conductivity)
    _check_names(root.data.get("nodes"), None if gateway is None else gateway.name, errors)
    root.finish()
    if errors or gateway is None or storage is None:
        raise ConfigError(errors.items)
    return Config(
        gateway=gateway, storage=storage, thingsboard=thingsboard, nodes=nodes, units=units_config
    )


def _units(sec: Section) -> UnitsConfig:
    take = _Taker(sec, UnitsConfig)
    conductivity = take("conductivity", one_of(*units.UNITS))
    sec.finish()
    return UnitsConfig(conductivity)


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 numbers and duplicate keys refused.

    YAML 1.1 reads an unquoted ``15:00`` as the base-60 number 900, which
    would turn a schedule into nonsense; here it stays the string "15:00".
    A key given twice in one mapping is an error instead of "last one wins".
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
# PyYAML's own int and float patterns without their YAML 1.1 base-60 alternatives.
_INT_RE = re.compile(
    r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""",
    re.X,
)
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))


def load_config(path: str | Path, *, controllers: Collection[str] = CONTROLLER_NAMES) -> Config:
    """Read and validate a YAML config file; relative paths in it are relative to its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError([(str(path), f"cannot read: {reason}")]) from err
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([(str(path), f"{where}{err.problem or err.context}")]) from err
    except yaml.YAMLError as err:
        raise ConfigError([(str(path), f"is not valid YAML: {err}")]) from err
    return parse_config(data, base_dir=path.parent, controllers=controllers)


def apply_control_update(
    control: ControlConfig,
    data: Mapping[str, Any],
    *,
    path_prefix: str = "",
    controllers: Collection[str] = CONTROLLER_NAMES,
    safety: SafetyConfig | None = None,
) -> ControlConfig:
    """``control`` with a run-time update applied, or ConfigError and nothing applied.

    ``data`` holds some of :data:`RUNTIME_KEYS` (a ThingsBoard shared-attribute
    update or RPC params); every value is checked with the config's own
    validators and any bad or unknown key refuses the whole update. Error paths
    start with ``path_prefix`` (e.g. ``"tank-a"`` gives ``tank-a.ph_setpoint``).
    With ``safety``, setpoints must also lie within its plausible ranges.
    """
    errors = ErrorList()
    sec = Section(errors, path_prefix, data)
    changes: dict[str, Any] = {}
    for key, validator in _runtime_validators(controllers).items():
        if sec.has(key) or key in sec.data:  # has() marks the key known, for suggestions
            value = errors.check(sec.path_of(key), validator, sec.raw(key))
            if value is not None:
                changes[key] = value
    sec.finish()
    _setpoint_update(control, changes, errors, sec)
    updated = dataclasses.replace(control, **changes)
    if safety is not None and not errors:
        _check_setpoints(updated, safety, errors, path_prefix, given=data.keys())
    if errors:
        raise ConfigError(errors.items)
    return updated


def _setpoint_update(
    control: ControlConfig, changes: dict[str, Any], errors: ErrorList, sec: Section
) -> None:
    """``tds_setpoint`` (the node's ppm scale) or ``ec_setpoint`` in ``changes``, as internal ppm.

    Both at once must agree (a dashboard that shows both may send both).
    """
    ppm = changes.pop("tds_setpoint", None)
    ec = changes.pop("ec_setpoint", None)
    scale = units.ppm_scale(control.conductivity)
    values = [units.to_internal(ppm, scale)] if ppm is not None else []
    if ec is not None:
        values.append(units.to_internal(ec, "ec"))
    if len(values) == 2 and not math.isclose(values[0], values[1], rel_tol=1e-6):
        errors.add(
            sec.path_of("ec_setpoint"),
            f"{fmt_number(ec)} mS/cm disagrees with tds_setpoint {fmt_number(ppm)} "
            f"({units.unit('ec').text(units.from_internal(values[0], 'ec'))}); give one of them",
        )
    elif values:
        changes["tds_setpoint"] = values[0]


def control_settings(control: ControlConfig) -> dict[str, Any]:
    """The run-time settings as JSON-able values; :func:`apply_control_update` takes them back.

    The setpoint goes as the node's unit writes it: ``ec_setpoint`` (mS/cm) with
    ``units.conductivity: ec``, else ``tds_setpoint`` in ppm on its scale.
    """
    if control.conductivity == "ec":
        key, value = "ec_setpoint", units.from_internal(control.tds_setpoint, "ec")
    else:
        key = "tds_setpoint"
        value = units.from_internal(control.tds_setpoint, units.ppm_scale(control.conductivity))
    return {
        "mode": control.mode,
        "controller": control.controller,
        key: value,
        "ph_setpoint": control.ph_setpoint,
        "schedule": [f"{t:%H:%M}" for t in control.schedule],
        "interval": control.interval,
    }


def _seconds(value: float) -> str:
    return f"{fmt_number(value)} s"


def _size(n: int) -> str:
    """Bytes the way the user probably wrote them: 2 GiB, 500 MB, else rounded IEC."""
    units = (("GiB", 1 << 30), ("GB", 10**9), ("MiB", 1 << 20), ("MB", 10**6), ("KiB", 1 << 10))
    for unit, scale in units:
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    for unit, scale in units[::2]:
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _control_line(control: ControlConfig | None) -> str:
    if control is None:
        return "monitor only"
    crop = f" ({control.crop})" if control.crop else ""
    when = [f"every {_seconds(control.interval)}"] if control.interval else []
    if control.schedule:
        when.append("at " + " ".join(f"{t:%H:%M}" for t in control.schedule))
    unit = units.unit(control.conductivity)
    setpoint = unit.text(units.from_internal(control.tds_setpoint, unit))
    return (
        f"{control.mode} {control.controller}, {unit.key} {setpoint}, "
        f"pH {fmt_number(control.ph_setpoint)}{crop}, {', '.join(when) or 'on demand only'}"
    )


def summarize(config: Config) -> str:
    """A short human summary for ``hydrogate check-config``."""
    storage = config.storage
    retention = f"at most {storage.max_rows} rows"
    if storage.max_bytes is not None:
        retention += f" or {_size(storage.max_bytes)}"
    tb = config.thingsboard
    uplink = (
        "offline (buffer only)"
        if tb is None
        else f"{tb.host}:{tb.port}{' tls' if tb.tls else ''}"
        f", max payload {_size(tb.max_payload_bytes)}"
    )
    lines = [
        f"gateway      {config.gateway.name}"
        f" (health every {_seconds(config.gateway.health_interval)})",
        f"storage      {storage.path} ({retention}, synced every"
        f" {_seconds(storage.sync_interval)})",
        f"thingsboard  {uplink}",
        f"units        conductivity {config.units.conductivity} (telemetry key "
        f"{units.unit(config.units.conductivity).key})",
        f"nodes        {len(config.nodes)}",
    ]
    for node in config.nodes:
        calibrated = ", ".join(sorted(node.calibration)) or "none"
        lines.append(
            f"  {node.name}: {node.url}, poll {_seconds(node.poll_interval)}, "
            f"calibrated: {calibrated}; {_control_line(node.control)}"
        )
    return "\n".join(lines)
