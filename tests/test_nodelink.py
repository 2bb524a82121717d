"""The NodeLink v1 codec: tables for the rules in docs/nodelink.md, Hypothesis for the rest."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.nodelink import (
    ID_MAX,
    MAX_LINE,
    Event,
    FrameError,
    FrameTooLong,
    LineSplitter,
    Reply,
    check_reply,
    clean_values,
    crc16,
    decode,
    encode,
)


def frame(text: str | bytes, *, lower: bool = False) -> bytes:
    """``text`` with its CRC, without the newline (what ``decode`` takes)."""
    body = text.encode() if isinstance(text, str) else text
    crc = b"%04X" % crc16(body)
    return body + b"*" + (crc.lower() if lower else crc)


# --- CRC and the example exchange of docs/nodelink.md -------------------------------


def test_crc_check_value() -> None:
    assert crc16(b"123456789") == 0x29B1


def test_example_exchange_from_the_spec() -> None:
    # CRCs computed independently with the bitwise CRC-16/CCITT-FALSE below.
    request = b'{"id":7,"op":"read"}'
    reply = (
        b'{"id":7,"ok":true,"uptime_ms":81234,"values":{"tds_v":1.12,"ph":6.08,"water_temp":24.6}}'
    )
    assert encode({"id": 7, "op": "read"}) == request + b"*5FFA\n"
    assert bitwise_crc(request) == 0x5FFA
    assert bitwise_crc(reply) == 0x0C7E
    msg = decode(reply + b"*0C7E")
    assert msg == Reply(7, True, None, json.loads(reply))
    assert msg.body["values"] == {"tds_v": 1.12, "ph": 6.08, "water_temp": 24.6}
    check_reply("read", msg)


def bitwise_crc(data: bytes) -> int:
    """Reference CRC-16/CCITT-FALSE, one bit at a time, to check crc_hqx against."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


@given(st.binary(max_size=200))
def test_crc_matches_bitwise_reference(data: bytes) -> None:
    assert crc16(data) == bitwise_crc(data)


# --- encode --------------------------------------------------------------------


def test_encode_is_compact_utf8_with_uppercase_crc() -> None:
    line = encode({"id": 1, "op": "actuate", "actuator": "ph_up", "note": "é"})
    body, crc = line[:-1].split(b"*")
    assert body == '{"id":1,"op":"actuate","actuator":"ph_up","note":"é"}'.encode()
    assert crc == b"%04X" % crc16(body) and crc.upper() == crc and len(crc) == 4
    assert line.endswith(b"\n") and line.count(b"\n") == 1


def test_encode_refuses_a_frame_over_1024_bytes() -> None:
    overhead = len(encode({"k": ""}))  # {"k":""}*XXXX\n
    fits = {"k": "x" * (MAX_LINE - overhead)}
    assert len(encode(fits)) == MAX_LINE
    with pytest.raises(FrameTooLong) as info:
        encode({"k": "x" * (MAX_LINE - overhead + 1)})
    assert info.value.reason == "too_long" and info.value.size == MAX_LINE + 1


@pytest.mark.parametrize("bad", [{"v": math.nan}, {"v": math.inf}, {"v": object()}])
def test_encode_refuses_what_is_not_strict_json(bad: dict[str, Any]) -> None:
    with pytest.raises(FrameError) as info:
        encode(bad)
    assert info.value.reason == "json"


def test_encoded_newlines_stay_escaped() -> None:
    line = encode({"event": "x", "text": "a\nb\r"})
    assert line.count(b"\n") == 1


# --- decode: table of good and bad lines -----------------------------------------

