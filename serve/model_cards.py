"""`/v1/models`: a card per public name (its variants, weights, traffic shares and states) and
per variant (what its running engine reported). Built from what the ingress already knows."""

from __future__ import annotations

from .ab import Router
from .health import VariantHealth
from .rayllm import ModelCard


def public_card(name: str, router: Router, health_of) -> ModelCard:
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
    return ModelCard(id=name, object="model", owned_by="slimserve", permission=[], metadata=meta)


def variant_card(card: ModelCard, name: str, variant: str, health: VariantHealth) -> ModelCard:
    """Ray Serve LLM's card for a variant's deployment, with slimserve's facts added."""
    meta = {
        **card.metadata, "public_name": name, "variant": variant, "state": health.state.value,
        **({"unavailable_because": health.describe()} if not health.available else {}),
        "engine": health.engine,
    }
    return card.model_copy(update={"metadata": meta})
