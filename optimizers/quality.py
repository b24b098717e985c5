"""Quality of an optimized checkpoint: perplexity on held-out text, against its base.

The default held-out text is Debian's `fortunes-min` (quotations and riddles, installed by
`make`); it is not used for calibration (that is `pydoc`), so the score is not flattered."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slimserve.optimizers.calibration import text_available, token_windows

log = logging.getLogger(__name__)

class HeldOut(BaseModel):
    """Text the quality gate measures perplexity on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field("fortunes", description="`fortunes` (Debian fortunes-min) or the path of a local UTF-8 text file.")
    windows: int = Field(16, ge=1, description="Number of token windows scored.")
    seq_len: int = Field(256, ge=16, description="Tokens per window.")

    def available(self) -> bool:
        return text_available(self.text)


def load_for_inference(checkpoint: Path):
    """A checkpoint for scoring, in eval mode: in the dtype it was saved in (bf16 / fp16 as
    saved; fp32 only when saved so), on the GPU(s) when there are any (spilling to CPU memory
    if they are full), else on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    placement = {"device_map": "auto"} if torch.cuda.is_available() else {}
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto", **placement).eval()


def perplexity(checkpoint: Path, held_out: HeldOut) -> float:
    """Perplexity of a checkpoint folder, loaded as `load_for_inference` does."""
    from transformers import AutoTokenizer

    model = load_for_inference(checkpoint)
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


def engine_perplexity(llm, tokenizer, held_out: HeldOut) -> float:
    """The same perplexity as `model_perplexity`, computed by a vLLM engine (`vllm.LLM`) from its
    prompt log-probabilities: what the served numerics give, kernels included."""
    from vllm import SamplingParams

    windows = token_windows(held_out.text, tokenizer, held_out.windows, held_out.seq_len).tolist()
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], SamplingParams(max_tokens=1, prompt_logprobs=0))
    losses = [-sum(o.prompt_logprobs[i][w[i]].logprob for i in range(1, len(w))) / (len(w) - 1) for w, o in zip(windows, outs)]
    return math.exp(sum(losses) / len(losses))


class QualityGate(BaseModel):
    """What a variant must keep of its base model's quality."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    measure: bool = Field(True, description="Measure perplexity of base and variant after building (stored in the manifest).")
    max_ppl_ratio: float | None = Field(None, gt=0, description="Largest allowed perplexity(variant) / perplexity(base); None: no limit.")
    on_quality_fail: Literal["fail", "serve_base"] = Field(
        "fail", description="Over the limit: fail startup with a clear message, or serve the base model instead."
    )
    held_out: HeldOut = Field(default_factory=HeldOut)

    @model_validator(mode="after")
    def _limit_needs_measuring(self) -> "QualityGate":
        if not self.measure and self.max_ppl_ratio is not None:
            raise ValueError(
                f"max_ppl_ratio {self.max_ppl_ratio:g} with measure: false is never checked (nothing is measured); "
                "set measure: true, or drop max_ppl_ratio"
            )
        return self


class QualityGateFailed(RuntimeError):
    pass
