"""`w8a8`: int8 weights (per-channel) and dynamic per-token int8 activations, via llm-compressor.

No calibration data is needed unless SmoothQuant (Xiao et al., 2022) is switched on: it moves
activation outliers into the weights before quantizing, measured on calibration text. vLLM runs the resulting
compressed-tensors checkpoint with int8 GEMMs on GPU and on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slimserve.optimizers.calibration import Calibration
from slimserve.optimizers.registry import Optimization, RunsOn, register


@register
class W8A8(Optimization):
    """INT8 weights and activations (compressed-tensors `W8A8` scheme)."""

    method: Literal["w8a8"] = "w8a8"
    ignore: tuple[str, ...] = Field(
        ("lm_head",), description="Module names (or `re:` patterns) left unquantized."
    )
    smoothquant: float | None = Field(
        None, gt=0, le=1, description="SmoothQuant migration strength (e.g. 0.8); None: off, no calibration."
    )
    calibration: Calibration = Field(default_factory=Calibration)
    libraries = ("llmcompressor", "compressed-tensors", "transformers", "torch")
    # vLLM's int8 GEMMs: CPU, and CUDA from Turing (CompressedTensorsW8A8Int8.get_min_capability: 75).
    runs_on = RunsOn(min_capability=(7, 5), reason="vLLM's int8 W8A8 kernels: CPU, and CUDA GPUs from Turing")
    version = 1

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        from slimserve.optimizers.methods.quantize import oneshot_and_save

        recipe = [QuantizationModifier(targets="Linear", scheme="W8A8", ignore=list(self.ignore))]
        if self.smoothquant is None:
            oneshot_and_save(base, out, recipe)
        else:
            from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

            recipe.insert(0, SmoothQuantModifier(smoothing_strength=self.smoothquant))
            oneshot_and_save(base, out, recipe, self.calibration)
        return {"scheme": "W8A8", "smoothquant": self.smoothquant}
