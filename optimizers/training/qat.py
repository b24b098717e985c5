"""`qat`: quantization-aware training — fine-tune with fake-quantized weights, then write the same
compressed-tensors W4A16 / W8A16 checkpoint `rtn` writes.

Post-training quantization rounds weights that were trained in full precision; QAT lets them
learn around the rounding. torchao's QAT (`QATConfig` prepare/convert) swaps each Linear for a
FakeQuantizedLinear: the forward pass sees the weights quantized (symmetric, per group, the
scheme `rtn` uses), gradients pass straight through the rounding. The loss is knowledge
distillation from the unquantized model (kd_trainer.py, alpha 1 by default: no labels needed).
At the end torchao's convert step removes the fake quantizers and llm-compressor quantizes the
trained weights with the same scheme, so what vLLM serves is what was trained; the manifest
says how closely the exported weights match the trained fake-quantized ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slimserve.optimizers.calibration import Calibration
from slimserve.optimizers.training.kd_trainer import DistillArgs
from slimserve.optimizers.quality import HeldOut
from slimserve.optimizers.methods.quantize import WNA16, WeightOnlyKernels
from slimserve.optimizers.registry import Optimization, register


class TrainedQuantization(WeightOnlyKernels, Optimization):
    """What the methods that train through the quantizer share (`qat`, `qlora`): the served
    scheme, the training run and the held-out text of the manifest. Not a method itself."""

    bits: Literal[4, 8] = Field(4, description="Weight bits of the served checkpoint (and of the quantizer training sees).")
    group_size: int = Field(
        128, ge=16, description="Columns sharing a scale (lowered when it does not divide the model's widths, as in `rtn`)."
    )
    ignore: tuple[str, ...] = Field(("lm_head",), description="Modules left unquantized (and not fake-quantized).")
    train: DistillArgs = Field(
        DistillArgs(steps=100, lr=1e-5, alpha=1.0, temperature=1.0),
        description="The fine-tuning run: steps, text, learning rate; `alpha` 1 = KD from the unquantized model only.",
    )
    eval: HeldOut = Field(
        HeldOut(text="fortunes", windows=8, seq_len=256),
        description="Held-out text on which the fake-quantized model's perplexity is reported before and after training "
        "(before = what round-to-nearest gives).",
    )
    libraries = ("torchao", "llmcompressor", "compressed-tensors", "transformers", "torch")
    runs_on = WNA16  # the checkpoint `rtn` writes; narrowed by bits (platforms)

    def input_digest(self) -> str | None:
        """Content hash of the training text (it goes into the artifact's cache key)."""
        return Calibration(text=self.train.text).digest()


@register
class QAT(TrainedQuantization):
    """Quantization-aware training (torchao fake quantization + KD), exported as W4A16 / W8A16."""

    method: Literal["qat"] = "qat"
    version = 1

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        return train_through_quantizer(base, out, self.bits, self.group_size, self.ignore, self.train, self.eval)


def train_through_quantizer(base: Path, out: Path, bits: int, group_size: int, ignore: tuple[str, ...],
                            train_args: DistillArgs, held_out: HeldOut, adapt=None, merge=None) -> dict[str, Any]:
    """Fake-quantize an fp32 copy of `base`, train it by KD from `base` through the quantizer,
    and write it quantized as compressed-tensors W`bits`A16 into `out` (shared by `qat` and
    `qlora`). `adapt(model)` changes what trains after the fake quantizers are in (qlora: frozen
    weights plus adapters) and returns facts for the manifest; `merge(model)` folds it back before
    the export. The manifest: perplexity through the quantizer before training (= round-to-nearest)
    and after, and how closely the export matches what training saw."""
    import torch
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimserve.optimizers.training.kd_trainer import distill, save_student
    from slimserve.optimizers.quality import load_for_inference, model_perplexity
    from slimserve.optimizers.methods.quantize import linear_in_features, oneshot_and_save, pick_group_size, weight_scheme
    from slimserve.optimizers.methods.structured import saved_dtype

    group = pick_group_size(linear_in_features(base), group_size)
    tokenizer = AutoTokenizer.from_pretrained(base)
    teacher = load_for_inference(base)  # forward only: in its saved dtype
    student = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # trains in fp32
    fake_quantize(student, bits, group, ignore)
    facts = adapt(student) if adapt else {}
    measure = held_out.available()
    before = model_perplexity(student, tokenizer, held_out) if measure else None
    work = out.parent / (out.name + ".qat-work")
    try:
        train = distill(teacher, student, tokenizer, train_args, work / "checkpoints")
        student.cpu()
        after = model_perplexity(student, tokenizer, held_out) if measure else None
        if merge:
            merge(student)
        trained_fake = {n: m.weight_fake_quantizer(m.weight).detach().clone() for n, m in _fake_linears(student)}
        remove_fake_quantizers(student)
        save_student(student, tokenizer, work / "trained", saved_dtype(base))
        del teacher, student
        recipe = QuantizationModifier(config_groups={"group_0": weight_scheme(bits, group, True)}, ignore=list(ignore))
        oneshot_and_save(work / "trained", out, recipe)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    train.pop("history", None)
    return {
        "scheme": f"W{bits}A16", "group_size": group, **facts,
        "perplexity_fake_quant_before": before and round(before, 3),
        "perplexity_fake_quant_after": after and round(after, 3),
        "held_out": held_out.model_dump(),
        "export_matches_training": export_agreement(out, trained_fake),
        "training": train,
    }


def fake_quantize(model, bits: int, group_size: int, ignore: tuple[str, ...]) -> None:
    """Swap the model's Linears (but `ignore`d ones) for torchao's FakeQuantizedLinear: symmetric
    int`bits` weights, one scale per `group_size` columns, activations untouched."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    dtype = {4: torch.int4, 8: torch.int8}[bits]
    config = QATConfig(weight_config=IntxFakeQuantizeConfig(dtype, group_size=group_size, is_symmetric=True), step="prepare")
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not _ignored(fqn, ignore))


def remove_fake_quantizers(model) -> None:
    """torchao's convert step without a target config: plain Linears with the trained weights."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"))


def _ignored(fqn: str, ignore: tuple[str, ...]) -> bool:
    return any(fqn == name or fqn.endswith("." + name) for name in ignore)


def _fake_linears(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "weight_fake_quantizer")]


def export_agreement(checkpoint: Path, trained: dict[str, Any]) -> dict[str, float]:
    """How closely the exported (dequantized) weights match the fake-quantized weights training
    saw: the share of equal weights and the largest difference relative to the layer's largest
    weight. Both quantizers are symmetric per-group with scale max|w| / (2^(bits-1) - 0.5), so
    differences come only from the dtype round trip and ties."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto", quantization_config=CompressedTensorsConfig(dequantize=True))
    params = dict(model.named_parameters())
    equal = total = 0
    worst = 0.0
    for name, w_fake in trained.items():
        w = params.get(name + ".weight")
        if w is None:
            continue
        a, b = w.detach().float(), w_fake.float().to(w.device)
        close = torch.isclose(a, b, rtol=1e-2, atol=1e-3 * b.abs().max().item())
        equal += int(close.sum())
        total += close.numel()
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
    return {"equal_share": round(equal / max(total, 1), 4), "max_relative_difference": round(worst, 4), "layers": len(trained)}
