"""The `slimserve` command."""

from __future__ import annotations

import argparse
import logging
import sys

from slimserve.optimizers.quality import QualityGateFailed

from .config import ConfigError, load_config


def _validate(args) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot read {args.config}: {e}", file=sys.stderr)
        return 1
    n = sum(len(m.variants) for m in cfg.models)
    print(f"{args.config}: ok ({len(cfg.models)} model(s), {n} variant(s))")
    for m in cfg.models:
        for v in m.variants:
            eng = m.engine_for(v)
            share = "auto" if eng.gpu_share is None else f"{eng.gpu_share:g}"
            print(f"  {m.name}/{v.name}: {v.optimization.method}, weight {v.weight:g}, tp {eng.tensor_parallel_size}, gpu_share {share}")
    return 0


def _run(args) -> int:
    from .local import check_fits, deploy, local_cluster, say, wait_ready

    cfg = load_config(args.config)
    with local_cluster(cfg, host=args.host, port=args.port, quiet=not args.verbose, metrics_port=args.metrics_port):
        check_fits(cfg)
        deploy(cfg)
        secs = wait_ready(lambda line: say("  " + line))
        say(f"slimserve ready in {secs:.1f}s: OpenAI API at http://{args.host}:{args.port}/v1, "
            f"metrics at http://{args.host}:{args.metrics_port}/metrics (Ctrl-C stops)")
        try:
            import time

            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            say("stopping")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(host=args.host, port=args.port, verbose=args.verbose)


def _optimize(args) -> int:
    from slimserve.optimizers.pipeline import optimize
    from slimserve.optimizers.report import size_on_disk

    cfg = load_config(args.config)
    rows = []
    for m in cfg.models:
        if args.model and m.name != args.model:
            continue
        for v in m.variants:
            if args.variant and v.name != args.variant:
                continue
            r = optimize(m.source, v.optimization, cfg.cache_dir, v.quality)
            base_size, size = size_on_disk(r.base), size_on_disk(r.path)
            status = "base" if r.cache_hit is None else ("hit" if r.cache_hit else "built")
            report = r.manifest.get("report", {})
            q = report.get("quality", {})
            fmt = lambda x: f"{x:.2f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
            rows.append((
                f"{m.name}/{v.name}", r.method, status,
                fmt(report.get("optimize_seconds", r.seconds)), f"{size / 1e6:.1f}", f"{size / base_size:.2f}x",
                fmt(q.get("base_perplexity")), fmt(q.get("perplexity")), fmt(q.get("ppl_ratio")), str(r.path),
            ))
    if not rows:
        print("no variant matched", file=sys.stderr)
        return 1
    header = ("variant", "method", "cache", "seconds", "MB", "size", "ppl_base", "ppl", "ppl_ratio", "checkpoint")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    return 0


def _ab_report(args) -> int:
    import json

    from .ab_report import PrometheusError, format_table, report

    try:
        r = report(args.prometheus, args.model, args.window, args.baseline)
    except (PrometheusError, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(r, indent=2) if args.json else format_table(r))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray and vLLM logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="serve the default model as two variants and ask it one question")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_demo)

    p = sub.add_parser("run", help="serve a slimserve config on this machine until Ctrl-C")
    p.add_argument("config")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus endpoint (slimserve_*, ray_vllm_*)")
    p.set_defaults(func=_run)

    p = sub.add_parser("config", help="config tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="check a config; print every error with its field path")
    v.add_argument("config")
    v.set_defaults(func=_validate)

    p = sub.add_parser("optimize", help="build (or reuse) variants' optimized checkpoints offline")
    p.add_argument("--config", required=True)
    p.add_argument("--model", help="only this public model name")
    p.add_argument("--variant", help="only this variant")
    p.set_defaults(func=_optimize)

    p = sub.add_parser("ab-report", help="compare a model's variants from Prometheus, with significance tests and a verdict")
    p.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--model", required=True, help="public model name")
    p.add_argument("--window", default="1h", help="look-back window, a Prometheus duration (default 1h)")
    p.add_argument("--baseline", help="variant the others are compared with (default: the unoptimized one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_ab_report)

    p = sub.add_parser("distill", help="teacher -> student knowledge distillation on text (torchrun for several GPUs)")
    from slimserve.optimizers.distill import add_arguments, run_cli

    add_arguments(p)
    p.set_defaults(func=run_cli)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except QualityGateFailed as e:
        print(e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
