"""Calibration text: what optimizations that look at activations feed the model.

`pydoc` (default) is the Python documentation topics shipped with the standard library
(`pydoc_data.topics`), present on every machine. Any other value is a local text file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field("pydoc", description="`pydoc` (stdlib docs) or the path of a local UTF-8 text file.")
    samples: int = Field(64, ge=1, description="Number of token windows.")
    seq_len: int = Field(256, ge=8, description="Tokens per window.")

    def load_text(self) -> str:
        if self.text == "pydoc":
            from pydoc_data.topics import topics

            return "\n\n".join(topics[k] for k in sorted(topics))
        return Path(self.text).expanduser().read_text(encoding="utf-8", errors="replace")

    def digest(self) -> str:
        """Content hash of the text, for the artifact cache key."""
        return hashlib.sha256(self.load_text().encode()).hexdigest()

    def windows(self, tokenizer):
        """`samples` consecutive, non-overlapping windows of `seq_len` token ids (a LongTensor)."""
        import torch

        # ~4 characters a token: tokenize only what the windows need (with a safety margin).
        text = self.load_text()[: self.samples * self.seq_len * 8]
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        n = min(self.samples, len(ids) // self.seq_len)
        if n == 0:
            raise ValueError(f"calibration text {self.text!r} is shorter than one window of {self.seq_len} tokens")
        return ids[: n * self.seq_len].view(n, self.seq_len).to(torch.long)
