# config.json of a node: validated at boot into plain dicts, every error
# collected with its path ("sensors[2].pin: ..."). A bad entry is left out
# and reported; everything valid is still served. Pure code (no machine
# import), so the tests run it under CPython and MicroPython alike.
#
# Pin rules per chip: the flash (and octal PSRAM) pins and the strapping pins
# are never used (a pump on a strapping pin can run or stop the boot); ADC2
# does not work while Wi-Fi is on, so analog sensors need ADC1 then; input-only
# pins cannot drive anything; the REPL's UART and USB pins are left alone; a
# pump is not put on a pin that toggles during boot (ESP32 GPIO14). On the
# ESP32-C3 the REPL is on USB, so its UART0 pins (20, 21) are the default link.

from nlframe import FrameError, loads


def _r(a, b):
    return tuple(range(a, b + 1))


BOARDS = {
    "esp32": {
        "pins": _r(0, 19) + _r(21, 23) + _r(25, 27) + _r(32, 39),
        "flash": _r(6, 11),
        "strapping": (0, 2, 5, 12, 15),
        "input_only": _r(34, 39),
        "adc1": _r(32, 39),
        "adc2": (4, 13, 14, 25, 26, 27),
        "console": (1, 3),
        "boot_pwm": (14,),
        "uart": {"id": 2, "tx": 17, "rx": 16, "baud": 115200},
    },
    "esp32s3": {
        "pins": _r(0, 21) + _r(26, 48),
        "flash": _r(26, 37),
        "strapping": (0, 3, 45, 46),
        "input_only": (),
        "adc1": _r(1, 10),
        "adc2": _r(11, 20),
        "console": (19, 20, 43, 44),
        "boot_pwm": (),
        "uart": {"id": 1, "tx": 17, "rx": 18, "baud": 115200},
    },
    "esp32c3": {
        "pins": _r(0, 21),
        "flash": _r(11, 17),
        "strapping": (2, 8, 9),
        "input_only": (),
        "adc1": (0, 1, 3, 4),
        "adc2": (5,),
        "console": (18, 19),
        "boot_pwm": (),
        "uart": {"id": 1, "tx": 21, "rx": 20, "baud": 115200},
    },
}

