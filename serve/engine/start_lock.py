"""One engine start at a time per GPU on GPU hosts: node-local lock files (/tmp is per pod in
Kubernetes), held from the moment the variant's checkpoint is ready (after the on-load step) to
the engine's first ready moment. vLLM sizes its KV cache from the GPU memory it sees free while
it profiles; a neighbour loading weights on the same GPU at that moment makes it take too much or
fail ("Error in memory profiling"). Engines on other GPUs do not touch that memory: they start
together.

Which GPUs an engine will hold is fixed when Ray reserves its placement group: each bundle's GPU
share is bound to GPU instances then (not when vLLM's workers start). `engine_gpus` asks Ray,
with a task of no CPUs in each bundle of the replica's group, taking the bundle's GPU share. Where
that cannot be known (no placement group), the engine takes the node-wide lock exclusively; every
per-GPU holder takes it shared, so such an engine waits for all and all wait for it.

The on-load step (optimizing, minutes to an hour) runs before the lock is taken: a long build
must not hold back the other variants' engine starts. The hook's `on_after_node_init` takes it
(Ray Serve LLM runs that right before it creates the engine) and `SlimServer.start` releases it
once `LLMServer.start` returns, engine up or failed."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from slimserve.optimizers.cache.locks import HeldFd

log = logging.getLogger("slimserve.start_lock")

# The node-wide lock; the per-GPU locks sit beside it (`<name>-<node>-gpu<id>.lock`).
ENGINE_START_LOCK = Path(os.environ.get("SLIMSERVE_ENGINE_START_LOCK", "/tmp/slimserve-engine-start.lock"))
# Asking Ray for the bundles' GPUs starts a worker process per bundle: seconds, not minutes.
GPU_QUERY_TIMEOUT_S = 60.0


@dataclass(frozen=True, order=True)
class NodeGpu:
    """One GPU as Ray names it: its node and its accelerator id there."""

    node_id: str
    gpu_id: str

    def lock_path(self, node_wide: Path) -> Path:
        # The node id too: Ray nodes that share a /tmp (several raylets on one host) have GPUs of
        # the same ids.
        safe = re.sub(r"[^A-Za-z0-9]", "_", self.gpu_id)
        return node_wide.with_name(f"{node_wide.stem}-{self.node_id[:16]}-gpu{safe}{node_wide.suffix}")


async def engine_gpus(timeout_s: float = GPU_QUERY_TIMEOUT_S) -> list[NodeGpu] | None:
    """The GPUs of this replica's placement group, or None where there is no group (the caller
    then locks the whole node). Must run before the engine's workers take the bundles."""
    import ray
    from ray.util import get_current_placement_group
    from ray.util.placement_group import placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = get_current_placement_group()
    if pg is None:
        return None
    bundles = placement_group_table(pg).get("bundles") or {}

    @ray.remote(num_cpus=0)
    def gpus_here() -> list[NodeGpu]:
        context = ray.get_runtime_context()
        return [NodeGpu(context.get_node_id(), str(g)) for g in context.get_accelerator_ids().get("GPU", [])]

    refs = [gpus_here.options(num_cpus=0, num_gpus=resources["GPU"],
                              scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=int(i)))
            .remote()
            for i, resources in bundles.items() if resources.get("GPU", 0) > 0]
    if not refs:
        return []
    found = await asyncio.wait_for(asyncio.gather(*refs), timeout_s)
    return sorted({gpu for per_bundle in found for gpu in per_bundle})


class EngineStartLock:
    """The locks an engine's start holds, taken by `acquire` and given back by `release` (or by
    the process's death: the kernel drops a flock with its last fd)."""

    def __init__(self, who: str, path: Path | None = None):
        self.who, self.path = who, Path(path or ENGINE_START_LOCK)
        self.fds: list[HeldFd] = []
        self.gpus: list[NodeGpu] | None = None

    async def acquire(self, timings: dict[str, float], gpus: list[NodeGpu] | None = None) -> None:
        """Wait for the locks (the replica's event loop stays free); the wait goes into `timings`.
        `gpus`: the engine's GPUs (None: unknown, the whole node)."""
        if self.fds:
            return
        self.gpus = gpus
        # Always in this order (node-wide, then GPUs sorted): no two engines wait on each other.
        wanted = [(self.path, fcntl.LOCK_SH if gpus is not None else fcntl.LOCK_EX)]
        wanted += [(gpu.lock_path(self.path), fcntl.LOCK_EX) for gpu in sorted(gpus or [])]
        t0 = time.monotonic()
        try:
            for path, mode in wanted:
                self.fds.append(await _flock(path, mode))
        except BaseException:
            self.release()
            raise
        timings["start_lock_wait_seconds"] = round(time.monotonic() - t0, 3)
        if timings["start_lock_wait_seconds"] > 1:
            log.info("%s: waited %.1f s for other engines on %s to start", self.who, timings["start_lock_wait_seconds"],
                     self.describe())

    def describe(self) -> str:
        if self.gpus is None:
            return "this node"
        return "GPU " + ", ".join(g.gpu_id for g in self.gpus) if self.gpus else "no GPU"

    @property
    def held(self) -> bool:
        return bool(self.fds)

    def release(self) -> None:
        while self.fds:
            self.fds.pop().release()


async def _flock(path: Path, mode: int) -> HeldFd:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        await asyncio.to_thread(fcntl.flock, fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return HeldFd(fd)
