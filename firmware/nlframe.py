# NodeLink v1 framing for the node: CRC-16/CCITT-FALSE, a strict JSON
# reader and an ordered JSON writer, and the line splitter.
#
# Pure code: no machine/network import, so it runs the same under MicroPython
# (on the board, and in the WebAssembly port the tests use) and under CPython.
# Where the two runtimes differ this module does the work itself instead of
# trusting the built-ins:
# - MicroPython has no binascii.crc_hqx: the CRC uses a 256-entry table;
# - MicroPython's json.loads accepts {"a":1,} and its dicts are not ordered:
#   requests are read by our own strict parser (working on bytes, so invalid
#   UTF-8 is found the same way whether or not str checks it), and replies
#   are written from lists of (key, value) pairs in a fixed order;
# - float repr differs (and ESP32 floats are single precision): floats are
#   written with a fixed number of decimals from integers.

from array import array

MAX_LINE = 1024  # bytes per line, the newline included
MAX_DEPTH = 8  # nesting accepted in a request (the protocol needs 1)


class FrameError(ValueError):
    # args[0] is the reason: crc, json, not_object, encoding, too_long (a
    # counter name). No __init__ of its own: MicroPython cannot call
    # ValueError.__init__ explicitly.
    pass


def _crc_table():
    table = array("H")
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc_table()


def crc16(data):
    # CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF; crc16(b"123456789") == 0x29B1
    crc = 0xFFFF
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFF00) ^ table[(crc >> 8) ^ byte]
    return crc


# --- reading requests ---------------------------------------------------------


def parse_line(line):
    # One received line (without its newline) -> dict; FrameError otherwise.
    if len(line) >= MAX_LINE:
        raise FrameError("too_long")
    end = len(line)
    if end and line[end - 1] == 13:  # \r
        end -= 1
    star = end - 5
    if star < 0 or line[star] != 42:  # *
        raise FrameError("crc")
    got = _hex(line, star + 1, 4)
    if got < 0:
        raise FrameError("crc")
    body = bytes(line[:star])
    if crc16(body) != got:
        raise FrameError("crc")
    value = loads(body)
    if type(value) is not dict:
        raise FrameError("not_object")
    return value


_HEX = b"0123456789abcdefABCDEF"
_DIGITS = b"0123456789"


def _hex(b, i, n):
    # The value of n hex digits (either case) at b[i:], or -1. Done by hand:
    # int(x, 16) also takes "+1F", " 1F" or "0x1F".
    if i + n > len(b):
        return -1
    value = 0
    for k in range(i, i + n):
        d = _HEX.find(b[k : k + 1])
        if d < 0:
            return -1
        value = value * 16 + (d if d < 16 else d - 6)
    return value


def _ws(b, i):
    n = len(b)
    while i < n and b[i] in b" \t\r\n":
        i += 1
    return i


def _value(b, i, depth):
    if i >= len(b):
        raise FrameError("json")
    c = b[i]
    if c == 123:  # {
        return _object(b, i + 1, depth + 1)
    if c == 91:  # [
        return _array(b, i + 1, depth + 1)
    if c == 34:  # "
        return _string(b, i + 1)
    if c == 45 or 48 <= c <= 57:
        return _number(b, i)
    for word, value in ((b"true", True), (b"false", False), (b"null", None)):
        if b[i : i + len(word)] == word:
            return value, i + len(word)
    raise FrameError("json")


def _object(b, i, depth):
    if depth > MAX_DEPTH:
        raise FrameError("json")
    out = {}
    i = _ws(b, i)
    if i < len(b) and b[i] == 125:  # }
        return out, i + 1
    while True:
        if i >= len(b) or b[i] != 34:
            raise FrameError("json")
        key, i = _string(b, i + 1)
        i = _ws(b, i)
        if i >= len(b) or b[i] != 58:  # :
            raise FrameError("json")
        out[key], i = _value(b, _ws(b, i + 1), depth)
        i = _ws(b, i)
        if i < len(b) and b[i] == 44:  # ,
            i = _ws(b, i + 1)
            continue
        if i < len(b) and b[i] == 125:
            return out, i + 1
        raise FrameError("json")


def _array(b, i, depth):
    if depth > MAX_DEPTH:
        raise FrameError("json")
    out = []
    i = _ws(b, i)
    if i < len(b) and b[i] == 93:  # ]
        return out, i + 1
    while True:
        item, i = _value(b, i, depth)
        out.append(item)
        i = _ws(b, i)
        if i < len(b) and b[i] == 44:
            i = _ws(b, i + 1)
            continue
        if i < len(b) and b[i] == 93:
            return out, i + 1
        raise FrameError("json")


_ESCAPES = {34: '"', 92: "\\", 47: "/", 98: "\b", 102: "\f", 110: "\n", 114: "\r", 116: "\t"}


def _string(b, i):
    # From just after the opening quote; returns (str, index after the closing quote).
    parts = []
    start = i
    n = len(b)
    while i < n:
        c = b[i]
        if c == 34:
            parts.append(b[start:i].decode())
            return "".join(parts), i + 1
        if c == 92:
            parts.append(b[start:i].decode())
            if i + 1 >= n:
                raise FrameError("json")
            e = b[i + 1]
            if e == 117:  # \uXXXX
                code, i = _hex4(b, i + 2)
                if 0xD800 <= code <= 0xDBFF:
                    if b[i : i + 2] != b"\\u":
                        raise FrameError("json")
                    low, i = _hex4(b, i + 2)
                    if not 0xDC00 <= low <= 0xDFFF:
                        raise FrameError("json")
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                elif 0xDC00 <= code <= 0xDFFF:
                    raise FrameError("json")
                parts.append(chr(code))
            elif e in _ESCAPES:
                parts.append(_ESCAPES[e])
                i += 2
            else:
                raise FrameError("json")
            start = i
        elif c < 32:
            raise FrameError("json")
        elif c < 128:
            i += 1
        else:
            i = _utf8(b, i)
    raise FrameError("json")