GOOD: list[tuple[bytes, Reply | Event]] = [
    (frame('{"id":1,"ok":true}'), Reply(1, True, None, {"id": 1, "ok": True})),
    (frame('{"id":1,"ok":true}', lower=True), Reply(1, True, None, {"id": 1, "ok": True})),
    (frame('{"id":1,"ok":true}') + b"\r", Reply(1, True, None, {"id": 1, "ok": True})),
    (
        frame(f'{{"id":{ID_MAX},"ok":false,"error":"busy"}}'),
        Reply(ID_MAX, False, "busy", {"id": ID_MAX, "ok": False, "error": "busy"}),
    ),
    (frame('{"id":2,"ok":false}'), Reply(2, False, "unknown error", {"id": 2, "ok": False})),
    (
        frame('{"id":3,"ok":true,"future":[1,{"x":null}]}'),
        Reply(3, True, None, {"id": 3, "ok": True, "future": [1, {"x": None}]}),
    ),
    (
        frame('{"event":"report","uptime_ms":5,"values":{"ph":6.1}}'),
        Event("report", {"event": "report", "uptime_ms": 5, "values": {"ph": 6.1}}),
    ),
    (
        frame('{"event":"boot","node":"tank-a","fw":"1.2.0"}'),
        Event("boot", {"event": "boot", "node": "tank-a", "fw": "1.2.0"}),
    ),
    (
        frame('{"event":"actuator","actuator":"ph_up","on":0}'),
        Event("actuator", {"event": "actuator", "actuator": "ph_up", "on": 0}),
    ),
    (frame('{"event":"newkind"}'), Event("newkind", {"event": "newkind"})),
    (
        frame('{"node":"ü","event":"boot","fw":"1"}'),
        Event("boot", {"node": "ü", "event": "boot", "fw": "1"}),
    ),
]


@pytest.mark.parametrize(("line", "expected"), GOOD)
def test_decode_accepts(line: bytes, expected: Reply | Event) -> None:
    assert decode(line) == expected


BAD: list[tuple[bytes, str]] = [
    (b"", "crc"),
    (b"garbage", "crc"),
    (b'{"id":1,"ok":true}', "crc"),
    (b'{"id":1,"ok":true}*0000', "crc"),
    (frame('{"id":1,"ok":true}')[:-1], "crc"),  # three hex digits
    (frame('{"id":1,"ok":true}') + b"0", "crc"),  # five
    (b'{"id":1,"ok":true}*+12A', "crc"),
    (b'{"id":1,"ok":true}*ZZZZ', "crc"),
    (frame('{"id":1,"ok":true}') + b" ", "crc"),
    (frame(b'{"id":1,"ok":true,"e":"\xff"}'), "encoding"),
    (frame("not json"), "json"),
    (frame('{"id":1,"ok":true'), "json"),
    (frame("[" * 1000 + "]" * 1), "json"),  # nesting deep enough to hit the recursion limit
    (frame("[1,2]"), "not_object"),
    (frame("42"), "not_object"),
    (frame('"text"'), "not_object"),
    (frame("null"), "not_object"),
    (frame("{}"), "field"),
    (frame('{"ok":true}'), "field"),
    (frame('{"id":"1","ok":true}'), "field"),
    (frame('{"id":1.0,"ok":true}'), "field"),
    (frame('{"id":true,"ok":true}'), "field"),
    (frame('{"id":0,"ok":true}'), "field"),
    (frame('{"id":-3,"ok":true}'), "field"),
    (frame(f'{{"id":{ID_MAX + 1},"ok":true}}'), "field"),
    (frame('{"id":1}'), "field"),
    (frame('{"id":1,"ok":1}'), "field"),
    (frame('{"id":1,"ok":"true"}'), "field"),
    (frame('{"id":1,"ok":false,"error":5}'), "field"),
    (frame('{"id":1,"ok":true,"values":[1]}'), "field"),
    (frame('{"id":1,"ok":true,"uptime_ms":1.5}'), "field"),
    (frame('{"id":1,"ok":true,"uptime_ms":true}'), "field"),
    (frame('{"event":5}'), "field"),
    (frame('{"event":"report"}'), "field"),
    (frame('{"event":"report","values":null}'), "field"),
    (frame('{"event":"boot","node":"a"}'), "field"),
    (frame('{"event":"boot","node":"a","fw":1}'), "field"),
    (frame('{"event":"actuator","actuator":"ph_up","on":2}'), "field"),
    (frame('{"event":"actuator","actuator":"ph_up","on":true}'), "field"),
    (frame('{"event":"actuator","on":1}'), "field"),
    (b"x" * MAX_LINE, "too_long"),
]


