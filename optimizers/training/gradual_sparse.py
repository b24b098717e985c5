"""`gradual_sparse`: 2:4 (N:M) or unstructured weight sparsity grown over training on the cubic
schedule of `gradual_prune` (Zhu & Gupta, 2017), with knowledge distillation from the dense
model, saved dense like `sparse`.

One-shot `sparse` zeroes its share of every decoder Linear at once and never trains; here the
model trains from the start and loses weights a few at a time. A weight's score is Wanda's: |w|
times the RMS of its input feature, gathered from the training batches. For N:M the candidates
of a group of M consecutive weights in a row are its N lowest-scoring ones; at each pruning step
the lowest-scoring candidates of the layer are zeroed until the layer's zero share reaches the
schedule's, so a group loses its weakest weight first and ends with exactly N zeros. Zeroed
weights stay zero: their score sorts first, and they are zeroed again after every optimizer step
(AdamW would move them). With `end` near 0 the whole share is cut after the first step and the
rest of training heals the one-shot result: the baseline at the same budget.

What it buys in serving is what `sparse` buys: nothing yet (dense on disk, no sparse kernels in
vLLM); the manifest says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from slimserve.optimizers.training.gradual_prune import GradualSchedule
from slimserve.optimizers.registry import register
from slimserve.optimizers.methods.sparse import SERVING_EFFECT, check_pattern, check_pattern_sparsity, measure_sparsity


@register
class GradualSparse(GradualSchedule):
    """Decoder Linear weights zeroed over training (2:4 or unstructured), KD from the dense model."""

    method: Literal["gradual_sparse"] = "gradual_sparse"
    version = 1
    pattern: str = Field("2:4", description="`unstructured`, or `N:M` (N zeros in every M consecutive weights of a row).")
    sparsity: float = Field(0.5, gt=0, lt=1, description="Fraction of weights zeroed at the end (for N:M: N/M).")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return check_pattern(v)

    @model_validator(mode="after")
    def _sparsity_fits_pattern(self) -> "GradualSparse":
        check_pattern_sparsity(self.pattern, self.sparsity)
        return self

    def sparsity_at(self, step: int) -> float:
        """Zero share after optimizer step `step` (1-based): sparsity · (1 - (1 - p)³), p the
        progress from `start` to `end`."""
        return self.sparsity * (1 - (1 - self.progress(step)) ** 3)

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        from slimserve.optimizers.quality import model_perplexity
        from slimserve.optimizers.methods.structured import saved_dtype

        tokenizer, student, masks, train = self.train_with_masks(base, out, lambda model: WeightMasks(model, self.pattern))
        masks.prune_to(self.sparsity)  # whatever the last step was, end at the final sparsity
        masks.remove_hooks()
        after = model_perplexity(student, tokenizer, self.eval) if self.eval.available() else None
        student.to(saved_dtype(base))
        student.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return {
            "pattern": self.pattern, **measure_sparsity(out), "schedule": masks.history,
            "perplexity_after": after and round(after, 3), "held_out": self.eval.model_dump(),
            "serving_effect": SERVING_EFFECT, "training": train,
        }


def lowest(score, k: int):
    """A bool tensor shaped like `score`: its k lowest entries (a threshold, not a sort: a pruning
    step scores every weight of the model; ties at the threshold may add a few)."""
    import torch

    flat = score.flatten()
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(score, dtype=torch.bool)
    return score <= flat.kthvalue(k).values


class WeightMasks:
    """Which weights of each decoder Linear are zeroed, and the input-feature statistics the
    scores need, gathered by forward pre-hooks while training."""

    def __init__(self, model, pattern: str):
        import torch

        self.pattern = pattern
        self.linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
        self.zeroed: dict[str, Any] = {}  # name -> bool tensor on the weight's device (none until the first prune)
        self.sum_sq = {n: torch.zeros(m.in_features) for n, m in self.linears.items()}  # summed over every process
        self.rows = 0
        self._local_sq: dict[str, Any] = {}
        self._local_rows = 0
        self.history: list[list[float]] = []  # [step, zero share]
        self._hooks = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            if module.training:
                x = args[0].detach().float()
                sq = x.pow(2).reshape(-1, x.shape[-1]).sum(0)
                self._local_sq[name] = self._local_sq[name] + sq if name in self._local_sq else sq
                if name == next(iter(self.linears)):
                    self._local_rows += x.numel() // x.shape[-1]
        return hook

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()

    def _sync(self) -> None:
        """Add every process's statistics since the last prune (data-parallel ranks saw other
        batches; their weights are equal, so equal statistics give equal masks)."""
        import torch
        import torch.distributed as dist

        names = list(self.linears)
        local = torch.cat([self._local_sq.get(n, torch.zeros(self.linears[n].in_features)).cpu() for n in names]
                          + [torch.tensor([float(self._local_rows)])])
        if dist.is_available() and dist.is_initialized():
            local = local.to("cuda") if dist.get_backend() == "nccl" else local
            dist.all_reduce(local)
            local = local.cpu()
        offset = 0
        for n in names:
            k = self.linears[n].in_features
            self.sum_sq[n] += local[offset:offset + k]
            offset += k
        self.rows += int(local[-1])
        self._local_sq.clear()
        self._local_rows = 0

    def prune_to(self, share: float) -> None:
        """Zero the lowest-scoring weights of every Linear until `share` of them are zero (never
        fewer than already are), keeping the N:M pattern's candidates per group."""
        import torch

        self._sync()
        with torch.no_grad():
            for n, mod in self.linears.items():
                w = mod.weight
                rms = (self.sum_sq[n] / max(self.rows, 1)).sqrt().to(w.device)
                score = w.detach().float().abs() * rms[None, :]
                if n in self.zeroed:
                    score[self.zeroed[n]] = -1.0  # already zero: first in line, so masks only grow
                k = int(round(share * w.numel()))
                if self.pattern == "unstructured":
                    zero = lowest(score, k)
                else:
                    nz, m = map(int, self.pattern.split(":"))
                    groups = score.view(-1, m)
                    cand_score, cand_idx = groups.topk(nz, dim=-1, largest=False)  # each group's N weakest
                    zero = torch.zeros_like(groups, dtype=torch.bool)
                    zero.scatter_(1, cand_idx, lowest(cand_score, k))
                self.zeroed[n] = zero.view_as(w)
                w.masked_fill_(self.zeroed[n], 0)

    def apply(self) -> None:
        """Zero again what is pruned (after an optimizer step moved it)."""
        import torch

        with torch.no_grad():
            for n, zero in self.zeroed.items():
                self.linears[n].weight.masked_fill_(zero, 0)

    def schedule(self, spec: GradualSparse):
        from transformers import TrainerCallback

        masks = self

        class CubicSparsity(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                masks.apply()
                step = state.global_step
                if spec.prunes_at(step):
                    share = round(spec.sparsity_at(step), 4)
                    if share > (masks.history[-1][1] if masks.history else 0.0):
                        masks.prune_to(share)
                        masks.history.append([step, share])

        return CubicSparsity()
