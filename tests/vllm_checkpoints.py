"""Load checkpoints in vLLM CPU the way its engine would, quickly enough for the suite: one
process for a whole list, the engine core in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0).
Each engine started this way costs ~6 s here; a fresh process per checkpoint costs ~45 s, most of
it importing vLLM twice (the caller and the spawned engine-core process).

Given the quality gate's held-out text, each engine also scores it (prompt log-probabilities over
the gate's own token windows): a perplexity that agrees with the gate's (transformers) says vLLM
serves the model the gate judged, which one greedy answer to one prompt cannot say robustly (a
4-bit 135M model's first token flips between hosts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from slimserve.optimizers.build.build_report import QualityReport
from slimserve.serve.app import CPU_INT4_W4A8
from slimserve.serve.config.schema import EngineSettings

PROMPT = "The capital of France is"

LOADER = textwrap.dedent("""
    import gc, json, sys
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from slimserve.optimizers.quality import HeldOut, engine_perplexity

    if __name__ == "__main__":
        prompt, max_tokens, held_out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
        for path in sys.argv[4:]:
            llm = LLM(path, enforce_eager=True, max_model_len=512, seed=0)
            out = llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0))
            config = llm.llm_engine.vllm_config.model_config
            print("RESULT " + json.dumps({"path": path, "text": out[0].outputs[0].text,
                  "quantization": config.quantization, "layers": config.hf_config.num_hidden_layers,
                  "intermediate_size": config.hf_config.intermediate_size,
                  "perplexity": held_out and engine_perplexity(
                      llm, AutoTokenizer.from_pretrained(path), HeldOut.model_validate(held_out))}), flush=True)
            del llm
            gc.collect()
""")


def vllm_load_each(paths: list[Path], tmp_path: Path, max_tokens: int = 8, timeout_s: float = 900,
                   held_out: dict | None = None) -> list[dict]:
    """Load each checkpoint in vLLM CPU in turn and generate greedily from PROMPT; what each engine
    reports (text, quantization, layers, intermediate_size, and with `held_out` (a quality gate's
    HeldOut, as its manifest stores it) the perplexity vLLM gives that text), in order."""
    script = tmp_path / "vllm_load_each.py"
    script.write_text(LOADER)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # 4-bit weights computed as slimserve's engines compute them (not vLLM's int8-activation default on AMX).
    env["VLLM_CPU_INT4_W4A8"] = CPU_INT4_W4A8[EngineSettings().cpu_int4_activations]
    # Own process group: on a timeout the engine's helper processes are killed too, not orphaned.
    proc = subprocess.Popen([sys.executable, str(script), PROMPT, str(max_tokens), json.dumps(held_out),
                             *map(str, paths)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    results = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert [r["path"] for r in results] == list(map(str, paths)), err[-3000:]
    return results


def assert_serves_the_judged_model(result: dict, quality: QualityReport, rel: float = 0.03) -> None:
    """vLLM's perplexity on the gate's held-out windows agrees with the gate's own measurement
    (transformers, same dtype): the checkpoint vLLM serves is the one whose quality was judged."""
    assert result["perplexity"] is not None, "call vllm_load_each with the gate's held_out"
    assert abs(result["perplexity"] / quality.perplexity - 1) <= rel, (result, quality)
