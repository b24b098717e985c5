"""`/v1/models`: a card per public name (its variants, weights, traffic shares and states) and
per variant (what its running engine reported). Built from what the ingress already knows.

Every client may read it: operator detail — a rollout's history and evidence, failure text with
the server's paths, the optimizer's output — stays on the admin route `GET /slimserve/variants`."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from slimserve.serve.handoff import EngineRecord
from slimserve.serve.http.split import Router
from slimserve.serve.http.health import VariantHealth
from slimserve.serve.rayllm import ModelCard


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
            **({"unavailable_because": public_reason(health)} if not health.available else {}),
        })
    meta = {"variants": variants, "sticky": router.sticky.get(name, True), "shadow": router.shadows.get(name)}
    if name in router.per_request:  # a rollout's pair: one route to a sticky user, split per request
        meta["split_per_request"] = list(router.per_request[name])
    if rollout:
        meta["rollout"] = {k: rollout[k] for k in PUBLIC_ROLLOUT_FIELDS if k in rollout}
    return ModelCard(id=name, object="model", owned_by="slimserve", permission=[], metadata=meta)


def variant_card(card: ModelCard, name: str, variant: str, health: VariantHealth) -> ModelCard:
    """Ray Serve LLM's card for a variant's deployment, with slimserve's facts added."""
    meta = {
        **card.metadata, "public_name": name, "variant": variant, "state": health.state.value,
        **({"unavailable_because": public_reason(health)} if not health.available else {}),
        "engine": public_engine_facts(health.engine),
    }
    return card.model_copy(update={"metadata": meta})


def public_engine_facts(record: EngineRecord | None) -> dict:
    """What a variant's engine reported (None: nothing yet), minus what API clients have no
    business seeing (file paths on the server, process ids): the artifact is named by its cache
    key. Operators get the whole record from the deployment (`slimserve_info`) through Ray."""
    if record is None:
        return {}
    # `failed`: the optimizer's last lines of output (its public summary is `unavailable_because`).
    out = record.model_dump(exclude_unset=True, exclude={"pid", "checkpoint", "failed", "optimization"})
    prep = record.optimization
    if prep is not None:
        out["optimization"] = prep.model_dump(exclude_unset=True, exclude={"checkpoint", "base"})
        if prep.cache_hit is not None:
            out["optimization"]["artifact"] = Path(prep.checkpoint).name
    return without_paths(out)


# What every client may see of a rollout: where it stands, not why (history, reasons, evidence).
PUBLIC_ROLLOUT_FIELDS = ("candidate", "baseline", "status", "step", "steps", "candidate_percent")
# An absolute path of two or more parts (`/root/.cache/x`, `/tmp/a.safetensors`), or what is left
# of one once a known folder is cut (`…/artifacts/x`): kept to its last part.
_PATH = re.compile(r"(?<![\w.:/…])…?/(?:[^\s/'\"`:,()]+/)+([^\s/'\"`:,()]*)")


def known_folders() -> list[str]:
    """The server's folders that paths in failure text start with ($SLIMSERVE_HOME, which holds
    the artifact cache and built models by default, $HF_HOME, the home, temporary and working
    folders), longest first. A name in them may hold spaces, which the pattern above cannot tell
    from the text around a path."""
    folders = {os.environ.get("SLIMSERVE_HOME", ""), os.environ.get("HF_HOME", ""), os.path.expanduser("~"),
               tempfile.gettempdir(), os.getcwd()}
    folders = {f.rstrip("/") for f in folders if f.startswith("/")}
    return sorted((f for f in folders if f), key=len, reverse=True)  # not `/` itself


def public_reason(health: VariantHealth) -> str:
    return without_paths(health.describe())


def without_paths(value):
    """`value` (text, or lists and dicts of it) with the server's absolute paths cut to their
    last part: a client learns which file, not where the server keeps it."""
    if isinstance(value, str):
        for folder in known_folders():
            # The whole folder only (`/home/u` is not the start of `/home/u2`).
            value = re.sub(rf"(?<![\w.:/]){re.escape(folder)}(?=[/\s'\"`:,()]|$)", "…", value)
        return _PATH.sub(lambda m: f"…/{m.group(1)}", value)
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    return value
