"""ThingsBoard MQTT Gateway API payloads: pure builders, validators and parsers.

Everything the gateway sends to ThingsBoard is built here, and everything it
receives is parsed here, with no I/O. The rules come from docs/thingsboard.md
(how the server parses the Gateway API): on MQTT 3.1.1 it closes the session on
any payload it cannot parse, and a store that resends until acknowledged would
then resend that payload forever. So every outgoing entry is validated before
it is stored (`telemetry_entry`), every payload is kept under the size limit
(`build_telemetry`), and every incoming message is parsed into a small frozen
dataclass or refused with `MalformedMessage`, never with anything else:
incoming messages are bounded in size and nesting before anything walks
them, and device names and RPC ids are checked to be ones a reply can carry.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

# Topics of the Gateway API (gateway -> server unless noted).
CONNECT = "v1/gateway/connect"
DISCONNECT = "v1/gateway/disconnect"
TELEMETRY = "v1/gateway/telemetry"
ATTRIBUTES = "v1/gateway/attributes"  # also server -> gateway: shared attribute updates
ATTRIBUTES_REQUEST = "v1/gateway/attributes/request"
ATTRIBUTES_RESPONSE = "v1/gateway/attributes/response"  # server -> gateway
RPC = "v1/gateway/rpc"  # both directions
GATEWAY_TELEMETRY = "v1/devices/me/telemetry"

#: The only filters a gateway may subscribe to; any other makes the subscription fail.
SUBSCRIPTIONS = (ATTRIBUTES, RPC, ATTRIBUTES_RESPONSE)

#: ThingsBoard stores device names in a varchar(255).
MAX_DEVICE_NAME = 255
#: Nesting allowed inside a value (ThingsBoard stores objects as JSON text).
MAX_DEPTH = 8
_INT64 = 2**63
#: Largest message accepted from the server. ThingsBoard's own limit is 64 KiB by
#: default; anything far beyond it is not the server talking.
MAX_INCOMING_BYTES = 1 << 20
#: Nesting accepted in a message from the server. Nothing the gateway reads is
#: nested more than a few levels; a deeper message is refused before any code
#: walks it recursively (json, repr, copy, logging all recurse).
MAX_INCOMING_DEPTH = 32
#: Server-side RPC ids are Java ints on the server: a reply carrying any other
#: id could not be parsed there and would end the session.
_RPC_ID_RANGE = range(-(2**31), 2**31)
#: Longest method name taken from an RPC (ours are a few characters).
MAX_METHOD_CHARS = 64
#: Longest ``error`` text in an RPC reply (it may quote outside input).
MAX_ERROR_CHARS = 500

_json_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _dumps(obj: Any) -> str:
    """Compact JSON text; orjson on the hot path (every stored reading).

    Values are validated before they get here (finite numbers only), so
    orjson's NaN-as-null never applies; what orjson refuses (an integer
    beyond 64 bits) or text that is not ASCII goes through the standard
    encoder, which refuses NaN and escapes non-ASCII characters.
    """
    try:
        data = orjson.dumps(obj)
    except TypeError:
        return _json_dumps(obj)
    # Sizes are counted in characters: keep the text ASCII (escaped) so that
    # characters are bytes, as the standard encoder does.
    return data.decode() if data.isascii() else _json_dumps(obj)


#: Compact JSON as entries are written (the store keeps parts of entries).
compact_json = _dumps


class TbMessageError(ValueError):
    """Base of the errors of this module."""


class InvalidMessage(TbMessageError):
    """Something we were about to send that ThingsBoard would refuse."""


class MalformedMessage(TbMessageError):
    """A message from the server that is not what the Gateway API documents.

    ``reason`` is a short fixed word (``not_json``, ``bad_device``, ``bad_id``,
    ``too_deep``, ``too_large``, ...) used to count and log faults by kind.
    """

    def __init__(self, message: str, *, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class MalformedRpc(MalformedMessage):
    """An RPC whose device and id are readable but whose body is not.

    It carries `device` and `id` so that the gateway can still answer it with
    ``{"success": false, "error": ...}`` instead of leaving the caller to time out.
    """

    def __init__(self, message: str, *, device: str, id: int, reason: str = "bad_body") -> None:
        super().__init__(message, reason=reason)
        self.device = device
        self.id = id


class OutboxRow(NamedTuple):
    """One buffered reading: its outbox id, device, timestamp and entry JSON text."""

    id: int
    device: str
    ts: int
    entry: str


# ------------------------------------------------------------------ limits
def mqtt_overhead(topic: str) -> int:
    """Bytes a QoS 1 PUBLISH adds around its payload on ``topic``.

    Fixed header (1 byte + up to 4 bytes of remaining length), the topic with
    its 2-byte length, and the 2-byte packet id. ThingsBoard's limit
    (``NETTY_MAX_PAYLOAD_SIZE``) applies to the packet, so the payload gets
    the configured limit minus this.
    """
    return 5 + 2 + len(topic.encode()) + 2


def payload_limit(max_packet_bytes: int, topic: str = TELEMETRY) -> int:
    """The largest payload on ``topic`` that keeps the packet within ``max_packet_bytes``."""
    limit = max_packet_bytes - mqtt_overhead(topic)
    if limit <= 0:
        raise ValueError(f"max_payload_bytes {max_packet_bytes} leaves no room for a payload")
    return limit


def single_entry_size(device: str, entry: str) -> int:
    """Size of ``{"<device>":[<entry>]}``, the smallest telemetry payload carrying ``entry``.

    Both texts are ASCII (``json`` escapes everything else), so characters are bytes.
    """
    return _json_len(device) + len(entry) + 5


@functools.lru_cache(maxsize=1024)
def _json_len(text: str) -> int:
    """Length of a device name as JSON (a handful of names, asked per reading)."""
    return len(_dumps(text))


# ------------------------------------------------------------- validation
def check_device(device: object) -> str:
    """Return ``device`` if ThingsBoard accepts it as a device name, else raise InvalidMessage."""
    if not isinstance(device, str):
        raise InvalidMessage(f"device name must be a string, got {type(device).__name__}")
    if not device.strip():
        raise InvalidMessage("device name is empty")
    if len(device) > MAX_DEVICE_NAME:
        raise InvalidMessage(f"device name longer than {MAX_DEVICE_NAME} characters")
    return device


def _check_value(key: str, value: object, depth: int) -> None:
    """Raise InvalidMessage unless ``value`` is JSON ThingsBoard stores as sent."""
    if value is None or isinstance(value, str | bool):
        return
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise InvalidMessage(f"{key}: integer {value} does not fit in 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMessage(f"{key}: {value} is not a finite number")
        return
    if depth >= MAX_DEPTH:
        raise InvalidMessage(f"{key}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidMessage(f"{key}: object key {k!r} is not a string")
            _check_value(f"{key}.{k}", v, depth + 1)
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_value(f"{key}[{i}]", v, depth + 1)
        return
    raise InvalidMessage(f"{key}: {type(value).__name__} is not a JSON value")


def clean_entry_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Validated telemetry values, ``None`` left out (ThingsBoard has no null values).

    Raises InvalidMessage for a non-string or empty key, a non-finite number,
    anything that is not JSON, or when no value is left.
    """
    if type(values) is not dict and not isinstance(values, Mapping):
        raise InvalidMessage(f"values must be a mapping, got {type(values).__name__}")
    out: dict[str, Any] = {}
    isfinite = math.isfinite
    for key, value in values.items():
        if type(key) is not str or not key:
            raise InvalidMessage(f"telemetry key {key!r} is not a non-empty string")
        if value is None:
            continue
        # Fast paths for the common cases: a finite float, a 64-bit integer.
        kind = type(value)
        if not (
            (kind is float and isfinite(value)) or (kind is int and -_INT64 <= value < _INT64)
        ):
            _check_value(key, value, 0)
        out[key] = value
    if not out:
        raise InvalidMessage("no values to send")
    return out


