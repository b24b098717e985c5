"""What the ingress measures per request — time to first token, inter-token latency, end-to-end
latency, tokens, status, requests in flight — and the per-variant gauges it keeps set. Metric
definitions are in metrics.py; TTFT is measured here, at the first item the engine sends."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import TypeAdapter
from ray.exceptions import LocalRayletDiedError, NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from slimserve.serve.http.guard import error_json
from slimserve.serve.metrics import metric

log = logging.getLogger("slimserve.telemetry")

# What Ray raises to the ingress when the replica (or the node) serving a request goes away:
# the actor died or is unreachable (RayActorError: ActorDiedError, ActorUnavailableError), its
# worker or node crashed, or Serve has no replica left. Not the request's fault, and a retry
# (after the health probe has seen the variant down, or the replica restarted) can succeed:
# answered 503 + Retry-After, not 500.
REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, LocalRayletDiedError, ObjectLostError,
                DeploymentUnavailableError, ReplicaUnavailableError)


class InFlight:
    """Per-label-set counts of requests in flight in this replica (Ray gauges only `set`)."""

    def __init__(self):
        self._n: dict[tuple, int] = {}

    def inc(self, labels: dict[str, str]) -> int:
        key = tuple(sorted(labels.items()))
        self._n[key] = self._n.get(key, 0) + 1
        return self._n[key]

    def get(self, labels: dict[str, str]) -> int:
        return self._n.get(tuple(sorted(labels.items())), 0)

    def dec(self, labels: dict[str, str]) -> int:
        key = tuple(sorted(labels.items()))
        self._n[key] = max(0, self._n.get(key, 0) - 1)
        return self._n[key]


in_flight = InFlight()


@dataclass
class RequestTimer:
    """What one request did, recorded once when it ends. Counting it in flight starts here."""

    labels: dict[str, str]
    stream: bool
    client_wants_usage: bool
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failed: bool = False
    # Called once at the end with (labels, status, ttft seconds or None, e2e seconds): the rollout's evidence.
    on_finish: Callable[[dict[str, str], str, float | None, float], None] | None = None
    _done: bool = False

    def __post_init__(self):
        metric("slimserve_requests_in_flight").set(in_flight.inc(self.labels), tags=self.labels)

    def saw(self, item: Any) -> Any:
        """Note one item from the engine (a response, a stream chunk, or a batch of chunks);
        returns the item to pass on (the usage-only chunk removed if the client did not ask)."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        if isinstance(item, list):
            kept = [x for x in (self._one(x) for x in item) if x is not None]
            return kept or None
        return self._one(item)

    def _one(self, item: Any) -> Any:
        if type(item).__name__ == "ErrorResponse":
            self.failed = True
            return item
        if isinstance(item, str):  # SSE text: "data: {...}\n\n", possibly several
            out = []
            for part in item.split("\n\n"):
                if not part.strip():
                    continue
                payload = part.removeprefix("data: ").strip()
                # Only chunks that can carry usage or an error are parsed (not every token's).
                if payload != "[DONE]" and ('"usage"' in payload or '"error"' in payload):
                    try:
                        chunk = json.loads(payload)
                    except ValueError:
                        chunk = {}
                    if "error" in chunk:
                        self.failed = True
                    if self._usage(chunk.get("usage")) and not chunk.get("choices") and not self.client_wants_usage:
                        continue
                out.append(part + "\n\n")
            return "".join(out) or None
        usage = getattr(item, "usage", None)
        if self._usage(usage.model_dump() if hasattr(usage, "model_dump") else usage):
            if self.stream and not getattr(item, "choices", None) and not self.client_wants_usage:
                return None
        return item

    def _usage(self, usage: dict | None) -> bool:
        if not usage:
            return False
        self.prompt_tokens = usage.get("prompt_tokens") or 0
        self.completion_tokens = usage.get("completion_tokens") or 0
        return True

    def finish(self, status_label: str) -> None:
        if self._done:
            return
        self._done = True
        end = time.perf_counter()
        labels = self.labels
        metric("slimserve_requests_in_flight").set(in_flight.dec(labels), tags=labels)
        if self.failed and status_label == "200":
            status_label = "error"
        metric("slimserve_requests_total").inc(1, tags={**labels, "status": status_label})
        metric("slimserve_e2e_request_latency_seconds").observe(end - self.t0, tags=labels)
        if self.prompt_tokens:
            metric("slimserve_prompt_tokens_total").inc(self.prompt_tokens, tags=labels)
        if self.completion_tokens:
            metric("slimserve_generation_tokens_total").inc(self.completion_tokens, tags=labels)
        # Token timings exist only for streamed answers: a non-streamed one arrives in one piece.
        if self.stream and self.t_first is not None and status_label == "200":
            metric("slimserve_time_to_first_token_seconds").observe(self.t_first - self.t0, tags=labels)
            if self.completion_tokens > 1 and self.t_last is not None:
                itl = (self.t_last - self.t_first) / (self.completion_tokens - 1)
                metric("slimserve_inter_token_latency_seconds").observe(itl, tags=labels)
        if self.on_finish is not None:
            ttft = self.t_first - self.t0 if self.stream and self.t_first is not None and status_label == "200" else None
            try:
                self.on_finish(labels, status_label, ttft, end - self.t0)
            except Exception as e:  # never fail a request over bookkeeping
                log.warning("on_finish: %s", e)


