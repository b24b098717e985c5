"""The OpenAI-compatible front door: Ray Serve LLM's OpenAiIngress, plus the variant choice and
per-variant metrics.

A request for a public model name is sent to one of its variants (by weight; sticky per user;
or forced by the `x-slimserve-variant` request header); a request for a variant's own id goes to
that variant. Every answer carries `x-slimserve-variant`. A model's shadow variant gets a copy of
each request in the background. The protocol itself stays Ray Serve LLM's."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request, status
from pydantic import TypeAdapter
from starlette.responses import JSONResponse, Response, StreamingResponse

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from .ab import TrafficSplit, VariantRoute
from .config import RequestLimits
from .health import HealthBoard
from .metrics import metric
from .rayllm import ModelCard, ModelList, OpenAIHTTPException, get_request_id, get_response_for_error

log = logging.getLogger("slimserve.ingress")

VARIANT_HEADER = "x-slimserve-variant"
USER_HEADER = "x-slimserve-user"
# Label for requests naming no model slimserve serves: never the client's string (unbounded
# label values, and it may carry anything the client typed).
UNKNOWN_MODEL = "unknown"
GAUGE_REFRESH_S = 5.0
LISTING_WAIT_S = 1.0


@dataclass
class Target:
    model: str  # public name
    variant: str
    shadow_model_id: str | None = None


@dataclass
class RequestTimer:
    """What one request did, recorded once when it ends."""

    labels: dict[str, str]
    stream: bool
    client_wants_usage: bool
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failed: bool = False
    _done: bool = False

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
                if payload != "[DONE]":
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
        metric("slimserve_requests_in_flight").set(_in_flight.dec(labels), tags=labels)
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


class _InFlight:
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


_in_flight = _InFlight()


class SlimserveIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        lora_paths=None,
        splits: dict[str, list[dict[str, Any]]],
        allow_forced_variant: bool = True,
        sticky: dict[str, bool] | None = None,
        shadows: dict[str, str] | None = None,
        shadow_max_in_flight: int = 8,
        health_probe_interval_s: float = 10,
        api_keys_env: str | None = None,
        limits: dict[str, int] | None = None,
        **kwargs,
    ):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        # Read here, in the replica: the keys come from its environment (a Kubernetes Secret),
        # never from the config or the deployment's arguments, which Ray shows in its dashboard.
        raw = os.environ.get(api_keys_env, "") if api_keys_env else ""
        self._api_keys = [k.strip().encode() for k in raw.split(",") if k.strip()]
        self._limits = RequestLimits.model_validate(limits or {})
        self._splits = {name: TrafficSplit([VariantRoute(**r) for r in routes]) for name, routes in splits.items()}
        self._by_model_id = {
            r.model_id: (name, r) for name, split in self._splits.items() for r in split.routes.values()
        }
        self._allow_forced = allow_forced_variant
        self._sticky = sticky or {}
        self._shadows = shadows or {}
        self._shadow_max = shadow_max_in_flight
        self._shadow_tasks: set[asyncio.Task] = set()
        self._probe_interval = health_probe_interval_s
        self._probe_task: asyncio.Task | None = None
        self._timers: dict[int, RequestTimer] = {}
        handles = self._default_serve_handles
        app_name = next(iter(handles.values())).app_name if handles else None
        self._health = HealthBoard(handles, app_name, serve.status)

    # --- choosing the variant -------------------------------------------------------------

    async def _route(self, body, request: Request) -> Target:
        """Rewrite body.model to the chosen variant's model id."""
        # Errors are raised as OpenAIHTTPException, which Ray Serve LLM's middleware turns into
        # OpenAI's {"error": {...}} shape (FastAPI's HTTPException would answer {"detail": ...}).
        if body.model is None and len(self._splits) == 1:
            body.model = next(iter(self._splits))
        if body.model in self._by_model_id:
            name, route = self._by_model_id[body.model]
            await self._health.refresh_if_stale([route.model_id])
            self._refuse_if_down(name, route)
            return Target(name, route.variant)
        split = self._splits.get(body.model)
        if split is None:
            known = ", ".join(self._splits)
            if body.model is None:
                raise OpenAIHTTPException(
                    status.HTTP_400_BAD_REQUEST, f"`model` is required; available: {known}", "invalid_request_error"
                )
            raise OpenAIHTTPException(
                status.HTTP_404_NOT_FOUND, f"The model `{body.model}` does not exist; available: {known}", "NotFoundError"
            )
        name = body.model
        forced = request.headers.get(VARIANT_HEADER)
        if forced and self._allow_forced:
            route = split.routes.get(forced)
            if route is None:
                raise OpenAIHTTPException(
                    status.HTTP_400_BAD_REQUEST,
                    f"model `{name}` has no variant `{forced}` (has: {', '.join(split.routes)})",
                    "invalid_request_error",
                )
            await self._health.refresh_if_stale([route.model_id])
            self._refuse_if_down(name, route)
        else:
            user = request.headers.get(USER_HEADER) or getattr(body, "user", None)
            await self._health.refresh_if_stale([r.model_id for r in split.routes.values()])
            down = {r.variant for r in split.routes.values() if not self._health.state_of(r.model_id).available}
            route = split.pick(user if self._sticky.get(name, True) else None, exclude=down)
            if route is None:
                why = "; ".join(f"{r.variant}: {self._health.state_of(r.model_id).describe()}" for r in split.routes.values() if r.weight > 0)
                raise OpenAIHTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE, f"no variant of `{name}` is available ({why})", "ServiceUnavailable"
                )
        body.model = route.model_id
        shadow = self._shadows.get(name)
        shadow_id = split.routes[shadow].model_id if shadow and shadow != route.variant else None
        return Target(name, route.variant, shadow_id)

    def _refuse_if_down(self, name: str, route: VariantRoute) -> None:
        health = self._health.state_of(route.model_id)
        if not health.available:
            raise OpenAIHTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"variant `{route.variant}` of `{name}` is not available: {health.describe()}",
                "ServiceUnavailable",
            )

    # --- answering and recording ----------------------------------------------------------

    def _set_asgi_app(self, app) -> None:
        # Ray Serve hands the replica's FastAPI app over here before it starts serving: the last
        # chance to put the key and body-size check in front of every route.
        app.add_middleware(GuardMiddleware, api_keys=self._api_keys, max_body_bytes=self._limits.max_body_bytes)
        super()._set_asgi_app(app)

    def _check_limits(self, body) -> None:
        lim = self._limits

        def too_many(param: str, value: int, most: int, setting: str) -> None:
            if value > most:
                raise OpenAIHTTPException(
                    status.HTTP_400_BAD_REQUEST,
                    f"`{param}` is {value}; this server allows at most {most} (ingress.limits.{setting})",
                    "invalid_request_error",
                )

        for param in ("max_tokens", "max_completion_tokens"):
            if getattr(body, param, None) is not None:
                too_many(param, getattr(body, param), lim.max_tokens, "max_tokens")
        for param in ("n", "best_of"):
            if getattr(body, param, None) is not None:
                too_many(param, getattr(body, param), lim.max_n, "max_n")
        prompt = getattr(body, "prompt", None)
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            too_many("prompt", len(prompt), lim.max_prompts, "max_prompts")
        messages = getattr(body, "messages", None)
        if messages is not None:
            too_many("messages", len(messages), lim.max_messages, "max_messages")
            # vLLM's schema lets a free-form message without `role` through, then fails on it
            # with a 500 and a traceback (found by schemathesis): refuse it here.
            for i, m in enumerate(messages):
                role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
                if not isinstance(role, str) or not role:
                    raise OpenAIHTTPException(
                        status.HTTP_400_BAD_REQUEST, f"`messages[{i}].role` is required (a string)", "invalid_request_error"
                    )

    async def _answer(self, handler, body, request: Request, call_method: str) -> Response:
        self._ensure_probe()
        requested = body.model
        try:
            self._check_limits(body)
            target = await self._route(body, request)
        except OpenAIHTTPException as e:
            model = requested if requested in self._splits else UNKNOWN_MODEL
            metric("slimserve_requests_total").inc(1, tags={"model": model, "variant": "", "status": str(e.status_code)})
            raise
        labels = {"model": target.model, "variant": target.variant}
        if target.shadow_model_id:
            self._send_shadow(body, call_method, target)
        stream = bool(getattr(body, "stream", False))
        options = getattr(body, "stream_options", None)
        timer = RequestTimer(labels, stream, client_wants_usage=bool(options and options.include_usage))
        if stream:
            # Ask the engine for token counts; the usage chunk is dropped again unless asked for.
            body.stream_options = _stream_options(body, {**(options.model_dump() if options else {}), "include_usage": True})
        metric("slimserve_requests_in_flight").set(_in_flight.inc(labels), tags=labels)
        self._timers[id(body)] = timer
        try:
            response = await handler(body, request)
        except BackPressureError as e:
            # The variant's queue is full: shed the request with a time to come back, rather
            # than queue without bound (Ray Serve would answer 503 without a body we control).
            timer.finish("429")
            retry = max(1, round(e.retry_after_s or 1))
            message = f"variant `{target.variant}` of `{target.model}` is at capacity; retry after {retry} s"
            return JSONResponse(
                {"error": {"message": message, "type": "rate_limit_error", "param": None, "code": 429}},
                status_code=429, headers={"retry-after": str(retry), VARIANT_HEADER: target.variant},
            )
        except (OpenAIHTTPException, HTTPException) as e:
            timer.finish(str(e.status_code))
            raise
        except Exception as e:
            # Ray Serve LLM's mapping decides the status (a client error stays a 4xx), but for a
            # 5xx its message would carry the engine's traceback (paths, internals): log that here
            # and tell the client only what failed.
            error = get_response_for_error(e, get_request_id(request)).error
            timer.finish(str(error.code))
            if error.code < 500:
                raise OpenAIHTTPException(error.code, error.message, error.type) from None
            log.error("%s/%s failed: %s", target.model, target.variant, e, exc_info=True)
            raise OpenAIHTTPException(
                error.code,
                f"variant `{target.variant}` of `{target.model}` failed to answer ({type(e).__name__}); "
                f"details are in the server log (request id {get_request_id(request)})",
                "InternalServerError",
            ) from None
        except BaseException:
            timer.finish("cancelled")
            raise
        finally:
            self._timers.pop(id(body), None)
        response.headers[VARIANT_HEADER] = target.variant
        if isinstance(response, StreamingResponse):
            response.body_iterator = _finish_after(response.body_iterator, timer)
        else:
            timer.finish(str(response.status_code))
        return response

    async def _get_response(self, *, body, call_method, raw_request=None):
        timer = self._timers.pop(id(body), None)
        async for item in super()._get_response(body=body, call_method=call_method, raw_request=raw_request):
            if timer is not None:
                item = timer.saw(item)
                if item is None:
                    continue
            yield item

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._answer(super().chat, body, request, "chat")

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._answer(super().completions, body, request, "completions")

    # --- shadow traffic -------------------------------------------------------------------

    def _send_shadow(self, body, call_method: str, target: Target) -> None:
        labels = {"model": target.model, "variant": self._by_model_id[target.shadow_model_id][1].variant}
        if len(self._shadow_tasks) >= self._shadow_max:
            metric("slimserve_shadow_requests_total").inc(1, tags={**labels, "status": "dropped"})
            return
        copy = body.model_copy(deep=True, update={"model": target.shadow_model_id, "stream": False})
        if getattr(copy, "stream_options", None) is not None:
            copy.stream_options = None
        task = asyncio.get_running_loop().create_task(self._shadow(copy, call_method, labels))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, body, call_method: str, labels: dict[str, str]) -> None:
        t0 = time.perf_counter()
        status_label = "200"
        try:
            async for item in super()._get_response(body=body, call_method=call_method, raw_request=None):
                if type(item).__name__ == "ErrorResponse":
                    status_label = str(getattr(item.error, "code", None) or "error")
        except BackPressureError:
            status_label = "dropped"  # the shadow's queue is full: shadow traffic goes first
        except Exception as e:  # recorded, never raised: the client is not waiting on this
            status_label = str(getattr(e, "status_code", "error"))
            log.warning("shadow request to %s/%s failed: %s", labels["model"], labels["variant"], e)
        metric("slimserve_shadow_requests_total").inc(1, tags={**labels, "status": status_label})
        metric("slimserve_shadow_e2e_request_latency_seconds").observe(time.perf_counter() - t0, tags=labels)

    # --- variant health -------------------------------------------------------------------

    def _ensure_probe(self) -> None:
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_forever())

    async def check_health(self):
        self._ensure_probe()  # Serve calls this periodically: the probe runs without traffic too

    async def _probe_forever(self) -> None:
        last_probe = -float("inf")
        while True:
            if time.monotonic() - last_probe >= self._probe_interval:
                last_probe = time.monotonic()
                try:
                    await self._health.refresh()
                except Exception as e:  # the probe must outlive any one bad round
                    log.warning("variant health refresh failed: %s", e)
            # Every gauge is set on each round: Ray drops a gauge that is not set for a while.
            for model_id, (name, route) in self._by_model_id.items():
                labels = {"model": name, "variant": route.variant}
                metric("slimserve_variant_up").set(int(self._health.state_of(model_id).available), tags=labels)
                metric("slimserve_traffic_weight").set(route.weight, tags=labels)
                metric("slimserve_requests_in_flight").set(_in_flight.get(labels), tags=labels)
            await asyncio.sleep(min(GAUGE_REFRESH_S, self._probe_interval))

    # --- /v1/models -----------------------------------------------------------------------

    def _public_card(self, name: str) -> ModelCard:
        routes = self._splits[name].routes.values()
        total = sum(r.weight for r in routes)
        variants = []
        for r in routes:
            health = self._health.state_of(r.model_id)
            variants.append({
                "variant": r.variant, "model_id": r.model_id, "weight": r.weight,
                "traffic_share": round(r.weight / total, 4),
                "state": health.state.value,
                "available": health.available,
                **({"unavailable_because": health.describe()} if not health.available else {}),
            })
        meta = {"variants": variants, "sticky": self._sticky.get(name, True), "shadow": self._shadows.get(name)}
        return ModelCard(id=name, object="model", owned_by="slimserve", permission=[], metadata=meta)

    async def model(self, model_id: str) -> ModelCard | None:
        """Answers from what the ingress already knows (the health board, refreshed in the
        background): never waits on an engine, so it answers while variants are still loading."""
        self._ensure_probe()
        # At most LISTING_WAIT_S for news of variants not ready yet: the listing answers at once
        # even when an engine does not, and shows a variant that just came up as ready.
        await self._health.refresh_if_stale(list(self._by_model_id), any_down=True, wait_s=LISTING_WAIT_S)
        if model_id in self._splits:
            return self._public_card(model_id)
        card = await super().model(model_id)
        if card is not None and model_id in self._by_model_id:
            name, route = self._by_model_id[model_id]
            health = self._health.state_of(model_id)
            meta = {
                **card.metadata, "public_name": name, "variant": route.variant, "state": health.state.value,
                **({"unavailable_because": health.describe()} if not health.available else {}),
                "engine": health.engine,
            }
            card = card.model_copy(update={"metadata": meta})
        return card

    async def models(self) -> ModelList:
        """Public names first (their variants, weights and states in metadata), then each
        variant's card with what its running engine reported (checkpoint, quantization, dtype,
        tensor parallel size); a variant still loading has an empty `engine`."""
        variant_cards = [await self.model(m) for m in self._model_cards]
        public = [self._public_card(name) for name in self._splits]
        return ModelList(data=public + [c for c in variant_cards if c is not None])


