"""Traffic split between the variants of one public model name."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class VariantRoute:
    variant: str
    model_id: str  # the deployment's model id, e.g. smollm2--int8
    weight: float


class TrafficSplit:
    """Chooses a variant by weight: at random per request, or sticky per user.

    Sticky choice is weighted rendezvous hashing (Schindelhauer & Schomaker, 2005): every
    variant scores `-weight / ln(u)` with `u` a uniform hash of (user, variant), the highest
    wins. A user's variant depends only on the user and the weights, so every ingress replica
    agrees without shared state, and changing one weight by a fraction moves only about that
    fraction of users (users move only to or from the changed variant). Weight 0: never chosen,
    reachable only when forced."""

    def __init__(self, routes: list[VariantRoute], rng: random.Random | None = None):
        self.routes = {r.variant: r for r in routes}
        self._weighted = [r for r in routes if r.weight > 0]
        self._rng = rng or random.Random()

    def pick(self, user: str | None = None, exclude: frozenset[str] | set[str] = frozenset()) -> VariantRoute | None:
        """The variant for this request; None when every weighted variant is excluded (down).
        Excluding a variant moves only its own users, to the others in proportion to weight."""
        routes = [r for r in self._weighted if r.variant not in exclude] if exclude else self._weighted
        if not routes:
            return None
        if user is None:
            return self._rng.choices(routes, weights=[r.weight for r in routes])[0]
        return max(routes, key=lambda r: _rendezvous_score(user, r))


def _rendezvous_score(user: str, route: VariantRoute) -> float:
    digest = hashlib.blake2b(f"{user}\0{route.variant}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / 2**64  # uniform in (0, 1)
    return -route.weight / math.log(u)
