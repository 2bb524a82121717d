"""Exceptions of the driver layer: everything a node task needs to catch.

``LinkError`` is the one base class; a node task catches it, backs off and
reconnects. Codec errors (``FrameError``) live in drivers/nodelink.py: they
never leave the link, which counts them.
"""

from __future__ import annotations


class LinkError(Exception):
    """Base class of every link failure."""


class TransportError(LinkError):
    """A transport URL is invalid, or its connection could not be opened."""


class BadUrl(TransportError):
    """A transport URL the drivers refuse; ``reason`` says why, without the URL."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url!r}: {reason}")
        self.url = url
        self.reason = reason


class LinkDown(LinkError):
    """The transport closed or failed; the link is unusable and must be reopened."""


class RequestTimeout(LinkError):
    """No valid reply came within the deadline, retries included."""

    def __init__(self, op: str, attempts: int, timeout: float) -> None:
        super().__init__(f"no reply to {op!r} after {attempts} attempt(s) of {timeout:g} s")
        self.op = op
        self.attempts = attempts


class NodeRefused(LinkError):
    """The node answered ``ok: false``; ``error`` is its text."""

    def __init__(self, op: str, error: str) -> None:
        super().__init__(f"node refused {op!r}: {error}")
        self.op = op
        self.error = error
