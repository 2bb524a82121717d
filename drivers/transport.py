"""Transports by URL scheme: ``tcp://host:port`` or ``serial:///dev/ttyUSB0?baud=115200``.

A transport module registers an *opener* for its scheme, an async function
``(urllib.parse.SplitResult) -> (StreamReader, StreamWriter)``, and a *check*
that validates the URL without opening anything (so configs are validated
up front). The link layer only ever calls ``open_transport(url)``; adding a
transport is a new module with one ``register`` call, no if/elif anywhere.

The registry is filled once, at import time of drivers.tcp and drivers.serial
(drivers/__init__.py imports both); tests that need an extra scheme build
their own ``TransportRegistry``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import overload
from urllib.parse import SplitResult, urlsplit

from .errors import TransportError

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Opener = Callable[[SplitResult], Awaitable[Streams]]
Check = Callable[[SplitResult], None]
"""Validates a URL of its scheme; raises ``ValueError`` saying what is wrong."""


@dataclass(frozen=True, slots=True)
class _Scheme:
    opener: Opener
    check: Check | None


class TransportRegistry:
    """URL scheme -> opener (and optional URL check)."""

    def __init__(self) -> None:
        self._schemes: dict[str, _Scheme] = {}

    @overload
    def register(
        self, scheme: str, *, check: Check | None = None
    ) -> Callable[[Opener], Opener]: ...

    @overload
    def register(self, scheme: str, opener: Opener, *, check: Check | None = None) -> Opener: ...

    def register(
        self, scheme: str, opener: Opener | None = None, *, check: Check | None = None
    ) -> Opener | Callable[[Opener], Opener]:
        """Register ``opener`` for ``scheme``: ``register("tcp", f)`` or ``@register("tcp")``.

        Registering a different opener for a taken scheme is an error rather
        than a silent replacement.
        """
        scheme = scheme.lower()

        def add(func: Opener) -> Opener:
            old = self._schemes.get(scheme)
            if old is not None and old.opener is not func:
                raise ValueError(f"transport scheme {scheme!r} is already registered")
            self._schemes[scheme] = _Scheme(func, check)
            return func

        return add if opener is None else add(opener)

    def schemes(self) -> list[str]:
        """The registered schemes, sorted."""
        return sorted(self._schemes)

    def parse_url(self, url: str) -> SplitResult:
        """Split and validate ``url``; raise ``TransportError`` saying what is wrong."""
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise TransportError(f"{url!r}: not a valid URL ({exc})") from exc
        entry = self._schemes.get(parts.scheme)
        if entry is None:
            known = ", ".join(f"{s}://" for s in self.schemes()) or "none"
            raise TransportError(f"{url!r}: unknown transport scheme (known: {known})")
        if entry.check is not None:
            try:
                entry.check(parts)
            except ValueError as exc:
                raise TransportError(f"{url!r}: {exc}") from exc
        return parts

    async def open(self, url: str) -> Streams:
        """Open the transport ``url`` names; failures become ``TransportError``."""
        parts = self.parse_url(url)
        opener = self._schemes[parts.scheme].opener
        try:
            return await opener(parts)
        except (OSError, ValueError) as exc:
            raise TransportError(f"{url}: cannot open: {exc}") from exc


REGISTRY = TransportRegistry()
"""The registry the gateway uses; filled by importing drivers.tcp and drivers.serial."""

register = REGISTRY.register
parse_url = REGISTRY.parse_url


async def open_transport(url: str) -> Streams:
    """Open ``url`` with the opener registered for its scheme."""
    return await REGISTRY.open(url)