@pytest.mark.parametrize(("line", "reason"), BAD)
def test_decode_refuses(line: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        decode(line)
    assert info.value.reason == reason


def test_decode_length_limit_counts_the_carriage_return() -> None:
    overhead = len(frame('{"event":"e","p":""}')) + 1  # + the newline
    longest = frame('{"event":"e","p":"' + "x" * (MAX_LINE - overhead) + '"}')
    assert len(longest) + 1 == MAX_LINE
    assert isinstance(decode(longest), Event)
    with pytest.raises(FrameError, match="too_long"):
        decode(longest + b"\r")  # 1025 bytes with the \n


# --- check_reply --------------------------------------------------------------------

HELLO = {"node": "tank-a", "fw": "1.0", "proto": 1, "sensors": ["ph"], "actuators": ["ph_up"]}


@pytest.mark.parametrize(
    ("op", "fields", "good"),
    [
        ("hello", HELLO, True),
        ("hello", {**HELLO, "proto": "1"}, False),
        ("hello", {**HELLO, "proto": True}, False),
        ("hello", {**HELLO, "sensors": ["ph", 3]}, False),
        ("hello", {**HELLO, "actuators": "ph_up"}, False),
        ("hello", {k: v for k, v in HELLO.items() if k != "fw"}, False),
        ("hello", {**HELLO, "node": None}, False),
        ("read", {"uptime_ms": 1, "values": {}}, True),
        ("read", {"values": {}}, False),
        ("read", {"uptime_ms": 1}, False),
        ("state", {"actuators": {"ph_up": 0}}, True),
        ("state", {"actuators": [0]}, False),
        ("state", {}, False),
        ("ping", {}, True),
        ("actuate", {}, True),
        ("stop", {}, True),
        ("some_future_op", {}, True),
    ],
)
def test_check_reply(op: str, fields: dict[str, Any], good: bool) -> None:
    reply = decode(frame(json.dumps({"id": 9, "ok": True, **fields})))
    assert isinstance(reply, Reply)
    if good:
        check_reply(op, reply)
    else:
        with pytest.raises(FrameError) as info:
            check_reply(op, reply)
        assert info.value.reason == "field"


def test_check_reply_lets_refusals_through() -> None:
    reply = decode(frame('{"id":9,"ok":false,"error":"no such actuator"}'))
    assert isinstance(reply, Reply)
    check_reply("read", reply)


# --- clean_values -------------------------------------------------------------------


def test_clean_values_keeps_finite_numbers_and_null() -> None:
    values: dict[str, object] = {
        "ph": 6.1,
        "tds_v": 1,
        "gone": None,
        "flag": True,
        "off": False,
        "text": "6.1",
        "list": [1],
        "obj": {},
        "nan": math.nan,
        "inf": -math.inf,
        "huge": 10**400,
        "zero": 0,
    }
    kept, dropped = clean_values(values)
    assert kept == {"ph": 6.1, "tds_v": 1, "gone": None, "zero": 0}
    assert dropped == 8


def test_clean_values_of_decoded_nan_and_infinity() -> None:
    # Python's json accepts NaN/Infinity; they must not survive into telemetry.
    event = decode(frame('{"event":"report","values":{"a":NaN,"b":Infinity,"c":1e400,"d":2}}'))
    kept, dropped = clean_values(event.body["values"])
    assert kept == {"d": 2} and dropped == 3


# --- LineSplitter ---------------------------------------------------------------------


def test_splitter_keeps_the_partial_tail() -> None:
    s = LineSplitter()
    assert s.feed(b"ab") == []
    assert s.feed(b"c\nde") == [b"abc"]
    assert s.feed(b"\n\nf\r\n") == [b"de", b"", b"f\r"]
    assert s.overlong == 0


def test_splitter_discards_an_overlong_line_up_to_the_next_newline() -> None:
    s = LineSplitter()
    assert s.feed(b"x" * (MAX_LINE - 1) + b"\n") == [b"x" * (MAX_LINE - 1)]  # exactly 1024
    assert s.feed(b"y" * MAX_LINE + b"\nok\n") == [b"ok"]  # 1025 in one chunk
    assert s.overlong == 1
    # Spread over many chunks: nothing is kept while discarding.
    for _ in range(100):
        assert s.feed(b"z" * 5000) == []
        assert len(s._tail) == 0
    assert s.feed(b"zz\nnext\npart") == [b"next"]
    assert s.overlong == 2
    assert s.feed(b"ial\n") == [b"partial"]


def test_splitter_exactly_at_the_limit_across_chunks() -> None:
    s = LineSplitter()
    assert s.feed(b"a" * (MAX_LINE - 1)) == []
    assert s.feed(b"\n") == [b"a" * (MAX_LINE - 1)]
    assert s.feed(b"b" * (MAX_LINE - 1)) == []
    assert s.feed(b"b\nc\n") == [b"c"]
    assert s.overlong == 1


def split_reference(stream: bytes) -> tuple[list[bytes], int]:
    """What the splitter must produce for ``stream`` fed at once (complete lines only)."""
    *complete, _ = stream.split(b"\n")
    kept = [line for line in complete if len(line) + 1 <= MAX_LINE]
    return kept, len(complete) - len(kept)


line_st = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.integers(MAX_LINE - 3, MAX_LINE + 3).map(lambda n: b"L" * n),
)


