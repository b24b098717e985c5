"""A student's first weights, before distillation: the teacher pruned by `structured`, or a
smaller config of the teacher randomly initialised. For `slimserve distill` and the `student`
method's recipe."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from slimserve.optimizers.methods.structured import StructuredPrune


def init_student(teacher: Path, prune: StructuredPrune | None, config: dict[str, Any] | None, seed: int,
                 pruned_dir: Path, write: bool = True):
    """An fp32 model: the teacher pruned by `prune` (written into `pruned_dir` unless it exists), else
    the teacher's config with `config` overrides, initialised from `seed`. write=False (torchrun
    ranks other than 0): wait for the process that writes `pruned_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if prune is not None:
        if write and not pruned_dir.exists():
            tmp = pruned_dir.with_name(f"{pruned_dir.name}.{os.getpid()}.tmp")
            prune.run(teacher, tmp)
            tmp.rename(pruned_dir)  # whole, or not there: other ranks wait for it below
        _wait_for(pruned_dir)
        return AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(teacher)
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _wait_for(path: Path, timeout: float = 3600) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(1)
