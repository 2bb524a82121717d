# The node's hardware: pump outputs and sensors on machine pins. Each sensor
# does a bounded piece of work in step(now) and keeps its latest value, so a
# `read` is answered from memory at once: the DS18B20's 750 ms conversion and
# the SHT3x's 15 ms measurement are started in one step and collected in a
# later one; a DHT22 (5 ms) and an ultrasonic ping (at most 30 ms) are taken
# between frames. A failing sensor reads null; it never stops the node.

import time

import nlsense
from machine import ADC, PWM, Pin, time_pulse_us
from nlframe import number

FAILS_TO_NULL = 3  # failed reads in a row before a value becomes null


class Output:
    # A pump on a MOSFET: PWM (duty 0-255) or plain on/off; active_low inverts.
    # The pin is driven to "off" as it is created.

    def __init__(self, cfg):
        self.active_low = cfg["active_low"]
        off = 1 if self.active_low else 0
        self.pin = Pin(cfg["pin"], Pin.OUT, value=off)
        self.pwm = None
        if cfg["pwm"]:
            self.pwm = PWM(self.pin, freq=cfg["freq"], duty_u16=65535 * off)

    def set(self, duty):
        if self.pwm is not None:
            level = duty * 257  # 255 -> 65535
            self.pwm.duty_u16(65535 - level if self.active_low else level)
        else:
            on = 1 if duty > 0 else 0
            self.pin.value(1 - on if self.active_low else on)


class _Sensor:
    def __init__(self, cfg):
        self.keys = cfg["keys"]
        self.period = cfg["period_ms"]
        self.due = 0
        self.fails = 0
        self.values = [None] * len(self.keys)

    def failed(self):
        self.fails += 1
        if self.fails >= FAILS_TO_NULL:
            self.values = [None] * len(self.keys)

    def got(self, *values):
        self.fails = 0
        self.values = list(values)

    def pairs(self):
        return [(self.keys[i], self.values[i]) for i in range(len(self.keys))]


class Analog(_Sensor):
    # A probe's analog output (TDS, pH): the median of `samples` readings, in
    # volts (keys *_v, 4 decimals) or 12-bit counts (keys *_adc).

    def __init__(self, cfg):
        _Sensor.__init__(self, cfg)
        self.adc = ADC(Pin(cfg["pin"]), atten=ADC.ATTN_11DB)
        self.raw = self.keys[0].endswith("_adc")
        self.samples = cfg["samples"]
        self.scale = cfg["scale"]

    def step(self, now):
        if now - self.due < 0:
            return
        self.due = now + self.period
        if self.raw:
            counts = nlsense.median([self.adc.read_u16() >> 4 for _ in range(self.samples)])
            self.got(int(counts * self.scale + 0.5))
        else:
            uv = nlsense.median([self.adc.read_uv() for _ in range(self.samples)])
            self.got(number(uv * self.scale / 1000000, 4))


class DS18B20(_Sensor):
    def __init__(self, cfg):
        _Sensor.__init__(self, cfg)
        import ds18x20
        import onewire

        self.ds = ds18x20.DS18X20(onewire.OneWire(Pin(cfg["pin"])))
        self.roms = []
        self.ready_at = None
        self.first = True

    def step(self, now):
        if self.ready_at is None:
            if now - self.due < 0:
                return
            self.due = now + self.period
            if not self.roms:
                self.roms = self.ds.scan()
                if not self.roms:
                    self.failed()
                    return
            self.ds.convert_temp()
            self.ready_at = now + 750
        elif now - self.ready_at >= 0:
            self.ready_at = None
            celsius = self.ds.read_temp(self.roms[0])
            if nlsense.ds_valid(celsius, self.first):
                self.got(number(celsius, 2))
            else:
                self.failed()
            self.first = False

    def reset(self):
        self.ready_at = None
        self.roms = []


class DHT22(_Sensor):
    def __init__(self, cfg):
        _Sensor.__init__(self, cfg)
        import dht

        self.dht = dht.DHT22(Pin(cfg["pin"]))

    def step(self, now):
        if now - self.due < 0:
            return
        self.due = now + self.period
        self.dht.measure()
        self.got(number(self.dht.temperature(), 1), number(self.dht.humidity(), 1))


