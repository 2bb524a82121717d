"""Small asyncio helpers shared by the gateway's long-running tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("hydrogate")


async def cancel_and_wait(
    task: asyncio.Task[None], *, attempts: int = 10, each: float = 1.0
) -> bool:
    """Cancel ``task`` and wait until it has ended; True if it did.

    A single cancel is not always enough: when a task is cancelled while a
    child of its TaskGroup fails (a link closing as the daemon stops), Python
    3.11's TaskGroup raises the child's error and the cancellation is lost, so
    a reconnect loop that catches that error goes on. Libraries also leave
    ``Task.cancelling()`` set after cancellations of their own (aiomqtt does
    after a failed connect), so the loops cannot ask it either. The owner of
    the task therefore cancels again, a bounded number of times.
    """
    for _ in range(attempts):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=each)
    if not task.done():
        log.error("task %s did not stop after %d cancellations", task.get_name(), attempts)
        return False
    if not task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            exc = task.exception()
            if exc is not None:
                log.error("task %s ended with %r", task.get_name(), exc)
    return True
