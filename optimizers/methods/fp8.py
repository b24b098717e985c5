"""`fp8`: FP8 (e4m3) weights per channel and dynamic per-token FP8 activations, no calibration.
vLLM runs it on Hopper/Ada GPUs; vLLM CPU cannot (see docs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slimserve.optimizers.registry import Optimization, RunsOn, register


@register
class FP8(Optimization):
    """FP8_DYNAMIC scheme of compressed-tensors."""

    method: Literal["fp8"] = "fp8"
    ignore: tuple[str, ...] = Field(("lm_head",), description="Modules left unquantized.")
    libraries = ("llmcompressor", "compressed-tensors", "transformers", "torch")
    # vLLM's FP8 W8A8 kernels (compressed-tensors CompressedTensorsW8A8Fp8.get_min_capability: 89).
    # Below 8.9 vLLM would serve it as weight-only FP8 (Marlin), not what this variant promises.
    runs_on = RunsOn(frozenset({"cuda"}), (8, 9), "vLLM's FP8 W8A8 kernels need Ada, Hopper or later; its CPU build has no kernels for FP8")
    version = 1

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        from slimserve.optimizers.methods.quantize import oneshot_and_save

        oneshot_and_save(base, out, QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=list(self.ignore)))
        return {"scheme": "FP8_DYNAMIC"}