BAUDS = (9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
SENSOR_KEYS = {
    # type: (pins it uses, allowed keys, default key, output needed on pins)
    "tds": (("pin",), ("tds_v", "tds_adc"), "tds_v", False),
    "ph": (("pin",), ("ph_v", "ph_adc"), "ph_v", False),
    "analog": (("pin",), None, None, False),
    "ds18b20": (("pin",), ("water_temp", "air_temp"), "water_temp", True),
    "ultrasonic": (("trig", "echo"), ("water_level",), "water_level", True),
    "float_switch": (("pin",), ("water_level",), "water_level", False),
    "dht22": (("pin",), None, None, True),
    "sht3x": (("sda", "scl"), None, None, True),
}
TWO_KEYS = ("air_temp", "humidity")  # dht22 and sht3x


class Invalid(Exception):
    pass


def _int(value, low, high, what="an integer"):
    if type(value) is not int or not low <= value <= high:
        raise Invalid("must be %s in %d..%d" % (what, low, high))
    return value


def _num(value, low, high):
    if type(value) not in (int, float) or not low <= value <= high:
        raise Invalid("must be a number in %s..%s" % (low, high))
    return float(value)


def _name(value, what):
    if type(value) is not str or not 1 <= len(value) <= 32:
        raise Invalid("must be %s of 1 to 32 characters" % what)
    for c in value:
        if not (c.isalpha() or c.isdigit() or c in "_-."):
            raise Invalid("must be %s of letters, digits, _ - ." % what)
    return value


def _bool(value):
    if value is not True and value is not False:
        raise Invalid("must be true or false")
    return value


class _Checker:
    def __init__(self, board, wifi):
        self.board = BOARDS[board]
        self.board_name = board
        self.wifi = wifi
        self.used = {}  # pin -> path of its user
        self.keys = {}  # value key -> path of its sensor

    def pin(self, value, path, output=False, analog=False, pump=False):
        b = self.board
        pin = _int(value, 0, 48, "a GPIO number")
        if pin not in b["pins"]:
            raise Invalid("GPIO %d does not exist on the %s" % (pin, self.board_name))
        if pin in b["flash"]:
            raise Invalid("GPIO %d is wired to the flash/PSRAM chip" % pin)
        if pin in b["strapping"]:
            raise Invalid("GPIO %d is a strapping pin (it decides how the chip boots)" % pin)
        if pin in b["console"]:
            raise Invalid("GPIO %d is the REPL's serial/USB line" % pin)
        if output and pin in b["input_only"]:
            raise Invalid("GPIO %d is input-only and cannot drive anything" % pin)
        if pump and pin in b["boot_pwm"]:
            raise Invalid("GPIO %d toggles while the chip boots; a pump would twitch" % pin)
        if analog:
            if pin in b["adc2"]:
                if self.wifi:
                    raise Invalid("GPIO %d is on ADC2, which does not work while Wi-Fi "
                                  "is on; use an ADC1 pin: %s" % (pin, _pins(b["adc1"])))
            elif pin not in b["adc1"]:
                raise Invalid("GPIO %d has no ADC; use an ADC1 pin: %s" % (pin, _pins(b["adc1"])))
        if pin in self.used:
            raise Invalid("GPIO %d is already used by %s" % (pin, self.used[pin]))
        return pin


def _pins(pins):
    return ", ".join(str(p) for p in pins)


def _fields(entry, allowed, path, errors):
    for key in entry:
        if key not in allowed:
            errors.append("%s.%s: unknown key" % (path, key))


def _sensor(entry, path, chk, errors):
    if type(entry) is not dict:
        raise Invalid("must be an object")
    kind = entry.get("type")
    if kind not in SENSOR_KEYS:
        raise Invalid("type must be one of " + ", ".join(sorted(SENSOR_KEYS)))
    pin_names, keys, default_key, output = SENSOR_KEYS[kind]
    allowed = ("type", "key", "samples", "scale", "addr", "empty_cm", "l_per_cm",
               "max_l", "on_l", "off_l", "active_low", "period_ms") + pin_names
    _fields(entry, allowed, path, errors)
    out = {"type": kind}
    pins = {}
    for p in pin_names:
        if p not in entry:
            raise Invalid("needs %r" % p)
        try:
            pins[p] = chk.pin(entry[p], path + "." + p, output=output or p == "trig",
                              analog=kind in ("tds", "ph", "analog"))
        except Invalid as exc:
            raise Invalid("%s: %s" % (p, exc))
    if kind in ("dht22", "sht3x"):
        names = TWO_KEYS
    else:
        key = entry.get("key", default_key)
        if keys is None:
            if type(key) is not str or not (key.endswith("_v") or key.endswith("_adc")):
                raise Invalid("key must end in _v (volts) or _adc (counts)")
            _name(key, "a key")
        elif key not in keys:
            raise Invalid("key must be one of " + ", ".join(keys))
        names = (key,)
    for key in names:
        if key in chk.keys:
            raise Invalid("key %s is already given by %s" % (key, chk.keys[key]))
    out["keys"] = names
    out["period_ms"] = _opt(entry, "period_ms", lambda v: _int(v, 100, 3600000), 1000)
    if kind in ("tds", "ph", "analog"):
        out["samples"] = _opt(entry, "samples", lambda v: _int(v, 1, 64), 15)
        out["scale"] = _opt(entry, "scale", lambda v: _num(v, 0.01, 100), 1.0)
    elif kind == "ultrasonic":
        out["empty_cm"] = _need(entry, "empty_cm", lambda v: _num(v, 2, 1000))
        out["l_per_cm"] = _need(entry, "l_per_cm", lambda v: _num(v, 0.001, 1000))
        out["max_l"] = _opt(entry, "max_l", lambda v: _num(v, 0, 100000), None)
    elif kind == "float_switch":
        out["on_l"] = _need(entry, "on_l", lambda v: _num(v, 0, 100000))
        out["off_l"] = _need(entry, "off_l", lambda v: _num(v, 0, 100000))
        out["active_low"] = _opt(entry, "active_low", _bool, True)
    elif kind == "sht3x":
        out["addr"] = _opt(entry, "addr", lambda v: _int(v, 0x44, 0x45), 0x44)
    if kind in ("dht22", "sht3x", "ds18b20"):
        out["period_ms"] = max(out["period_ms"], 2000)
    out.update(pins)
    for p in pin_names:
        chk.used[pins[p]] = path
    for key in names:
        chk.keys[key] = path
    return out


def _need(entry, key, check):
    if key not in entry:
        raise Invalid("needs %r" % key)
    try:
        return check(entry[key])
    except Invalid as exc:
        raise Invalid("%s %s" % (key, exc))


def _opt(entry, key, check, default):
    if key not in entry:
        return default
    try:
        return check(entry[key])
    except Invalid as exc:
        raise Invalid("%s %s" % (key, exc))


def _actuator(entry, path, chk, names, errors):
    if type(entry) is not dict:
        raise Invalid("must be an object")
    _fields(entry, ("name", "pin", "freq", "pwm", "active_low"), path, errors)
    name = _need(entry, "name", lambda v: _name(v, "a name"))
    if name in names:
        raise Invalid("name %s is used twice" % name)
    if "pin" not in entry:
        raise Invalid("needs 'pin'")
    try:
        pin = chk.pin(entry["pin"], path + ".pin", output=True, pump=True)
    except Invalid as exc:
        raise Invalid("pin: %s" % exc)
    out = {
        "name": name,
        "pin": pin,
        "freq": _opt(entry, "freq", lambda v: _int(v, 1, 40000), 1000),
        "pwm": _opt(entry, "pwm", _bool, True),
        "active_low": _opt(entry, "active_low", _bool, False),
    }
    chk.used[pin] = path
    names.append(name)
    return out


def _uart(entry, chk, errors):
    default = chk.board["uart"]
    if entry is False:
        return None
    if entry is None:
        entry = {}
    if type(entry) is not dict:
        raise Invalid("must be an object or false")
    _fields(entry, ("id", "tx", "rx", "baud"), "uart", errors)
    out = {
        "id": _opt(entry, "id", lambda v: _int(v, 1, 2), default["id"]),
        "baud": _opt(entry, "baud", lambda v: _choice(v, BAUDS), default["baud"]),
    }
    for p in ("tx", "rx"):
        try:
            out[p] = chk.pin(entry.get(p, default[p]), "uart." + p, output=p == "tx")
        except Invalid as exc:
            if p == "rx":
                del chk.used[out["tx"]]
            raise Invalid("%s: %s" % (p, exc))
        chk.used[out[p]] = "uart." + p
    return out


def _choice(value, choices):
    if value not in choices or type(value) is not int:
        raise Invalid("must be one of " + ", ".join(str(c) for c in choices))
    return value


def _wifi(entry, errors):
    if type(entry) is not dict:
        raise Invalid("must be an object with ssid and password")
    _fields(entry, ("ssid", "password", "hostname"), "wifi", errors)
    ssid = entry.get("ssid")
    password = entry.get("password", "")
    if type(ssid) is not str or not 1 <= len(ssid) <= 32:
        raise Invalid("ssid must be a text of 1 to 32 characters")
    if type(password) is not str or len(password) > 64:
        raise Invalid("password must be a text of at most 64 characters")
    out = {"ssid": ssid, "password": password}
    if "hostname" in entry:
        out["hostname"] = _need(entry, "hostname", lambda v: _name(v, "a host name"))
    return out


def _tcp(entry, errors):
    if entry is None:
        entry = {}
    if type(entry) is not dict:
        raise Invalid("must be an object")
    _fields(entry, ("port", "bind"), "tcp", errors)
    bind = entry.get("bind", "0.0.0.0")
    if type(bind) is not str or not bind:
        raise Invalid("bind must be an IP address text")
    return {"port": _opt(entry, "port", lambda v: _int(v, 1, 65535), 3333), "bind": bind}


def validate(data):
    # data: the decoded config.json -> (config dict, [error texts]).
    errors = []
    if type(data) is not dict:
        errors.append("config: must be a JSON object")
        data = {}
    _fields(data, ("name", "board", "uart", "wifi", "tcp", "push_ms", "sensors", "actuators"),
            "config", errors)
    cfg = {"name": "node", "board": "esp32", "push_ms": 0, "sensors": [], "actuators": [],
           "wifi": None, "tcp": None, "uart": None}

    def field(key, check):
        if key in data:
            try:
                cfg[key] = check(data[key])
            except Invalid as exc:
                errors.append("%s: %s" % (key, exc))

    field("name", lambda v: _name(v, "a name"))
    field("board", lambda v: _choice_str(v, sorted(BOARDS)))
    field("push_ms", lambda v: 0 if v == 0 and type(v) is int else _int(v, 100, 3600000))
    field("wifi", lambda v: _wifi(v, errors))
    chk = _Checker(cfg["board"], cfg["wifi"] is not None)
    if cfg["wifi"] is not None:
        try:
            cfg["tcp"] = _tcp(data.get("tcp"), errors)
        except Invalid as exc:
            errors.append("tcp: %s" % exc)
            cfg["tcp"] = {"port": 3333, "bind": "0.0.0.0"}
    elif "tcp" in data:
        errors.append("tcp: needs a wifi section")
    try:
        cfg["uart"] = _uart(data.get("uart"), chk, errors)
    except Invalid as exc:
        errors.append("uart: %s" % exc)
    for section, build in (("sensors", _sensor), ("actuators", _actuator)):
        entries = data.get(section, [])
        if type(entries) is not list:
            errors.append("%s: must be a list" % section)
            continue
        names = []
        for i in range(len(entries)):
            path = "%s[%d]" % (section, i)
            try:
                if section == "sensors":
                    cfg[section].append(build(entries[i], path, chk, errors))
                else:
                    cfg[section].append(build(entries[i], path, chk, names, errors))
            except Invalid as exc:
                errors.append("%s: %s" % (path, exc))
    if cfg["uart"] is None and cfg["tcp"] is None and data.get("uart") is not False:
        # No way in at all: fall back to the board's default UART so that the
        # gateway (and `hydrogate node probe`) can still read the errors --
        # unless a pump or sensor has its pins (a UART's TX idles high).
        uart = chk.board["uart"]
        if uart["tx"] in chk.used or uart["rx"] in chk.used:
            errors.append("uart: no usable link: the default UART pins are taken")
        else:
            cfg["uart"] = dict(uart)
            errors.append("uart: using the default UART%(id)d tx=%(tx)d rx=%(rx)d" % uart)
    return cfg, errors


def _choice_str(value, choices):
    if value not in choices:
        raise Invalid("must be one of " + ", ".join(choices))
    return value


def load(text):
    # The bytes of config.json -> (config, errors); unreadable JSON counts as
    # one error and leaves the defaults.
    try:
        data = loads(text)
    except FrameError:
        return validate({})[0], ["config.json: not valid JSON"]
    return validate(data)
