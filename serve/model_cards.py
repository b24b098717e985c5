"""`/v1/models`: a card per public name (its variants, weights, traffic shares and states) and
per variant (what its running engine reported). Built from what the ingress already knows."""

from __future__ import annotations

from pathlib import Path

from .ab import Router
from .health import VariantHealth
from .rayllm import ModelCard


def public_card(name: str, router: Router, health_of, rollout: dict | None = None) -> ModelCard:
    routes = router.splits[name].routes.values()
    total = sum(r.weight for r in routes)
    variants = []
    for r in routes:
        health: VariantHealth = health_of(r.model_id)
        variants.append({
            "variant": r.variant, "model_id": r.model_id, "weight": r.weight,
            "traffic_share": round(r.weight / total, 4),
            "state": health.state.value,
            "available": health.available,
            **({"unavailable_because": health.describe()} if not health.available else {}),
        })
    meta = {"variants": variants, "sticky": router.sticky.get(name, True), "shadow": router.shadows.get(name)}
    if rollout:
        meta["rollout"] = rollout
    return ModelCard(id=name, object="model", owned_by="slimserve", permission=[], metadata=meta)


def variant_card(card: ModelCard, name: str, variant: str, health: VariantHealth) -> ModelCard:
    """Ray Serve LLM's card for a variant's deployment, with slimserve's facts added."""
    meta = {
        **card.metadata, "public_name": name, "variant": variant, "state": health.state.value,
        **({"unavailable_because": health.describe()} if not health.available else {}),
        "engine": public_engine_facts(health.engine),
    }
    return card.model_copy(update={"metadata": meta})


def public_engine_facts(info: dict) -> dict:
    """What a variant's engine reported, minus what API clients have no business seeing (file
    paths on the server, process ids): the artifact is named by its cache key. Operators get the
    whole record from the deployment (`slimserve_info`) through Ray."""
    out = {k: v for k, v in info.items() if k not in ("pid", "checkpoint")}
    if "optimization" in info:
        optimization = {k: v for k, v in (info["optimization"] or {}).items() if k not in ("checkpoint", "base")}
        if info["optimization"] and info["optimization"].get("cache_hit") is not None:
            optimization["artifact"] = Path(info["optimization"]["checkpoint"]).name
        out["optimization"] = optimization
    return out
