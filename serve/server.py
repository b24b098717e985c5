"""The engine deployment: Ray Serve LLM's LLMServer plus what slimserve reports about it — one
read-only method with what the running engine actually loaded (not what the config asked for),
and the per-variant memory, optimization and quality metrics."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import struct
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ray.serve.llm.deployment import LLMServer

from .metrics import metric
from .rayllm import FirstChunkAtOnce

log = logging.getLogger("slimserve.server")

METRICS_INTERVAL_S = 5.0


# One engine start at a time per node on GPU hosts (a node-local lock file: /tmp is per pod in
# Kubernetes). vLLM sizes its KV cache from the GPU memory it sees free while it profiles; a
# neighbour loading weights or optimizing on the same GPU at that moment makes it take too much
# or fail ("Error in memory profiling").
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


class SlimServer(FirstChunkAtOnce, LLMServer):
    failure: str | None = None

    async def start(self):
        kw = self._llm_config.callback_config.callback_kwargs
        self.timings: dict[str, float] = {}
        t0 = time.monotonic()
        try:
            # The on-load step (optimizing) runs inside start(), before the engine: both hold the lock.
            async with one_start_per_node(f"{kw.get('model')}/{kw.get('variant')}", kw.get("accelerator") == "gpu", self.timings):
                await super().start()
        except Exception:
            failure = self._llm_config.get_or_create_callback().ctx.custom_data.get("slimserve_failure")
            if failure is None or self._llm_config.callback_config.callback_kwargs.get("required"):
                raise
            # The on-load step failed before any engine started: stay up without an engine, so
            # the other variants serve on; the ingress sees `failure` and routes around us.
            log.error("%s: variant not served: %s", self._labels(), failure)
            self.engine = None
            self.failure = failure
            self._report_task = asyncio.get_running_loop().create_task(self._report_forever())
            return
        # Replica start to engine ready: lock wait + on-load step + engine start.
        self.timings["start_seconds"] = round(time.monotonic() - t0, 3)
        prep = self._prepared()
        if prep:
            cache = {True: "hit", False: "miss"}.get(prep.get("cache_hit"), "none")
            tags = {**self._labels(), "method": prep.get("method", "none"), "cache": cache}
            metric("slimserve_optimization_runs_total").inc(1, tags=tags)
        self._report_task = asyncio.get_running_loop().create_task(self._report_forever())

    def _labels(self) -> dict[str, str]:
        kw = self._llm_config.callback_config.callback_kwargs
        return {"model": kw.get("model", ""), "variant": kw.get("variant", "")}

    def _prepared(self) -> dict[str, Any]:
        return self._llm_config.get_or_create_callback().ctx.custom_data.get("slimserve", {})

    def _report_optimization(self) -> None:
        labels, prep = self._labels(), self._prepared()
        if not prep:
            return
        method = prep.get("method", "none")
        metric("slimserve_optimization_seconds").set(prep.get("prepare_seconds") or 0.0, tags={**labels, "method": method})
        gate_failed = str(prep.get("quality_gate", "passed")).startswith("failed")
        metric("slimserve_quality_gate_failed").set(1 if gate_failed else 0, tags=labels)
        quality = (prep.get("report") or {}).get("quality") or {}
        if "ppl_ratio" in quality:
            metric("slimserve_quality_ratio").set(quality["ppl_ratio"], tags={**labels, "metric": "ppl_ratio"})
        elif method == "none":
            metric("slimserve_quality_ratio").set(1.0, tags={**labels, "metric": "ppl_ratio"})
        if "teacher_agreement" in quality:
            metric("slimserve_quality_ratio").set(quality["teacher_agreement"], tags={**labels, "metric": "teacher_agreement"})

    async def _report_forever(self) -> None:
        """Ray drops a gauge that is not set again within a few export periods, so the gauges
        are set on every round, the unchanging ones too."""
        labels = self._labels()
        checkpoint = Path(self._llm_config.get_engine_config().actual_hf_model_id)
        sizes = (folder_bytes(checkpoint), weight_bytes(checkpoint)) if checkpoint.is_dir() else None
        while True:
            try:
                metric("slimserve_optimization_failed").set(1 if self.failure else 0, tags=labels)
                self._report_optimization()
                if sizes:
                    metric("slimserve_checkpoint_bytes").set(sizes[0], tags=labels)
                    metric("slimserve_model_weight_bytes").set(sizes[1], tags=labels)
                metric("slimserve_process_rss_bytes").set(tree_rss_bytes(os.getpid()), tags=labels)
                gpu = gpu_memory_used_bytes()
                if gpu is not None:
                    metric("slimserve_gpu_memory_used_bytes").set(gpu, tags=labels)
            except Exception as e:  # metrics must never take the engine down
                log.warning("slimserve metrics: %s", e)
            await asyncio.sleep(METRICS_INTERVAL_S)

    async def slimserve_info(self) -> dict[str, Any]:
        """Facts from the live vLLM engine and the on-load step, for /v1/models and tests."""
        engine_client = getattr(self.engine, "_engine_client", None)
        vllm_config = getattr(engine_client, "vllm_config", None)
        info: dict[str, Any] = {"optimization": self._prepared(), "pid": os.getpid(), "timings": getattr(self, "timings", {})}
        if self.failure:
            info["failed"] = self.failure
        if vllm_config is not None:
            mc = vllm_config.model_config
            info.update(
                checkpoint=mc.model,
                quantization=mc.quantization,
                dtype=str(mc.dtype).removeprefix("torch."),
                max_model_len=mc.max_model_len,
                tensor_parallel_size=vllm_config.parallel_config.tensor_parallel_size,
                device=str(vllm_config.device_config.device_type),
                # The KV cache the engine sized for itself (its memory share, minus weights and activations).
                kv_cache_tokens=(vllm_config.cache_config.num_gpu_blocks or 0) * vllm_config.cache_config.block_size,
                gpu_memory_utilization=vllm_config.cache_config.gpu_memory_utilization,
            )
        return info


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def weight_bytes(folder: Path) -> int:
    """Bytes of all tensors in the folder's safetensors files, read from their headers (the
    first 8 bytes give the header's length; each entry gives its data offsets)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        total += sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    return total


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