class SHT3x(_Sensor):
    def __init__(self, cfg):
        _Sensor.__init__(self, cfg)
        from machine import I2C

        self.i2c = I2C(0, sda=Pin(cfg["sda"]), scl=Pin(cfg["scl"]), freq=100000)
        self.addr = cfg["addr"]
        self.ready_at = None

    def step(self, now):
        if self.ready_at is None:
            if now - self.due < 0:
                return
            self.due = now + self.period
            self.i2c.writeto(self.addr, b"\x24\x00")  # single shot, high repeatability
            self.ready_at = now + 20
        elif now - self.ready_at >= 0:
            self.ready_at = None
            got = nlsense.sht_convert(self.i2c.readfrom(self.addr, 6))
            if got is None:
                self.failed()
            else:
                self.got(number(got[0], 2), number(got[1], 1))

    def reset(self):
        self.ready_at = None


class Ultrasonic(_Sensor):
    # JSN-SR04T / HC-SR04: one ping per 200 ms, the median of the last five.
    PING_MS = 200

    def __init__(self, cfg):
        _Sensor.__init__(self, cfg)
        self.trig = Pin(cfg["trig"], Pin.OUT, value=0)
        self.echo = Pin(cfg["echo"], Pin.IN)
        self.cfg = cfg
        self.ring = []

    def step(self, now):
        if now - self.due < 0:
            return
        self.due = now + self.PING_MS
        self.trig.value(1)
        time.sleep_us(12)
        self.trig.value(0)
        us = time_pulse_us(self.echo, 1, 30000)
        if us <= 0:
            self.failed()
            return
        self.ring.append(nlsense.echo_to_cm(us))
        if len(self.ring) > 5:
            self.ring.pop(0)
        c = self.cfg
        litres = nlsense.level_litres(nlsense.median(self.ring), c["empty_cm"], c["l_per_cm"],
                                      c["max_l"])
        self.got(number(litres, 2))


class FloatSwitch(_Sensor):
    def __init__(self, cfg):
        _Sensor.__init__(self, cfg)
        pull = Pin.PULL_UP if cfg["active_low"] else None
        self.pin = Pin(cfg["pin"], Pin.IN, pull)
        self.cfg = cfg

    def step(self, now):
        if now - self.due < 0:
            return
        self.due = now + self.period
        c = self.cfg
        self.got(nlsense.float_litres(self.pin.value(), c["active_low"], c["on_l"], c["off_l"]))


KINDS = {"tds": Analog, "ph": Analog, "analog": Analog, "ds18b20": DS18B20, "dht22": DHT22,
         "sht3x": SHT3x, "ultrasonic": Ultrasonic, "float_switch": FloatSwitch}


class Sensors:
    # Every configured sensor; step() gives each its turn, catching its
    # failures so that one broken sensor only reads null.

    def __init__(self, configs, errors):
        self.all = []
        for i in range(len(configs)):
            cfg = configs[i]
            try:
                self.all.append(KINDS[cfg["type"]](cfg))
            except Exception as exc:  # a driver missing or a pin refused by the port
                errors.append("sensors[%d]: cannot set up %s: %s" % (i, cfg["type"], exc))
        self.keys = []
        for s in self.all:
            self.keys.extend(s.keys)

    def step(self, now):
        for s in self.all:
            try:
                s.step(now)
            except Exception:  # OSError, onewire.OneWireError: a read failed
                if hasattr(s, "reset"):
                    s.reset()
                s.failed()

    def pairs(self):
        out = []
        for s in self.all:
            out.extend(s.pairs())
        return out


def outputs(configs, errors):
    # Every pump, driven off as soon as it exists; a pin the port refuses is reported.
    out = []
    for i in range(len(configs)):
        cfg = configs[i]
        try:
            out.append((cfg["name"], Output(cfg)))
        except Exception as exc:
            errors.append("actuators[%d]: cannot set up %s: %s" % (i, cfg["name"], exc))
    return out
