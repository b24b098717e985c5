"""`gradual_prune`: structured MLP pruning that grows over training steps on a cubic schedule
(Zhu & Gupta, 2017) with knowledge distillation from the unpruned model, ending, like
`structured`, in a smaller *dense* model.

One-shot `structured` (with `heal`) removes every channel at once and then trains; here the
model trains from the start and loses channels a few at a time. The share kept follows
keep(p) = keep_final + (1 - keep_final)(1 - p)^3, p the progress from `start` to `end` of
training (fast at first, while the model can still adapt, slow near the end); the rest of
training is on the final shape. The channels dropped are the least important by the mean
|activation| entering down_proj (Minitron's score, as in `structured`), measured on the
training batches themselves. A dropped channel is masked (its activation times 0) until the
end, when the masked channels are cut out (`structured.pruned_copy`): a plain Llama-family
checkpoint with a smaller intermediate_size that vLLM serves faster.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from slimserve.optimizers.calibration import Calibration
from slimserve.optimizers.training.kd_trainer import DistillArgs
from slimserve.optimizers.quality import HeldOut
from slimserve.optimizers.registry import Optimization, register


class GradualSchedule(Optimization):
    """What the methods that prune over training share (`gradual_prune`, `gradual_sparse`): when
    pruning happens within the training run, the run itself and the held-out text. Not a method."""

    start: float = Field(0.0, ge=0, lt=1, description="Fraction of training steps before pruning begins.")
    end: float = Field(
        0.7, gt=0, le=1, description="Fraction of training steps by which pruning reaches its final amount; the steps "
        "after it train the final shape."
    )
    every: int = Field(1, ge=1, description="Optimizer steps between two pruning steps.")
    train: DistillArgs = Field(
        DistillArgs(steps=100, lr=1e-4, alpha=0.5, temperature=2.0),
        description="The training run the pruning happens in (KD from the unpruned model).",
    )
    eval: HeldOut = Field(
        HeldOut(text="fortunes", windows=8, seq_len=256), description="Held-out text for the perplexity reported after pruning."
    )
    libraries = ("torch", "transformers", "accelerate")
    needs_optimizer_env = False  # torch + transformers only: runs in the serving environment

    @model_validator(mode="after")
    def _start_before_end(self) -> "GradualSchedule":
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be before end ({self.end})")
        return self

    def input_digest(self) -> str | None:
        """Content hash of the training text (it goes into the artifact's cache key)."""
        return Calibration(text=self.train.text).digest()

    def progress(self, step: int) -> float:
        """p of the cubic schedule after optimizer step `step` (1-based): 0 until `start`, 1 from `end`."""
        s0, s1 = self.start * self.train.steps, self.end * self.train.steps
        return min(1.0, max(0.0, (step - s0) / max(s1 - s0, 1e-9)))

    def train_with_masks(self, base: Path, out: Path, make_masks) -> tuple:
        """The run both methods share: the model, in fp32, distilled from itself as loaded (forward
        only, its saved dtype) while `make_masks(student)` prunes it on this schedule. Returns the
        tokenizer, the student (on the CPU), its masks and the training facts (no loss history)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from slimserve.optimizers.training.kd_trainer import distill
        from slimserve.optimizers.quality import load_for_inference

        tokenizer = AutoTokenizer.from_pretrained(base)
        teacher = load_for_inference(base)
        student = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        masks = make_masks(student)
        work = out.parent / (out.name + ".gradual-work")
        try:
            train = distill(teacher, student, tokenizer, self.train, work / "checkpoints", callbacks=[masks.schedule(self)])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        train.pop("history", None)
        return tokenizer, student.cpu(), masks, train

    def prunes_at(self, step: int) -> bool:
        """Whether a pruning step follows optimizer step `step`."""
        s0 = self.start * self.train.steps
        return step >= s0 and (round(step - s0) % self.every == 0 or step >= self.end * self.train.steps)


@register
class GradualPrune(GradualSchedule):
    """MLP channels pruned over training on a cubic schedule, with KD from the unpruned model."""

    method: Literal["gradual_prune"] = "gradual_prune"
    version = 1
    mlp_keep: float = Field(0.5, gt=0, lt=1, description="Fraction of MLP channels kept at the end.")
    mlp_multiple: int = Field(32, ge=1, description="Round the kept MLP width to a multiple of this.")

    def final_width(self, intermediate_size: int) -> int:
        m = self.mlp_multiple
        return min(intermediate_size, max(m, round(intermediate_size * self.mlp_keep / m) * m))

    def kept_at(self, step: int, intermediate_size: int) -> int:
        """MLP channels kept after optimizer step `step` (1-based) under the cubic schedule."""
        final = self.final_width(intermediate_size)
        return final + math.ceil((intermediate_size - final) * (1 - self.progress(step)) ** 3)

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        from slimserve.optimizers.quality import model_perplexity
        from slimserve.optimizers.methods.structured import saved_dtype

        tokenizer, student, masks, train = self.train_with_masks(base, out, ChannelMasks)
        masks.prune_to(self.final_width(masks.width))  # whatever the last step was, end at the final width
        measure = self.eval.available()
        masked = model_perplexity(student, tokenizer, self.eval) if measure else None
        pruned = masks.cut(student)
        after = model_perplexity(pruned, tokenizer, self.eval) if measure else None
        params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        report = {
            "intermediate_size": [masks.width, self.final_width(masks.width)],
            "parameters": [params(student), params(pruned)],
            "schedule": masks.history,
            "perplexity_after": after and round(after, 3),
            # Cutting the masked channels out must not change what the model computes.
            "perplexity_masked_before_cut": masked and round(masked, 3),
            "held_out": self.eval.model_dump(),
        }
        pruned.to(saved_dtype(base))
        pruned.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return {**report, "training": train}


class ChannelMasks:
    """A 0/1 mask per decoder layer over the MLP channels entering down_proj, applied by forward
    pre-hooks, and the importance of each channel accumulated from the activations the hooks see
    while training."""

    def __init__(self, model):
        import torch

        layers = model.model.layers
        self.width = model.config.intermediate_size
        self.masks = torch.ones(len(layers), self.width)
        self.scores = torch.zeros(len(layers), self.width)  # summed over every process of a torchrun job
        self._local = torch.zeros(len(layers), self.width)  # this process's, since the last prune
        self.history: list[list[int]] = []  # [step, channels kept per layer]
        self._on_device: dict = {}
        self._hooks = [layer.mlp.down_proj.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i: int):
        def hook(module, args):
            x = args[0]
            if module.training:
                if self._local.device != x.device:  # scores stay where the activations are: no sync per layer
                    self._local = self._local.to(x.device)
                self._local[i] += x.detach().float().abs().mean(dim=(0, 1))
            key = (i, x.device, x.dtype)
            if key not in self._on_device:
                self._on_device[key] = self.masks[i].to(x.device, x.dtype)
            return (x * self._on_device[key],)
        return hook

    def prune_to(self, kept: int) -> None:
        """Mask the least important live channels of every layer until `kept` remain."""
        import torch

        self._sync()
        changed = False
        for i in range(len(self.masks)):
            alive = self.masks[i] > 0
            drop = int(alive.sum()) - kept
            if drop > 0:
                score = self.scores[i].masked_fill(~alive, float("inf"))
                self.masks[i][torch.topk(score, drop, largest=False).indices] = 0
                changed = True
        if changed:
            self._on_device.clear()

    def _sync(self) -> None:
        """Add every process's scores since the last prune (data-parallel ranks saw different
        batches and must drop the same channels)."""
        import torch.distributed as dist

        local = self._local.clone()
        if dist.is_available() and dist.is_initialized():
            local = local.to("cuda") if dist.get_backend() == "nccl" else local.cpu()
            dist.all_reduce(local)
        self.scores += local.cpu()
        self._local.zero_()

    def schedule(self, spec: GradualPrune):
        from transformers import TrainerCallback

        masks = self

        class CubicSchedule(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                step = state.global_step
                if spec.prunes_at(step):
                    kept = spec.kept_at(step, masks.width)
                    if not masks.history or masks.history[-1][1] != kept:
                        masks.prune_to(kept)
                        masks.history.append([step, kept])

        return CubicSchedule()

    def cut(self, model):
        """The hooks off, and a smaller dense copy of `model` without the masked channels."""
        from slimserve.optimizers.methods.structured import pruned_copy

        for h in self._hooks:
            h.remove()
        n_layers, n_kv = len(self.masks), model.config.num_key_value_heads
        kept = [m.nonzero().flatten().tolist() for m in self.masks]
        return pruned_copy(model, [list(range(n_kv))] * n_layers, kept, list(range(n_layers)))