def drop_unsendable(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The entries of ``values`` that `clean_entry_values` accepts one by one, and the others' keys.

    For a reading refused as a whole: its good values can still be sent
    while the bad ones (an empty key, an integer beyond 64 bits, a
    non-finite number) are dropped and counted by the caller.
    """
    good: dict[str, Any] = {}
    bad: list[str] = []
    for key, value in values.items():
        try:
            if type(key) is not str or not key:
                raise InvalidMessage("bad key")
            if value is not None:
                _check_value(key, value, 0)
        except InvalidMessage:
            bad.append(str(key))
            continue
        good[key] = value
    return good, bad


def check_ts(ts_ms: object) -> int:
    """Return ``ts_ms`` if it is a usable timestamp (integer ms since the epoch), else raise."""
    if type(ts_ms) is not int or not 0 <= ts_ms < _INT64:
        raise InvalidMessage(f"ts must be a non-negative integer of milliseconds, got {ts_ms!r}")
    return ts_ms


def telemetry_entry(device: str, ts_ms: int, values: Mapping[str, Any], max_payload: int) -> str:
    """The entry text ``{"ts":..,"values":{..}}`` for one reading, validated.

    ``max_payload`` is the payload limit (see `payload_limit`): the entry must
    fit in a telemetry message on its own, or it could never be sent.
    """
    return encode_entry(check_device(device), check_ts(ts_ms), values, max_payload)


def encode_entry(device: str, ts_ms: int, values: Mapping[str, Any], max_payload: int) -> str:
    """`telemetry_entry` for a device and ts already checked (`check_device`, `check_ts`)."""
    entry = _dumps({"ts": ts_ms, "values": clean_entry_values(values)})
    size = single_entry_size(device, entry)
    if size > max_payload:
        raise InvalidMessage(f"entry of {size} bytes exceeds the payload limit of {max_payload}")
    return entry


# ---------------------------------------------------------------- builders
def connect(device: str, device_type: str | None = None) -> bytes:
    """Payload announcing ``device`` (``type`` is the profile of a newly created device)."""
    msg: dict[str, str] = {"device": check_device(device)}
    if device_type:
        msg["type"] = device_type
    return _dumps(msg).encode()


def disconnect(device: str) -> bytes:
    """Payload telling the server that ``device`` is no longer behind this gateway."""
    return _dumps({"device": check_device(device)}).encode()


def build_telemetry(rows: Iterable[OutboxRow], max_bytes: int) -> list[tuple[bytes, list[int]]]:
    """Pack outbox rows into telemetry payloads of at most ``max_bytes`` each.

    Rows are taken in the order given (the outbox's id order); within a payload
    they are grouped by device, and every device's entries keep their order
    within and across payloads. Each result is ``(payload, ids it carries)``.
    Entry texts are copied verbatim: they were validated when stored.
    Raises InvalidMessage for a row too large to travel even on its own.
    """
    out: list[tuple[bytes, list[int]]] = []
    groups: dict[str, list[str]] = {}
    ids: list[int] = []
    # Size of the payload so far, counting a comma before every group: the
    # "{}" (2 bytes) minus the first group's comma that is never written.
    size = 1
    for row in rows:
        entries = groups.get(row.device)
        # ,"<device>":[<entry>]  for a new group;  ,<entry>  for one more entry.
        added = (
            len(row.entry) + 1
            if entries is not None
            else single_entry_size(row.device, row.entry) - 1
        )
        if size + added > max_bytes and ids:
            out.append((_encode(groups), ids))
            groups, ids, size = {}, [], 1
            entries = None
            added = single_entry_size(row.device, row.entry) - 1
        if size + added > max_bytes:
            raise InvalidMessage(
                f"outbox row {row.id} ({row.device}) does not fit in {max_bytes} bytes"
            )
        if entries is None:
            groups[row.device] = [row.entry]
        else:
            entries.append(row.entry)
        ids.append(row.id)
        size += added
    if ids:
        out.append((_encode(groups), ids))
    return out


def _encode(groups: Mapping[str, Sequence[str]]) -> bytes:
    parts = [f"{_dumps(device)}:[{','.join(entries)}]" for device, entries in groups.items()]
    return ("{" + ",".join(parts) + "}").encode()


def attributes_request(request_id: int, device: str, keys: Sequence[str]) -> bytes:
    """Request for the shared attributes ``keys`` of ``device``.

    ``client`` must be the boolean false: the documented ``"client":[...]``
    form makes the server close the connection.
    """
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise InvalidMessage(f"attribute keys must be non-empty strings, got {keys!r}")
    return _dumps(
        {"id": request_id, "device": check_device(device), "client": False, "keys": list(keys)}
    ).encode()


def rpc_reply(device: str, request_id: int, data: Mapping[str, Any]) -> bytes:
    """Reply to the server-side RPC ``request_id`` of ``device``.

    Raises InvalidMessage when ``data`` is not JSON (e.g. holds NaN); the
    caller then replies with an error instead. The size is not checked here:
    `fit_rpc_reply` keeps a reply within the payload limit.
    """
    if not isinstance(data, Mapping):
        raise InvalidMessage(f"RPC reply data must be a mapping, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str):
            raise InvalidMessage(f"RPC reply key {key!r} is not a string")
        _check_value(key, value, 0)
    return _dumps({"device": check_device(device), "id": request_id, "data": dict(data)}).encode()


def rpc_error(device: str, request_id: int, error: str) -> bytes:
    """Reply ``{"success": false, "error": ...}`` to an RPC that cannot be carried out.

    The text is cut to `MAX_ERROR_CHARS`: it may quote what the caller sent.
    """
    text = str(error)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return rpc_reply(device, request_id, {"success": False, "error": text})


def fit_rpc_reply(
    device: str, request_id: int, data: Mapping[str, Any], max_payload: int
) -> tuple[bytes, str | None]:
    """The reply to send, at most ``max_payload`` bytes, and what had to be done to it.

    Returns ``(payload, None)`` when ``data`` fits as it is. A reply too large
    (a `get_state` of a node that sent thousands of keys) has entries of its
    largest objects left out, last ones first, and says so in ``trimmed``
    (``"trimmed"``); a reply that cannot be trimmed enough, or that is not
    JSON at all, becomes ``{"success": false, "error": ...}`` with the reason
    (``"refused"``). Raises InvalidMessage only when even that error reply
    cannot be sent (an invalid device name, a limit of a few bytes).
    """
    try:
        payload = rpc_reply(device, request_id, data)
    except InvalidMessage as exc:
        return rpc_error(device, request_id, f"reply cannot be encoded: {exc}"), "refused"
    if len(payload) <= max_payload:
        return payload, None
    size = len(payload)
    excess = size - max_payload
    for _ in range(3):  # the estimate is exact but for the note; retry with more room
        trimmed = _trim(data, excess + 256, max_payload)
        if trimmed is None:
            break
        payload = rpc_reply(device, request_id, trimmed)
        if len(payload) <= max_payload:
            return payload, "trimmed"
        excess += len(payload) - max_payload
    error = rpc_error(
        device,
        request_id,
        f"reply of {size} bytes exceeds the largest message ThingsBoard takes "
        f"({max_payload} bytes) and cannot be trimmed",
    )
    if len(error) > max_payload:
        raise InvalidMessage(f"even an error reply exceeds {max_payload} bytes")
    return error, "refused"


def _trim(data: Mapping[str, Any], need: int, max_payload: int) -> dict[str, Any] | None:
    """``data`` with at least ``need`` bytes of entries of its objects left out, or None.

    The largest objects are cut first; within one, the entries that came
    first are kept (a node's standard keys come before the ones it added).
    """
    out = dict(data)
    objects = [k for k, v in out.items() if isinstance(v, Mapping) and v]
    objects.sort(key=lambda k: len(_dumps(out[k])), reverse=True)
    notes: list[str] = []
    for name in objects:
        if need <= 0:
            break
        items = list(out[name].items())
        keep = len(items)
        while keep and need > 0:
            keep -= 1
            key, value = items[keep]
            need -= len(_dumps(key)) + len(_dumps(value)) + 2
        out[name] = dict(items[:keep])
        notes.append(f"{name}: {len(items) - keep} of {len(items)} entries left out")
    if need > 0 or not notes:
        return None
    out["trimmed"] = (
        "; ".join(notes) + f": the reply must fit in max_payload_bytes ({max_payload} bytes "
        "of payload)"
    )
    return out


def client_attributes(device: str, values: Mapping[str, Any], max_payload: int) -> bytes:
    """``{"<device>":{...}}`` for ``v1/gateway/attributes`` (the device's client attributes).

    Validated like telemetry values (``None`` left out); raises InvalidMessage
    if nothing is left or the payload would exceed ``max_payload``.
    """
    payload = _dumps({check_device(device): clean_entry_values(values)}).encode()
    if len(payload) > max_payload:
        raise InvalidMessage(
            f"client attributes of {device}: {len(payload)} bytes exceed {max_payload}"
        )
    return payload


def gateway_telemetry(values: Mapping[str, Any]) -> bytes:
    """The gateway device's own telemetry (``{"k": v, ...}``, stamped by the server)."""
    return _dumps(clean_entry_values(values)).encode()


# ----------------------------------------------------------------- parsers
@dataclass(frozen=True)
class AttributeUpdate:
    """Shared attributes of ``device`` changed (``data``) or were deleted (``deleted``)."""

    device: str
    data: Mapping[str, Any]
    deleted: tuple[str, ...] = ()


_NO_VALUE: Any = object()


@dataclass(frozen=True)
class AttributeResponse:
    """The server's answer to attribute request ``id``.

    For a single key the server sends only ``value`` (without the key name),
    so the caller resolves it with the keys it asked for (`resolve`).
    """

    id: int
    device: str
    values: Mapping[str, Any] = field(default_factory=dict)
    value: Any = _NO_VALUE

    def resolve(self, keys: Sequence[str]) -> dict[str, Any]:
        """The attributes found, as key -> value, given the keys that were requested."""
        if self.value is _NO_VALUE:
            return dict(self.values)
        if len(keys) != 1:
            raise MalformedMessage(
                f"attribute response {self.id} has one value but {len(keys)} keys were requested"
            )
        return {keys[0]: self.value}


@dataclass(frozen=True)
class RpcRequest:
    """A server-side RPC to ``device``: reply with the same ``id``."""

    device: str
    id: int
    method: str
    params: Any


def _load_object(payload: object) -> dict[str, Any]:
    if isinstance(payload, bytes | bytearray):
        if len(payload) > MAX_INCOMING_BYTES:
            raise MalformedMessage(
                f"payload of {len(payload)} bytes exceeds {MAX_INCOMING_BYTES}", reason="too_large"
            )
        try:
            payload = payload.decode()
        except UnicodeDecodeError as exc:
            raise MalformedMessage("payload is not UTF-8", reason="not_utf8") from exc
    if not isinstance(payload, str):
        raise MalformedMessage(f"payload of type {type(payload).__name__}", reason="not_json")
    if len(payload) > MAX_INCOMING_BYTES:
        raise MalformedMessage(
            f"payload of {len(payload)} characters exceeds {MAX_INCOMING_BYTES}",
            reason="too_large",
        )
    try:
        obj = json.loads(payload)
    except RecursionError as exc:
        raise MalformedMessage("payload is nested too deeply", reason="too_deep") from exc
    except ValueError as exc:
        raise MalformedMessage(f"payload is not JSON: {exc}", reason="not_json") from exc
    if not isinstance(obj, dict):
        raise MalformedMessage(
            f"payload is a JSON {type(obj).__name__}, not an object", reason="not_object"
        )
    return obj


def depth(value: object, limit: int = MAX_INCOMING_DEPTH) -> int:
    """How deeply ``value`` nests lists and objects (a scalar is 0), counted up to ``limit + 1``.

    Iterative, so a value nested thousands of levels deep cannot raise
    RecursionError here; it stops looking once ``limit`` is exceeded.
    """
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        level += 1
        if level > deepest:
            deepest = level
            if deepest > limit:
                return deepest
        stack.extend((child, level) for child in children)
    return deepest


def _check_depth(obj: object, what: str) -> None:
    if depth(obj) > MAX_INCOMING_DEPTH:
        raise MalformedMessage(
            f"{what} is nested deeper than {MAX_INCOMING_DEPTH} levels", reason="too_deep"
        )


def _device(obj: Mapping[str, Any]) -> str:
    """The message's device: a name ThingsBoard could have sent and we can answer to."""
    device = obj.get("device")
    try:
        return check_device(device)
    except InvalidMessage as exc:
        raise MalformedMessage(f"invalid 'device': {exc}", reason="bad_device") from None


def _id(obj: Mapping[str, Any]) -> int:
    rid = obj.get("id")
    if type(rid) is not int:
        raise MalformedMessage(
            f"missing or invalid 'id' ({type(rid).__name__})", reason="bad_id"
        )
    return rid


def parse_attribute_update(payload: object) -> AttributeUpdate | None:
    """Parse ``{"device":..,"data":{..}}`` from ``v1/gateway/attributes``.

    Returns None for our own client attributes (``{"tank-a":{..},..}``, no
    ``device``): the topic is shared by both directions and a plain MQTT
    broker hands them back to us.
    """
    obj = _load_object(payload)
    _check_depth(obj, "attribute update")
    if obj and "device" not in obj and all(isinstance(v, dict) for v in obj.values()):
        return None
    device = _device(obj)
    data = obj.get("data")
    if not isinstance(data, dict):
        raise MalformedMessage(
            f"attribute update for {device}: 'data' is not an object", reason="bad_data"
        )
    deleted: tuple[str, ...] = ()
    if "deleted" in data:
        raw = data["deleted"]
        if not isinstance(raw, list) or not all(isinstance(k, str) for k in raw):
            raise MalformedMessage(
                f"attribute update for {device}: 'deleted' is not a key list", reason="bad_data"
            )
        deleted = tuple(raw)
    return AttributeUpdate(device, data, deleted)


def parse_attribute_response(payload: object) -> AttributeResponse:
    """Parse a response from ``v1/gateway/attributes/response`` (one, several or no keys)."""
    obj = _load_object(payload)
    _check_depth(obj, "attribute response")
    rid = _id(obj)
    device = _device(obj)
    if "values" in obj:
        values = obj["values"]
        if not isinstance(values, dict):
            raise MalformedMessage(
                f"attribute response {rid}: 'values' is not an object", reason="bad_data"
            )
        return AttributeResponse(rid, device, values=values)
    if "value" in obj:
        return AttributeResponse(rid, device, value=obj["value"])
    return AttributeResponse(rid, device)


def parse_rpc(payload: object) -> RpcRequest | None:
    """Parse ``{"device":..,"data":{"id":..,"method":..,"params":..}}`` from ``v1/gateway/rpc``.

    Returns None for a reply (``{"device":..,"id":..,"data":..}``): the topic
    is shared by both directions, and a plain MQTT broker (the demo's, the
    tests') hands our own replies back to us. Raises MalformedRpc (answerable)
    when device and id are ones a reply can carry but the rest is not
    usable, MalformedMessage (not answerable: dropped) otherwise.
    """
    obj = _load_object(payload)
    device = _device(obj)
    if "id" in obj:
        return None
    data = obj.get("data")
    if not isinstance(data, dict):
        raise MalformedMessage(f"RPC for {device}: 'data' is not an object", reason="bad_data")
    rid = _id(data)
    if rid not in _RPC_ID_RANGE:
        raise MalformedMessage(f"RPC for {device}: id {rid} is not a 32-bit integer",
                               reason="bad_id")
    method = data.get("method")
    if not isinstance(method, str) or not method.strip():
        raise MalformedRpc(f"RPC {rid} for {device}: missing method", device=device, id=rid,
                           reason="no_method")
    if len(method) > MAX_METHOD_CHARS:
        raise MalformedRpc(
            f"RPC {rid} for {device}: method name longer than {MAX_METHOD_CHARS} characters",
            device=device, id=rid, reason="bad_method",
        )
    params = data.get("params")
    if depth(params) > MAX_INCOMING_DEPTH:
        raise MalformedRpc(
            f"RPC {rid} for {device}: params nested deeper than {MAX_INCOMING_DEPTH} levels",
            device=device, id=rid, reason="too_deep",
        )
    return RpcRequest(device, rid, method, params)