@settings(max_examples=300)
@given(st.lists(line_st, max_size=12), st.data())
def test_splitter_same_lines_for_any_chunking(lines: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    s = LineSplitter()
    out: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += s.feed(stream[start:cut])
        start = cut
    expected, overlong = split_reference(stream)
    assert out == expected
    assert s.overlong == overlong


# --- Hypothesis: round trip and robustness ---------------------------------------------

RESERVED = {"id", "ok", "error", "event", "values", "uptime_ms"}
keys = st.text(max_size=8).filter(lambda k: k not in RESERVED)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    st.dictionaries(keys, json_values, max_size=6),
    st.integers(1, ID_MAX),
    st.booleans(),
    st.text(max_size=20),
)
def test_reply_round_trip(extra: dict[str, Any], rid: int, ok: bool, error: str) -> None:
    msg: dict[str, Any] = {**extra, "id": rid, "ok": ok}
    if not ok:
        msg["error"] = error
    try:
        line = encode(msg)
    except FrameTooLong:
        compact = json.dumps(msg, separators=(",", ":"), ensure_ascii=False)
        assert len(compact.encode()) + 6 > MAX_LINE
        return
    assert line.endswith(b"\n") and b"\n" not in line[:-1] and len(line) <= MAX_LINE
    decoded = decode(line[:-1])
    assert decoded == Reply(rid, ok, None if ok else error, msg)


@settings(max_examples=200)
@given(st.dictionaries(keys, json_values, max_size=6), st.text(max_size=10))
def test_event_round_trip(extra: dict[str, Any], kind: str) -> None:
    if kind in ("report", "boot", "actuator"):
        kind = "x" + kind
    msg = {**extra, "event": kind}
    try:
        line = encode(msg)
    except FrameTooLong:
        return
    assert decode(line[:-1]) == Event(kind, msg)


@settings(max_examples=500)
@given(st.binary(max_size=1100))
def test_random_bytes_raise_only_frame_error(data: bytes) -> None:
    for line in (data, frame(data)):  # with a valid CRC the JSON stage is reached too
        try:
            decode(line)
        except FrameError:
            pass


@settings(max_examples=300)
@given(json_values | st.dictionaries(st.sampled_from(sorted(RESERVED)), json_values))
def test_any_json_with_a_valid_crc_raises_only_frame_error(value: Any) -> None:
    body = json.dumps(value, separators=(",", ":")).encode()
    try:
        decode(frame(body))
    except FrameError:
        pass
