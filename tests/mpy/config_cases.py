# Validates a list of config.json texts with the firmware's nlconfig and
# prints what it kept and every error, in a form both runtimes write alike.

from nlconfig import load

CASES = [
    b'{"name":"tank-a","wifi":{"ssid":"farm","password":"pw"},'
    b'"sensors":[{"type":"tds","pin":34},{"type":"ph","pin":25,"key":"ph_adc"},'
    b'{"type":"ds18b20","pin":4},{"type":"dht22","pin":13},{"type":"sht3x","sda":21,"scl":22},'
    b'{"type":"ultrasonic","trig":18,"echo":19,"empty_cm":40,"l_per_cm":0.5}],'
    b'"actuators":[{"name":"ph_up","pin":26},{"name":"ph_down","pin":2},'
    b'{"name":"nutrient","pin":27,"active_low":true},{"name":"refill","pin":36},'
    b'{"name":"ph_up","pin":23}]}',
    b'{"name":"c3","board":"esp32c3","uart":{"tx":21,"rx":20},'
    b'"sensors":[{"type":"ph","pin":5},{"type":"tds","pin":9},{"type":"float_switch","pin":10,'
    b'"on_l":2,"off_l":0.8}],"actuators":[{"name":"refill","pin":7,"pwm":false}]}',
    b'{"name":"s3","board":"esp32s3","wifi":{"ssid":"x"},"tcp":{"port":70000},'
    b'"sensors":[{"type":"tds","pin":12},{"type":"analog","pin":4,"key":"ec"},'
    b'{"type":"analog","pin":5,"key":"orp_v","samples":65}],"push_ms":50,'
    b'"actuators":[{"name":"nutrient","pin":33},{"name":"refill","pin":21,"freq":0}],"extra":1}',
    b'{"name":"bad name!","board":"esp8266","uart":false,"sensors":{},"actuators":[7]}',
    b'{"name":"tank-b","uart":{"tx":17,"rx":17},"sensors":[],"actuators":[]}',
    b'{"name":"x",}',
    b"[]",
]


def show(value):
    kind = type(value)
    if kind is dict:
        return "{" + ",".join("%s:%s" % (k, show(value[k])) for k in sorted(value)) + "}"
    if kind is list or kind is tuple:
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def main():
    for text in CASES:
        cfg, errors = load(text)
        print(show(cfg))
        for e in errors:
            print("  " + e)
