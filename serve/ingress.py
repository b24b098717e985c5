"""The OpenAI-compatible front door: Ray Serve LLM's OpenAiIngress, plus the variant choice.

A request for a public model name is sent to one of its variants (by weight, or forced by the
`x-slimserve-variant` request header); a request for a variant's own id goes to that variant.
Every answer carries `x-slimserve-variant`. The protocol itself stays Ray Serve LLM's."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request, status
from starlette.responses import Response

from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard, ModelList, OpenAIHTTPException

from .ab import TrafficSplit, VariantRoute

VARIANT_HEADER = "x-slimserve-variant"


class SlimserveIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        lora_paths=None,
        splits: dict[str, list[dict[str, Any]]],
        allow_forced_variant: bool = True,
        **kwargs,
    ):
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths, **kwargs)
        self._splits = {name: TrafficSplit([VariantRoute(**r) for r in routes]) for name, routes in splits.items()}
        self._by_model_id = {
            r.model_id: (name, r) for name, split in self._splits.items() for r in split.routes.values()
        }
        self._allow_forced = allow_forced_variant

    def _route(self, body, request: Request) -> str | None:
        """Rewrite body.model to the chosen variant's model id; return the variant name."""
        # Errors are raised as OpenAIHTTPException, which Ray Serve LLM's middleware turns into
        # OpenAI's {"error": {...}} shape (FastAPI's HTTPException would answer {"detail": ...}).
        if body.model is None and len(self._splits) == 1:
            body.model = next(iter(self._splits))
        if body.model in self._by_model_id:
            return self._by_model_id[body.model][1].variant
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
        forced = request.headers.get(VARIANT_HEADER)
        if forced and self._allow_forced:
            route = split.routes.get(forced)
            if route is None:
                raise OpenAIHTTPException(
                    status.HTTP_400_BAD_REQUEST,
                    f"model `{body.model}` has no variant `{forced}` (has: {', '.join(split.routes)})",
                    "invalid_request_error",
                )
        else:
            route = split.pick()
        body.model = route.model_id
        return route.variant

    async def _answer(self, handler, body, request: Request) -> Response:
        variant = self._route(body, request)
        response = await handler(body, request)
        if variant is not None:
            response.headers[VARIANT_HEADER] = variant
        return response

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._answer(super().chat, body, request)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._answer(super().completions, body, request)

    def _public_card(self, name: str) -> ModelCard:
        routes = self._splits[name].routes.values()
        total = sum(r.weight for r in routes)
        variants = [
            {"variant": r.variant, "model_id": r.model_id, "weight": r.weight, "traffic_share": round(r.weight / total, 4)}
            for r in routes
        ]
        return ModelCard(id=name, object="model", owned_by="slimserve", permission=[], metadata={"variants": variants})

    async def _engine_info(self, model_id: str) -> dict[str, Any]:
        try:
            handle = self._default_serve_handles[model_id]
            return await asyncio.wait_for(handle.slimserve_info.remote(), timeout=5)
        except Exception as e:  # a variant that is down must not break the listing
            return {"error": f"{type(e).__name__}: {e}"}

    async def model(self, model_id: str) -> ModelCard | None:
        if model_id in self._splits:
            return self._public_card(model_id)
        card = await super().model(model_id)
        if card is not None and model_id in self._by_model_id:
            name, route = self._by_model_id[model_id]
            engine = await self._engine_info(model_id)
            card = card.model_copy(
                update={"metadata": {**card.metadata, "public_name": name, "variant": route.variant, "engine": engine}}
            )
        return card

    async def models(self) -> ModelList:
        """Public names first (their variants and weights in metadata), then each variant's card
        with what its engine reports (checkpoint, quantization, dtype, tensor parallel size)."""
        variant_cards = await asyncio.gather(*(self.model(m) for m in self._model_cards))
        public = [self._public_card(name) for name in self._splits]
        return ModelList(data=public + [c for c in variant_cards if c is not None])
