"""A stand-in for MicroPython's ``network`` module (test-only): Wi-Fi that connects at once."""

from __future__ import annotations

STA_IF = 0
CALLS: list[str] = []
_HOSTNAME = ["esp"]


def hostname(name: str | None = None) -> str | None:
    if name is None:
        return _HOSTNAME[0]
    _HOSTNAME[0] = name
    return None


class WLAN:
    def __init__(self, interface: int) -> None:
        self._active = False
        self._connected = False

    def active(self, on: bool | None = None) -> bool:
        if on is not None:
            self._active = bool(on)
        return self._active

    def connect(self, ssid: str, password: str) -> None:
        CALLS.append(f"connect {ssid}")
        self._connected = self._active

    def disconnect(self) -> None:
        self._connected = False

    def isconnected(self) -> bool:
        return self._connected

    def ifconfig(self) -> tuple[str, str, str, str]:
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")
