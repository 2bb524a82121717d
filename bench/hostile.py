"""Hostile input for the gateway's outside interfaces, shared by the fuzz tests and bench.

- `rpc_payloads()` / `attribute_payloads()`: Hypothesis strategies of what a
  broken or hostile server could publish on ``v1/gateway/rpc`` and
  ``v1/gateway/attributes``: mutations of well-formed messages (devices
  empty, blank, not text, 300 characters; ids of every type and size;
  params and values of every JSON type, NaN and infinities, nesting up to
  thousands of levels, 60 kB strings), plus raw bytes.
- `FrameFuzzer`: mutated NodeLink frames (replies to the gateway's real
  requests, reports, events, garbage, bad CRCs, overlong and broken lines).
- `FakeServer`: a paho client standing in for ThingsBoard, to publish those
  and wait for the gateway's replies.
- `HostileNode`: a NodeLink node on TCP that answers every request with a
  reply that is sometimes mutated and floods the link with fuzzed frames.

Every RPC the strategy builds says whether the gateway must answer it (a
device name ThingsBoard could use and an integer id a reply can carry), so
a test can check that what can be answered is answered.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from drivers.nodelink import LineSplitter
from sim.node import parse_request

DEVICE = "tank-a"
METHODS = ("get_state", "actuate", "stop", "force_on", "force_stop", "set_mode", "nope", "")
ATTRIBUTE_KEYS = ("mode", "controller", "tds_setpoint", "ph_setpoint", "schedule", "interval",
                  "deleted", "other")

# ------------------------------------------------------------------ JSON text helpers


def dumps(obj: Any) -> str:
    """JSON text as a server might (mis)write it: NaN and Infinity allowed."""
    return json.dumps(obj, allow_nan=True, separators=(",", ":"))


def nested(depth: int, inner: str = "1") -> str:
    """A JSON array nested ``depth`` levels deep, as text (no recursion to build it)."""
    return "[" * depth + inner + "]" * depth


# ------------------------------------------------------------------ Hypothesis strategies

_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 255, 256, -1, 600000, 600001, 3000, 1e400, -1e400]),
)
_scalars = st.one_of(
    st.none(), st.booleans(), _numbers,
    st.text(max_size=20),
    st.sampled_from(["auto", "manual", "fuzzy", "rb", "09:00", "25:00", "", " ", "NaN",
                     "refill", "ph_up", "x" * 60_000]),
)
_json = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)
#: Device names the gateway can answer to, and ones it cannot.
_good_devices = st.sampled_from([DEVICE, "unknown-node", "ü-node", "a" * 255])
_bad_devices = st.one_of(
    st.sampled_from(["", " ", "\t\n", "b" * 256, "c" * 10_000]),
    st.none(), st.integers(), st.floats(), st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_good_ids = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_bad_ids = st.one_of(
    st.sampled_from([2**31, -(2**31) - 1, 2**63, 2**80]),
    st.floats(), st.text(max_size=5), st.none(), st.booleans(), st.lists(st.integers(),
                                                                           max_size=2),
)


@st.composite
def _params(draw: st.DrawFn) -> str:
    """Params as JSON text: realistic, random, or nested far too deep."""
    kind = draw(st.sampled_from(["actuate", "mode", "random", "deep", "very_deep"]))
    if kind == "actuate":
        params = {
            "actuator": draw(st.one_of(st.sampled_from(["refill", "ph_up", "nutrient", "nope",
                                                        "", "p" * 5000]), _scalars)),
            "ms": draw(st.one_of(_numbers, _scalars)),
        }
        if draw(st.booleans()):
            params["duty"] = draw(st.one_of(_numbers, _scalars))
        return dumps(params)
    if kind == "mode":
        return dumps({"mode": draw(_json)})
    if kind == "deep":
        return nested(draw(st.integers(min_value=30, max_value=200)))
    if kind == "very_deep":  # beyond what a JSON parser will read at all
        return nested(draw(st.integers(min_value=2000, max_value=5000)))
    return dumps(draw(_json))


@dataclass(frozen=True)
class Rpc:
    """One RPC payload and whether the gateway must answer it (and to whom)."""

    payload: bytes
    device: Any
    id: Any
    answerable: bool


@st.composite
def rpc_payloads(draw: st.DrawFn, ids: Callable[[], int] | None = None) -> Rpc:
    """An RPC as a server might publish it; ``ids`` hands out unique good ids."""
    good_device = draw(st.integers(0, 9)) < 7
    device = draw(_good_devices if good_device else _bad_devices)
    good_id = draw(st.integers(0, 3)) > 0
    rid = (ids() if ids is not None else draw(_good_ids)) if good_id else draw(_bad_ids)
    method = draw(st.one_of(st.sampled_from(METHODS), _scalars))
    params = draw(_params())
    shape = draw(st.sampled_from(["normal"] * 7 + ["no_data", "data_list", "reply_shape",
                                                   "raw"]))
    body = f'{{"id":{dumps(rid)},"method":{dumps(method)},"params":{params}}}'
    if shape == "no_data":
        text = f'{{"device":{dumps(device)}}}'
    elif shape == "data_list":
        text = f'{{"device":{dumps(device)},"data":[{body}]}}'
    elif shape == "reply_shape":  # what our own reply looks like: ignored
        text = f'{{"device":{dumps(device)},"id":{dumps(rid)},"data":{body}}}'
    elif shape == "raw":
        return Rpc(draw(st.binary(max_size=64)), device, rid, False)
    else:
        text = f'{{"device":{dumps(device)},"data":{body}}}'
    parsable = params[:1500].count("[") < 1500  # "very_deep" params: no parser reads them
    answerable = shape == "normal" and good_device and good_id and parsable
    return Rpc(text.encode(), device, rid, answerable)


@st.composite
def attribute_payloads(draw: st.DrawFn) -> bytes:
    """A shared-attribute update (or response) as a server might publish it."""
    device = draw(st.one_of(_good_devices, _bad_devices))
    keys = draw(st.lists(st.sampled_from(ATTRIBUTE_KEYS), max_size=4, unique=True))
    parts = []
    for key in keys:
        kind = draw(st.sampled_from(["json", "scalar", "deep", "deep_text", "list"]))
        if kind == "deep":
            value = nested(draw(st.sampled_from([40, 900, 3000])), '"09:00"')
        elif kind == "deep_text":
            value = dumps(nested(draw(st.sampled_from([40, 1000, 5000])), '"09:00"'))
        elif kind == "list":
            value = dumps(draw(st.lists(st.sampled_from(["09:00", "9:00", "24:00", "", 9, None]),
                                        max_size=5)))
        elif kind == "scalar":
            value = dumps(draw(_scalars))
        else:
            value = dumps(draw(_json))
        parts.append(f"{dumps(key)}:{value}")
    data = "{" + ",".join(parts) + "}"
    if draw(st.integers(0, 9)) == 0:
        data = dumps(draw(_json))
    return f'{{"device":{dumps(device)},"data":{data}}}'.encode()


# ------------------------------------------------------------------ NodeLink frames


def frame(body: bytes, *, crc_ok: bool = True) -> bytes:
    crc = binascii.crc_hqx(body, 0xFFFF) ^ (0 if crc_ok else 0x1D0F)
    return body + b"*%04X\n" % crc


class FrameFuzzer:
    """Mutated NodeLink frames from a seeded RNG (fast: ~100k frames in a few seconds)."""

    KEYS = ("tds", "ph", "water_temp", "", " ", "k\x00", "ü", "x" * 300, "id", "values")
    VALUES: tuple[Any, ...] = (1.0, -0.0, 7, 2**63, 2**64 + 1, -(2**63) - 1, 1e308, math.nan,
                               math.inf, -math.inf, None, True, "6.1", [], {}, [1, [2]],
                               {"a": {"b": 1}})

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def _value(self) -> Any:
        rng = self.rng
        if rng.random() < 0.7:
            return rng.choice((rng.uniform(-1e3, 1e3), rng.randint(-1000, 1000)))
        return rng.choice(self.VALUES)

    def values(self) -> dict[str, Any]:
        rng = self.rng
        out = {k: self._value() for k in ("tds", "ph", "water_temp") if rng.random() < 0.8}
        for _ in range(rng.randint(0, 4)):
            key = rng.choice(self.KEYS) if rng.random() < 0.5 else f"k{rng.randint(0, 10**6)}"
            out[key] = self._value()
        return out

    def _mutate(self, msg: dict[str, Any]) -> dict[str, Any]:
        rng = self.rng
        for _ in range(rng.randint(0, 2)):
            key = rng.choice(list(msg) + ["extra"])
            action = rng.random()
            if action < 0.3:
                msg.pop(key, None)
            else:
                msg[key] = self._value() if action < 0.8 else self.values()
        return msg

    def reply(self, op: str, rid: int) -> bytes:
        """A reply to request ``rid``: right most of the time, mutated or broken otherwise."""
        rng = self.rng
        body: dict[str, Any] = {"id": rid, "ok": True}
        if op == "hello":
            body.update(node="hostile", fw="0", proto=1, sensors=["tds", "ph"],
                        actuators=["refill", "ph_up"])
        elif op == "read":
            body.update(uptime_ms=rng.randint(0, 10**9), values=self.values())
        elif op == "state":
            body.update(actuators={"refill": 0, "ph_up": rng.choice([0, 1, 2, "x"])})
        if rng.random() < 0.3:
            body = self._mutate(body)
        if rng.random() < 0.05:
            body["ok"] = False
            body["error"] = rng.choice(["sensor", "", 5, None])
        return self.encode(body)

    def unsolicited(self) -> bytes:
        """An event, a stray reply, or junk."""
        rng = self.rng
        pick = rng.random()
        if pick < 0.5:
            body: dict[str, Any] = {"event": "report", "uptime_ms": rng.randint(0, 10**9),
                                    "values": self.values()}
        elif pick < 0.6:
            body = {"event": "actuator", "actuator": rng.choice(["refill", "nope", 5]),
                    "on": rng.choice([0, 1, 2, True, None])}
        elif pick < 0.65:
            body = {"event": "boot", "node": rng.choice(["hostile", 5]), "fw": "1"}
        elif pick < 0.75:
            body = {"event": rng.choice(["unknown", "", "report"]), "x": self._value()}
        elif pick < 0.85:
            body = {"id": rng.choice([rng.randint(1, 2**31 - 1), 0, -1, 2**40, "7", 1.5]),
                    "ok": rng.choice([True, False, 1, None])}
        else:
            return self.junk()
        return self.encode(self._mutate(body) if rng.random() < 0.3 else body)

    def encode(self, body: dict[str, Any]) -> bytes:
        rng = self.rng
        text = json.dumps(body, allow_nan=True, separators=(",", ":"), ensure_ascii=False)
        data = text.encode("utf-8", "surrogatepass")
        if len(data) > 1000:
            data = data[:1000]  # a truncated object: invalid JSON with a valid CRC
        line = frame(data, crc_ok=rng.random() > 0.05)
        if rng.random() < 0.05:
            line = line[:-1] + b"\r\n"
        return line

    def junk(self) -> bytes:
        rng = self.rng
        kind = rng.random()
        if kind < 0.25:
            return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 60))) + b"\n"
        if kind < 0.45:
            return b"x" * rng.randint(1024, 3000) + b"\n"  # overlong
        if kind < 0.6:
            return frame(b"\xff\xfe" + bytes(rng.getrandbits(8) for _ in range(8)))  # not UTF-8
        if kind < 0.75:
            return frame(nested(rng.randint(100, 480)).encode())  # deep JSON, valid CRC
        if kind < 0.9:
            return frame(rng.choice([b"[]", b"1", b'"s"', b"null", b"{}", b'{"id":}']))
        return b"*ABCD\n"


@dataclass
class FakeServer:
    """A paho client standing in for ThingsBoard (publishes, records), on its own thread."""

    port: int
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzz-server")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port)
        self.client.subscribe([("v1/gateway/#", 1), ("v1/devices/me/#", 1)])
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def wait(self, predicate: Any, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while (found := predicate()) is None:
                left = deadline - time.monotonic()
                assert left > 0, "timed out"
                self.cond.wait(left)
        return found

    def reply(self, device: Any, rid: Any, timeout: float = 10.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for topic, raw in self.messages:
                if topic != "v1/gateway/rpc" or b'"success"' not in raw:
                    continue
                msg = json.loads(raw)
                if not isinstance(msg, dict):  # our own fuzzed payload, echoed back
                    continue
                if msg.get("device") == device and msg.get("id") == rid and "data" in msg:
                    return dict(msg)
            return None

        return dict(self.wait(find, timeout))


class HostileNode:
    """A NodeLink node on TCP that answers with fuzzed replies and floods fuzzed frames."""

    def __init__(self, seed: int = 0, *, flood: int = 0, per_write: int = 50) -> None:
        self.fuzz = FrameFuzzer(seed)
        self.flood = flood  # unsolicited frames to send in total
        self.per_write = per_write
        self.sent = 0  # frames sent (replies and unsolicited)
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.flooded = asyncio.Event()

    async def serve(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end every connection (its task then ends by itself)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        flood = asyncio.create_task(self._flood(writer))
        splitter = LineSplitter()
        try:
            while data := await reader.read(65536):
                for line in splitter.feed(data):
                    try:
                        msg = parse_request(line)
                    except ValueError:
                        continue
                    rid, op = msg.get("id"), msg.get("op")
                    if type(rid) is not int or type(op) is not str:
                        continue
                    self.requests += 1
                    writer.write(self.fuzz.reply(op, rid))
                    self.sent += 1
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            flood.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flood
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def _flood(self, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while self.flood > 0:
                n = min(self.per_write, self.flood)
                writer.write(b"".join(self.fuzz.unsolicited() for _ in range(n)))
                self.flood -= n
                self.sent += n
                await writer.drain()
                await asyncio.sleep(0)
            self.flooded.set()
