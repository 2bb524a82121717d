"""Small configuration validators that check and normalise one value each.

In the manner of ESPHome's ``config_validation``: a validator is a callable
``(raw value) -> normalised value`` that raises :class:`Invalid` with a short
message ("must be between 3 and 9") and, for values inside lists, the relative
position of the bad element. :class:`Section` walks one YAML mapping, runs the
validators on its keys, records every failure with its full YAML path in an
:class:`ErrorList`, and reports keys nobody asked for as unknown, with a
suggestion. Nothing is ever clamped: a value is accepted as it is, normalised
(``"500ms"`` -> 0.5), or reported.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from drivers.tcp import check_host

T = TypeVar("T")
Validator = Callable[[Any], T]
PathPart = str | int


class Invalid(ValueError):
    """One or more bad values, each a message and its position below the value checked."""

    def __init__(self, message: str, where: tuple[PathPart, ...] = ()) -> None:
        super().__init__(message)
        self.problems: list[tuple[tuple[PathPart, ...], str]] = [(where, message)]

    @classmethod
    def many(cls, problems: list[tuple[tuple[PathPart, ...], str]]) -> Invalid:
        """Several problems at once (for example two bad elements of one list)."""
        err = cls(problems[0][1], problems[0][0])
        err.problems = list(problems)
        return err


def join_path(base: str, part: PathPart) -> str:
    """``("nodes", 1)`` -> ``"nodes[1]"``; ``("nodes[1]", "url")`` -> ``"nodes[1].url"``."""
    if isinstance(part, int):
        return f"{base}[{part}]"
    return f"{base}.{part}" if base else part


class ErrorList:
    """Every problem found so far, as ``(yaml_path, message)`` in the order found."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, path: str, message: str) -> None:
        self.items.append((path, message))

    def check(self, path: str, validator: Validator[T], value: Any) -> T | None:
        """``validator(value)``, or None with every problem recorded under ``path``."""
        try:
            return validator(value)
        except Invalid as err:
            for where, message in err.problems:
                full = path
                for part in where:
                    full = join_path(full, part)
                self.add(full, message)
            return None


class Section:
    """One YAML mapping being validated; tracks which keys were used.

    A missing or null section reads as an empty mapping, so its required keys
    are reported one by one (``thingsboard.host: is required``) and its
    defaults apply. Call :meth:`finish` once every key has been read: the keys
    left over are reported as unknown.
    """

    def __init__(self, errors: ErrorList, path: str, data: Any) -> None:
        self.errors = errors
        self.path = path
        self.ok = True
        self._seen: set[str] = set()
        if data is None:
            data = {}
        elif not isinstance(data, Mapping):
            errors.add(path, f"must be a mapping, not {type_name(data)}")
            self.ok = False
            data = {}
        self.data: Mapping[Any, Any] = data

    def path_of(self, key: str) -> str:
        return join_path(self.path, key)

    def has(self, key: str) -> bool:
        """Whether the key is present with a non-null value (and mark it as known)."""
        self._seen.add(key)
        return self.data.get(key) is not None

    def raw(self, key: str) -> Any:
        """The unvalidated value (None when missing), marking the key as known."""
        self._seen.add(key)
        return self.data.get(key)

    def get(self, key: str, validator: Validator[T], default: T) -> T:
        """The validated value; ``default`` when the key is missing or the value is bad."""
        if key not in self.data:
            self._seen.add(key)
            return default
        value = self.errors.check(self.path_of(key), validator, self.raw(key))
        return default if value is None else value

    def optional(self, key: str, validator: Validator[T]) -> T | None:
        """The validated value, or None when missing or null (null means "not set")."""
        value = self.raw(key)
        if value is None:
            return None
        return self.errors.check(self.path_of(key), validator, value)

    def require(self, key: str, validator: Validator[T]) -> T | None:
        """The validated value; None (and an error) when missing or bad."""
        if not self.has(key):
            if self.ok:  # a section that is not a mapping was reported once already
                self.errors.add(self.path_of(key), "is required")
            return None
        return self.errors.check(self.path_of(key), validator, self.raw(key))

    def section(self, key: str) -> Section:
        """The nested mapping under ``key`` as its own section."""
        return Section(self.errors, self.path_of(key), self.raw(key))

    def finish(self) -> None:
        """Report every key that no reader asked for, with the closest known key."""
        known = sorted(self._seen)
        for key in self.data:
            if isinstance(key, str) and key in self._seen:
                continue
            self.errors.add(
                join_path(self.path, str(key)), f"unknown key{suggest(str(key), known)}"
            )


