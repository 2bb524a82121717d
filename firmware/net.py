# The node's ways in: a UART on chosen pins, and a TCP server on Wi-Fi that
# keeps trying to (re)connect. Everything is non-blocking: the main loop asks
# each link for bytes, and the links never wait.

import errno
import socket

import network
from machine import UART

AGAIN = (errno.EAGAIN, errno.ETIMEDOUT)
OUT_MAX = 4096  # bytes kept for a TCP client that does not read; beyond, it is dropped


class UartLink:
    name = "uart"

    def __init__(self, cfg):
        self.uart = UART(cfg["id"], baudrate=cfg["baud"], tx=cfg["tx"], rx=cfg["rx"],
                         timeout=0, rxbuf=2048)

    def pollable(self):
        return self.uart

    def connected(self):
        return True

    def accept(self):
        return False

    def read(self):
        return self.uart.read() or None

    def write(self, data):
        self.uart.write(data)


class TcpLink:
    # One client at a time; a new connection replaces the older one.
    name = "tcp"

    def __init__(self, cfg, poller, log):
        self.poller = poller
        self.log = log
        addr = socket.getaddrinfo(cfg["bind"], cfg["port"])[0][-1]
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(addr)
        server.listen(1)
        server.setblocking(False)
        poller.register(server, 1)  # POLLIN
        self.server = server
        self.client = None
        self.out = b""

    def pollable(self):
        return None  # registered by itself

    def connected(self):
        return self.client is not None

    def accept(self):
        # True when a new client was accepted (the caller starts a new session).
        try:
            conn, addr = self.server.accept()
        except OSError as exc:
            if exc.args[0] in AGAIN:
                return False
            raise
        self.close()
        conn.setblocking(False)
        self.client = conn
        self.out = b""
        self.poller.register(conn, 1)
        self.log("tcp: gateway connected from %s" % (addr[0],))
        return True

    def close(self):
        if self.client is not None:
            try:
                self.poller.unregister(self.client)
            except (OSError, KeyError, ValueError):
                pass
            self.client.close()
            self.client = None
            self.out = b""

    def read(self):
        if self.client is None:
            return None
        try:
            data = self.client.recv(512)
        except OSError as exc:
            if exc.args[0] in AGAIN:
                return None
            self.log("tcp: connection lost (%s)" % exc)
            self.close()
            return None
        if not data:
            self.log("tcp: gateway closed the connection")
            self.close()
            return None
        return data

    def write(self, data):
        if self.client is None:
            return
        self.out += data
        if len(self.out) > OUT_MAX:
            self.log("tcp: gateway does not read; dropping it")
            self.close()
            return
        self.flush()

    def flush(self):
        if self.client is None or not self.out:
            return
        try:
            sent = self.client.send(self.out)
        except OSError as exc:
            if exc.args[0] in AGAIN:
                return
            self.log("tcp: connection lost (%s)" % exc)
            self.close()
            return
        self.out = self.out[sent:]


class Wifi:
    # Station mode; while not connected, tries again after 5 s, doubling up to 60 s.
    FIRST_MS = 5000
    MAX_MS = 60000

    def __init__(self, cfg, log):
        self.cfg = cfg
        self.log = log
        if "hostname" in cfg:
            network.hostname(cfg["hostname"])
        self.wlan = network.WLAN(network.STA_IF)
        self.wlan.active(True)
        self.up = False
        self.retry_at = None
        self.wait = self.FIRST_MS

    def step(self, now):
        up = self.wlan.isconnected()
        if up != self.up:
            self.up = up
            if up:
                self.log("wifi: connected, address %s" % self.wlan.ifconfig()[0])
                self.wait = self.FIRST_MS
            else:
                self.log("wifi: disconnected")
        if up or (self.retry_at is not None and now - self.retry_at < 0):
            return
        self.retry_at = now + self.wait
        self.wait = min(self.wait * 2, self.MAX_MS)
        try:
            self.wlan.disconnect()
            self.wlan.connect(self.cfg["ssid"], self.cfg["password"])
        except OSError as exc:
            self.log("wifi: connect failed (%s)" % exc)
