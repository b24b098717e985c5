"""Where engines go on GPU hosts: each engine's share of a GPU, and whether all engines fit the
cluster's GPUs. Pure functions over typed inputs (no Ray), used by `build_app` and
`slimserve run`, tested without a cluster."""

from __future__ import annotations

import math
from dataclasses import dataclass

# The memory share of a whole GPU: a little under vLLM's own default gpu_memory_utilization (0.92
# in vLLM 0.26; 0.9 in earlier releases), and the headroom one engine leaves is kept when engines
# share one (two engines at 0.5 take 0.45 each).
MEMORY_PER_SHARE = 0.9
# Below this an engine's memory share holds little more than a CUDA context.
MIN_SHARE = 0.05


@dataclass(frozen=True)
class EngineDemand:
    """One engine replica: `ranks` tensor-parallel ranks, each wanting `share` of a GPU
    (None: auto)."""

    who: str  # e.g. "smollm2/int8" (replica 2 of 3 gets a suffix)
    ranks: int
    share: float | None


def resolve_shares(engines: list[EngineDemand], gpus: list[int]) -> dict[str, float]:
    """Each engine's GPU share. Explicit shares are kept; tensor-parallel engines take whole
    GPUs; auto engines get a whole GPU each when the GPUs left over hold one per engine, else
    split them evenly (k engines per GPU: 1/k each). With no GPU in the cluster yet (an
    autoscaler will add them) auto means a whole GPU, Ray Serve LLM's own default."""
    shares = {e.who: (1.0 if e.ranks > 1 else e.share) for e in engines if e.ranks > 1 or e.share is not None}
    auto = [e for e in engines if e.who not in shares]
    if not auto:
        return shares
    taken = sum(shares[e.who] * e.ranks for e in engines if e.who in shares)
    free = sum(gpus) - taken
    if not gpus or sum(gpus) == 0 or len(auto) <= math.floor(free + 1e-9):
        share = 1.0
    elif free >= 1:
        per_gpu = math.ceil(len(auto) / math.floor(free + 1e-9))
        share = math.floor(100 / per_gpu) / 100
    else:
        share = math.floor(100 * max(free, 0) / len(auto)) / 100
    if share < MIN_SHARE:
        raise ValueError(
            f"{len(auto)} engine(s) without gpu_share get {share:g} of a GPU each ({free:g} GPU(s) left after the "
            f"engines with an explicit gpu_share): too little to hold a model. Set gpu_share, or add GPUs"
        )
    return {**shares, **{e.who: share for e in auto}}


def memory_utilization(share: float) -> float:
    """vLLM's gpu_memory_utilization for an engine holding `share` of a GPU."""
    return round(MEMORY_PER_SHARE * share, 4)


def unplaceable(engines: list[EngineDemand], shares: dict[str, float], gpus: list[int]) -> list[str]:
    """Engines that cannot all be placed on the nodes' GPUs at once (`gpus`: GPUs per node), each
    with why; empty when they fit. Mirrors Ray's placement: a tensor-parallel group takes whole
    GPUs of one node (STRICT_PACK), fractional ranks fill GPUs first-fit, largest first."""
    nodes = [[1.0] * n for n in gpus]
    problems = []
    order = sorted(engines, key=lambda e: (-e.ranks, -shares[e.who]))
    for e in order:
        share = shares[e.who]
        if e.ranks > 1 or share >= 1:
            node = next((n for n in nodes if sum(free >= 1 - 1e-9 for free in n) >= e.ranks), None)
            if node is not None:
                whole = [i for i, free in enumerate(node) if free >= 1 - 1e-9][: e.ranks]
                for i in whole:
                    node[i] = 0.0
                continue
            need = f"{e.ranks} whole GPU(s) on one node"
        else:
            slot = next(((n, i) for n in nodes for i, free in enumerate(n) if free >= share - 1e-9), None)
            if slot is not None:
                slot[0][slot[1]] -= share
                continue
            need = f"{share:g} of a GPU"
        have = ", ".join(f"{n} GPU(s)" for n in gpus) or "no GPU"
        problems.append(f"{e.who}: needs {need}; the cluster's nodes have {have}, taken by the engines before it")
    return problems
