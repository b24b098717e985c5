"""`sparse`: unstructured or N:M (2:4) weight pruning through llm-compressor.

Algorithms: `magnitude` (smallest |w| zeroed, no data), `wanda` (|w| x input-activation norm;
Sun et al., 2023) and `sparsegpt` (OBS-style reconstruction; Frantar & Alistarh, 2023), the last
two on calibration text.

What it buys today: **nothing in serving.** llm-compressor saves the pruned weights dense, vLLM
removed its 2:4 sparse kernels (PR #36799) and torch's 2:4 kernels ran slower than dense bf16 on
an H100 here. The checkpoint has the base's size and speed and only loses quality; the manifest
says so (`serving_effect`). It is here for research and as a base for future sparse kernels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from slimserve.optimizers.calibration import Calibration
from slimserve.optimizers.registry import Optimization, register

SERVING_EFFECT = (
    "none: weights are saved dense and vLLM runs them dense (no sparse kernels): "
    "same memory and speed as the base, quality lost only"
)


@register
class SparsePrune(Optimization):
    """Zero a fraction of every decoder Linear's weights (lm_head and embeddings kept)."""

    method: Literal["sparse"] = "sparse"
    algorithm: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        "wanda", description="How weights are chosen: magnitude (no data), wanda or sparsegpt (calibration text)."
    )
    sparsity: float = Field(0.5, gt=0, lt=1, description="Fraction of weights zeroed (for N:M it must equal 1 - N/M).")
    pattern: str = Field("2:4", description="`unstructured`, or `N:M` (N zeros in every M consecutive weights of a row).")
    ignore: tuple[str, ...] = Field(("lm_head",), description="Module names (or `re:` patterns) left dense.")
    calibration: Calibration = Field(default_factory=Calibration)
    libraries = ("llmcompressor", "compressed-tensors", "transformers", "torch")
    version = 1  # dense weights on disk: runs wherever the base does (runs_on's default)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return check_pattern(v)

    def model_post_init(self, _ctx: Any) -> None:
        check_pattern_sparsity(self.pattern, self.sparsity)

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        if self.algorithm == "magnitude":
            # llm-compressor's MagnitudePruningModifier is a training-time schedule (it does
            # nothing in oneshot, and has no N:M masks): the data-free rule is a few lines.
            self._magnitude(base, out)
        else:
            from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

            from slimserve.optimizers.methods.quantize import oneshot_and_save

            cls = WandaPruningModifier if self.algorithm == "wanda" else SparseGPTModifier
            structure = "0:0" if self.pattern == "unstructured" else self.pattern  # llm-compressor's spelling
            modifier = cls(sparsity=self.sparsity, mask_structure=structure, targets=["Linear"], ignore=list(self.ignore))
            oneshot_and_save(base, out, [modifier], self.calibration)
        return {"algorithm": self.algorithm, "pattern": self.pattern, **measure_sparsity(out), "serving_effect": SERVING_EFFECT}

    def _magnitude(self, base: Path, out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        with torch.no_grad():
            for name, mod in model.model.layers.named_modules():
                if not isinstance(mod, torch.nn.Linear):
                    continue
                w = mod.weight
                if self.pattern == "unstructured":
                    k = int(self.sparsity * w.numel())
                    cut = w.abs().float().flatten().kthvalue(k).values
                    w.masked_fill_(w.abs() <= cut, 0)
                else:
                    n, m = map(int, self.pattern.split(":"))
                    groups = w.view(-1, m)
                    drop = groups.abs().topk(n, dim=-1, largest=False).indices
                    groups.scatter_(-1, drop, 0)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)


def check_pattern(pattern: str) -> str:
    """`unstructured` or `N:M` with 0 < N < M (shared by `sparse` and `gradual_sparse`)."""
    if pattern != "unstructured":
        n, _, m = pattern.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise ValueError(f"pattern must be `unstructured` or `N:M` with 0 < N < M, not {pattern!r}")
    return pattern


def check_pattern_sparsity(pattern: str, sparsity: float) -> None:
    """An N:M pattern fixes the zero share at N/M."""
    if pattern != "unstructured":
        n, m = map(int, pattern.split(":"))
        if abs(sparsity - n / m) > 1e-6:
            raise ValueError(f"pattern {pattern} zeroes {n}/{m} of the weights: set sparsity {n / m:g}, not {sparsity:g}")


def measure_sparsity(checkpoint: Path) -> dict[str, Any]:
    """Zero fraction of the decoder Linear weights as saved, and whether every row keeps 2:4."""
    from safetensors import safe_open

    zeros = total = 0
    two_four = True
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if ".layers." in k and k.endswith("_proj.weight"):
                    w = st.get_tensor(k)
                    z = w == 0
                    zeros += int(z.sum())
                    total += w.numel()
                    if two_four and w.shape[-1] % 4 == 0:
                        two_four = bool((z.view(-1, 4).sum(-1) >= 2).all())
    if not total:
        return {"weight_sparsity": None}
    return {"weight_sparsity": round(zeros / total, 4), "is_2_4": two_four, "dense_on_disk": True}
