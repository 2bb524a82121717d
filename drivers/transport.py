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

from .errors import BadUrl, TransportError

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Opener = Callable[[SplitResult], Awaitable[Streams]]
Check = Callable[[SplitResult], str]
"""Validates a URL of its scheme and returns its canonical form (defaults written out);
raises ``ValueError`` saying what is wrong. The one place a scheme's URL rules live: the
config (gateway/config.py) validates node URLs with it too."""


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
        """Split and validate ``url``; raise :class:`BadUrl` saying what is wrong."""
        return self._check(url)[0]

    def canonical(self, url: str) -> str:
        """``url`` validated and written out in full (e.g. the default port or baud rate)."""
        return self._check(url)[1]

    def _check(self, url: str) -> tuple[SplitResult, str]:
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise BadUrl(url, f"not a valid URL ({exc})") from exc
        entry = self._schemes.get(parts.scheme)
        if entry is None:
            known = ", ".join(f"{s}://" for s in self.schemes()) or "none"
            raise BadUrl(url, f"unknown transport scheme (known: {known})")
        if entry.check is None:
            return parts, url
        try:
            return parts, entry.check(parts)
        except ValueError as exc:
            raise BadUrl(url, str(exc)) from exc

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
canonical_url = REGISTRY.canonical


async def open_transport(url: str) -> Streams:
    """Open ``url`` with the opener registered for its scheme."""
    return await REGISTRY.open(url)