def start_timer(body, labels: dict[str, str], on_finish=None) -> RequestTimer:
    """A timer for this request. A streamed request asks the engine for token counts; the usage
    chunk is dropped again on the way out unless the client asked for it."""
    stream = bool(getattr(body, "stream", False))
    options = getattr(body, "stream_options", None)
    timer = RequestTimer(labels, stream, client_wants_usage=bool(options and options.include_usage), on_finish=on_finish)
    if stream:
        value = {**(options.model_dump() if options else {}), "include_usage": True}
        annotation = type(body).model_fields["stream_options"].annotation
        body.stream_options = TypeAdapter(annotation).validate_python(value)
    return timer


def record_refused(model_label: str, status_code: int) -> None:
    """A request refused before it reached a variant (unknown model, limits, no variant up)."""
    metric("slimserve_requests_total").inc(1, tags={"model": model_label, "variant": "", "status": str(status_code)})


def set_variant_gauges(variants: list[tuple[dict[str, str], float, bool]]) -> None:
    """Per variant (labels, weight, up). Set on every round: Ray drops a gauge not set for a while."""
    for labels, weight, up in variants:
        metric("slimserve_variant_up").set(int(up), tags=labels)
        metric("slimserve_traffic_weight").set(weight, tags=labels)
        metric("slimserve_requests_in_flight").set(in_flight.get(labels), tags=labels)


async def finish_after(iterator, timer: RequestTimer):
    """Pass a streamed body through and record the request when it ends, however it ends. If the
    engine fails mid-stream, the status (200) is already sent: the stream ends with an OpenAI
    error event and `[DONE]` (as vLLM ends a stream that fails) rather than a cut connection, so
    clients see why — code 503 when the replica or its node was lost (retry), else 500."""
    status_label = "200"
    try:
        async for chunk in iterator:
            yield chunk
    except (asyncio.CancelledError, GeneratorExit):
        status_label = "cancelled"  # the client went away
        raise
    except Exception as e:
        status_label = "error"
        log.error("%s/%s: stream broke: %s", timer.labels["model"], timer.labels["variant"], e)
        variant = timer.labels["variant"]
        if isinstance(e, REPLICA_LOST):
            event = error_json(503, f"variant `{variant}` failed mid-stream: the replica serving it was lost "
                               f"({type(e).__name__}); retry the request", "server_error")
        else:
            event = error_json(500, f"variant `{variant}` failed mid-stream ({type(e).__name__}); retry the request",
                               "InternalServerError")
        yield f"data: {event.decode()}\n\ndata: [DONE]\n\n"
    finally:
        timer.finish(status_label)
