"""Shared pieces of the llm-compressor methods: group-size choice, the quantization scheme,
and the oneshot-and-save step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimserve.optimizers.registry import RunsOn

# Weight-only int (W4A16 / W8A16, compressed-tensors WNA16): on CUDA vLLM's WNA16 kernels (Turing
# and up); vLLM CPU's take grouped 4-bit weights only (8-bit fails with "Failed to find a kernel").
WNA16 = RunsOn(min_capability=(7, 5), reason="vLLM's WNA16 kernels: Turing and up; on CPU grouped 4-bit weights only")
WNA16_GPU_ONLY = RunsOn(frozenset({"cuda"}), (7, 5), "vLLM's CPU build has no kernels for 8-bit or ungrouped weights: "
                        "its WNA16 kernels take 4-bit weights with a group size")


# Compressed-tensors W4A16 on CUDA: vLLM 0.26 picks its Machete kernel on Hopper, Marlin decodes
# faster (8B shape, H100: 1.89x bf16 at batch 1 against Machete's 1.62x, and 1.58x against 1.54x
# at batch 32; docs/BENCHMARKS.md, "GPU speed and cold start"). Where Machete does not exist
# (before Hopper) vLLM picks Marlin anyway, so turning Machete off costs nothing there.
W4A16_CUDA_ENV = {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}


def weight_only_engine_env(bits: int, device: str) -> dict[str, str]:
    """The engine environment of a weight-only checkpoint (rtn, gptq, qat, qlora) on `device`."""
    return dict(W4A16_CUDA_ENV) if bits == 4 and device == "cuda" else {}


class WeightOnlyKernels:
    """Mixin of the methods whose checkpoint is compressed-tensors weight-only (W4A16 / W8A16:
    rtn, gptq, qat, qlora): where it runs and the engine environment it runs fastest with follow
    from `bits` and `group_size`."""

    def platforms(self) -> RunsOn:
        return weight_only_runs_on(self.bits, self.group_size)

    def engine_env(self, device: str) -> dict[str, str]:
        return weight_only_engine_env(self.bits, device)


def weight_only_runs_on(bits: int, group_size: int | None) -> RunsOn:
    """Where a W`bits`A16 checkpoint (per channel when `group_size` is None) runs."""
    return WNA16 if bits == 4 and group_size else WNA16_GPU_ONLY


def linear_in_features(base: Path) -> set[int]:
    """Input widths of the checkpoint's Linear layers (lm_head aside), read from a weightless copy."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def pick_group_size(in_features: set[int], wanted: int) -> int:
    """`wanted` if it divides every Linear's input width, else the largest power of two below it
    that does (SmolLM2's 576 takes 64, not 128)."""
    g = wanted
    while g > 1 and any(f % g for f in in_features):
        g //= 2
    if g < 16:
        raise ValueError(f"no group size >= 16 divides the Linear input widths {sorted(in_features)}")
    return g


def weight_scheme(bits: int, group_size: int | None, symmetric: bool, actorder: str | None = None):
    """A weight-only int scheme (activations stay 16-bit): grouped when group_size is set,
    per output channel otherwise."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = dict(num_bits=bits, type="int", symmetric=symmetric)
    if group_size:
        args.update(strategy="group", group_size=group_size)
    else:
        args.update(strategy="channel")
    if actorder:
        args["actorder"] = actorder
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))


def oneshot_and_save(base: Path, out: Path, recipe, calibration=None) -> None:
    """Run llm-compressor's oneshot (data-free, or on calibration windows) and save a
    compressed-tensors checkpoint with its tokenizer."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    kwargs: dict[str, Any] = {}
    if calibration is not None:
        from datasets import Dataset

        windows = calibration.windows(tokenizer)
        kwargs = dict(
            dataset=Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": [[1] * windows.shape[1]] * len(windows)}),
            num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1],
        )
    # Loaded from its path: llm-compressor looks for the tokenizer beside the model. Data-free
    # schemes run where the weights are: on the GPU when one is free enough (seconds for an 8B
    # model, minutes on CPU); with calibration llm-compressor moves layers to the GPU itself.
    device = "cuda" if calibration is None and _gpu_holds(base) else None
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", **({"device_map": device} if device else {}))
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe, **kwargs)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


def _gpu_holds(base: Path, headroom: float = 1.5) -> bool:
    """A GPU is visible and has `headroom` x the checkpoint's bytes free."""
    import torch

    if not torch.cuda.is_available():
        return False
    free, _ = torch.cuda.mem_get_info()
    return free > headroom * sum(p.stat().st_size for p in base.glob("*.safetensors"))
