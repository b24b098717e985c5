"""The random-weight Llama shapes of the GPU benchmarks (bench/gpu_serving.py, bench/gpu_kernels.py):
made on the GPU with SmolLM2's tokenizer and vocabulary, saved as a bf16 safetensors checkpoint.
Right for speed and memory, meaningless for quality. Imports nothing but torch and transformers,
so it can run while the serving stack installs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

SHAPES = {
    # Llama-3-8B's body (7.38 B parameters with the 49k vocabulary)
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, rope_theta=500000.0),
    # TinyLlama's body (1.17 B)
    "llama1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4),
}


def make_model(name: str, path: Path, tokenizer: str | Path) -> dict:
    """Random bf16 weights (normal, std 0.02, seed 0) of SHAPES[name], made on the GPU and saved
    at `path` with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, tie_word_embeddings=False, **SHAPES[name])
    t0 = time.monotonic()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    tok.save_pretrained(path)
    for extra in Path(tokenizer).glob("chat_template.jinja"):
        shutil.copy(extra, path)
    del model
    torch.cuda.empty_cache()
    return {"parameters": params, "bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")),
            "seconds": round(time.monotonic() - t0, 1), "weights": "random (normal, std 0.02), made on the GPU"}
