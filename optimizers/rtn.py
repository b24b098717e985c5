"""`rtn`: weight-only round-to-nearest int8 or int4, no calibration (the baseline GPTQ must beat)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .registry import Optimization, register


@register
class RTN(Optimization):
    """Round-to-nearest weight quantization (min-max scales), data-free."""

    method: Literal["rtn"] = "rtn"
    bits: Literal[4, 8] = Field(8, description="Weight bits.")
    group_size: int | None = Field(None, ge=16, description="Columns sharing a scale; None: one scale per output channel (int4 defaults to 128).")
    symmetric: bool = Field(True, description="Symmetric (no zero point) weights.")
    ignore: tuple[str, ...] = Field(("lm_head",), description="Modules left unquantized.")
    libraries = ("llmcompressor", "compressed-tensors", "transformers", "torch")

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        from .quantize import linear_in_features, oneshot_and_save, pick_group_size, weight_scheme

        wanted = self.group_size or (128 if self.bits == 4 else None)
        group = pick_group_size(linear_in_features(base), wanted) if wanted else None
        recipe = QuantizationModifier(
            config_groups={"group_0": weight_scheme(self.bits, group, self.symmetric)}, ignore=list(self.ignore)
        )
        oneshot_and_save(base, out, recipe)
        return {"scheme": f"W{self.bits}A16", "group_size": group}
