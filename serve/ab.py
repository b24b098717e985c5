"""Traffic split between the variants of one public model name."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class VariantRoute:
    variant: str
    model_id: str  # the deployment's model id, e.g. smollm2--int8
    weight: float


class TrafficSplit:
    """Weighted random choice between variants (weight 0: reachable only when forced)."""

    def __init__(self, routes: list[VariantRoute], rng: random.Random | None = None):
        self.routes = {r.variant: r for r in routes}
        self._weighted = [r for r in routes if r.weight > 0]
        self._rng = rng or random.Random()

    def pick(self) -> VariantRoute:
        return self._rng.choices(self._weighted, weights=[r.weight for r in self._weighted])[0]
