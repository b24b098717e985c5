"""`qlora`: quantized fine-tuning — low-rank adapters (peft LoRA) trained on a frozen base that is
already on the 4-bit (or 8-bit) grid, then merged and written as the same compressed-tensors
W4A16 / W8A16 checkpoint `rtn` writes.

The base is the model's weights quantized and dequantized with the scheme the served checkpoint
uses (symmetric, one scale per group: the quantizer of `qat`), frozen; the adapters learn to
correct what the rounding lost, by knowledge distillation from the unquantized model
(kd_trainer.py, alpha 1: no labels). Unlike QLoRA's NF4 the base is held dequantized during
training (no 4-bit storage: memory as LoRA on the full model), so the adapters see exactly the
grid vLLM will serve.

Served as merge-and-requantize, not as base + adapter: Ray Serve LLM loads adapters only from
object stores (`dynamic_lora_loading_path` must be s3://, gs://, abfss:// or azure://), a request
must name the adapter as `model:adapter`, and vLLM's LoRA kernels cost decode time; a merged
checkpoint is one artifact in the cache, served by the same Marlin kernels as `gptq`/`rtn`. The
price is that requantizing the merged weights rounds away every adapter change smaller than half
a quantization step: the manifest reports the held-out perplexity of the base, of base +
adapters (what base + adapter serving would give) and of the served checkpoint, so the share of
the adapters' gain that survived is measured, not assumed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .calibration import Calibration
from .kd_trainer import DistillArgs
from .quality import HeldOut
from .registry import Optimization, register

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@register
class QLoRA(Optimization):
    """LoRA adapters trained on the frozen quantized base (KD), merged and requantized to W4A16 / W8A16."""

    method: Literal["qlora"] = "qlora"
    bits: Literal[4, 8] = Field(4, description="Weight bits of the base and of the served checkpoint.")
    group_size: int = Field(
        128, ge=16, description="Columns sharing a scale (lowered when it does not divide the model's widths, as in `rtn`)."
    )
    rank: int = Field(16, ge=1, le=512, description="LoRA rank r of every adapter.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator: the update is (lora_alpha / rank) x B A.")
    target_modules: tuple[str, ...] = Field(
        LINEARS, min_length=1, description="Names of the Linear layers that get an adapter (peft's `target_modules`)."
    )
    ignore: tuple[str, ...] = Field(("lm_head",), description="Modules left unquantized (never adapted).")
    train: DistillArgs = Field(
        DistillArgs(steps=100, lr=2e-4, alpha=1.0, temperature=1.0),
        description="The fine-tuning run: steps, text, learning rate; `alpha` 1 = KD from the unquantized model only.",
    )
    eval: HeldOut = Field(
        HeldOut(text="fortunes", windows=8, seq_len=256),
        description="Held-out text for the manifest's perplexities: quantized base, base + adapters, served checkpoint.",
    )
    libraries = ("peft", "torchao", "llmcompressor", "compressed-tensors", "transformers", "torch")

    def input_digest(self) -> str | None:
        """Content hash of the training text (it goes into the artifact's cache key)."""
        return Calibration(text=self.train.text).digest()

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        import torch
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils.quantization_config import CompressedTensorsConfig

        from .kd_trainer import distill, save_student
        from .quality import load_for_inference, model_perplexity
        from .quantize import linear_in_features, oneshot_and_save, pick_group_size, weight_scheme
        from .structured import saved_dtype

        group = pick_group_size(linear_in_features(base), self.group_size)
        tokenizer = AutoTokenizer.from_pretrained(base)
        teacher = load_for_inference(base)  # forward only: in its saved dtype
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        snapped = snap_to_grid(model, self.bits, group, self.ignore)
        measure = self.eval.available()
        ppl = (lambda m: round(model_perplexity(m, tokenizer, self.eval), 3)) if measure else (lambda m: None)
        before = ppl(model)
        model.requires_grad_(False)
        lora = LoraConfig(r=self.rank, lora_alpha=self.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if trainable == 0:
            raise ValueError(f"qlora: no Linear named {list(self.target_modules)} in the model: nothing to adapt")
        work = out.parent / (out.name + ".qlora-work")
        try:
            train = distill(teacher, model, tokenizer, self.train, work / "checkpoints")
            model.cpu()
            with_adapters = ppl(model)
            merged = model.merge_and_unload()
            save_student(merged, tokenizer, work / "merged", saved_dtype(base))
            del teacher, model, merged
            recipe = QuantizationModifier(
                config_groups={"group_0": weight_scheme(self.bits, group, True)}, ignore=list(self.ignore)
            )
            oneshot_and_save(work / "merged", out, recipe)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        served = None
        if measure:
            served_model = AutoModelForCausalLM.from_pretrained(
                out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
            served = ppl(served_model)
            del served_model
        train.pop("history", None)
        return {
            "scheme": f"W{self.bits}A16", "group_size": group, "rank": self.rank, "lora_alpha": self.lora_alpha,
            "adapter_parameters": trainable, "linears_on_grid": snapped,
            "perplexity_quantized_base": before, "perplexity_with_adapters": with_adapters,
            "perplexity_served": served, "adapter_gain_kept": kept_share(before, with_adapters, served),
            "held_out": self.eval.model_dump(), "training": train,
        }


def snap_to_grid(model, bits: int, group_size: int, ignore: tuple[str, ...]) -> int:
    """Replace every Linear's weights (but `ignore`d ones) by their quantized-dequantized values:
    torchao's fake quantizer, the one `qat` trains with (symmetric, per group). Returns how many."""
    import torch

    from .qat import _fake_linears, fake_quantize, remove_fake_quantizers

    fake_quantize(model, bits, group_size, ignore)
    layers = _fake_linears(model)
    with torch.no_grad():
        for _, m in layers:
            m.weight.copy_(m.weight_fake_quantizer(m.weight))
    remove_fake_quantizers(model)
    return len(layers)


def kept_share(before: float | None, with_adapters: float | None, served: float | None) -> float | None:
    """Share of the adapters' perplexity gain that the served (requantized) checkpoint keeps:
    1 = all of it, 0 = none (served = the quantized base), None when unmeasured or no gain."""
    if None in (before, with_adapters, served) or before - with_adapters <= 0:
        return None
    return round((before - served) / (before - with_adapters), 3)
