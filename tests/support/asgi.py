"""Driving an ASGI app's lifespan the way a server does."""

from __future__ import annotations

import asyncio
from typing import Any


async def astart(app: Any) -> None:
    """Runs ``app``'s lifespan startup; raises what the app raises when it refuses to start.

    A refusal must reach the server as ``lifespan.startup.failed`` with the error's message (uvicorn
    logs it and exits), not only as an exception, which uvicorn's ``--lifespan auto`` would take for
    "lifespan not supported" and serve anyway.
    """
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}, "app": app}
    task = asyncio.create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    answer = asyncio.create_task(outbox.get())
    await asyncio.wait({task, answer}, return_when=asyncio.FIRST_COMPLETED)
    if not answer.done():
        answer.cancel()
        task.result()  # the app returned without answering: a bare app that runs no lifespan
        return
    if answer.result()["type"] == "lifespan.startup.complete":
        await inbox.put({"type": "lifespan.shutdown"})
        await task
        return
    assert answer.result()["type"] == "lifespan.startup.failed", answer.result()
    error = (await asyncio.gather(task, return_exceptions=True))[0]
    assert isinstance(error, Exception), "the app failed its startup without raising"
    assert answer.result()["message"] == str(error)
    raise error


def start(app: Any) -> None:
    """:func:`astart` from synchronous code."""
    asyncio.run(astart(app))
