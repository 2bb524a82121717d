"""NodeLink v1 codec: pure functions between bytes on the wire and messages.

One message is one line, ``<json>*<crc>\\n``, where ``<crc>`` is the
CRC-16/CCITT-FALSE of the JSON bytes as 4 hex digits; the full protocol is
the NodeLink v1 specification (docs/nodelink.md) that firmware is written against.
Nothing here does I/O, so the framing rules can be tested with tables and
Hypothesis, and the link layer (drivers/link.py) only moves bytes.

``decode`` sits on the hot path (tens of thousands of lines per second on a
busy serial line), so it does one ``crc_hqx``, one ``json.loads`` and a few
type checks, and nothing else.
"""

from __future__ import annotations

import binascii
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

MAX_LINE: Final = 1024
"""Largest frame in bytes, including the ``\\n`` that ends it."""

ID_MIN: Final = 1
ID_MAX: Final = 2**31 - 1
"""Request ids are integers in ``ID_MIN..ID_MAX``."""

MAX_KEY: Final = 255
"""Longest key of ``values`` kept: as long as a ThingsBoard device name; real keys are short."""

_CRC_LEN: Final = 4
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_SEPARATORS: Final = (",", ":")


class FrameError(ValueError):
    """A line that is not a valid NodeLink frame.

    ``reason`` is a short fixed word used as a counter name by the link:
    ``crc``, ``json``, ``not_object``, ``field``, ``too_long`` or ``encoding``.
    ``detail`` says what exactly was wrong, for logs and tests.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class FrameTooLong(FrameError):
    """A message whose frame would exceed ``MAX_LINE`` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__("too_long", f"frame of {size} bytes exceeds {MAX_LINE}")
        self.size = size


