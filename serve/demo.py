"""`slimserve demo`: the default model served as two variants, one question, a clean exit."""

from __future__ import annotations

import time
from importlib import resources

from .config import load_config
from .ingress import VARIANT_HEADER
from .local import deploy, local_cluster, quiet_logs, say, wait_ready

QUESTION = "What is the capital of France? Answer in one sentence."


def demo_config_path():
    return resources.files("slimserve.serve") / "demo.yaml"


def run_demo(host: str = "127.0.0.1", port: int = 8000, question: str = QUESTION, verbose: bool = False) -> int:
    import openai

    from slimserve.optimizers.models import ensure_default_model
    from slimserve.optimizers.pipeline import optimize

    from . import app  # noqa: F401  (imports Ray Serve LLM and vLLM now, before quieting their logs)

    if not verbose:
        quiet_logs()
    cfg = load_config(demo_config_path())
    model = cfg.models[0]
    say(f"[1/4] default model: {ensure_default_model()}")
    say("[2/4] optimizing variants (reused from the artifact cache when already built)")
    for v in model.variants:
        r = optimize(model.source, v.optimization, cfg.cache_dir, v.quality)
        what = "base model as is" if r.cache_hit is None else ("cache hit" if r.cache_hit else "built")
        say(f"      {v.name:<10} {r.method:<6} {what:<17} {r.seconds:6.1f}s  {r.path}")
    with local_cluster(cfg, host=host, port=port, quiet=not verbose):
        say("[3/4] starting Ray Serve and one vLLM engine per variant")
        deploy(cfg)
        ready = wait_ready(lambda line: say("      " + line))
        say(f"      ready in {ready:.1f}s")
        say(f"[4/4] asking {model.name!r} through the openai client: {question}")
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="not-needed")
        t0 = time.monotonic()
        ttft = None
        parts: list[str] = []
        with client.chat.completions.with_streaming_response.create(
            model=model.name,
            messages=[{"role": "user", "content": question}],
            max_tokens=64,
            temperature=0,
            stream=True,
        ) as response:
            variant = response.headers.get(VARIANT_HEADER)
            for chunk in response.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    ttft = ttft if ttft is not None else time.monotonic() - t0
                    parts.append(chunk.choices[0].delta.content)
        total = time.monotonic() - t0
        print(f"\nanswer:  {''.join(parts).strip()}")
        print(f"variant: {variant}")
        print(f"time to first token: {ttft * 1000:.0f} ms   (whole answer {total:.2f} s, {len(parts)} chunks)")
        say("shutting down")
    return 0
