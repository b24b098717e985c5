"""`structured`: width pruning that gives a smaller *dense* model any engine runs faster.

Removes whole attention KV groups (a KV head and the query heads that share it, so GQA stays
valid) and MLP channels, the same number in every layer, ranked by their activations on
calibration text as in Minitron (Muralidharan et al., 2024): a head's importance is the mean
L2 norm of its slice of the attention output, a channel's the mean |activation| entering
down_proj. The result is a plain Llama-family checkpoint with a smaller config.

Depth pruning (`layers_keep`) drops whole decoder layers, those that change their input least
on calibration text (block influence, 1 - cos(input, output); Men et al., 2024, ShortGPT).

`heal` then distills the unpruned model into the pruned one for a few steps (kd_trainer.py)
and reports held-out perplexity before and after healing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slimserve.optimizers.calibration import Calibration
from slimserve.optimizers.training.kd_trainer import DistillArgs, distill
from slimserve.optimizers.quality import HeldOut, model_perplexity
from slimserve.optimizers.registry import Optimization, register


@register
class StructuredPrune(Optimization):
    """Keep the most important attention KV groups and MLP channels."""

    method: Literal["structured"] = "structured"
    heads_keep: float = Field(1.0, gt=0, le=1, description="Fraction of KV groups (with their query heads) kept.")
    mlp_keep: float = Field(1.0, gt=0, le=1, description="Fraction of MLP channels kept.")
    mlp_multiple: int = Field(32, ge=1, description="Round the kept MLP width to a multiple of this.")
    layers_keep: float = Field(1.0, gt=0, le=1, description="Fraction of decoder layers kept (the least influential are dropped).")
    calibration: Calibration = Field(default_factory=Calibration)
    heal: DistillArgs | None = Field(None, description="Distill from the unpruned model after pruning (None: no healing).")
    heal_eval: HeldOut = Field(
        HeldOut(text="fortunes", windows=8, seq_len=256),
        description="Held-out text on which perplexity before and after healing is reported.",
    )
    libraries = ("torch", "transformers", "accelerate")
    needs_optimizer_env = False  # torch + transformers only: runs in the serving environment
    version = 1

    def input_digest(self) -> str | None:
        """Content hash of the healing text (it goes into the artifact's cache key)."""
        return Calibration(text=self.heal.text).digest() if self.heal else None

    def run(self, base: Path, out: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.eval()
        cfg = model.config
        n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        group = n_heads // n_kv
        inter = cfg.intermediate_size
        kv_keep = max(1, round(n_kv * self.heads_keep))
        inter_keep = min(inter, max(self.mlp_multiple, round(inter * self.mlp_keep / self.mlp_multiple) * self.mlp_multiple))

        layers = model.model.layers
        n_layers = len(layers)
        layers_kept = max(1, round(n_layers * self.layers_keep))
        influence = torch.zeros(n_layers)
        head_score = torch.zeros(len(layers), n_heads)
        chan_score = torch.zeros(len(layers), inter)
        hooks = []
        for i, layer in enumerate(layers):
            def attn_hook(mod, args, i=i):
                x = args[0].detach().float()  # [B, T, n_heads * head_dim]
                head_score[i] += x.view(*x.shape[:-1], n_heads, head_dim).norm(dim=-1).mean(dim=(0, 1))

            def mlp_hook(mod, args, i=i):
                chan_score[i] += args[0].detach().float().abs().mean(dim=(0, 1))

            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(attn_hook))
            def layer_hook(mod, args, output, i=i):
                h_in = args[0].detach().float()
                h_out = (output[0] if isinstance(output, tuple) else output).detach().float()
                influence[i] += 1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).mean()

            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook))
            hooks.append(layer.register_forward_hook(layer_hook))
        windows = self.calibration.windows(tokenizer)
        from tqdm import tqdm

        with torch.no_grad():
            for w in tqdm(windows, desc="structured: importance", unit="window"):
                model(w.unsqueeze(0))
        for h in hooks:
            h.remove()

        keep_layers = influence.topk(layers_kept).indices.sort().values.tolist()
        kept_groups = [head_score[i].view(n_kv, group).sum(-1).topk(kv_keep).indices.sort().values.tolist()
                       for i in range(n_layers)]
        kept_channels = [chan_score[i].topk(inter_keep).indices.sort().values.tolist() for i in range(n_layers)]
        pruned = pruned_copy(model, kept_groups, kept_channels, keep_layers)
        healing = self._heal(model, pruned, tokenizer, out) if self.heal else None
        pruned.to(saved_dtype(base))  # importance was measured in fp32; save as the base was
        pruned.save_pretrained(out)
        tokenizer.save_pretrained(out)
        params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "layers": [n_layers, layers_kept],
            "dropped_layers": sorted(set(range(n_layers)) - set(keep_layers)),
            "healing": healing,
            "heads": [n_heads, kv_keep * group],
            "kv_heads": [n_kv, kv_keep],
            "intermediate_size": [inter, inter_keep],
            "parameters": [params(model), params(pruned)],
            "kept_kv_groups_layer0": kept_groups[0],
        }

    def _heal(self, teacher, student, tokenizer, out: Path) -> dict[str, Any]:
        import shutil

        measure = self.heal_eval.available()
        before = model_perplexity(student, tokenizer, self.heal_eval) if measure else None
        work = out.parent / (out.name + ".heal-work")
        try:
            train = distill(teacher, student, tokenizer, self.heal, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # checkpoints never go into the artifact
        student.cpu()
        after = model_perplexity(student, tokenizer, self.heal_eval) if measure else None
        train.pop("history", None)
        return {"perplexity_before": before and round(before, 3), "perplexity_after": after and round(after, 3),
                "held_out": self.heal_eval.model_dump(), **train}


def pruned_copy(model, kept_groups: list[list[int]], kept_channels: list[list[int]], keep_layers: list[int]):
    """A smaller dense copy of a Llama-family `model` (fp32): per layer i, the KV groups
    `kept_groups[i]` (with their query heads) and the MLP channels `kept_channels[i]`; only the
    layers in `keep_layers`. Every layer keeps the same counts (one config for all)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    group = n_heads // n_kv
    state = model.state_dict()
    for i, (groups, chans) in enumerate(zip(kept_groups, kept_channels)):
        groups, chans = torch.tensor(groups), torch.tensor(chans)
        heads = (groups[:, None] * group + torch.arange(group)).flatten()
        q_rows = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
        p = f"model.layers.{i}."
        for name, rows in (("self_attn.q_proj", q_rows), ("self_attn.k_proj", kv_rows), ("self_attn.v_proj", kv_rows)):
            state[p + name + ".weight"] = state[p + name + ".weight"][rows]
            if p + name + ".bias" in state:
                state[p + name + ".bias"] = state[p + name + ".bias"][rows]
        state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, q_rows]
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            state[p + name + ".weight"] = state[p + name + ".weight"][chans]
        state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, chans]
    state = _renumber_layers(state, keep_layers)
    extra = {"num_hidden_layers": len(keep_layers)}
    if getattr(cfg, "layer_types", None):
        extra["layer_types"] = [cfg.layer_types[i] for i in keep_layers]
    new_cfg = cfg.__class__.from_dict(
        {**cfg.to_dict(), "num_attention_heads": len(kept_groups[0]) * group, "num_key_value_heads": len(kept_groups[0]),
         "head_dim": head_dim, "intermediate_size": len(kept_channels[0]), **extra}
    )
    pruned = AutoModelForCausalLM.from_config(new_cfg, dtype=torch.float32)
    pruned.load_state_dict(state, strict=True)
    pruned.generation_config = model.generation_config
    return pruned


def _renumber_layers(state: dict, keep: list[int]) -> dict:
    """Drop the decoder layers not in `keep` and number the rest 0..len(keep)-1."""
    import re

    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for k, v in state.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", k)
        if m is None:
            out[k] = v
        elif int(m.group(1)) in new_index:
            out[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = v
    return out


def saved_dtype(checkpoint: Path):
    """The dtype `checkpoint` was saved in (bfloat16 when its config does not say)."""
    import json

    import torch

    config = json.loads((checkpoint / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return getattr(torch, str(name).removeprefix("torch."), torch.bfloat16)