@dataclass(frozen=True, slots=True)
class Reply:
    """A node's answer to request ``id``.

    ``body`` is the whole decoded JSON object (``id`` and ``ok`` included), so
    op-specific fields such as ``values`` are read from it without copying.
    ``error`` is the node's text when ``ok`` is false, else ``None``.
    """

    id: int
    ok: bool
    error: str | None
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    """An unsolicited message (``report``, ``boot``, ``actuator``, or a newer kind).

    ``body`` is the whole decoded JSON object, ``event`` included.
    """

    event: str
    body: dict[str, Any]


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF): ``crc16(b"123456789") == 0x29B1``."""
    return binascii.crc_hqx(data, 0xFFFF)


def encode(msg: Mapping[str, Any]) -> bytes:
    """Frame ``msg`` as one NodeLink line: compact UTF-8 JSON, ``*``, CRC, ``\\n``.

    Raises ``FrameTooLong`` when the line would exceed ``MAX_LINE`` bytes, and
    ``FrameError("json")`` when ``msg`` cannot be written as strict JSON (NaN,
    infinity, objects JSON does not know).
    """
    try:
        text = json.dumps(msg, separators=_SEPARATORS, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise FrameError("json", f"cannot encode message: {exc}") from exc
    body = text.encode("utf-8")
    size = len(body) + _CRC_LEN + 2
    if size > MAX_LINE:
        raise FrameTooLong(size)
    return b"%b*%04X\n" % (body, crc16(body))


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is a subclass of int and is not accepted


def _is_str(value: object) -> bool:
    return type(value) is str


def _is_object(value: object) -> bool:
    return type(value) is dict


def _is_str_list(value: object) -> bool:
    return type(value) is list and all(type(item) is str for item in value)


def _is_switch(value: object) -> bool:
    return type(value) is int and value in (0, 1)


_Check = tuple[tuple[str, Callable[[object], bool]], ...]

REPLY_FIELDS: Final[Mapping[str, _Check]] = {
    "hello": (
        ("node", _is_str),
        ("fw", _is_str),
        ("proto", _is_int),
        ("sensors", _is_str_list),
        ("actuators", _is_str_list),
    ),
    "read": (("uptime_ms", _is_int), ("values", _is_object)),
    "state": (("actuators", _is_object),),
}
"""Fields an ok reply must carry, by request op (ops not listed need none)."""

EVENT_FIELDS: Final[Mapping[str, _Check]] = {
    "report": (("values", _is_object),),
    "boot": (("node", _is_str), ("fw", _is_str)),
    "actuator": (("actuator", _is_str), ("on", _is_switch)),
}
"""Fields each known event must carry; unknown events pass with no check."""


def _require(obj: Mapping[str, Any], checks: _Check, what: str) -> None:
    for name, ok in checks:
        if name not in obj:
            raise FrameError("field", f"{what} lacks {name!r}")
        if not ok(obj[name]):
            raise FrameError("field", f"{what} has a bad {name!r}: {obj[name]!r}")


def decode(line: bytes) -> Reply | Event:
    """Parse one line (without its ``\\n``; a trailing ``\\r`` is accepted).

    Raises ``FrameError`` whose ``reason`` says why the line was refused:
    ``too_long``, ``crc`` (no CRC, or a mismatch), ``encoding`` (not UTF-8),
    ``json``, ``not_object``, or ``field`` (a required field missing or of
    the wrong type). Unknown fields are ignored.
    """
    if len(line) >= MAX_LINE:
        raise FrameError("too_long", f"line of {len(line) + 1} bytes exceeds {MAX_LINE}")
    if line.endswith(b"\r"):
        line = line[:-1]
    star = len(line) - _CRC_LEN - 1
    if star < 0 or line[star] != 0x2A:  # b"*"
        raise FrameError("crc", "no *CRC at the end of the line")
    body = line[:star]
    # Formatting the computed CRC and comparing also rejects non-hex digits.
    if line[star + 1 :].upper() != b"%04X" % crc16(body):
        raise FrameError("crc", "CRC mismatch")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        # Rare lines orjson refuses but the protocol wants read: a `NaN` or
        # `Infinity` token (only that value is then dropped, by clean_values)
        # or an integer beyond 64 bits; and the precise error of a bad line.
        obj = _slow_loads(body)
    if type(obj) is not dict:
        raise FrameError("not_object", f"JSON {type(obj).__name__}, not an object")
    if "values" in obj and type(obj["values"]) is not dict:
        raise FrameError("field", "'values' is not an object")
    if "uptime_ms" in obj and type(obj["uptime_ms"]) is not int:
        raise FrameError("field", "'uptime_ms' is not an integer")
    if "id" in obj:
        return _reply(obj)
    kind = obj.get("event")
    if type(kind) is not str:
        raise FrameError("field", "neither an integer 'id' nor a string 'event'")
    checks = EVENT_FIELDS.get(kind)
    if checks is not None:
        _require(obj, checks, f"event {kind!r}")
    return Event(kind, obj)


def _slow_loads(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError("encoding", str(exc)) from exc
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FrameError("json", str(exc)) from exc


def _reply(obj: dict[str, Any]) -> Reply:
    rid = obj["id"]
    if type(rid) is not int or not ID_MIN <= rid <= ID_MAX:
        raise FrameError("field", f"'id' is not an integer in 1..2^31-1: {rid!r}")
    ok = obj.get("ok")
    if type(ok) is not bool:
        raise FrameError("field", "'ok' is not a boolean")
    if ok:
        return Reply(rid, True, None, obj)
    error = obj.get("error", "unknown error")
    if type(error) is not str:
        raise FrameError("field", "'error' is not a string")
    return Reply(rid, False, error, obj)


def check_reply(op: str, reply: Reply) -> None:
    """Raise ``FrameError("field")`` if an ok reply to ``op`` lacks a field it must carry.

    The table is ``REPLY_FIELDS``; refusals (``ok`` false) and ops without
    reply fields always pass.
    """
    if reply.ok:
        checks = REPLY_FIELDS.get(op)
        if checks is not None:
            _require(reply.body, checks, f"reply to {op!r}")


def clean_values(values: Mapping[str, Any]) -> tuple[dict[str, float | None], int]:
    """Keep the usable entries of a ``values`` object, one by one; count the rest.

    A value is usable when it is ``None`` or a finite number: a bool is not
    a number, and an integer beyond 64 bits is not one any consumer can
    store. A key is usable when it is a printable, non-blank text of at most
    ``MAX_KEY`` characters (a longer one is a corrupted frame, not a sensor). One
    bad entry never costs the reading its good ones. Returns ``(kept,
    dropped)``; the caller counts ``dropped`` as ``bad_value``.
    """
    kept: dict[str, float | None] = {}
    dropped = 0
    for key, value in values.items():
        kind = type(value)
        if (
            value is None
            or (kind is float and math.isfinite(value))
            or (kind is int and _INT64_MIN <= value <= _INT64_MAX)
        ) and (0 < len(key) <= MAX_KEY and key.isprintable() and not key.isspace()):
            kept[key] = value
        else:
            dropped += 1
    return kept, dropped


class LineSplitter:
    """Cut a byte stream into lines, keeping the partial tail between feeds.

    Lines come back without their ``\\n`` (a ``\\r`` before it is left for
    ``decode``). A line longer than ``MAX_LINE`` bytes including the newline
    is dropped and counted in ``overlong``; while skipping its remainder the
    splitter keeps nothing, so memory stays bounded by one chunk plus one line.
    """

    __slots__ = ("_discarding", "_tail", "overlong")

    def __init__(self) -> None:
        self._tail = b""
        self._discarding = False
        self.overlong = 0

    def feed(self, data: bytes) -> list[bytes]:
        """Return the lines completed by ``data``, in order."""
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return []
            self._discarding = False
            data = data[newline + 1 :]
        if self._tail:
            data = self._tail + data
        lines = data.split(b"\n")
        tail = lines.pop()
        if len(tail) >= MAX_LINE:
            # Already too long even if the next byte were the newline.
            self.overlong += 1
            self._discarding = True
            tail = b""
        self._tail = tail
        if lines and max(map(len, lines)) >= MAX_LINE:
            kept = [line for line in lines if len(line) < MAX_LINE]
            self.overlong += len(lines) - len(kept)
            return kept
        return lines
