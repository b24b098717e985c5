"""Shadow traffic: a copy of a request sent to a model's shadow variant in the background. The
client never waits on it; copies beyond the bound are dropped (and counted) rather than queued,
so shadow traffic is shed before client traffic."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable

from ray.serve.exceptions import BackPressureError

from slimserve.serve.metrics import metric

log = logging.getLogger("slimserve.shadow")

# get_response(body=..., call_method=..., raw_request=None) -> the engine's answer, as an async iterator
GetResponse = Callable[..., AsyncIterator[Any]]


class ShadowCopies:
    def __init__(self, max_in_flight: int, get_response: GetResponse):
        self._max = max_in_flight
        self._get_response = get_response
        self._tasks: set[asyncio.Task] = set()

    def send(self, body, call_method: str, model_id: str, labels: dict[str, str]) -> None:
        if len(self._tasks) >= self._max:
            metric("slimserve_shadow_requests_total").inc(1, tags={**labels, "status": "dropped"})
            return
        copy = body.model_copy(deep=True, update={"model": model_id, "stream": False})
        if getattr(copy, "stream_options", None) is not None:
            copy.stream_options = None
        task = asyncio.get_running_loop().create_task(self._run(copy, call_method, labels))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, body, call_method: str, labels: dict[str, str]) -> None:
        t0 = time.perf_counter()
        status_label = "200"
        try:
            async for item in self._get_response(body=body, call_method=call_method, raw_request=None):
                if type(item).__name__ == "ErrorResponse":
                    status_label = str(getattr(item.error, "code", None) or "error")
        except BackPressureError:
            status_label = "dropped"  # the shadow's queue is full: shadow traffic goes first
        except Exception as e:  # recorded, never raised: the client is not waiting on this
            status_label = str(getattr(e, "status_code", "error"))
            log.warning("shadow request to %s/%s failed: %s", labels["model"], labels["variant"], e)
        metric("slimserve_shadow_requests_total").inc(1, tags={**labels, "status": status_label})
        metric("slimserve_shadow_e2e_request_latency_seconds").observe(time.perf_counter() - t0, tags=labels)
