"""`none`: serve the base checkpoint as it is (the baseline of an A/B test)."""

from typing import Literal

from slimserve.optimizers.registry import Optimization, register


@register
class NoOptimization(Optimization):
    """Serve the base model unchanged (already-quantized checkpoints are served this way too)."""

    method: Literal["none"] = "none"
    needs_optimizer_env = False
    version = 1  # builds nothing (no cache key); set as every method's is

    @property
    def produces_artifact(self) -> bool:
        return False