def _hex4(b, i):
    value = _hex(b, i, 4)
    if value < 0:
        raise FrameError("json")
    return value, i + 4


def _utf8(b, i):
    # Validate one multi-byte UTF-8 sequence at i; return the index after it.
    c = b[i]
    if 0xC2 <= c <= 0xDF:
        need, low, high = 1, 0x80, 0xBF
    elif 0xE0 <= c <= 0xEF:
        need = 2
        low = 0xA0 if c == 0xE0 else 0x80
        high = 0x9F if c == 0xED else 0xBF  # no surrogates
    elif 0xF0 <= c <= 0xF4:
        need = 3
        low = 0x90 if c == 0xF0 else 0x80
        high = 0x8F if c == 0xF4 else 0xBF
    else:
        raise FrameError("encoding")
    if i + need >= len(b):
        raise FrameError("encoding")
    if not low <= b[i + 1] <= high:
        raise FrameError("encoding")
    for k in range(2, need + 1):
        if not 0x80 <= b[i + k] <= 0xBF:
            raise FrameError("encoding")
    return i + need + 1


def _number(b, i):
    start = i
    n = len(b)
    if b[i] == 45:
        i += 1
    if i >= n or b[i] not in _DIGITS:
        raise FrameError("json")
    if b[i] == 48:
        i += 1
    else:
        while i < n and b[i] in _DIGITS:
            i += 1
    is_float = False
    if i < n and b[i] == 46:  # .
        i += 1
        is_float = True
        if i >= n or b[i] not in _DIGITS:
            raise FrameError("json")
        while i < n and b[i] in _DIGITS:
            i += 1
    if i < n and b[i] in b"eE":
        i += 1
        is_float = True
        if i < n and b[i] in b"+-":
            i += 1
        if i >= n or b[i] not in _DIGITS:
            raise FrameError("json")
        while i < n and b[i] in _DIGITS:
            i += 1
    text = b[start:i]
    return (float(text) if is_float else int(text)), i


def loads(data):
    # A whole JSON document (bytes) -> value, by the same strict parser.
    value, pos = _value(data, _ws(data, 0), 0)
    if _ws(data, pos) != len(data):
        raise FrameError("json")
    return value


# --- writing replies and events ---------------------------------------------------


class Obj:
    # A JSON object written with its keys in the order given: [(key, value), ...].
    def __init__(self, pairs):
        self.pairs = pairs


def number(value, decimals=4):
    # A float with at most `decimals` decimals, trailing zeros dropped; None
    # (JSON null) when it is not finite. Computed from integers so that every
    # runtime writes the same text.
    if value is None or value != value or value - value != 0:
        return None
    return _Fixed(value, decimals)


class _Fixed:
    def __init__(self, value, decimals):
        scale = 10**decimals
        neg = value < 0
        units = int((-value if neg else value) * scale + 0.5)
        whole, frac = divmod(units, scale)
        text = str(whole)
        if frac:
            digits = str(frac)
            digits = "0" * (decimals - len(digits)) + digits
            text += "." + digits.rstrip("0")
        self.text = "-" + text if neg and units else text


def _write_str(s, out):
    out.append('"')
    start = 0
    for i in range(len(s)):
        c = s[i]
        if c == '"' or c == "\\" or c < " ":
            out.append(s[start:i])
            if c == '"':
                out.append('\\"')
            elif c == "\\":
                out.append("\\\\")
            elif c == "\n":
                out.append("\\n")
            else:
                out.append("\\u%04x" % ord(c))
            start = i + 1
    out.append(s[start:])
    out.append('"')


def _write(value, out):
    kind = type(value)
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif kind is int:
        out.append(str(value))
    elif kind is str:
        _write_str(value, out)
    elif kind is _Fixed:
        out.append(value.text)
    elif kind is float:
        fixed = number(value)
        out.append("null" if fixed is None else fixed.text)
    elif kind is Obj:
        out.append("{")
        first = True
        for key, item in value.pairs:
            if not first:
                out.append(",")
            first = False
            _write_str(key, out)
            out.append(":")
            _write(item, out)
        out.append("}")
    elif kind is list or kind is tuple:
        out.append("[")
        for k in range(len(value)):
            if k:
                out.append(",")
            _write(value[k], out)
        out.append("]")
    else:
        raise TypeError("cannot write " + str(kind))


def frame(pairs):
    # Frame a message given as [(key, value), ...]: JSON, "*", CRC, "\n".
    out = []
    _write(Obj(pairs), out)
    body = "".join(out).encode()
    if len(body) + 6 > MAX_LINE:
        raise FrameError("too_long")
    return body + ("*%04X\n" % crc16(body)).encode()


# --- cutting the byte stream into lines ---------------------------------------------


class LineBuffer:
    # Bytes in, complete lines out. A line of MAX_LINE bytes or more (the
    # newline included) is discarded up to the next newline and counted in
    # `overlong`; memory stays bounded by one line.

    def __init__(self):
        self._buf = b""
        self._skip = False
        self.overlong = 0

    def feed(self, data):
        lines = []
        buf = self._buf + data if self._buf else bytes(data)
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if self._skip:
                self._skip = False
            elif nl - start >= MAX_LINE:
                self.overlong += 1
            else:
                lines.append(buf[start:nl])
            start = nl + 1
        tail = buf[start:]
        if self._skip:
            tail = b""
        elif len(tail) >= MAX_LINE:
            self.overlong += 1
            self._skip = True
            tail = b""
        self._buf = tail
        return lines
