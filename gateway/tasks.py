"""Small asyncio helpers shared by the gateway's long-running loops."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that an error swallowed.

    When a task is cancelled while a child of its TaskGroup fails (a link
    closing as the daemon stops), Python 3.11's TaskGroup raises the child's
    error and the cancellation is lost. A reconnect loop that catches that
    error would then go on for ever and the daemon would never stop; calling
    this after catching keeps the cancellation.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
