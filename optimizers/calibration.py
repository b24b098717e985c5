"""Text that optimizations and the quality gate feed the model, cut into token windows.

Named texts: `pydoc` (the Python documentation topics shipped with the standard library, on
every machine; the default for calibration) and `fortunes` (Debian's fortunes-min, installed by
`make`; the default held-out text). Any other value is the path of a local UTF-8 text file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


FORTUNES = [Path("/usr/share/games/fortunes") / n for n in ("fortunes", "literature", "riddles")]


def text_available(name: str) -> bool:
    if name == "pydoc":
        return True
    if name == "fortunes":
        return all(p.exists() for p in FORTUNES)
    return Path(name).expanduser().exists()


def load_text(name: str) -> str:
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    if name == "fortunes":
        missing = [p for p in FORTUNES if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"text {missing[0]} is missing: install Debian's fortunes-min (`make` does), "
                "or name a local text file instead"
            )
        return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in FORTUNES)
    return Path(name).expanduser().read_text(encoding="utf-8", errors="replace")


def token_windows(name: str, tokenizer, count: int | None, seq_len: int):
    """Up to `count` (None: all) consecutive, non-overlapping windows of `seq_len` token ids (a LongTensor)."""
    import torch

    # ~4 characters a token: tokenize only what the windows need (with a safety margin).
    text = load_text(name)[: count * seq_len * 8 if count is not None else None]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = len(ids) // seq_len if count is None else min(count, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"text {name!r} is shorter than one window of {seq_len} tokens")
    return ids[: n * seq_len].view(n, seq_len).to(torch.long)


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field("pydoc", description="`pydoc` (stdlib docs) or the path of a local UTF-8 text file.")
    samples: int = Field(64, ge=1, description="Number of token windows.")
    seq_len: int = Field(256, ge=8, description="Tokens per window.")

    def digest(self) -> str:
        """Content hash of the text, for the artifact cache key."""
        return hashlib.sha256(load_text(self.text).encode()).hexdigest()

    def windows(self, tokenizer):
        return token_windows(self.text, tokenizer, self.samples, self.seq_len)
