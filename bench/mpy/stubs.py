# Minimal stand-ins for the board's C modules (machine, network, socket), only
# so that hw.py, net.py and app.py can be imported under the WebAssembly port
# to weigh them. On a board these modules live in flash, not on the heap.


class Pin:
    IN = 0
    OUT = 1
    PULL_UP = 1

    def __init__(self, *a, **k):
        pass


class PWM:
    def __init__(self, *a, **k):
        pass


class ADC:
    ATTN_11DB = 3

    def __init__(self, *a, **k):
        pass


class UART:
    def __init__(self, *a, **k):
        pass


def time_pulse_us(*a):
    return -1


STA_IF = 0
WLAN = UART
AF_INET = SOCK_STREAM = SOL_SOCKET = SO_REUSEADDR = 0
socket = UART
getaddrinfo = time_pulse_us
