"""The `ingress:` block: the OpenAI-compatible front door's settings, and the limits on what one
request may ask for."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestLimits(_Strict):
    """Bounds on what one request may ask for; beyond them the answer is a 400 (413 for the
    body) naming the parameter, before any engine sees the request. vLLM's own request checks
    apply too (e.g. at most VLLM_MAX_STOP_STRINGS=4 `stop` strings, prompt + max_tokens within
    max_model_len)."""

    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body (Content-Length).")
    max_tokens: int = Field(4096, ge=1, description="Largest `max_tokens` / `max_completion_tokens`.")
    default_max_tokens: int = Field(
        1024, ge=1, description="`max_tokens` of a request that sets neither it nor `max_completion_tokens` "
        "(vLLM would generate up to the context limit). At most `max_tokens`; left unset, it is "
        "lowered to `max_tokens` when that is smaller."
    )
    max_n: int = Field(4, ge=1, description="Largest `n` (and `best_of`): completions generated per request.")
    max_prompts: int = Field(16, ge=1, description="Most prompts in one /v1/completions request (a list `prompt`).")
    max_messages: int = Field(256, ge=1, description="Most messages in one chat request.")

    @model_validator(mode="after")
    def _default_within_limit(self) -> "RequestLimits":
        if self.default_max_tokens > self.max_tokens:
            if "default_max_tokens" not in self.model_fields_set:
                # Only the operator's own contradiction is an error; the built-in default follows the cap.
                self.default_max_tokens = self.max_tokens
                return self
            raise ValueError(f"default_max_tokens {self.default_max_tokens} is more than max_tokens {self.max_tokens}")
        return self


class IngressSettings(_Strict):
    """The OpenAI-compatible front door."""

    replicas: int = Field(
        1, ge=1, description="Ingress replicas. Every stream's chunks pass through an ingress replica's one "
        "event loop: at high concurrency on a fast GPU that loop, not the GPU, is the limit (docs/BENCHMARKS.md); "
        "more replicas share it. Routing and sticky users give the same answer on every replica."
    )
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="At most this many ingress replicas on one Ray node (Ray Serve's "
        "`max_replicas_per_node`): 1 spreads them over nodes, so a node's loss takes one of them. Unset: Ray "
        "Serve places them.",
    )
    allow_forced_variant: bool = Field(True, description="Honour the x-slimserve-variant request header.")
    sticky_user_from: Literal["api_key", "header"] | None = Field(
        None, description="Who a user is, for sticky routing (a model's `sticky: true`): `header` — the "
        "x-slimserve-user header or the body's `user` field, which the client chooses (and so can choose its "
        "variant by trying names): right when forcing a variant is allowed anyway, or when a gateway you trust "
        "sets the header; `api_key` — the API key the request authenticated with (each key is one user; "
        "without API keys no request is sticky). Unset: `header` when allow_forced_variant is true, else `api_key`.",
    )
    shadow_max_in_flight: int = Field(
        8, ge=0, description="Shadow copies in flight at once per ingress replica; beyond it copies are dropped "
        "(and counted), so shadow traffic is shed before client traffic."
    )
    drain_timeout_s: float = Field(
        300, gt=0, description="When the ingress is replaced (e.g. new weights), how long its in-flight requests "
        "(long streams included) may run on before they are cut."
    )
    api_keys_env: str | None = Field(
        "SLIMSERVE_API_KEYS",
        description="Environment variable holding the accepted API keys, comma-separated (in Kubernetes: from the "
        "chart's Secret). When it is set and not empty, every request needs `Authorization: Bearer KEY` (401 "
        "otherwise); unset: no authentication. The keys themselves never appear in the config.",
    )
    admin_keys_env: str | None = Field(
        "SLIMSERVE_ADMIN_KEYS",
        description="Environment variable holding the admin keys (comma-separated) for the operator's routes "
        "(/slimserve/rollout/...); client keys never open them. Unset or empty: the admin routes are off.",
    )
    limits: RequestLimits = Field(default_factory=RequestLimits, description="What one request may ask for.")
    health_probe_interval_s: float = Field(
        10, gt=0, description="How often the ingress checks each variant's engine (slimserve_variant_up)."
    )

    def sticky_identity(self) -> Literal["api_key", "header"]:
        return self.sticky_user_from or ("header" if self.allow_forced_variant else "api_key")