# --- messages ----------------------------------------------------------------------------------

_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    type(None): "null",
}


def type_name(value: Any) -> str:
    """How a YAML user would name the type of ``value`` ("a string", "null", ...)."""
    for kind, name in _TYPE_NAMES.items():
        if type(value) is kind:
            return name
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters.

    Run-time updates come from outside (ThingsBoard attributes, RPC params):
    a 60 kB string must not become a 60 kB error message and log line.
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fmt_number(x: float) -> str:
    """3.0 -> "3", 0.15 -> "0.15", 2000000 -> "2000000" (no exponent for whole numbers)."""
    if isinstance(x, int) or (math.isfinite(x) and x.is_integer() and abs(x) < 1e15):
        return str(int(x))
    return repr(x)


# --- scalar validators -------------------------------------------------------------------------


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, not {type_name(value)}")
    return value


def integer(value: Any) -> int:
    """An int; a bool is not an int, and neither is 2.5 (2.0 is accepted as 2)."""
    if isinstance(value, bool):
        raise Invalid("must be an integer, not a boolean")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if not isinstance(value, int):
        raise Invalid(f"must be an integer, not {type_name(value)}")
    return value


def number(value: Any) -> float:
    """A finite float; ints are accepted and converted, bools are not numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"must be a number, not {type_name(value)}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise Invalid("must be a finite number")
    return result


def string(value: Any) -> str:
    """A non-empty string without control characters."""
    if not isinstance(value, str):
        raise Invalid(f"must be a string, not {type_name(value)}")
    if not value.strip():
        raise Invalid("must not be empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise Invalid("must not contain control characters")
    return value


def device_name(value: Any) -> str:
    """A ThingsBoard device name: 1 to 255 characters, no outer whitespace."""
    name = string(value)
    if name != name.strip():
        raise Invalid("must not start or end with whitespace")
    if len(name) > 255:
        raise Invalid(f"must be at most 255 characters long (is {len(name)})")
    return name


_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def key_name(value: Any) -> str:
    """A telemetry or NodeLink key such as ``tds_v``: a letter, then letters, digits, ``_``."""
    key = string(value)
    if not _KEY.fullmatch(key) or len(key) > 64:
        raise Invalid(
            f"must be a key of letters, digits and '_' starting with a letter: {shown(key)}"
        )
    return key


def one_of(*choices: str) -> Validator[str]:
    """One of a few fixed words (case-sensitive, as they appear in the docs)."""

    def validate(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            what = shown(value) if isinstance(value, str) else type_name(value)
            raise Invalid(f"must be one of {', '.join(choices)}; not {what}")
        return value

    return validate


def in_range(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    unit: str = "",
) -> Callable[[float], float]:
    """A bound check for an already validated number; never clamps."""
    u = f" {unit}" if unit else ""

    def describe() -> str:
        if lo is not None and hi is not None and not lo_open and not hi_open:
            return f"must be between {fmt_number(lo)}{u} and {fmt_number(hi)}{u}"
        parts = []
        if lo is not None:
            parts.append(f"{'more than' if lo_open else 'at least'} {fmt_number(lo)}{u}")
        if hi is not None:
            parts.append(f"{'less than' if hi_open else 'at most'} {fmt_number(hi)}{u}")
        return "must be " + " and ".join(parts)

    def validate(value: float) -> float:
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise Invalid(describe())
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise Invalid(describe())
        return value

    return validate


def all_of(first: Validator[T], *rest: Callable[[T], T]) -> Validator[T]:
    """``first`` normalises the raw value, then each of ``rest`` checks the result."""

    def validate(value: Any) -> T:
        result = first(value)
        for check in rest:
            result = check(result)
        return result

    return validate


def int_range(lo: int, hi: int, *, unit: str = "") -> Validator[int]:
    """An integer between ``lo`` and ``hi`` inclusive."""
    check = in_range(lo, hi, unit=unit)

    def validate(value: Any) -> int:
        result = integer(value)
        check(result)
        return result

    return validate


def num_range(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    unit: str = "",
) -> Validator[float]:
    """A number (int or float) within bounds."""
    return all_of(number, in_range(lo, hi, lo_open=lo_open, hi_open=hi_open, unit=unit))


# --- durations, sizes, times ------------------------------------------------------------------

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|sec|min|h)\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0}


def duration(value: Any) -> float:
    """Seconds: a plain number, or a string with a unit: ``"500ms"``, ``"5s"``, ``"2min"``."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise Invalid(
                f"must be a duration such as 5, 500ms, 5s, 2min or 1h; not {shown(value)}"
            )
        return float(match[1]) * _DURATION_UNITS[match[2]]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"must be a duration in seconds (or 500ms, 2min), not {type_name(value)}")
    return number(value)


