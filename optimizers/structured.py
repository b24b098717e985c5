"""`structured`: width pruning that gives a smaller *dense* model any engine runs faster.

Removes whole attention KV groups (a KV head and the query heads that share it, so GQA stays
valid) and MLP channels, the same number in every layer, ranked by their activations on
calibration text as in Minitron (Muralidharan et al., 2024): a head's importance is the mean
L2 norm of its slice of the attention output, a channel's the mean |activation| entering
down_proj. The result is a plain Llama-family checkpoint with a smaller config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from .calibration import Calibration
from .registry import Optimization, register


@register
class StructuredPrune(Optimization):
    """Keep the most important attention KV groups and MLP channels."""

    method: Literal["structured"] = "structured"
    heads_keep: float = Field(1.0, gt=0, le=1, description="Fraction of KV groups (with their query heads) kept.")
    mlp_keep: float = Field(1.0, gt=0, le=1, description="Fraction of MLP channels kept.")
    mlp_multiple: int = Field(32, ge=1, description="Round the kept MLP width to a multiple of this.")
    calibration: Calibration = Field(default_factory=Calibration)
    libraries = ("torch", "transformers")
    needs_optimizer_env = False  # torch + transformers only: runs in the serving environment

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
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook))
        windows = self.calibration.windows(tokenizer)
        from tqdm import tqdm

        with torch.no_grad():
            for w in tqdm(windows, desc="structured: importance", unit="window"):
                model(w.unsqueeze(0))
        for h in hooks:
            h.remove()

        state = model.state_dict()
        kept_groups, kept_channels = [], []
        for i in range(len(layers)):
            groups = head_score[i].view(n_kv, group).sum(-1).topk(kv_keep).indices.sort().values
            chans = chan_score[i].topk(inter_keep).indices.sort().values
            kept_groups.append(groups.tolist())
            kept_channels.append(chans.tolist())
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

        new_cfg = cfg.__class__.from_dict(
            {**cfg.to_dict(), "num_attention_heads": kv_keep * group, "num_key_value_heads": kv_keep,
             "head_dim": head_dim, "intermediate_size": inter_keep}
        )
        pruned = AutoModelForCausalLM.from_config(new_cfg, dtype=torch.float32)
        pruned.load_state_dict(state, strict=True)
        pruned.to(_saved_dtype(base))  # importance was measured in fp32; save as the base was
        pruned.generation_config = model.generation_config
        pruned.save_pretrained(out)
        tokenizer.save_pretrained(out)
        params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "heads": [n_heads, kv_keep * group],
            "kv_heads": [n_kv, kv_keep],
            "intermediate_size": [inter, inter_keep],
            "parameters": [params(model), params(pruned)],
            "kept_kv_groups_layer0": kept_groups[0],
        }


def _saved_dtype(base: Path):
    import json

    import torch

    config = json.loads((base / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return getattr(torch, str(name).removeprefix("torch."), torch.bfloat16)
