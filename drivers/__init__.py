"""Drivers: the NodeLink codec, link sessions and the transports under them.

Importing the package registers the built-in transports (tcp, serial), so
``drivers.transport.parse_url`` and ``drivers.link.open_link`` know them
whichever module is imported first.
"""

from . import serial, tcp

__all__ = ["serial", "tcp"]
