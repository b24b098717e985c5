"""The reports a build leaves, typed: what the optimizer's child reports (`BuildReport`, with its
`QualityReport`) and the artifact's manifest that stores it (`ArtifactManifest`).

They cross processes as JSON — the child's result line, the manifest on disk, `slimserve_info`
through Ray — and are validated where they arrive: `pipeline._run_child` (the child's line),
`pipeline.optimize` (the manifest, through `ArtifactCache.get_or_build`), and in the ingress
(`serve.handoff.EngineRecord`). Their JSON is the manifest's `report` as it has always been:
written with `exclude_unset`, a field the child did not report is not written either."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimserve.optimizers.cache.upkeep import CacheManifest, FileDigest  # noqa: F401 (FileDigest: re-exported)
from slimserve.optimizers.quality import HeldOut


class QualityReport(BaseModel):
    """The quality gate's measurement: perplexity of the base and of the variant on held-out text
    (optimizers/quality.py), measured by the child after the method ran."""

    model_config = ConfigDict(extra="forbid")

    held_out: HeldOut = Field(description="The text measured on (the quality gate's `held_out`).")
    base_perplexity: float = Field(description="Perplexity of the base checkpoint.")
    perplexity: float = Field(description="Perplexity of the variant's checkpoint.")
    ppl_ratio: float = Field(description="perplexity / base_perplexity: what the gate's max_ppl_ratio limits.")
    seconds: float = Field(ge=0, description="Wall time of both measurements.")


class TeacherAgreement(BaseModel):
    """A student's agreement with its teacher (the `student` method), exported as the variant's
    `slimserve_quality_ratio{metric="teacher_agreement"}`."""

    model_config = ConfigDict(extra="forbid")

    top1_agreement: float = Field(description="Share of held-out tokens whose top-1 next token is the teacher's.")
    kl_per_token: float = Field(description="Mean KL(teacher ‖ student) per token.")
    tokens: int = Field(ge=0, description="Tokens compared.")
    held_out: HeldOut | None = Field(None, description="The text compared on.")


class BuildReport(BaseModel):
    """What the optimizer's child reports for one build: the facts the method's `run` returned
    (scheme, group size, training run, ...; each method's own, kept as it wrote them: extra
    fields), and the fields slimserve reads."""

    model_config = ConfigDict(extra="allow")

    optimize_seconds: float = Field(ge=0, description="Wall time of the method's run in the child.")
    quality: QualityReport | None = Field(None, description="The quality gate's measurement; None: not measured.")
    agreement: TeacherAgreement | None = Field(None, description="A student's agreement with its teacher (method `student`).")

    def to_json_dict(self) -> dict[str, Any]:
        """What the child writes and the manifest stores, for json.dumps (fields not reported left
        out; a NaN perplexity stays NaN, as json.dumps writes it)."""
        return self.model_dump(exclude_unset=True)


class ArtifactManifest(CacheManifest):
    """`<key>/slimserve-manifest.json` of a cached artifact: what made it (pipeline.optimize's
    facts), when, and every file's digest (`files`, from the cache's own `CacheManifest`:
    cache/store.py writes and verifies those). Fields a later slimserve adds are ignored here;
    one this slimserve needs and cannot read makes the artifact a rebuild (ArtifactCache.lookup),
    never a crash."""

    model_config = ConfigDict(extra="ignore")

    method: str = Field(description="The optimization method (registry name).")
    spec: dict[str, Any] = Field(description="The optimization as the registry parsed it.")
    base: str = Field(description="The base checkpoint's folder.")
    versions: dict[str, str] = Field(default_factory=dict, description="Versions of the libraries the method used.")
    slimserve: dict[str, Any] = Field(default_factory=dict, description="slimserve's version and code identity that built it.")
    key: str = Field(description="The cache key (the artifact's folder name).")
    created: str = Field(description="UTC time the build finished, ISO 8601.")
    build_seconds: float = Field(ge=0, description="Wall time of the build, the child's start to its end.")
    report: BuildReport = Field(description="The optimizer child's report.")


def field_errors(e: ValidationError, prefix: str = "") -> str:
    """`quality.ppl_ratio: Field required; optimize_seconds: ...`: one line naming each field."""
    def where(loc) -> str:
        path = ".".join(str(part) for part in loc)
        return prefix + path if path else prefix.rstrip(".") or "(top level)"

    return "; ".join(f"{where(err['loc'])}: {err['msg']}" for err in e.errors())
