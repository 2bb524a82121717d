# Heap use of the firmware under MicroPython (run by bench/firmware_heap.py in
# the WebAssembly port, with the modules as .mpy files compiled by mpy-cross
# exactly as `hydrogate node deploy` installs them).
import gc
import sys

import micropython
import stubs

sys.modules["machine"] = stubs
sys.modules["network"] = stubs
sys.modules["socket"] = stubs


def used():
    gc.collect()
    return gc.mem_alloc()


base = used()
import nlconfig
import nlframe
import nlnode
import nlsense

core = used()
import app
import hw
import net

modules = used()

CONFIG = (b'{"name":"tank-a","wifi":{"ssid":"farm","password":"secret"},'
          b'"sensors":[{"type":"tds","pin":34},{"type":"ph","pin":35,"key":"ph_adc"},'
          b'{"type":"ds18b20","pin":4},{"type":"ultrasonic","trig":18,"echo":19,"empty_cm":40,'
          b'"l_per_cm":0.5},{"type":"sht3x","sda":21,"scl":22}],'
          b'"actuators":[{"name":"nutrient","pin":25},{"name":"ph_up","pin":26},'
          b'{"name":"ph_down","pin":27},{"name":"refill","pin":13}]}')


class Out:
    def set(self, duty):
        pass


cfg, errors = nlconfig.load(CONFIG)
keys = []
for s in cfg["sensors"]:
    keys.extend(s["keys"])
values = [(k, nlframe.number(12.3456)) for k in keys]
outputs = [(a["name"], Out()) for a in cfg["actuators"]]
node = nlnode.Node(cfg["name"], "hydronode-1.0.0", keys, outputs, lambda: values, 0)
session = nlnode.Session(node)
state = used()


def frame(body):
    return body + ("*%04X\n" % nlframe.crc16(body)).encode()


FRAMES = [
    ("hello", b'{"id":1,"op":"hello"}'),
    ("read", b'{"id":2,"op":"read"}'),
    ("actuate", b'{"id":3,"op":"actuate","actuator":"nutrient","duty":204,"ms":1000}'),
    ("state", b'{"id":4,"op":"state"}'),
    ("ping", b'{"id":5,"op":"ping"}'),
    ("stop", b'{"id":6,"op":"stop"}'),
    ("bad CRC", b'{"id":7,"op":"ping"}'),
]
worst = 0
print("static: interpreter %d B, protocol core %d B, hw/net/app %d B, node state %d B"
      % (base, core - base, modules - core, state - modules))
for i in range(len(FRAMES)):
    name, body = FRAMES[i]
    data = frame(body)
    if name == "bad CRC":
        data = body + b"*0000\n"
    gc.collect()
    gc.disable()
    before = gc.mem_alloc()
    session.feed(data, 1000 + i)
    node.take_events()
    grown = gc.mem_alloc() - before
    gc.enable()
    worst = max(worst, grown)
    print("frame %-8s %5d B allocated" % (name, grown))
print("peak: %d B (all static + the worst frame)" % (state + worst))
micropython.mem_info()
