"""Gateway API payloads: what we build is what docs/thingsboard.md documents, and parsing never dies."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import tbmsg
from gateway.tbmsg import InvalidMessage, MalformedMessage, MalformedRpc, OutboxRow


# ------------------------------------------------------------------ entries
def test_entry_is_compact_ts_values_json() -> None:
    entry = tbmsg.telemetry_entry("tank-a", 1732200000000, {"tds": 801.2, "ph": 6.02}, 65000)
    assert entry == '{"ts":1732200000000,"values":{"tds":801.2,"ph":6.02}}'


def test_entry_leaves_out_null_values() -> None:
    entry = tbmsg.telemetry_entry("tank-a", 1, {"tds": None, "ph": 6.0}, 65000)
    assert json.loads(entry) == {"ts": 1, "values": {"ph": 6.0}}


def test_entry_keeps_strings_bools_ints_and_json_objects() -> None:
    values = {"severity": "info", "ok": True, "n": 3, "obj": {"a": [1, 2.5, "x"]}}
    entry = tbmsg.telemetry_entry("tank-a", 5, values, 65000)
    assert json.loads(entry)["values"] == values


@pytest.mark.parametrize(
    ("device", "ts", "values"),
    [
        ("", 1, {"tds": 1.0}),
        ("   ", 1, {"tds": 1.0}),
        (None, 1, {"tds": 1.0}),
        (42, 1, {"tds": 1.0}),
        ("x" * 256, 1, {"tds": 1.0}),
        ("tank-a", 1, {}),
        ("tank-a", 1, {"tds": None}),
        ("tank-a", 1, {"tds": math.nan}),
        ("tank-a", 1, {"tds": math.inf}),
        ("tank-a", 1, {"tds": -math.inf}),
        ("tank-a", 1, {"obj": {"deep": [1, math.nan]}}),
        ("tank-a", 1, {"tds": {1, 2}}),
        ("tank-a", 1, {"tds": b"bytes"}),
        ("tank-a", 1, {"tds": object()}),
        ("tank-a", 1, {"obj": {1: "non-str key"}}),
        ("tank-a", 1, {"": 1.0}),
        ("tank-a", 1, {3: 1.0}),
        ("tank-a", 1, {"big": 2**64}),
        ("tank-a", 1, ["not", "a", "mapping"]),
        ("tank-a", 1.5, {"tds": 1.0}),
        ("tank-a", True, {"tds": 1.0}),
        ("tank-a", -1, {"tds": 1.0}),
        ("tank-a", "1", {"tds": 1.0}),
    ],
)
def test_entry_refuses_what_thingsboard_would_refuse(
    device: object, ts: object, values: object
) -> None:
    with pytest.raises(InvalidMessage):
        tbmsg.telemetry_entry(device, ts, values, 65000)  # type: ignore[arg-type]


def test_entry_refuses_nesting_beyond_the_limit() -> None:
    value: object = 1
    for _ in range(tbmsg.MAX_DEPTH + 1):
        value = [value]
    with pytest.raises(InvalidMessage, match="nested"):
        tbmsg.telemetry_entry("tank-a", 1, {"deep": value}, 65000)


def test_entry_size_limit_counts_the_wrapper() -> None:
    entry = tbmsg.telemetry_entry("tank-a", 1, {"s": "x" * 100}, 65000)
    exact = len(b'{"tank-a":[' + entry.encode() + b"]}")
    assert tbmsg.single_entry_size("tank-a", entry) == exact
    assert tbmsg.telemetry_entry("tank-a", 1, {"s": "x" * 100}, exact) == entry
    with pytest.raises(InvalidMessage, match="exceeds"):
        tbmsg.telemetry_entry("tank-a", 1, {"s": "x" * 100}, exact - 1)


def test_non_ascii_is_escaped_so_characters_are_bytes() -> None:
    entry = tbmsg.telemetry_entry("bak-ü", 1, {"note": "pH naik ✓"}, 65000)
    assert entry.isascii()
    assert json.loads(entry)["values"]["note"] == "pH naik ✓"


def test_payload_limit_leaves_room_for_the_mqtt_header() -> None:
    limit = tbmsg.payload_limit(65536)
    assert limit == 65536 - (5 + 2 + len("v1/gateway/telemetry") + 2)
    with pytest.raises(ValueError):
        tbmsg.payload_limit(10)


# --------------------------------------------------------------- telemetry
def _rows(devices: list[str]) -> list[OutboxRow]:
    return [
        OutboxRow(i + 1, d, 1000 + i, tbmsg.telemetry_entry(d, 1000 + i, {"v": i}, 65000))
        for i, d in enumerate(devices)
    ]


def test_build_telemetry_groups_by_device_in_order() -> None:
    rows = _rows(["a", "b", "a", "c", "b"])
    [(payload, ids)] = tbmsg.build_telemetry(rows, 65000)
    assert ids == [1, 2, 3, 4, 5]
    msg = json.loads(payload)
    assert list(msg) == ["a", "b", "c"]
    assert msg["a"] == [{"ts": 1000, "values": {"v": 0}}, {"ts": 1002, "values": {"v": 2}}]
    assert msg["b"] == [{"ts": 1001, "values": {"v": 1}}, {"ts": 1004, "values": {"v": 4}}]


def test_build_telemetry_splits_at_the_limit_exactly() -> None:
    rows = _rows(["a"] * 3)
    one = tbmsg.single_entry_size("a", rows[0].entry)
    two = one + 1 + len(rows[1].entry)
    batches = tbmsg.build_telemetry(rows, two)
    assert [ids for _, ids in batches] == [[1, 2], [3]]
    assert len(batches[0][0]) == two
    assert [ids for _, ids in tbmsg.build_telemetry(rows, two - 1)] == [[1], [2], [3]]


def test_build_telemetry_refuses_a_row_that_never_fits() -> None:
    rows = _rows(["a", "b"])
    with pytest.raises(InvalidMessage, match="row 1"):
        tbmsg.build_telemetry(rows, 10)


def test_build_telemetry_of_nothing_is_nothing() -> None:
    assert tbmsg.build_telemetry([], 1000) == []


@given(
    devices=st.lists(st.sampled_from(["a", "tank-b", "c\u00e9", 'q"uote']), max_size=60),
    limit=st.integers(min_value=120, max_value=2000),
)
def test_build_telemetry_properties(devices: list[str], limit: int) -> None:
    rows = _rows(devices)
    batches = tbmsg.build_telemetry(rows, limit)
    assert [i for _, ids in batches for i in ids] == [r.id for r in rows]
    seen: dict[str, list[int]] = {}
    by_id = {r.id: r for r in rows}
    for payload, ids in batches:
        assert len(payload) <= limit
        msg = json.loads(payload)
        assert sum(len(entries) for entries in msg.values()) == len(ids)
        for device, entries in msg.items():
            seen.setdefault(device, []).extend(e["ts"] for e in entries)
        assert {by_id[i].device for i in ids} == set(msg)
    for device, stamps in seen.items():
        assert stamps == [r.ts for r in rows if r.device == device]


# ----------------------------------------------------------- other builders
def test_connect_and_disconnect() -> None:
    assert json.loads(tbmsg.connect("tank-a", "hydro-node")) == {
        "device": "tank-a",
        "type": "hydro-node",
    }
    assert json.loads(tbmsg.connect("tank-a")) == {"device": "tank-a"}
    assert json.loads(tbmsg.disconnect("tank-a")) == {"device": "tank-a"}
    with pytest.raises(InvalidMessage):
        tbmsg.connect("")


def test_attribute_request_has_boolean_client() -> None:
    msg = json.loads(tbmsg.attributes_request(7, "tank-a", ["tds_setpoint", "mode"]))
    assert msg == {"id": 7, "device": "tank-a", "client": False, "keys": ["tds_setpoint", "mode"]}
    assert msg["client"] is False
    with pytest.raises(InvalidMessage):
        tbmsg.attributes_request(7, "tank-a", [])


def test_rpc_reply_and_error() -> None:
    assert json.loads(tbmsg.rpc_reply("tank-a", 42, {"success": True})) == {
        "device": "tank-a",
        "id": 42,
        "data": {"success": True},
    }
    assert json.loads(tbmsg.rpc_error("tank-a", 42, "no such method")) == {
        "device": "tank-a",
        "id": 42,
        "data": {"success": False, "error": "no such method"},
    }
    with pytest.raises(InvalidMessage):
        tbmsg.rpc_reply("tank-a", 42, {"value": math.nan})


def test_gateway_telemetry() -> None:
    assert json.loads(tbmsg.gateway_telemetry({"buffer_depth": 3, "x": None})) == {
        "buffer_depth": 3
    }


# ------------------------------------------------------------------ parsers
def test_parse_attribute_update_and_deletion() -> None:
    upd = tbmsg.parse_attribute_update(b'{"device":"tank-a","data":{"tds_setpoint":900}}')
    assert upd == tbmsg.AttributeUpdate("tank-a", {"tds_setpoint": 900})
    upd = tbmsg.parse_attribute_update('{"device":"tank-a","data":{"deleted":["mode"]}}')
    assert upd is not None and upd.deleted == ("mode",)


def test_parse_attribute_response_one_several_none() -> None:
    one = tbmsg.parse_attribute_response(b'{"id":1,"device":"tank-a","value":900}')
    assert one.resolve(["tds_setpoint"]) == {"tds_setpoint": 900}
    with pytest.raises(MalformedMessage):
        one.resolve(["a", "b"])
    several = tbmsg.parse_attribute_response(
        b'{"id":2,"device":"tank-a","values":{"mode":"auto","interval":30}}'
    )
    assert several.resolve(["mode", "interval"]) == {"mode": "auto", "interval": 30}
    none = tbmsg.parse_attribute_response(b'{"id":3,"device":"tank-a"}')
    assert none.resolve(["mode"]) == {}
    null_value = tbmsg.parse_attribute_response(b'{"id":4,"device":"tank-a","value":null}')
    assert null_value.resolve(["mode"]) == {"mode": None}


def test_parse_rpc() -> None:
    req = tbmsg.parse_rpc(
        b'{"device":"tank-a","data":{"id":42,"method":"force_on","params":{"x":1}}}'
    )
    assert req == tbmsg.RpcRequest("tank-a", 42, "force_on", {"x": 1})
    bare = tbmsg.parse_rpc(b'{"device":"t","data":{"id":1,"method":"stop"}}')
    assert bare is not None and bare.params is None


def test_parse_rpc_ignores_replies_echoed_by_a_plain_broker() -> None:
    assert tbmsg.parse_rpc(tbmsg.rpc_reply("tank-a", 42, {"success": True})) is None


def test_parse_rpc_without_method_is_answerable() -> None:
    with pytest.raises(MalformedRpc) as info:
        tbmsg.parse_rpc(b'{"device":"tank-a","data":{"id":42,"params":{}}}')
    assert (info.value.device, info.value.id) == ("tank-a", 42)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b"[1,2]",
        b'"text"',
        b"{}",
        b'{"device":"","data":{}}',
        b'{"device":"tank-a"}',
        b'{"device":"tank-a","data":[]}',
        b"[" * 100_000,
        None,
        3,
    ],
)
def test_parsers_refuse_junk_with_malformed_message_only(payload: object) -> None:
    for parse in (tbmsg.parse_rpc, tbmsg.parse_attribute_update, tbmsg.parse_attribute_response):
        with pytest.raises(MalformedMessage):
            parse(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"device":"tank-a","data":{"method":"x"}}',
        b'{"device":"tank-a","data":{"id":"42","method":"x"}}',
        b'{"device":"tank-a","data":{"id":true,"method":"x"}}',
        b'{"device":5,"data":{"id":1,"method":"x"}}',
    ],
)
def test_rpc_without_readable_device_and_id_is_not_answerable(payload: bytes) -> None:
    with pytest.raises(MalformedMessage) as info:
        tbmsg.parse_rpc(payload)
    assert not isinstance(info.value, MalformedRpc)


def test_attribute_update_with_bad_deleted_list() -> None:
    with pytest.raises(MalformedMessage):
        tbmsg.parse_attribute_update(b'{"device":"t","data":{"deleted":"mode"}}')


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_parsers_never_raise_anything_else(payload: bytes) -> None:
    for parse in (tbmsg.parse_rpc, tbmsg.parse_attribute_update, tbmsg.parse_attribute_response):
        try:
            parse(payload)
        except MalformedMessage:
            pass
