# Runs a NodeLink conformance table through the firmware's protocol core and
# prints one result line per step. Written for both runtimes: the tests run
# it under CPython and under the MicroPython WebAssembly port and compare the
# outputs byte for byte (and with the table's expected frames).
#
# Table: {"node": {...}, "steps": [{"at": ms, "in": text | "in_hex": hex |
# "tick": true, "out": [frames], "pins": ["name=duty", ...]}]}

import json

from nlnode import Node, Session


class Pin:
    def __init__(self, name, log):
        self.name = name
        self.log = log

    def set(self, duty):
        self.log.append("%s=%d" % (self.name, duty))


def _unhex(text):
    return bytes([int(text[i : i + 2], 16) for i in range(0, len(text), 2)])


def _quote(text):
    # A frame as a JSON string, written by hand so that both runtimes agree.
    out = ['"']
    for c in text:
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c < " " or c > "~":
            out.append("\\u%04x" % ord(c))
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def run(table):
    spec = table["node"]
    pins = []
    outputs = [(name, Pin(name, pins)) for name in spec["actuators"]]
    values = [(pair[0], pair[1]) for pair in spec["values"]]
    node = Node(spec["name"], spec["fw"], spec["sensors"], outputs, lambda: values, 0,
                error=spec.get("error", ""))
    session = Session(node)
    del pins[:]  # the boot-time "all off" is checked by a unit test
    results = []
    for step in table["steps"]:
        now = step["at"]
        if "tick" in step:
            node.tick(now)
            frames = node.take_events()
        else:
            data = _unhex(step["in_hex"]) if "in_hex" in step else step["in"].encode()
            frames = session.feed(data, now)[0]
        line = '{"out":[%s],"pins":[%s]}' % (
            ",".join(_quote(f.decode()) for f in frames),
            ",".join('"%s"' % p for p in pins),
        )
        del pins[:]
        results.append(line)
    counts = ",".join('"%s":%d' % (r, node.bad[r]) for r in sorted(node.bad))
    results.append('{"bad":{%s}}' % counts)
    return results


def main(path):
    with open(path) as f:
        table = json.loads(f.read())
    for line in run(table):
        print(line)
