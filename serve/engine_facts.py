"""Memory facts of an engine replica for its gauges: resident memory of the replica and its
engine processes, and GPU memory in use (NVML)."""

from __future__ import annotations

import os
from pathlib import Path


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


def gpu_memory_used_bytes() -> int | None:
    """Memory in use on the GPUs visible to this replica (NVML), None without a GPU."""
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        indices = [int(i) for i in visible.split(",") if i.strip().isdigit()] if visible else range(pynvml.nvmlDeviceGetCount())
        return sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used for i in indices)
    except Exception:
        return None
