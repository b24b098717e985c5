"""`qlora`: quantized fine-tuning — low-rank adapters on a frozen base, trained through the
quantizer the served checkpoint uses, then merged and written as the same compressed-tensors
W4A16 / W8A16 checkpoint `rtn` writes.

Every decoder Linear (but `ignore`d ones) gets a LoRA pair (A: rank x in, B: out x rank, B = 0 at
the start) as a parametrization of its weight: the forward pass computes
fake_quant(W0 + (lora_alpha / rank) B A) with torchao's fake quantizer (the one `qat` uses:
symmetric, one scale per group), gradients pass straight through the rounding to A and B, and W0
stays frozen. At step 0 the model is exactly `rtn`'s; the loss is distillation from the
unquantized model (kd_trainer.py, alpha 1: no labels). Only the adapters and their optimizer
state train: memory as LoRA, not as full fine-tuning (`qat` keeps AdamW state for every weight).

Why through the quantizer, and not peft's LoRA beside a quantized layer: merged back, peft's
adapters are requantized on a grid they never saw (a changed group maximum moves every weight of
the group), and on SmolLM2 the served checkpoint came out *worse* than the quantized base the
adapters started from (perplexity 34.7 -> 30.7 with the adapters, 38.6 served; docs/BENCHMARKS.md).
Here the merge is W0 + (lora_alpha / rank) B A and the export quantizes exactly what training
fake-quantized, so what vLLM serves is what was trained (`export_matches_training`).

Why merged, and not base + adapter through vLLM's LoRA support: Ray Serve LLM loads adapters only
from object stores (`dynamic_lora_loading_path` must be s3://, gs://, abfss:// or azure://; the
artifact cache is a local folder), a request must name `model:adapter`, and LoRA kernels cost
decode time on every request; a merged checkpoint is one artifact served by the Marlin kernels.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slimserve.optimizers.training.kd_trainer import DistillArgs
from slimserve.optimizers.training.qat import TrainedQuantization, _fake_linears, train_through_quantizer
from slimserve.optimizers.registry import register

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@register
class QLoRA(TrainedQuantization):
    """Low-rank adapters trained through the 4/8-bit quantizer (KD), merged and exported as W4A16 / W8A16."""

    method: Literal["qlora"] = "qlora"
    version = 1
    rank: int = Field(16, ge=1, le=512, description="LoRA rank r of every adapter.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator: the update is (lora_alpha / rank) x B A.")
    target_modules: tuple[str, ...] = Field(
        LINEARS, min_length=1, description="Names of the Linear layers that get an adapter (the others are quantized as they are)."
    )
    train: DistillArgs = Field(
        DistillArgs(steps=100, lr=1e-3, alpha=1.0, temperature=1.0),
        description="The fine-tuning run: steps, text, learning rate (only the adapters train: LoRA's rates); "
        "`alpha` 1 = KD from the unquantized model only.",
    )

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        def adapt(model) -> dict[str, Any]:
            model.requires_grad_(False)  # W0 frozen: only the adapters added next train
            adapted = add_adapters(model, self.target_modules, self.rank, self.lora_alpha, self.train.seed)
            if not adapted:
                raise ValueError(f"qlora: no quantized Linear named {list(self.target_modules)} in the model: nothing to adapt")
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            return {"rank": self.rank, "lora_alpha": self.lora_alpha, "adapted_linears": adapted, "adapter_parameters": trainable}

        return train_through_quantizer(base, out, self.bits, self.group_size, self.ignore, self.train, self.eval,
                                       adapt=adapt, merge=merge_adapters)


def add_adapters(model, names: tuple[str, ...], rank: int, lora_alpha: float, seed: int) -> int:
    """A LoRA pair on the weight of every fake-quantized Linear whose name ends in one of `names`
    (torch parametrization: the fake quantizer then sees W0 + scale B A). Returns how many."""
    import torch
    from torch.nn.utils import parametrize

    generator = torch.Generator().manual_seed(seed)
    count = 0
    for fqn, layer in _fake_linears(model):
        if fqn.rsplit(".", 1)[-1] not in names:
            continue
        out_features, in_features = layer.weight.shape
        parametrize.register_parametrization(
            layer, "weight", _low_rank_update()(out_features, in_features, rank, lora_alpha / rank, generator))
        count += 1
    return count


def merge_adapters(model) -> None:
    """Fold every adapter into its weight (W0 + scale B A) and drop the parametrizations."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


@functools.cache
def _low_rank_update():
    """The parametrization class (built on first use: this module imports torch only in `run`)."""
    import torch

    class LowRankUpdate(torch.nn.Module):
        """W -> W + scale x B A; B is zero at the start and A Kaiming-uniform (LoRA's initialisation)."""

        def __init__(self, out_features: int, in_features: int, rank: int, scale: float, generator):
            super().__init__()
            bound = 1 / math.sqrt(in_features)  # Kaiming-uniform with a = sqrt(5), as nn.Linear and peft
            self.lora_A = torch.nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator))
            self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank))
            self.scale = scale

        def forward(self, weight):
            return weight + self.scale * (self.lora_B @ self.lora_A)

    return LowRankUpdate
