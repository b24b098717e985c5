"""One engine start at a time per node on GPU hosts: a node-local lock file (/tmp is per pod in
Kubernetes), held from the on-load step (optimizing) to the engine's first ready moment. vLLM
sizes its KV cache from the GPU memory it sees free while it profiles; a neighbour loading
weights or optimizing on the same GPU at that moment makes it take too much or fail ("Error in
memory profiling")."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

log = logging.getLogger("slimserve.start_lock")

ENGINE_START_LOCK = Path(os.environ.get("SLIMSERVE_ENGINE_START_LOCK", "/tmp/slimserve-engine-start.lock"))


@asynccontextmanager
async def one_start_per_node(who: str, enabled: bool, timings: dict[str, float]):
    """Holds the node's engine-start lock (when `enabled`); records the wait in `timings`."""
    if not enabled:
        yield
        return
    fd = os.open(ENGINE_START_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        t0 = time.monotonic()
        # flock in a thread: the replica's event loop stays free while it waits.
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        timings["start_lock_wait_seconds"] = round(time.monotonic() - t0, 3)
        if timings["start_lock_wait_seconds"] > 1:
            log.info("%s: waited %.1f s for other engines on this node to start", who, timings["start_lock_wait_seconds"])
        yield
    finally:
        os.close(fd)  # releases the lock, as does the process's death
