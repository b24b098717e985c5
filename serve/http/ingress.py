"""The OpenAI-compatible front door: Ray Serve LLM's OpenAiIngress, plus the request lifecycle
of an A/B split. The protocol itself stays Ray Serve LLM's and vLLM's.

One request: guard (guard.py: key, size, limits) -> route (http/split.py: which variant; health.py:
which are up) -> the variant's engine deployment (Ray Serve LLM) -> the answer, with
`x-slimserve-variant`, timed on its way out (telemetry.py); a shadow copy on the side
(shadow.py). `/v1/models` comes from model_cards.py."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import time

from fastapi import HTTPException, Request
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.responses import Response, StreamingResponse

from slimserve.serve.http import telemetry
from slimserve.serve.http.split import RouteError, Router, Target
from slimserve.serve.http.guard import (
    VARIANT_HEADER, GuardMiddleware, admin_only, api_keys_from_env, bearer_token, check_limits, error_response,
)
from slimserve.serve.handoff import IngressSpec, IngressWeights
from slimserve.serve.http.health import HealthBoard
from slimserve.serve.http.model_cards import public_card, variant_card
from slimserve.serve.rayllm import (
    IngressSeams, ModelCard, ModelList, OpenAIHTTPException, get_request_id, get_response_for_error, model_ids,
    variant_handles,
)
from slimserve.serve.http.live_probes import LiveProbes, probe_plans
from slimserve.serve.http.rollout_routes import ADMIN_PREFIX, Rollouts
from slimserve.serve.http.shadow import ShadowCopies

log = logging.getLogger("slimserve.ingress")

USER_HEADER = "x-slimserve-user"
# Label for requests naming no model slimserve serves: never the client's string (unbounded
# label values, and it may carry anything the client typed).
UNKNOWN_MODEL = "unknown"
GAUGE_REFRESH_S = 5.0
# /v1/models waits at most this long for news of variants not ready yet.
LISTING_WAIT_S = 1.0


class VariantWentDown(Exception):
    """The variant a request waited on stopped being available before its first byte."""


class SlimserveIngress(IngressSeams, OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, lora_paths=None, spec: dict, rollout_owner=None, **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self._spec = IngressSpec.model_validate(spec)
        self._api_keys = api_keys_from_env(self._spec.api_keys_env)
        self._router = Router(self._spec.splits, allow_forced=self._spec.allow_forced_variant,
                              sticky=self._spec.sticky, shadows=self._spec.shadows,
                              per_request={name: (r.baseline, r.candidate) for name, r in self._spec.rollouts.items()
                                           if not r.sticky})
        handles = variant_handles(self)
        app_name = next(iter(handles.values())).app_name if handles else None
        self._health = HealthBoard(handles, app_name, serve.status)
        self._shadow = ShadowCopies(self._spec.shadow_max_in_flight, super().engine_response)
        self._rollouts = Rollouts(self._spec.rollouts, rollout_owner, self._router)
        self._live = LiveProbes(probe_plans(self._spec), super().engine_response, on_result=self._rollouts.probed)
        self._probe_task: asyncio.Task | None = None
        # id(body) -> (timer, rename): what engine_response needs of a request in flight.
        self._in_flight: dict[int, tuple[telemetry.RequestTimer, tuple[str, str] | None]] = {}

    def reconfigure(self, user_config: dict) -> None:
        """Ray Serve calls this with the deployment's `user_config` when the replica starts and
        whenever only the user_config changed: new weights apply to the next request, on this
        replica, with its counters and in-flight streams untouched."""
        weights = IngressWeights.model_validate(user_config or {"weights": {}})
        self._router.set_weights(weights.weights)
        self._rollouts.new_configured_weights()  # a rollout's pair keeps its share of the new weights
        log.info("slimserve: weights %s", self._router.weights())

    async def slimserve_info(self) -> dict:
        """This replica's pid and current weights, read through Ray by operators and tests (not
        an HTTP route: API clients see the weights in /v1/models)."""
        return {"pid": os.getpid(), "weights": self._router.weights()}

    def on_asgi_app(self, app) -> None:
        # Ray Serve hands the replica's FastAPI app over here before it starts serving
        # (rayllm.IngressSeams): the last chance to put the key and body-size check in front of
        # every route.
        admin_keys = api_keys_from_env(self._spec.admin_keys_env)
        app.add_middleware(GuardMiddleware, api_keys=self._api_keys, max_body_bytes=self._spec.limits.max_body_bytes,
                           admin_keys=admin_keys, admin_prefix=ADMIN_PREFIX)
        self._rollouts.add_admin_routes(app, admin_keys)
        app.add_api_route(ADMIN_PREFIX + "variants", admin_only(self._admin_variants, admin_keys), methods=["GET"])

    async def _admin_variants(self, request: Request) -> dict:
        """GET /slimserve/variants (admin key): what /v1/models leaves out for clients — each
        variant's full reason and engine record (paths, pid, the optimizer's last output), and
        each rollout's history and evidence."""
        return {
            "variants": {model_id: {"model": name, "variant": route.variant, "state": h.state.value,
                                    "reason": h.reason,
                                    "engine": h.engine.model_dump(exclude_unset=True) if h.engine else {}}
                         for model_id, (name, route) in self._router.by_model_id.items()
                         for h in [self._health.state_of(model_id)]},
            "rollouts": {name: self._rollouts.summary(name) for name in self._spec.rollouts},
        }

    # --- one request ----------------------------------------------------------------------

    async def _route(self, body, request: Request) -> Target:
        """Choose the variant and point the request at it (body.model = its model id)."""
        forced = request.headers.get(VARIANT_HEADER)
        # None of the candidates known up (e.g. the first request after a deploy): look now.
        await self._health.refresh_if_stale(self._router.candidates(body.model, forced))
        await self._rollouts.first_sync(self._candidate_up)  # a stored rollout routes from the first request on
        user = self._user_of(body, request)
        state = self._health.state_of
        try:
            target = self._router.route(body.model, forced, user, lambda m: state(m).available, lambda m: state(m).describe())
        except RouteError as e:
            # OpenAIHTTPException: Ray Serve LLM's middleware answers it in OpenAI's shape.
            raise OpenAIHTTPException(e.status, e.message, e.type) from None
        body.model = target.model_id
        request.state.slimserve_variant = target.variant  # guard.py puts it on every answer, errors too
        return target

    def _user_of(self, body, request: Request) -> str | None:
        """Who the request is for sticky routing: what the operator trusts (ingress.sticky_user_from)."""
        if self._spec.sticky_user_from == "header":
            return request.headers.get(USER_HEADER) or getattr(body, "user", None)
        key = bearer_token(request.headers.get("authorization", "").encode())
        # The key's digest, not the key: the identity is only hashed again, never shown.
        return hashlib.blake2b(key, digest_size=16).hexdigest() if key and self._api_keys else None

    async def _answer(self, handler, body, request: Request, call_method: str, rerouted: bool = False) -> Response:
        self._ensure_probe()
        requested = body.model
        try:
            check_limits(body, self._spec.limits)
            target = await self._route(body, request)
        except OpenAIHTTPException as e:
            telemetry.record_refused(requested if requested in self._router.splits else UNKNOWN_MODEL, e.status_code)
            raise
        labels = {"model": target.model, "variant": target.variant}
        if target.shadow_model_id and not rerouted:
            shadow = self._router.by_model_id[target.shadow_model_id][1].variant
            self._shadow.send(body, call_method, target.shadow_model_id, {"model": target.model, "variant": shadow})
        if not rerouted:
            self._live.maybe_probe(body, call_method, target.model)
        # The user groups requests for the rollout's statistics (a sticky user's go together).
        user = self._user_of(body, request)
        timer = telemetry.start_timer(body, labels, on_finish=functools.partial(self._rollouts.observe, user=user))
        # Answers name the model the client asked for (OpenAI clients compare it); the variant
        # is in the header. A client that asked for a variant's own id gets that id.
        asked = requested if requested is not None else target.model
        self._in_flight[id(body)] = (timer, (target.model_id, asked) if asked != target.model_id else None)
        try:
            response = await self._unless_down(handler(body, request), target)
        except BackPressureError as e:
            # The variant's queue is full: shed the request with a time to come back, rather
            # than queue without bound (Ray Serve would answer 503 without a body we control).
            timer.finish("429")
            retry = max(1, round(e.retry_after_s or 1))
            return error_response(429, f"variant `{target.variant}` of `{target.model}` is at capacity; retry after {retry} s",
                                  "rate_limit_error", {"retry-after": str(retry), VARIANT_HEADER: target.variant})
        except (OpenAIHTTPException, HTTPException) as e:
            timer.finish(str(e.status_code))
            raise
        except (*telemetry.REPLICA_LOST, VariantWentDown) as e:
            if not isinstance(e, VariantWentDown):
                self._health.mark_lost(target.model_id, e)
            if rerouted or not self._another_is_up(requested, request, target):
                return self._replica_lost(e, target, timer)
            # Nothing reached the client yet: once more, on a variant that is up.
            timer.finish("503")
            log.warning("%s/%s: replica lost before the answer began (%s): rerouting", target.model,
                        target.variant, type(e).__name__)
            body.model = requested
            return await self._answer(handler, body, request, call_method, rerouted=True)
        except Exception as e:
            raise self._client_error(e, target, timer, request) from None
        except BaseException:
            timer.finish("cancelled")
            raise
        finally:
            self._in_flight.pop(id(body), None)
        response.headers[VARIANT_HEADER] = target.variant
        if isinstance(response, StreamingResponse):
            response.body_iterator = telemetry.finish_after(response.body_iterator, timer)
        else:
            timer.finish(str(response.status_code))
        return response

    async def _unless_down(self, answer, target: Target):
        """The handler's response (which Ray Serve LLM returns once the first chunk is there), or
        VariantWentDown if the variant is marked down first (`HealthBoard.went_down`: a request
        lost its replica, or Serve restarts it): a request sent to a replica Serve has not yet
        replaced (a lost node) waits in Serve's queue for the restart, minutes on a GPU; nothing
        has reached the client, so it can still go elsewhere."""
        task = asyncio.ensure_future(answer)
        down = asyncio.ensure_future(self._health.went_down(target.model_id).wait())
        try:
            await asyncio.wait({task, down}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the client went away: so does its request
            task.cancel()
            raise
        finally:
            down.cancel()
        if task.done():
            return task.result()
        task.cancel()  # Serve takes a cancelled request out of its queue
        try:
            await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this request itself was cancelled meanwhile
                raise
        except Exception:
            pass
        raise VariantWentDown(self._health.state_of(target.model_id).describe())

    def _client_error(self, e: Exception, target: Target, timer, request: Request) -> OpenAIHTTPException:
        """Ray Serve LLM's mapping decides the status (a client error stays a 4xx), but for a 5xx
        its message would carry the engine's traceback: that goes to the log, and the client
        learns only what failed."""
        error = get_response_for_error(e, get_request_id(request)).error
        timer.finish(str(error.code))
        if error.code < 500:
            return OpenAIHTTPException(error.code, error.message, error.type)
        log.error("%s/%s failed: %s", target.model, target.variant, e, exc_info=True)
        return OpenAIHTTPException(
            error.code,
            f"variant `{target.variant}` of `{target.model}` failed to answer ({type(e).__name__}); "
            f"details are in the server log (request id {get_request_id(request)})",
            "InternalServerError",
        )

    def _another_is_up(self, requested, request: Request, lost: Target) -> bool:
        """Whether a request that lost its replica may go to another variant of its model: it did
        not pick its variant (forced, or by the variant's own id) and another one is up."""
        if requested in self._router.by_model_id:
            return False
        others = [m for m in self._router.candidates(requested, request.headers.get(VARIANT_HEADER))
                  if m != lost.model_id]
        return any(self._health.state_of(m).available for m in others)

    def _replica_lost(self, e: Exception, target: Target, timer) -> Response:
        """The replica (or node) serving the request went away: a 503 with Retry-After, so that
        clients retry (the openai client does) instead of giving up on a 500. By one health probe
        interval the router knows the variant is down and sends the retry elsewhere."""
        timer.finish("503")
        log.warning("%s/%s: replica lost: %s: %s", target.model, target.variant, type(e).__name__, e)
        retry = max(1, round(self._spec.health_probe_interval_s))
        return error_response(503, f"variant `{target.variant}` of `{target.model}` lost the replica serving the "
                              f"request ({type(e).__name__}); retry after {retry} s", "server_error",
                              {"retry-after": str(retry), VARIANT_HEADER: target.variant})

    async def engine_response(self, *, body, call_method, raw_request=None):
        timer, rename = self._in_flight.pop(id(body), (None, None))
        async for item in super().engine_response(body=body, call_method=call_method, raw_request=raw_request):
            if timer is not None:
                item = timer.saw(item)
                if item is None:
                    continue
            yield _renamed(item, rename) if rename else item

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._answer(super().chat, body, request, "chat")

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._answer(super().completions, body, request, "completions")

    # --- the other routes of Ray Serve LLM's ingress --------------------------------------
    # Same signatures as the parent's (FastAPI reads them), so the routes keep their request models.

    def _generative_only(name: str):
        @functools.wraps(getattr(OpenAiIngress, name))
        async def refuse(self, body, request: Request) -> Response:
            raise OpenAIHTTPException(400, f"slimserve serves generative models: /{name} is not available here "
                                      "(use /v1/chat/completions or /v1/completions)", "invalid_request_error")
        return refuse

    embeddings = _generative_only("embeddings")
    score = _generative_only("score")
    transcriptions = _generative_only("transcriptions")

    def _routed(name: str):
        """Tokenizer routes: the variant is chosen (and must be up) like for a completion."""
        @functools.wraps(getattr(OpenAiIngress, name))
        async def routed(self, body, request: Request) -> Response:
            try:
                await self._route(body, request)
            except OpenAIHTTPException as e:
                telemetry.record_refused(body.model if body.model in self._router.splits else UNKNOWN_MODEL, e.status_code)
                raise
            return await getattr(super(SlimserveIngress, self), name)(body, request)
        return routed

    tokenize = _routed("tokenize")
    detokenize = _routed("detokenize")
    del _generative_only, _routed

    # --- variant health -------------------------------------------------------------------

    def _ensure_probe(self) -> None:
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_forever())

    def _candidate_up(self, model_id: str) -> bool | None:
        return self._health.state_of(model_id).available

    async def check_health(self):
        self._ensure_probe()  # Serve calls this periodically: the probe runs without traffic too

    async def _probe_forever(self) -> None:
        interval = self._spec.health_probe_interval_s
        last_probe = -float("inf")
        while True:
            if time.monotonic() - last_probe >= interval:
                last_probe = time.monotonic()
                try:
                    await self._health.refresh()
                except Exception as e:  # the probe must outlive any one bad round
                    log.warning("variant health refresh failed: %s", e)
            self._live.set_gauges()
            try:
                await self._rollouts.sync(self._candidate_up)
            except Exception as e:  # a rollout's trouble must not stop the health loop
                log.warning("rollout: %s", e)
            telemetry.set_variant_gauges([
                ({"model": name, "variant": route.variant}, route.weight, self._health.state_of(model_id).available)
                for model_id, (name, route) in self._router.by_model_id.items()
            ])
            await asyncio.sleep(min(GAUGE_REFRESH_S, interval, self._rollouts.report_every_s or GAUGE_REFRESH_S))

    # --- /v1/models -----------------------------------------------------------------------

    async def model(self, model_id: str) -> ModelCard | None:
        """Answers from what the ingress already knows (the health board, refreshed in the
        background): never waits on an engine, so it answers while variants are still loading."""
        self._ensure_probe()
        await self._health.refresh_if_stale(list(self._router.by_model_id), any_down=True, wait_s=LISTING_WAIT_S)
        if model_id in self._router.splits:
            return public_card(model_id, self._router, self._health.state_of, self._rollouts.summary(model_id))
        card = await super().model(model_id)
        if card is not None and model_id in self._router.by_model_id:
            name, route = self._router.by_model_id[model_id]
            card = variant_card(card, name, route.variant, self._health.state_of(model_id))
        return card

    async def models(self) -> ModelList:
        """Public names first (their variants, weights and states), then each variant's card
        with what its running engine reported; a variant still loading has an empty `engine`."""
        variant_cards = [await self.model(m) for m in model_ids(self)]
        public = [public_card(name, self._router, self._health.state_of, self._rollouts.summary(name))
                  for name in self._router.splits]
        return ModelList(data=public + [c for c in variant_cards if c is not None])


def _renamed(item, rename: tuple[str, str]):
    """An engine answer with `model` set to the name the client asked for: SSE text (a stream
    chunk, or a batch of them) or a response object."""
    model_id, asked = rename
    if isinstance(item, list):
        return [_renamed(x, rename) for x in item]
    if isinstance(item, str):
        return item.replace(f'"model":"{model_id}"', f'"model":"{asked}"')
    if getattr(item, "model", None) == model_id:
        return item.model_copy(update={"model": asked})
    return item
