# The node side of NodeLink v1: op dispatch, actuator timers, the link
# watchdog, pH interlock. Pure code (no machine/network import): time comes
# in as integer milliseconds from the caller, outputs are objects with a
# set(duty) method, sensor values come from a callable. The same code runs on
# the board, in the WebAssembly port and under CPython in the tests.
#
# Safety duties (docs/nodelink.md):
# - an actuate runs for its ms on this clock and then stops, gateway or not;
# - a second actuate of a running actuator restarts its timer (new ms, duty);
# - no valid frame (right CRC, a JSON object) for WATCHDOG_MS: all off;
# - ph_up and ph_down never run at once: the second is refused;
# - every output is off at boot (the caller builds outputs off, and
#   Node.__init__ turns each off once more).

from nlframe import FrameError, LineBuffer, Obj, frame, parse_line

PROTO = 1
WATCHDOG_MS = 30000
MAX_MS = 600000
ID_MAX = 2147483647
EXCLUSIVE = (("ph_up", "ph_down"),)
BAD_REASONS = ("crc", "json", "not_object", "encoding", "too_long", "field")


class Node:
    def __init__(self, name, fw, sensors, outputs, read_values, now,
                 watchdog_ms=WATCHDOG_MS, error=""):
        # sensors: list of value keys; outputs: [(name, output)];
        # read_values(): [(key, value)] of the latest readings (None = failed);
        # error: configuration problems to report in hello ("" = none).
        self.name = name
        self.fw = fw
        self.sensors = sensors
        self.outputs = outputs
        self.read_values = read_values
        self.watchdog_ms = watchdog_ms
        self.error = error
        self.start = now
        self.last_valid = now
        self.running = {}  # name -> [duty, deadline_ms]
        self.bad = {}
        for reason in BAD_REASONS:
            self.bad[reason] = 0
        self.events = []  # frames to send to every connection
        for _, out in outputs:
            out.set(0)

    # --- frames in --------------------------------------------------------------

    def handle(self, line, now):
        # One received line -> the reply frame, or None (bad frame, no reply).
        try:
            msg = parse_line(line)
        except FrameError as exc:
            self.bad[exc.args[0]] += 1
            return None
        self.last_valid = now  # a valid frame feeds the watchdog
        rid = msg.get("id")
        if type(rid) is not int or not 1 <= rid <= ID_MAX:
            self.bad["field"] += 1
            return None
        self.tick(now)
        try:
            return frame([("id", rid)] + self._execute(msg.get("op"), msg, now))
        except FrameError:
            return frame([("id", rid), ("ok", False), ("error", "reply too long")])

    def _execute(self, op, msg, now):
        if op == "hello":
            pairs = [("ok", True), ("node", self.name), ("fw", self.fw), ("proto", PROTO),
                     ("sensors", self.sensors), ("actuators", [n for n, _ in self.outputs])]
            if self.error:
                pairs.append(("error", self.error))
            return pairs
        if op == "read":
            return [("ok", True), ("uptime_ms", now - self.start),
                    ("values", Obj(self.read_values()))]
        if op == "actuate":
            return self._actuate(msg, now)
        if op == "stop":
            self.all_off()
            return [("ok", True)]
        if op == "state":
            states = [(n, 1 if n in self.running else 0) for n, _ in self.outputs]
            bad = [(r, self.bad[r]) for r in BAD_REASONS]
            return [("ok", True), ("actuators", Obj(states)), ("bad_frames", Obj(bad))]
        if op == "ping":
            return [("ok", True)]
        return [("ok", False), ("error", "unknown op")]

    def _actuate(self, msg, now):
        name = msg.get("actuator")
        duty = msg.get("duty")
        ms = msg.get("ms")
        out = None
        for n, o in self.outputs:
            if n == name:
                out = o
        if out is None:
            return _refuse("unknown actuator")
        if type(duty) is not int or not 0 <= duty <= 255:
            return _refuse("duty must be an integer 0..255")
        if type(ms) is not int or not 1 <= ms <= MAX_MS:
            return _refuse("ms must be an integer 1..600000")
        if duty == 0:
            self.off(name)
            return [("ok", True)]
        for group in EXCLUSIVE:
            if name in group:
                for other in group:
                    if other != name and other in self.running:
                        return _refuse(other + " is running")
        was_on = name in self.running
        self.running[name] = [duty, now + ms]
        out.set(duty)
        if not was_on:
            self._event([("event", "actuator"), ("actuator", name), ("on", 1), ("duty", duty)])
        return [("ok", True)]

    # --- time -----------------------------------------------------------------------

    def tick(self, now):
        # Apply due timers and the watchdog; call often (every loop pass).
        # Outputs go in their configured order (MicroPython's dicts have none).
        for name, _ in self.outputs:
            run = self.running.get(name)
            if run is not None and now - run[1] >= 0:
                self.off(name)
        if self.running and now - self.last_valid >= self.watchdog_ms:
            self.all_off()

    # --- outputs and events ------------------------------------------------------------

    def off(self, name):
        if self.running.pop(name, None) is None:
            return
        for n, out in self.outputs:
            if n == name:
                out.set(0)
        self._event([("event", "actuator"), ("actuator", name), ("on", 0)])

    def all_off(self):
        for name, _ in self.outputs:
            self.off(name)
        for _, out in self.outputs:  # also anything a fault left on
            out.set(0)

    def boot(self):
        return frame([("event", "boot"), ("node", self.name), ("fw", self.fw)])

    def report(self, now):
        try:
            return frame([("event", "report"), ("uptime_ms", now - self.start),
                          ("values", Obj(self.read_values()))])
        except FrameError:
            return None

    def _event(self, pairs):
        self.events.append(frame(pairs))

    def take_events(self):
        events = self.events
        self.events = []
        return events


def _refuse(text):
    return [("ok", False), ("error", text)]


class Session:
    # One connection's byte stream, with its own line buffer (a TCP client and
    # the UART never share a half line).

    def __init__(self, node):
        self.node = node
        self.lines = LineBuffer()
        self._overlong = 0

    def feed(self, data, now):
        # -> (frames for this connection in order, the events among them):
        # the events a request caused go out before its reply, and to every
        # other connection too.
        out = []
        events = []
        node = self.node
        for line in self.lines.feed(data):
            reply = node.handle(line, now)
            caused = node.take_events()
            events.extend(caused)
            out.extend(caused)
            if reply is not None:
                out.append(reply)
        if self.lines.overlong != self._overlong:
            node.bad["too_long"] += self.lines.overlong - self._overlong
            self._overlong = self.lines.overlong
        return out, events
