"""The engine deployment: Ray Serve LLM's LLMServer plus what slimserve reports about it — one
read-only method with what the running engine actually loaded (not what the config asked for),
and the per-variant memory, optimization and quality metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from ray.serve.llm.deployment import LLMServer

from slimserve.optimizers.report import size_on_disk, weight_bytes

from slimserve.serve.engine.cpu_binding import SLOTS_ENV, claim_slot
from slimserve.serve.engine.facts import engine_gpu_memory_bytes, tree_rss_bytes
from slimserve.serve.handoff import EngineRecord, OnLoadSpec, PreparedCheckpoint
from slimserve.serve.metrics import metric
from slimserve.serve.rayllm import FirstChunkAtOnce, adopt_renamed_serving_objects, engine_client, llm_config_of
from slimserve.serve.config.retry import describe_retry, retry_status

log = logging.getLogger("slimserve.server")

METRICS_INTERVAL_S = 5.0


class SlimServer(FirstChunkAtOnce, LLMServer):
    failure: str | None = None
    retry: dict[str, Any] | None = None  # while a failed variant waits for (or runs) a retry: retry.retry_status
    _engine_lost: str | None = None  # the engine failed to start on a retry: Serve replaces the replica

    async def start(self):
        self.spec = OnLoadSpec.model_validate(llm_config_of(self).callback_config.callback_kwargs)
        # Wall-clock start and ready moments too: engines on different nodes (or GPUs) start side
        # by side, and only absolute times show it (tests/test_rollout_owner.py compares them).
        self.timings: dict[str, float] = {"started_at": round(time.time(), 3)}
        t0 = time.monotonic()
        slots = os.environ.get(SLOTS_ENV)
        if slots:  # several replicas of a CPU engine: this one's own cores
            self._cpu_slot = await asyncio.to_thread(claim_slot, self.spec.who, slots.split(";"))
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self._cpu_slot.binding  # read when the engine starts
        try:
            await self._start_once()
        except Exception:
            failure, transient = self._failure()
            if failure is None or self.spec.required:
                raise
            # The on-load step failed before any engine started: stay up without an engine, so
            # the other variants serve on; the ingress sees `failure` and routes around us.
            log.error("%s: variant not served: %s", self.spec.who, failure)
            self.engine = None
            self.failure = failure
            self._report_task = asyncio.get_running_loop().create_task(self._report_forever())
            if transient and self.spec.prepare_retry.attempts:
                policy = self.spec.prepare_retry  # reported from now on, not only once the task runs
                self.retry = retry_status(1, policy.attempts, time.time() + policy.delay_s(1), failure)
                self._retry_task = asyncio.get_running_loop().create_task(self._retry(failure))
            return
        self._started(t0)
        self._report_task = asyncio.get_running_loop().create_task(self._report_forever())

    async def _start_once(self) -> None:
        """Ray Serve LLM's start: the on-load hook (optimizing; on GPU hosts it then takes the
        node's engine-start lock, onload.on_after_node_init), then the engine."""
        custom = llm_config_of(self).get_or_create_callback().ctx.custom_data
        try:
            await super().start()
        finally:
            lock = custom.pop("slimserve_start_lock", None)
            if lock is not None:
                lock.release()
            self.timings.update(custom.pop("slimserve_timings", {}))
        adopt_renamed_serving_objects(self)

    def _failure(self) -> tuple[str | None, bool]:
        """The on-load step's failure (None: it did not fail), and whether a retry may help."""
        custom = llm_config_of(self).get_or_create_callback().ctx.custom_data
        return custom.get("slimserve_failure"), bool(custom.get("slimserve_failure_transient"))

    def _started(self, t0: float) -> None:
        # Replica start (or retry) to engine ready: on-load step + lock wait + engine start.
        self.timings["start_seconds"] = round(time.monotonic() - t0, 3)
        self.timings["ready_at"] = round(time.time(), 3)
        prep = self._prepared()
        if prep:
            cache = {True: "hit", False: "miss"}.get(prep.cache_hit, "none")
            metric("slimserve_optimization_runs_total").inc(1, tags={**self.spec.labels, "method": prep.method, "cache": cache})

    async def _retry(self, failure: str) -> None:
        """Try the start again after a transient failure, with backoff, a bounded number of times;
        the replica reports each wait (slimserve_info -> /v1/models)."""
        policy, who = self.spec.prepare_retry, self.spec.who
        for attempt in range(1, policy.attempts + 1):
            self.retry = retry_status(attempt, policy.attempts, time.time() + policy.delay_s(attempt), failure)
            log.warning("%s: %s", who, describe_retry(self.retry))
            await asyncio.sleep(policy.delay_s(attempt))
            self.retry = retry_status(attempt, policy.attempts, None, failure)
            metric("slimserve_optimization_retries_total").inc(1, tags=self.spec.labels)
            t0 = time.monotonic()
            try:
                await self._start_once()
            except Exception as e:
                self.engine = None
                failure, transient = self._failure()
                if failure is None:  # prepared, but the engine failed: as on a first start, Serve's to handle
                    self._engine_lost = self.failure = f"{type(e).__name__}: {e}"
                    self.retry = None
                    log.error("%s: engine failed to start on retry %d: %s", who, attempt, e)
                    return
                if not transient:
                    break
                continue
            self.failure = self.retry = None
            self._started(t0)
            log.info("%s: prepared and serving on retry %d of %d", who, attempt, policy.attempts)
            return
        self.retry = None
        self.failure = f"{failure}\n(gave up after {attempt} of {policy.attempts} retries)"
        log.error("%s: variant not served, gave up after %d retries: %s", who, attempt, failure.splitlines()[0])

    async def check_health(self) -> None:
        if self._engine_lost:
            raise RuntimeError(f"{self.spec.who}: the engine failed to start on a retry: {self._engine_lost}")
        if self.failure or self.retry:  # no engine (yet): nothing to check
            return
        return await super().check_health()

    def _prepared(self) -> PreparedCheckpoint | None:
        return llm_config_of(self).get_or_create_callback().ctx.custom_data.get("slimserve")

    def _report_optimization(self) -> None:
        labels, prep = self.spec.labels, self._prepared()
        if not prep:
            return
        method = prep.method
        metric("slimserve_optimization_seconds").set(prep.prepare_seconds, tags={**labels, "method": method})
        metric("slimserve_quality_gate_failed").set(1 if prep.quality_gate.startswith("failed") else 0, tags=labels)
        quality = prep.report.quality if prep.report else None
        if quality is not None:
            metric("slimserve_quality_ratio").set(quality.ppl_ratio, tags={**labels, "metric": "ppl_ratio"})
        elif method == "none":
            metric("slimserve_quality_ratio").set(1.0, tags={**labels, "metric": "ppl_ratio"})
        # A student's agreement with its teacher (optimizers/methods/student.py puts it in the report).
        agreement = prep.report.agreement if prep.report else None
        if agreement is not None:
            metric("slimserve_quality_ratio").set(agreement.top1_agreement, tags={**labels, "metric": "teacher_agreement"})

    async def _report_forever(self) -> None:
        """Ray drops a gauge that is not set again within a few export periods, so the gauges
        are set on every round, the unchanging ones too."""
        labels = self.spec.labels
        sizes = None
        while True:
            try:
                if sizes is None and not self.failure and not self.retry:  # served (at last, after a retry)
                    checkpoint = Path(llm_config_of(self).get_engine_config().actual_hf_model_id)
                    sizes = (size_on_disk(checkpoint), weight_bytes(checkpoint)) if checkpoint.is_dir() else ()
                metric("slimserve_optimization_failed").set(1 if self.failure else 0, tags=labels)
                self._report_optimization()
                if sizes:
                    metric("slimserve_checkpoint_bytes").set(sizes[0], tags=labels)
                    metric("slimserve_model_weight_bytes").set(sizes[1], tags=labels)
                metric("slimserve_process_rss_bytes").set(tree_rss_bytes(os.getpid()), tags=labels)
                gpu = await engine_gpu_memory_bytes(engine_client(self)) if self.spec.accelerator == "gpu" else None
                if gpu is not None:
                    metric("slimserve_gpu_memory_used_bytes").set(gpu, tags=labels)
            except Exception as e:  # metrics must never take the engine down
                log.warning("slimserve metrics: %s", e)
            await asyncio.sleep(METRICS_INTERVAL_S)

    async def slimserve_info(self) -> dict[str, Any]:
        """Facts from the live vLLM engine and the on-load step, for /v1/models and tests: an
        EngineRecord, sent through Ray as a plain dict of the fields that apply."""
        vllm_config = getattr(engine_client(self), "vllm_config", None)
        prep = self._prepared()
        info: dict[str, Any] = {"pid": os.getpid(), "timings": getattr(self, "timings", {})}
        if prep:
            info["optimization"] = prep
        if self.retry:
            info["retrying"] = self.retry
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
        return EngineRecord(**info).model_dump(exclude_unset=True)
