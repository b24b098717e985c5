"""`rtn`: weight-only round-to-nearest int8 or int4, no calibration (the baseline GPTQ must beat)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from slimserve.optimizers.methods.quantize import WNA16, WeightOnlyKernels
from slimserve.optimizers.registry import Optimization, register


@register
class RTN(WeightOnlyKernels, Optimization):
    """Round-to-nearest weight quantization (min-max scales), data-free."""

    method: Literal["rtn"] = "rtn"
    bits: Literal[4, 8] = Field(8, description="Weight bits.")
    group_size: int | None = Field(
        None, ge=16, description="Columns sharing a scale (lowered when it does not divide the model's widths); None: one scale per output channel. Left out: 128 for int4, per channel for int8."
    )
    symmetric: bool = Field(True, description="Symmetric (no zero point) weights.")
    ignore: tuple[str, ...] = Field(("lm_head",), description="Modules left unquantized.")
    libraries = ("llmcompressor", "compressed-tensors", "transformers", "torch")
    runs_on = WNA16  # narrowed by bits and group_size (platforms)
    version = 1

    @model_validator(mode="before")
    @classmethod
    def _int4_groups_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("bits") == 4 and "group_size" not in data:
            data = {**data, "group_size": 128}
        return data

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        from slimserve.optimizers.methods.quantize import linear_in_features, oneshot_and_save, pick_group_size, weight_scheme

        group = pick_group_size(linear_in_features(base), self.group_size) if self.group_size else None
        recipe = QuantizationModifier(
            config_groups={"group_0": weight_scheme(self.bits, group, self.symmetric)}, ignore=list(self.ignore)
        )
        oneshot_and_save(base, out, recipe)
        return {"scheme": f"W{self.bits}A16", "group_size": group}