class GuardMiddleware:
    """ASGI middleware in front of every route of the ingress: API key (when keys are set) and
    body size. Open paths: none here — Serve's proxy answers /-/healthz and /-/routes itself,
    and metrics are on Ray's own port, so probes and scrapers need no key."""

    def __init__(self, app, api_keys: list[bytes], max_body_bytes: int):
        self.app = app
        self.api_keys = api_keys
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_keys:
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            # Compare with every key in constant time: no early exit that leaks which matched.
            if not any([hmac.compare_digest(token, k) for k in self.api_keys]):
                message = "Incorrect API key provided" if token else "Missing API key: send `Authorization: Bearer KEY`"
                return await _error(send, 401, message, "authentication_error", {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _error(
                send, 413, f"request body is {int(length)} bytes; this server allows at most {self.max_body_bytes} "
                "(ingress.limits.max_body_bytes)", "invalid_request_error"
            )
        return await self.app(scope, receive, send)


async def _error(send, code: int, message: str, type_: str, headers: dict[str, str] | None = None) -> None:
    """An OpenAI-shaped error answer, the same shape Ray Serve LLM gives its own errors."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": code, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _stream_options(body, value: dict[str, Any]):
    annotation = type(body).model_fields["stream_options"].annotation
    return TypeAdapter(annotation).validate_python(value)


async def _finish_after(iterator, timer: RequestTimer):
    """Pass a streamed body through and record the request when it ends, however it ends. If the
    engine fails mid-stream (its replica died, say), the stream ends with an OpenAI error event
    and `[DONE]` rather than a cut connection, so clients see why."""
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
        message = f"variant `{timer.labels['variant']}` failed mid-stream ({type(e).__name__}); retry the request"
        error = {"error": {"message": message, "type": "InternalServerError", "param": None, "code": 500}}
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"
    finally:
        timer.finish(status_label)
