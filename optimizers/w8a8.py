"""`w8a8`: int8 weights (per-channel) and dynamic per-token int8 activations, via llm-compressor.

No calibration data is needed unless SmoothQuant is switched on. vLLM runs the resulting
compressed-tensors checkpoint with int8 GEMMs on GPU and on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .registry import Optimization, register


@register
class W8A8(Optimization):
    """INT8 weights and activations (compressed-tensors `W8A8` scheme)."""

    method: Literal["w8a8"] = "w8a8"
    ignore: tuple[str, ...] = Field(
        ("lm_head",), description="Module names (or `re:` patterns) left unquantized."
    )
    libraries = ("llmcompressor", "compressed-tensors", "transformers", "torch")

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        from .quantize import oneshot_and_save

        oneshot_and_save(base, out, QuantizationModifier(targets="Linear", scheme="W8A8", ignore=list(self.ignore)))
        return {"scheme": "W8A8"}
