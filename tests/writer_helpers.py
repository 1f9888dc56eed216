"""A Writer stopped as a crash would stop it, for tests of what a restart replays."""

from __future__ import annotations

import asyncio

from quotad.engine.writer import Writer


async def stop_without_final_snapshot(writer: Writer) -> None:
    """Ends the writer's tasks and its log thread with everything written durable, but no
    snapshot at the stop (close() takes one): a restart then replays the whole log."""
    for task in writer._tasks:
        task.cancel()
    await asyncio.gather(*writer._tasks, return_exceptions=True)
    writer._executor.shutdown(wait=True)
