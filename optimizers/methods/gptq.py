"""`gptq`: weight-only int4 (W4A16 by default) with GPTQ's error-compensating rounding
(Frantar et al., 2022), via llm-compressor, on calibration text."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slimserve.optimizers.calibration import Calibration
from slimserve.optimizers.methods.quantize import WNA16, WeightOnlyKernels
from slimserve.optimizers.registry import Optimization, register


@register
class GPTQ(WeightOnlyKernels, Optimization):
    """GPTQ weight quantization; the checkpoint runs in vLLM's W4A16 / WNA16 kernels."""

    method: Literal["gptq"] = "gptq"
    bits: Literal[4, 8] = Field(4, description="Weight bits.")
    group_size: int | None = Field(
        128, ge=16, description="Columns sharing a scale; lowered (and reported) when it does not divide the model's widths. None: one scale per output channel."
    )
    actorder: Literal["static", "group", "weight"] | None = Field(None, description="Quantize columns in order of activation size.")
    symmetric: bool = Field(True, description="Symmetric (no zero point) weights.")
    dampening_frac: float = Field(0.01, gt=0, description="Hessian dampening.")
    ignore: tuple[str, ...] = Field(("lm_head",), description="Modules left unquantized.")
    calibration: Calibration = Field(default_factory=lambda: Calibration(samples=128, seq_len=512))
    libraries = ("llmcompressor", "compressed-tensors", "transformers", "torch")
    runs_on = WNA16  # narrowed by bits and group_size (platforms)
    version = 1

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import GPTQModifier
        from slimserve.optimizers.methods.quantize import linear_in_features, oneshot_and_save, pick_group_size, weight_scheme

        group = pick_group_size(linear_in_features(base), self.group_size) if self.group_size else None
        recipe = GPTQModifier(
            config_groups={"group_0": weight_scheme(self.bits, group, self.symmetric, self.actorder)},
            ignore=list(self.ignore),
            dampening_frac=self.dampening_frac,
        )
        oneshot_and_save(base, out, recipe, self.calibration)
        return {"scheme": f"W{self.bits}A16", "group_size": group, "group_size_requested": self.group_size}

