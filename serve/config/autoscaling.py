"""`deployment.autoscaling` (a model's) and `autoscaling` (a variant's override): Ray Serve's
autoscaler for a variant's engine deployment, in Serve's own field names. Serve adds and removes
engine replicas between min_replicas and max_replicas so that each replica has about
`target_ongoing_requests` requests running or queued; every variant is a deployment of its own, so
each scales with the traffic it gets (its weight's share, a rollout step's share, shadow copies).

The engines' placement is planned for max_replicas: CPU hosts give every replica up to
max_replicas its own cores, GPU hosts split the GPUs between the engines at their maximum."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.fields import FieldInfo

# What a variant scaled to zero does, said once for the field, the README and /v1/models.
SCALED_TO_ZERO = (
    "no engine replica runs; /v1/models shows the variant as `idle` (available). A request forced to it "
    "(x-slimserve-variant) waits for a replica to start — a cold start: the engine's start, and its build "
    "unless the artifact is cached — and Serve scales it back to zero downscale_to_zero_delay_s after the last one"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingSettings(_Strict):
    """Ray Serve's autoscaling for a variant's engine deployment (ray.serve.config.AutoscalingConfig,
    the fields slimserve passes on). Unset fields take Serve's defaults."""

    min_replicas: int = Field(
        1, ge=0,
        description="Fewest engine replicas. 0 (scale to zero) only for a variant that gets no traffic: weight 0, "
        "not the model's shadow, not a rollout's candidate or baseline, and in a model without `probe:` (probes "
        f"reach every variant). At zero replicas {SCALED_TO_ZERO}.",
    )
    max_replicas: int = Field(
        ge=1,
        description="Most engine replicas. CPU cores (a core set per replica rank) and GPU shares are planned "
        "for this many, so a replica Serve adds always has room that no other engine was promised.",
    )
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas started at deploy; unset: min_replicas.",
    )
    target_ongoing_requests: float | None = Field(
        None, gt=0,
        description="Requests running or queued per replica that Serve scales toward; unset: Serve's default (2). "
        "An engine batches many requests at once (up to deployment.max_ongoing_requests): a higher target adds "
        "replicas only when the engines are busy, a lower one keeps latency down at the cost of more engines.",
    )
    upscale_delay_s: float | None = Field(
        None, ge=0, description="How long the load must call for more replicas before Serve adds one; unset: 30.",
    )
    downscale_delay_s: float | None = Field(
        None, ge=0, description="How long the load must call for fewer replicas before Serve removes one; unset: 600. "
        "A removed replica finishes its requests first.",
    )
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="With min_replicas 0: how long without requests before the last replica goes; "
        "unset: downscale_delay_s.",
    )
    look_back_period_s: float | None = Field(
        None, gt=0, description="The window the load is averaged over; unset: 30.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is less than min_replicas {self.min_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas {self.initial_replicas} is not within min_replicas {self.min_replicas} "
                             f"and max_replicas {self.max_replicas}")
        return self

    def serve_config(self) -> dict[str, Any]:
        """Serve's `autoscaling_config`: the fields set (Serve's defaults for the others)."""
        return self.model_dump(exclude_none=True)


# A variant's override: the same fields, each optional, laid over the model's block field by field.
AutoscalingOverride = create_model(
    "AutoscalingOverride",
    __base__=_Strict,
    __doc__="A variant's autoscaling: any of the model's `deployment.autoscaling` fields, laid over it field by "
    "field (a variant of a model without autoscaling sets max_replicas at least).",
    **{name: (field.annotation | None, FieldInfo.merge_field_infos(field, default=None))
       for name, field in AutoscalingSettings.model_fields.items()},
)


def merged(model_block: AutoscalingSettings | None, override: BaseModel | None) -> AutoscalingSettings | None:
    """A variant's autoscaling: the model's block with the variant's fields over it; None: fixed
    replicas. Raises pydantic's ValidationError for a merge that does not validate."""
    if model_block is None and override is None:
        return None
    base = model_block.model_dump(exclude_unset=True) if model_block is not None else {}
    top = override.model_dump(exclude_none=True) if override is not None else {}
    return AutoscalingSettings.model_validate({**base, **top})
