"""Traffic split between the variants of one public model name, and the routing of one request
to a variant (pure functions and classes: tested without Ray)."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, replace
from typing import Callable

from slimserve.serve.handoff import VariantRoute


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

    def pick(self, user: str | None = None, exclude: frozenset[str] | set[str] = frozenset(),
             per_request: tuple[str, str] | None = None) -> VariantRoute | None:
        """The variant for this request; None when every weighted variant is excluded (down).
        Excluding a variant moves only its own users, to the others in proportion to weight.
        `per_request`: two variants (a rollout's baseline and candidate) that a sticky user is kept
        on together, as one route of their summed weight, and split between per request."""
        routes = [r for r in self._weighted if r.variant not in exclude] if exclude else self._weighted
        if not routes:
            return None
        if user is None:
            return self._random(routes)
        inside = [r for r in routes if per_request and r.variant in per_request]
        if not inside:
            return max(routes, key=lambda r: _rendezvous_score(user, r))
        # Keyed by the pair's first name: the pair's users stay put while its inner split moves.
        pair = replace(inside[0], variant=per_request[0], weight=sum(r.weight for r in inside))
        best = max([r for r in routes if r.variant not in per_request] + [pair], key=lambda r: _rendezvous_score(user, r))
        return self._random(inside) if best is pair else best

    def _random(self, routes: list[VariantRoute]) -> VariantRoute:
        return self._rng.choices(routes, weights=[r.weight for r in routes])[0]


def _rendezvous_score(user: str, route: VariantRoute) -> float:
    digest = hashlib.blake2b(f"{user}\0{route.variant}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / 2**64  # uniform in (0, 1)
    return -route.weight / math.log(u)


# --- routing: which variant answers a request (pure: no Ray, no HTTP) ---------------------------


@dataclass(frozen=True)
class Target:
    model: str  # public name
    variant: str
    model_id: str  # the variant's deployment model id
    shadow_model_id: str | None = None


class RouteError(Exception):
    """A request no variant can take: `status` is the HTTP status, `type` OpenAI's error type."""

    def __init__(self, status: int, message: str, type_: str):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


class Router:
    """Maps a request's `model` (a public name or a variant's own id), the forced-variant header
    and the user to the variant that answers it, skipping variants that are not available."""

    def __init__(self, splits: dict[str, list[VariantRoute]], *, allow_forced: bool = True,
                 sticky: dict[str, bool] | None = None, shadows: dict[str, str] | None = None,
                 per_request: dict[str, tuple[str, str]] | None = None):
        self.splits = {name: TrafficSplit(routes) for name, routes in splits.items()}
        self.by_model_id = {r.model_id: (name, r) for name, split in self.splits.items() for r in split.routes.values()}
        self.allow_forced = allow_forced
        self.sticky = sticky or {}
        self.per_request = per_request or {}  # a rollout's (baseline, candidate), split per request (rollout.sticky false)
        self.shadows = shadows or {}

    def set_weights(self, weights: dict[str, dict[str, float]]) -> None:
        """New weights (public name -> variant -> weight), all checked before any is applied;
        a variant the mapping leaves out keeps its weight. Requests routed from now on use them."""
        splits = dict(self.splits)
        for name, new in weights.items():
            if name not in self.splits:
                raise ValueError(f"weights: `{name}` is not a model this ingress serves (has: {', '.join(self.splits)})")
            routes = self.splits[name].routes
            unknown = sorted(set(new) - set(routes))
            if unknown:
                raise ValueError(f"weights.{name}: no variant {', '.join(unknown)} (has: {', '.join(routes)})")
            if any(w < 0 for w in new.values()):
                raise ValueError(f"weights.{name}: weights must be >= 0")
            updated = [replace(r, weight=float(new.get(v, r.weight))) for v, r in routes.items()]
            if sum(r.weight for r in updated) <= 0:
                raise ValueError(f"weights.{name}: all variant weights are 0: at least one must be positive")
            splits[name] = TrafficSplit(updated)
        self.splits = splits
        self.by_model_id = {r.model_id: (name, r) for name, split in splits.items() for r in split.routes.values()}

    def weights(self) -> dict[str, dict[str, float]]:
        return {name: {v: r.weight for v, r in split.routes.items()} for name, split in self.splits.items()}

    def public_name(self, model: str | None) -> str | None:
        """The public name a request is for: its `model`, or the only one when it names none."""
        return next(iter(self.splits)) if model is None and len(self.splits) == 1 else model

    def candidates(self, model: str | None, forced: str | None) -> list[str]:
        """Model ids that may answer (what availability must be known for)."""
        model = self.public_name(model)
        if model in self.by_model_id:
            return [model]
        split = self.splits.get(model)
        if split is None:
            return []
        if forced and self.allow_forced and forced in split.routes:
            return [split.routes[forced].model_id]
        return [r.model_id for r in split.routes.values()]

    def route(self, model: str | None, forced: str | None, user: str | None,
              available: Callable[[str], bool], why_not: Callable[[str], str]) -> Target:
        model = self.public_name(model)
        if model in self.by_model_id:
            name, route = self.by_model_id[model]
            if not self.allow_forced:
                # A variant's own id is a way of forcing it: the operator's choice holds here too.
                raise RouteError(400, f"`{model}` is a variant of `{name}`; this server routes by the public name "
                                 f"only (ingress.allow_forced_variant is false): send model `{name}`", "invalid_request_error")
            return self._target(name, route, available, why_not)
        split = self.splits.get(model)
        if split is None:
            known = ", ".join(self.splits)
            if model is None:
                raise RouteError(400, f"`model` is required; available: {known}", "invalid_request_error")
            raise RouteError(404, f"The model `{model}` does not exist; available: {known}", "NotFoundError")
        if forced and self.allow_forced:
            route = split.routes.get(forced)
            if route is None:
                raise RouteError(400, f"model `{model}` has no variant `{forced}` (has: {', '.join(split.routes)})",
                                 "invalid_request_error")
            return self._target(model, route, available, why_not, split)
        down = {r.variant for r in split.routes.values() if not available(r.model_id)}
        route = split.pick(user if self.sticky.get(model, True) else None, exclude=down,
                           per_request=self.per_request.get(model))
        if route is None:
            why = "; ".join(f"{r.variant}: {why_not(r.model_id)}" for r in split.routes.values() if r.weight > 0)
            raise RouteError(503, f"no variant of `{model}` is available ({why})", "ServiceUnavailable")
        return self._target(model, route, available, why_not, split)

    def _target(self, name: str, route: VariantRoute, available, why_not, split: TrafficSplit | None = None) -> Target:
        if not available(route.model_id):
            raise RouteError(503, f"variant `{route.variant}` of `{name}` is not available: {why_not(route.model_id)}",
                             "ServiceUnavailable")
        shadow = self.shadows.get(name) if split is not None else None
        shadow_id = split.routes[shadow].model_id if shadow and shadow != route.variant else None
        return Target(name, route.variant, route.model_id, shadow_id)
