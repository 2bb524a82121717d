# The node's main loop: read config.json, drive every pump off, set up the
# sensors and the links, then serve NodeLink forever.
#
# One polling loop, no asyncio: each pass waits at most POLL_MS for a byte on
# any link (select.poll), answers complete lines, applies the actuator timers
# and the watchdog, pushes reports, gives each sensor a bounded step and
# keeps Wi-Fi up. The same loop runs unchanged under CPython with stand-in
# machine/network modules, which is how the tests put it behind a real pty
# and a real TCP socket.

import gc
import select
import time

import hw
import net
import nlconfig
from nlnode import WATCHDOG_MS, Node, Session

FW = "hydronode-1.0.0"
CONFIG = "config.json"
POLL_MS = 10
GC_MS = 1000
MAX_ERROR_TEXT = 400  # hello's error stays well inside a 1024-byte frame


def log(text):
    print("hydronode: " + text)


class Clock:
    # Milliseconds since start, from time.ticks_ms (which wraps) by ticks_diff.
    def __init__(self):
        self.last = time.ticks_ms()
        self.ms = 0

    def now(self):
        t = time.ticks_ms()
        self.ms += time.ticks_diff(t, self.last)
        self.last = t
        return self.ms


def read_config(path):
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        cfg, errors = nlconfig.validate({})
        return cfg, [path + ": not found; serving the defaults"] + errors
    return nlconfig.load(text)


def error_text(errors):
    text = "; ".join(errors)
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


class App:
    def __init__(self, path=CONFIG, watchdog_ms=WATCHDOG_MS):
        self.clock = Clock()
        cfg, errors = read_config(path)
        outputs = hw.outputs(cfg["actuators"], errors)  # first of all: every pump off
        self.sensors = hw.Sensors(cfg["sensors"], errors)
        self.poller = select.poll()
        self.links = []
        self.sessions = {}
        self.wifi = None
        if cfg["uart"] is not None:
            try:
                self.links.append(net.UartLink(cfg["uart"]))
            except Exception as exc:
                errors.append("uart: cannot open: %s" % exc)
        if cfg["wifi"] is not None:
            try:
                self.wifi = net.Wifi(cfg["wifi"], log)
                self.links.append(net.TcpLink(cfg["tcp"], self.poller, log))
            except Exception as exc:
                errors.append("wifi/tcp: cannot start: %s" % exc)
        for text in errors:
            log("config error: " + text)
        self.node = Node(cfg["name"], FW, self.sensors.keys, outputs, self.sensors.pairs,
                         self.clock.now(), watchdog_ms=watchdog_ms, error=error_text(errors))
        self.push_ms = cfg["push_ms"]
        self.push_at = self.push_ms
        self.gc_at = 0
        self.booted_tcp = False
        for link in self.links:
            self.sessions[link] = Session(self.node)
            if link.pollable() is not None:
                self.poller.register(link.pollable(), 1)
            if link.name == "uart":
                link.write(self.node.boot())  # on a serial line at once
        log("%s up: %d sensor value(s), %d pump(s), %d link(s)"
            % (cfg["name"], len(self.sensors.keys), len(outputs), len(self.links)))

    def broadcast(self, frames, skip=None):
        for link in self.links:
            if link is not skip and link.connected():
                for f in frames:
                    link.write(f)

    def step(self):
        # One pass of the loop.
        self.poller.poll(POLL_MS)
        now = self.clock.now()
        for link in self.links:
            if link.accept():
                self.sessions[link] = Session(self.node)
                if not self.booted_tcp:  # over TCP to the first connection after the start
                    self.booted_tcp = True
                    link.write(self.node.boot())
            data = link.read()
            if data:
                out, events = self.sessions[link].feed(data, now)
                self.broadcast(events, skip=link)
                for f in out:
                    link.write(f)
            if link.name == "tcp":
                link.flush()
        self.node.tick(now)
        self.broadcast(self.node.take_events())
        if self.push_ms and now - self.push_at >= 0:
            self.push_at = now + self.push_ms
            report = self.node.report(now)
            if report is not None:
                self.broadcast([report])
        self.sensors.step(now)
        if self.wifi is not None:
            self.wifi.step(now)
        if now - self.gc_at >= 0:
            self.gc_at = now + GC_MS
            gc.collect()

    def run(self):
        failures = 0
        try:
            while True:
                try:
                    self.step()
                    failures = 0
                except Exception as exc:  # never leave the loop on a fault
                    failures += 1
                    if failures <= 3:
                        log("loop error: %r" % (exc,))
                    self.node.tick(self.clock.now())
        finally:
            self.node.all_off()  # Ctrl-C (mpremote), or anything else that ends the loop


def main(path=CONFIG, watchdog_ms=WATCHDOG_MS):
    App(path, watchdog_ms).run()