def duration_range(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Validator[float]:
    """A duration in seconds within bounds (messages state the bounds in seconds)."""
    return all_of(duration, in_range(lo, hi, lo_open=lo_open, hi_open=hi_open, unit="s"))


def milliseconds(lo: int, hi: int) -> Validator[int]:
    """Whole milliseconds: an integer (taken as ms) or a duration string (``"2min"``)."""
    check = in_range(lo, hi, unit="ms")

    def validate(value: Any) -> int:
        if isinstance(value, str):
            ms = duration(value) * 1000.0
            if not ms.is_integer():
                raise Invalid(f"must be a whole number of milliseconds, not {shown(value)}")
            result = int(ms)
        else:
            result = integer(value)
        check(result)
        return result

    return validate


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kKMGT]i?)?B?\s*")
_SIZE_UNITS = {
    None: 1,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "KI": 1024,
    "ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}


def size_bytes(value: Any) -> int:
    """A byte count: an integer, or ``"500MB"`` (powers of 1000) / ``"2GiB"`` (powers of 1024)."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None or match[2] not in _SIZE_UNITS:
            raise Invalid(f"must be a size such as 65536, 500MB or 2GiB; not {shown(value)}")
        amount = float(match[1]) * _SIZE_UNITS[match[2]]
        if not amount.is_integer():
            raise Invalid(f"must be a whole number of bytes, not {shown(value)}")
        return int(amount)
    return integer(value)


def size_range(lo: int, hi: int | None = None) -> Validator[int]:
    """A byte count within bounds."""
    check = in_range(lo, hi, unit="bytes")

    def validate(value: Any) -> int:
        result = size_bytes(value)
        check(result)
        return result

    return validate


_TIME = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])")


def time_of_day(value: Any) -> datetime.time:
    """A local time of day written ``"HH:MM"`` (or ``"H:MM"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise Invalid(f'must be a time of day "HH:MM" in quotes, not the number {value}')
    if not isinstance(value, str):
        raise Invalid(f'must be a time of day "HH:MM", not {type_name(value)}')
    match = _TIME.fullmatch(value.strip())
    if match is None:
        raise Invalid(f'must be a time of day "HH:MM" (00:00 to 23:59), not {shown(value)}')
    return datetime.time(int(match[1]), int(match[2]))


def schedule(value: Any) -> tuple[datetime.time, ...]:
    """Times of day, sorted, without repeats.

    Accepts a list of ``"HH:MM"``, or - as ThingsBoard attributes may carry it -
    a JSON-encoded list, or a comma-separated string ``"09:00,15:00"``. An empty
    list or string is an empty schedule.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as err:
                raise Invalid(f"must be a list of times; this JSON is broken: {err}") from err
            except RecursionError:  # "[[[[..." a thousand deep: not a schedule either
                raise Invalid("must be a list of times; this JSON is nested too deeply") from None
        else:
            value = [part.strip() for part in text.split(",")] if text else []
    if not isinstance(value, list | tuple):
        raise Invalid(f'must be a list of times "HH:MM", not {type_name(value)}')
    times: set[datetime.time] = set()
    problems: list[tuple[tuple[PathPart, ...], str]] = []
    for i, element in enumerate(value):
        try:
            t = time_of_day(element)
        except Invalid as err:
            problems.append(((i,), str(err)))
            continue
        if t in times:
            problems.append(((i,), f"repeats {t:%H:%M}"))
        times.add(t)
    if problems:
        raise Invalid.many(problems)
    return tuple(sorted(times))


# --- containers and files ---------------------------------------------------------------------


def list_of(item: Validator[T]) -> Validator[list[T]]:
    """A list whose every element passes ``item``; every bad element is reported."""

    def validate(value: Any) -> list[T]:
        if not isinstance(value, list | tuple):
            raise Invalid(f"must be a list, not {type_name(value)}")
        result: list[T] = []
        problems: list[tuple[tuple[PathPart, ...], str]] = []
        for i, element in enumerate(value):
            try:
                result.append(item(element))
            except Invalid as err:
                problems.extend(((i, *where), message) for where, message in err.problems)
        if problems:
            raise Invalid.many(problems)
        return result

    return validate


def number_pair(
    *, lo: float | None = None, hi: float | None = None
) -> Validator[tuple[float, float]]:
    """``[low, high]`` with low < high, both within optional bounds."""
    element = num_range(lo, hi)

    def validate(value: Any) -> tuple[float, float]:
        items = list_of(element)(value)
        if len(items) != 2:
            raise Invalid(f"must be a pair [low, high], not {len(items)} numbers")
        if not items[0] < items[1]:
            raise Invalid(
                f"must be [low, high] with low < high, not [{fmt_number(items[0])}, "
                f"{fmt_number(items[1])}]"
            )
        return items[0], items[1]

    return validate


def file_path(base_dir: Path | None, *, must_exist: bool) -> Validator[Path]:
    """A path, ``~`` expanded and made relative to ``base_dir`` (the config file's folder)."""

    def validate(value: Any) -> Path:
        text = string(value)
        if "\0" in text:
            raise Invalid("must not contain a NUL character")
        try:
            path = Path(text).expanduser()
        except RuntimeError as err:  # "~user" of an unknown user
            raise Invalid(f"cannot expand {text!r}: no such home directory") from err
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            if path.is_dir():
                raise Invalid(f"{path} is a directory, not a file")
            if must_exist and not path.is_file():
                raise Invalid(f"{path} does not exist")
        except OSError as err:
            raise Invalid(f"cannot check {path}: {err.strerror or err}") from err
        return path

    return validate


def read_secret(path: Path, limit: int = 4096) -> str:
    """The stripped text of a small secret file such as an access token."""
    try:
        if path.exists() and not path.is_file():
            raise Invalid(f"cannot read {path}: not a regular file")
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise Invalid(f"cannot read {path}: {err.strerror or err}") from err
    if len(data) > limit:
        raise Invalid(f"{path} is larger than {limit} bytes; is it really a token?")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise Invalid(f"{path} is not UTF-8 text") from err
    if not text:
        raise Invalid(f"{path} is empty")
    return text


def suggest(word: str, choices: Collection[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def host_name(value: Any) -> str:
    """A DNS name or an IP address (no scheme, no port): the rule of node URLs' hosts."""
    try:
        return check_host(string(value))
    except ValueError as exc:
        raise Invalid(str(exc)) from None
