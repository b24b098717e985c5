"""One engine start at a time per node on GPU hosts: a node-local lock file (/tmp is per pod in
Kubernetes), held from the moment the variant's checkpoint is ready (after the on-load step) to
the engine's first ready moment. vLLM sizes its KV cache from the GPU memory it sees free while
it profiles; a neighbour loading weights on the same GPU at that moment makes it take too much or
fail ("Error in memory profiling").

The on-load step (optimizing, minutes to an hour) runs before the lock is taken: a long build
must not hold back the other variants' engine starts on the node. The hook's
`on_after_node_init` takes it (Ray Serve LLM runs that right before it creates the engine) and
`SlimServer.start` releases it once `LLMServer.start` returns, engine up or failed."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from pathlib import Path

from slimserve.optimizers.cache.locks import HeldFd

log = logging.getLogger("slimserve.start_lock")

ENGINE_START_LOCK = Path(os.environ.get("SLIMSERVE_ENGINE_START_LOCK", "/tmp/slimserve-engine-start.lock"))


class EngineStartLock(HeldFd):
    """The node's engine-start lock, taken by `acquire` and given back by `release` (or by the
    process's death: the kernel drops a flock with its last fd)."""

    def __init__(self, who: str, path: Path | None = None):
        super().__init__()
        self.who, self.path = who, Path(path or ENGINE_START_LOCK)

    async def acquire(self, timings: dict[str, float]) -> None:
        """Wait for the lock (the replica's event loop stays free); the wait goes into `timings`."""
        if self.fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        timings["start_lock_wait_seconds"] = round(time.monotonic() - t0, 3)
        if timings["start_lock_wait_seconds"] > 1:
            log.info("%s: waited %.1f s for other engines on this node to start", self.who, timings["start_lock_wait_seconds"])

    @property
    def held(self) -> bool:
        return self.fd is not None
