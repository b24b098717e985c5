"""Memory facts of an engine replica for its gauges: resident memory of the replica and its
engine processes, and the GPU memory its engine's workers hold."""

from __future__ import annotations


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and its descendants (vLLM runs its engine core in child processes)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


async def engine_gpu_memory_bytes(engine_client) -> int | None:
    """GPU memory held by this engine's own workers (torch's reserved memory in each of them:
    weights, KV cache, activations), asked of vLLM's workers themselves. Not NVML's device-wide
    `used`: on a GPU shared by several variants that would count every neighbour's engine too.
    None when the engine has no GPU workers."""
    if engine_client is None or not hasattr(engine_client, "collective_rpc"):
        return None
    per_worker = await engine_client.collective_rpc(_reserved_bytes)
    return sum(per_worker) if any(per_worker) else None


def _reserved_bytes(worker) -> int:
    import torch

    return torch.cuda.memory_reserved() if torch.cuda.is_available() else 0
