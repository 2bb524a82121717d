"""Stand-in for MicroPython's ``onewire`` (test-only)."""


class OneWireError(Exception):
    pass


class OneWire:
    def __init__(self, pin: object) -> None:
        self.pin = pin
