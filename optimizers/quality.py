"""Quality of an optimized checkpoint: perplexity on held-out text, against its base.

The default held-out text is Debian's `fortunes-min` (quotations and riddles, installed by
`make`); it is not used for calibration (that is `pydoc`), so the score is not flattered."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .calibration import text_available, token_windows

log = logging.getLogger(__name__)

class HeldOut(BaseModel):
    """Text the quality gate measures perplexity on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field("fortunes", description="`fortunes` (Debian fortunes-min) or the path of a local UTF-8 text file.")
    windows: int = Field(16, ge=1, description="Number of token windows scored.")
    seq_len: int = Field(256, ge=16, description="Tokens per window.")

    def available(self) -> bool:
        return text_available(self.text)


def perplexity(checkpoint: Path, held_out: HeldOut) -> float:
    """Perplexity of a checkpoint folder, loaded in fp32 on CPU (or the first GPU when there is one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to("cuda" if torch.cuda.is_available() else "cpu")
    return model_perplexity(model, AutoTokenizer.from_pretrained(checkpoint), held_out, checkpoint)


def model_perplexity(model, tokenizer, held_out: HeldOut, checkpoint: Path | None = None) -> float:
    """exp(mean next-token loss) over `windows` windows of `seq_len` tokens, on the model's device.
    With the `checkpoint` it came from: a progress bar, and the result logged."""
    import torch
    from tqdm import tqdm

    windows = token_windows(held_out.text, tokenizer, held_out.windows, held_out.seq_len)
    device, was_training, t0, total = next(model.parameters()).device, model.training, time.monotonic(), 0.0
    model.eval()
    with torch.no_grad():
        for w in tqdm(windows, desc=f"perplexity {checkpoint and checkpoint.name[:16]}", unit="window", disable=checkpoint is None):
            w = w.unsqueeze(0).to(device)
            total += model(w, labels=w).loss.float().item()
    model.train(was_training)
    ppl = math.exp(total / len(windows))
    if checkpoint is not None:
        log.info("perplexity of %s: %.3f (%d x %d tokens, %.1f s)", checkpoint, ppl, len(windows), held_out.seq_len, time.monotonic() - t0)
    return ppl


class QualityGate(BaseModel):
    """What a variant must keep of its base model's quality."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    measure: bool = Field(True, description="Measure perplexity of base and variant after building (stored in the manifest).")
    max_ppl_ratio: float | None = Field(None, gt=0, description="Largest allowed perplexity(variant) / perplexity(base); None: no limit.")
    on_quality_fail: Literal["fail", "serve_base"] = Field(
        "fail", description="Over the limit: fail startup with a clear message, or serve the base model instead."
    )
    held_out: HeldOut = Field(default_factory=HeldOut)


class QualityGateFailed(RuntimeError):
    pass
