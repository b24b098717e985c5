"""`fp8`: FP8 (e4m3) weights per channel and dynamic per-token FP8 activations, no calibration.
vLLM runs it on Hopper/Ada GPUs; vLLM CPU cannot (see docs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slimserve.optimizers.registry import Optimization, register


@register
class FP8(Optimization):
    """FP8_DYNAMIC scheme of compressed-tensors."""

    method: Literal["fp8"] = "fp8"
    ignore: tuple[str, ...] = Field(("lm_head",), description="Modules left unquantized.")
    libraries = ("llmcompressor", "compressed-tensors", "transformers", "torch")

    @property
    def runs_on_vllm_cpu(self) -> bool:
        return False  # no FP8 kernels in vLLM's CPU build

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        from slimserve.optimizers.methods.quantize import oneshot_and_save

        oneshot_and_save(base, out, QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=list(self.ignore)))
        return {"scheme": "FP8_DYNAMIC"}
