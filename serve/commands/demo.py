"""`slimserve demo`: the default model served as two variants, one question, a clean exit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import resources

from slimserve.serve.config.schema import SlimserveConfig
from slimserve.serve.config.file import load_config
from slimserve.serve.commands.local import deploy, local_cluster, quiet_logs, say, wait_ready

QUESTION = "What is the capital of France? Answer in one sentence."


def demo_config_path():
    return resources.files("slimserve.serve") / "demo.yaml"


def client_api_key(cfg: SlimserveConfig) -> str:
    """The key the demo's own client sends: with API keys set (`ingress.api_keys_env`, by default
    SLIMSERVE_API_KEYS) the ingress answers 401 without one of them."""
    from slimserve.serve.http.guard import api_keys_from_env

    keys = api_keys_from_env(cfg.ingress.api_keys_env)
    return keys[0].decode() if keys else "not-needed"


@dataclass
class Answer:
    variant: str | None = None
    parts: list[str] = field(default_factory=list)
    ttft_s: float | None = None  # None: no chunk carried text
    total_s: float = 0.0


def ask(client, model: str, question: str) -> Answer:
    """One streamed chat request; times the first chunk that carries text."""
    from slimserve.serve.http.ingress import VARIANT_HEADER

    answer = Answer()
    t0 = time.monotonic()
    with client.chat.completions.with_streaming_response.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=64,
        temperature=0,
        stream=True,
    ) as response:
        answer.variant = response.headers.get(VARIANT_HEADER)
        for chunk in response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                if answer.ttft_s is None:
                    answer.ttft_s = time.monotonic() - t0
                answer.parts.append(chunk.choices[0].delta.content)
    answer.total_s = time.monotonic() - t0
    return answer


def print_answer(answer: Answer) -> int:
    """The demo's result lines; 1 if the model answered no text at all."""
    text = "".join(answer.parts).strip()
    print(f"\nanswer:  {text or '(no text)'}")
    print(f"variant: {answer.variant}")
    if answer.ttft_s is None:
        print(f"time to first token: none, the stream carried no text   (whole answer {answer.total_s:.2f} s)")
        say("slimserve demo: the model streamed no text (run with -v for Ray's and vLLM's logs)")
        return 1
    print(f"time to first token: {answer.ttft_s * 1000:.0f} ms   (whole answer {answer.total_s:.2f} s, {len(answer.parts)} chunks)")
    return 0


def run_demo(host: str = "127.0.0.1", port: int = 8000, question: str = QUESTION, verbose: bool = False) -> int:
    import openai

    from slimserve.optimizers.models import ensure_default_model
    from slimserve.optimizers.build.pipeline import optimize

    from slimserve.serve import app  # noqa: F401  (imports Ray Serve LLM and vLLM now, before quieting their logs)

    if not verbose:
        quiet_logs()
    cfg = load_config(demo_config_path())
    model = cfg.models[0]
    say(f"[1/4] default model: {ensure_default_model()}")
    say("[2/4] optimizing variants (reused from the artifact cache when already built)")
    for v in model.variants:
        r = optimize(model.source, v.optimization, cfg.cache_dir, v.quality,
                     build_timeout_s=v.build_timeout_s, cache_max_gib=cfg.cache_max_gib)
        what = "base model as is" if r.cache_hit is None else ("cache hit" if r.cache_hit else "built")
        say(f"      {v.name:<10} {r.method:<6} {what:<17} {r.seconds:6.1f}s  {r.path}")
    with local_cluster(cfg, host=host, port=port, quiet=not verbose):
        say("[3/4] starting Ray Serve and one vLLM engine per variant")
        deploy(cfg)
        ready = wait_ready(lambda line: say("      " + line))
        say(f"      ready in {ready:.1f}s")
        say(f"[4/4] asking {model.name!r} through the openai client: {question}")
        client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=client_api_key(cfg))
        rc = print_answer(ask(client, model.name, question))
        say("shutting down")
    return rc
