"""The `rollout:` block of a model: promote a candidate variant step by step on live traffic,
against guardrails measured on that traffic (see rollout/controller.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimserve.serve.config.probe import LiveProbeSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Guardrails(_Strict):
    """Limits the candidate must keep against the baseline during every step. A breach shown by
    its always-valid test sets the candidate's weight to 0 at once; the tests share one
    false-rollback budget, `significance` (docs/ROLLOUT_STATISTICS.md)."""

    max_ttft_p95_ratio: float | None = Field(
        1.5, gt=0, description="Candidate TTFT p95 / baseline TTFT p95 (streamed requests), tested as: more than 5 % of the "
        "candidate's answered requests are slower than this times the baseline's p95; unset: not checked.")
    max_e2e_p95_ratio: float | None = Field(
        1.5, gt=0, description="Candidate end-to-end p95 / baseline end-to-end p95, tested as the TTFT ratio; unset: not checked.")
    max_error_rate: float | None = Field(
        0.05, ge=0, le=1, description="Candidate failure rate (5xx, broken streams, timeouts, 429 sheds, and 4xx beyond the "
        "baseline's 4xx rate) shown above this and above the baseline's rate is a breach; unset: not checked.")
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="Live agreement floor (the `probe:` block's match fraction): shown below it is a "
        "breach, and a step advances only once it is shown above it. Needs `probe:`.")
    max_unavailable_s: float = Field(
        30, gt=0, description="The candidate unavailable (engine down, failed) this long is a breach.")


class RolloutSettings(_Strict):
    """Shift traffic from `baseline` to `candidate` in `steps`. Each step holds until it has seen
    `min_requests` candidate requests and `min_seconds`, and advances only when every guardrail
    is shown to be met; any guardrail breach rolls back at once (candidate weight 0) and records why.
    New guardrails or durations keep the step; a new candidate, baseline or steps start over.
    The two variants share the weight they have in the config (the others keep theirs)."""

    candidate: str = Field(description="The variant being rolled out.")
    baseline: str | None = Field(None, description="The variant it replaces; unset: the first variant.")
    steps: list[float] = Field(
        default_factory=lambda: [5, 25, 50, 100],
        description="The candidate's percentage of the two variants' traffic at each step, rising, ending at 100.",
    )
    sticky: bool = Field(
        False, description="Keep each user on one of the two variants while the rollout runs (the model's `sticky`). "
        "Off (default): the two variants' share is split per request, as a canary rollout does, so the guardrails see "
        "the candidate on every user's traffic; users stay sticky to the pair and to the model's other variants. On: a "
        "step's evidence is about the few users it puts on the candidate, and a first step that reaches only a few "
        "users' worth of traffic may show neither a regression nor its absence until `inconclusive_after` ends it "
        "(docs/ROLLOUT_STATISTICS.md#users).",
    )
    inconclusive_after: float | None = Field(
        3, ge=1, description="A step that has lasted this many times `min_seconds` and seen this many times "
        "`min_requests` candidate requests without every guardrail shown met rolls back (fail closed: the candidate "
        "could not show it keeps them). Unset: such a step holds until an operator acts.",
    )
    min_requests: int = Field(200, ge=1, description="Candidate requests a step must see before it may advance.")
    min_seconds: float = Field(600, ge=0, description="Time a step must last before it may advance.")
    significance: float = Field(0.05, gt=0, lt=1, description="The probability of rolling back a candidate that keeps every guardrail, over "
        "the whole rollout however often it is evaluated, shared by the guardrails; also each guardrail's "
        "probability of being shown met when it sits at its limit.")
    evaluate_every_s: float = Field(5, gt=0, description="How often the evidence is weighed.")
    guardrails: Guardrails = Field(default_factory=Guardrails)

    @field_validator("steps")
    @classmethod
    def _rising_to_100(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < x <= 100 for x in v) or any(b <= a for a, b in zip(v, v[1:])) or v[-1] != 100:
            raise ValueError(f"steps must rise within (0, 100] and end at 100, got {v}")
        return v


def check_probe_and_rollout(names: list[str], probe: LiveProbeSettings | None, rollout: RolloutSettings | None) -> None:
    """A model's `probe:` and `rollout:` against its variant names (ModelSpec's validator)."""
    if probe is not None:
        if len(names) < 2:
            raise ValueError("probe: needs at least two variants to compare")
        if probe.baseline is not None and probe.baseline not in names:
            raise ValueError(f"probe.baseline: {probe.baseline!r} is not one of this model's variants {names}")
    if rollout is not None:
        r = rollout
        baseline = r.baseline or names[0]
        for field, value in (("candidate", r.candidate), ("baseline", baseline)):
            if value not in names:
                raise ValueError(f"rollout.{field}: {value!r} is not one of this model's variants {names}")
        if r.candidate == baseline:
            raise ValueError(f"rollout.candidate: {r.candidate!r} is also the baseline")
        if r.guardrails.min_agreement is not None:
            if probe is None:
                raise ValueError("rollout.guardrails.min_agreement needs a `probe:` block (the live agreement)")
            if (probe.baseline or names[0]) != baseline:
                raise ValueError("rollout.baseline and probe.baseline differ: the agreement would not be with the rollout's baseline")
