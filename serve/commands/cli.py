"""The `slimserve` command."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading

from slimserve.optimizers.quality import QualityGateFailed

from slimserve.serve.config.file import ConfigError, ConfigFile, ServeApp, load_config_file
from slimserve.serve.commands.local import RunError, Terminated, use_ray_serve_env

DESCRIPTION = """\
slimserve optimizes a model when it loads (quantization, pruning, distillation) and serves
the result with vLLM on Ray Serve LLM. One YAML config names a base model and its variants
(bf16, int8, pruned, a distilled student, ...), each with a traffic weight; at startup each
variant is optimized (or taken from the artifact cache), and one OpenAI-compatible endpoint
splits the requests between them. Every answer says which variant produced it.

CONFIG is a slimserve config, or a Ray Serve config file whose applications use
`import_path: slimserve.serve.app:build_app` (deploy/*.yaml)."""

EPILOG = """\
examples:
  slimserve demo                             the default model as bf16 + int8, one question
  slimserve config validate my.yaml          every error of a config, with its field path
  slimserve run my.yaml                      serve on 127.0.0.1:8000/v1 until Ctrl-C or SIGTERM
  slimserve run deploy/demo.yaml             a Ray Serve config file works too
  slimserve optimize my.yaml --variant int8  build a variant's checkpoint ahead of time
  slimserve rollout status --model smollm2   a progressive rollout's step and history (admin key)

`slimserve COMMAND -h` shows a command's options; -v (anywhere) shows Ray's and vLLM's logs."""


def _validate(args) -> int:
    f = load_config_file(args.config)  # a ConfigError is printed by main(), exit 1

    def counts(app: ServeApp) -> str:
        return f"{len(app.config.models)} model(s), {sum(len(m.variants) for m in app.config.models)} variant(s)"

    if f.kind == "slimserve":
        print(f"{args.config}: ok ({counts(f.apps[0])})")
    else:
        print(f"{args.config}: ok (Ray Serve config, {len(f.apps)} slimserve application(s))")
    for app in f.apps:
        indent = "  "
        if f.kind == "serve":
            print(f"  application {app.name} at {app.route_prefix}: {counts(app)}")
            indent = "    "
        for m in app.config.models:
            for v in m.variants:
                eng = m.engine_for(v)
                share = "auto" if eng.gpu_share is None else f"{eng.gpu_share:g}"
                scaling = m.autoscaling_for(v)
                replicas = (f"{scaling.min_replicas}-{scaling.max_replicas} (autoscaling)" if scaling
                            else str(m.deployment.replicas))
                print(f"{indent}{m.name}/{v.name}: {v.optimization.method}, weight {v.weight:g}, "
                      f"tp {eng.tensor_parallel_size}, gpu_share {share}, replicas {replicas}")
    if f.ignored:
        print(f"  not used by `slimserve run` (only by `serve run`): {', '.join(f.ignored)}")
    return 0


def _one_app(f: ConfigFile, path: str, name: str | None) -> ServeApp:
    """The application `slimserve run` serves. One at a time: each app's CPU engines get their
    own cores counted from core 0, so two apps' engines would share cores (20-30x slower)."""
    names = [a.name for a in f.apps]
    if name is not None:
        for app in f.apps:
            if app.name == name:
                return app
        raise RunError(f"--app {name}: {path} has no slimserve application of that name (it has: {', '.join(names)})")
    if len(f.apps) > 1:
        raise RunError(f"{path} has {len(f.apps)} slimserve applications ({', '.join(names)}); `slimserve run` serves "
                       f"one: pick it with --app NAME (`serve run {path}` runs them all)")
    return f.apps[0]


def _run(args) -> int:
    from slimserve.serve.commands.local import check_fits, deploy, local_cluster, say, wait_ready

    f = load_config_file(args.config)
    app = _one_app(f, args.config, args.app)
    # The flags win; then a Serve config's http_options; then Serve's defaults.
    host = args.host or f.http_options.get("host") or "127.0.0.1"
    port = args.port or f.http_options.get("port") or 8000
    if f.ignored:
        say(f"note: serving application {app.name!r}; not used here (only by `serve run`): {', '.join(f.ignored)}")
    cfg = app.config
    with local_cluster(cfg, host=host, port=port, quiet=not args.verbose, metrics_port=args.metrics_port):
        check_fits(cfg)
        deploy(cfg, name=app.name, route_prefix=app.route_prefix)
        secs = wait_ready(lambda line: say("  " + line), name=app.name)
        say(f"slimserve ready in {secs:.1f}s: OpenAI API at http://{host}:{port}{app.route_prefix.rstrip('/')}/v1, "
            f"metrics at http://{host}:{args.metrics_port}/metrics (Ctrl-C or SIGTERM stops)")
        try:
            import time

            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (local.Terminated): the same clean stop
            say("stopping")
    return 0


def _demo(args) -> int:
    from slimserve.serve.commands.demo import run_demo

    return run_demo(host=args.host, port=args.port, verbose=args.verbose)


def _optimize(args) -> int:
    from slimserve.optimizers.build.pipeline import optimize
    from slimserve.optimizers.report import size_on_disk

    if args.config_flag is not None:
        print("slimserve optimize: --config is deprecated; give the config as the argument: "
              "slimserve optimize CONFIG", file=sys.stderr)
        if args.config is not None and args.config != args.config_flag:
            raise RunError(f"optimize: two configs given ({args.config} and --config {args.config_flag})")
    path = args.config or args.config_flag
    if path is None:
        raise RunError("optimize: which config? slimserve optimize CONFIG [--model NAME] [--variant NAME]")
    rows = []
    for cfg, m in [(app.config, m) for app in load_config_file(path).apps for m in app.config.models]:
        if args.model and m.name != args.model:
            continue
        for v in m.variants:
            if args.variant and v.name != args.variant:
                continue
            r = optimize(m.source, v.optimization, cfg.cache_dir, v.quality,
                         build_timeout_s=v.build_timeout_s, cache_max_gib=cfg.cache_max_gib)
            base_size, size = size_on_disk(r.base), size_on_disk(r.path)
            status = "base" if r.cache_hit is None else ("hit" if r.cache_hit else "built")
            report = r.manifest.report if r.manifest else None
            q = report.quality if report else None
            fmt = lambda x: f"{x:.2f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
            rows.append((
                f"{m.name}/{v.name}", r.method, status,
                fmt(report.optimize_seconds if report else r.seconds), f"{size / 1e6:.1f}", f"{size / base_size:.2f}x",
                fmt(q and q.base_perplexity), fmt(q and q.perplexity), fmt(q and q.ppl_ratio), str(r.path),
            ))
    if not rows:
        print("no variant matched", file=sys.stderr)
        return 1
    header = ("variant", "method", "cache", "seconds", "MB", "size", "ppl_base", "ppl", "ppl_ratio", "checkpoint")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    return 0


def _cache(args) -> int:
    """`slimserve cache ls | prune`: the cache of CONFIG (each application's), --cache-dir, or the default one."""
    from slimserve.optimizers.cache.store import cache_command
    from slimserve.optimizers.models import slimserve_home

    if args.cache_dir:
        caches = [(args.cache_dir, None)]
    elif args.config:
        caches = list(dict.fromkeys((a.config.cache_dir, a.config.cache_max_gib) for a in load_config_file(args.config).apps))
    else:
        caches = [(str(slimserve_home() / "artifacts"), None)]
    max_gib = getattr(args, "max_gib", None)
    return max(cache_command(args.cache_command, root, cap if max_gib is None else max_gib) for root, cap in caches)


def _distill(args) -> int:
    import importlib.util

    from slimserve.optimizers.training.distill import run_cli

    if (args.qat or args.qlora) and importlib.util.find_spec("torchao") is None:
        # QAT and QLoRA need torchao and llm-compressor, which live in the optimizer environment
        # (requirements/optimizer.txt says why two): the same command runs on there.
        from slimserve.optimizers.build.pipeline import optimizer_python

        argv = args.argv[args.argv.index("distill") + 1:]
        argv = [x for x in argv if x not in ("-v", "--verbose")]  # slimserve's own flag
        return subprocess.call([optimizer_python(), "-m", "slimserve.optimizers.training.distill", *argv])
    return run_cli(args)


def _ab_report(args) -> int:
    import json

    from slimserve.serve.commands.ab_report import PrometheusError, format_table, report

    try:
        r = report(args.prometheus, args.model, args.window, args.baseline)
    except (PrometheusError, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    rollout = None
    if args.url:
        from slimserve.serve.commands.rollout import admin_key, fetch, format_status

        code, body = fetch(args.url, args.model, admin_key("SLIMSERVE_ADMIN_KEYS"))
        rollout = body if code == 200 else {"unavailable": (body.get("error") or {}).get("message", str(code))}
        r["rollout"] = rollout
    out = json.dumps(r, indent=2) if args.json else format_table(r)
    if rollout and not args.json:
        out += "\n\n" + (format_status(rollout) if "history" in rollout else f"rollout: {rollout['unavailable']}")
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="slimserve", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's and vLLM's logs (and tracebacks)")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    p = sub.add_parser("demo", help="serve the default model as two variants and ask it one question")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_demo)

    p = sub.add_parser("run", help="serve a config on this machine until Ctrl-C or SIGTERM")
    p.add_argument("config", metavar="CONFIG", help="a slimserve config, or a Ray Serve config file (deploy/*.yaml)")
    p.add_argument("--app", help="the application to serve, when a Ray Serve config has several slimserve applications")
    p.add_argument("--host", help="HTTP host (default: the Serve config's http_options.host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: the Serve config's http_options.port, else 8000)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus endpoint (slimserve_*, ray_vllm_*)")
    p.set_defaults(func=_run)

    p = sub.add_parser("config", help="`config validate CONFIG`: check a config, every error with its field path")
    csub = p.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="check a config; print every error with its field path")
    v.add_argument("config", metavar="CONFIG", help="a slimserve config, or a Ray Serve config file (deploy/*.yaml)")
    v.set_defaults(func=_validate)

    p = sub.add_parser("optimize", help="build (or reuse) variants' optimized checkpoints offline")
    p.add_argument("config", metavar="CONFIG", nargs="?", help="a slimserve config, or a Ray Serve config file")
    p.add_argument("--config", dest="config_flag", metavar="CONFIG", help="deprecated: give CONFIG as the argument")
    p.add_argument("--model", help="only this public model name")
    p.add_argument("--variant", help="only this variant")
    p.set_defaults(func=_optimize)

    p = sub.add_parser("cache", help="the artifact cache: `cache ls` lists it, `cache prune` cleans and shrinks it")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    for name, text in (("ls", "list artifacts (method, base, size, last use, in use) and builds in progress"),
                       ("prune", "remove stale temporaries, then evict least recently used artifacts not in use to a size")):
        c = cache_sub.add_parser(name, help=text)
        c.add_argument("config", metavar="CONFIG", nargs="?", help="a config: its cache_dir (default $SLIMSERVE_HOME/artifacts)")
        c.add_argument("--cache-dir", help="the cache folder itself, instead of a config's")
        if name == "prune":
            c.add_argument("--max-gib", type=float, help="size cap in GiB (default: the config's cache_max_gib; 0: all not in use)")
        c.set_defaults(func=_cache)

    p = sub.add_parser("ab-report", help="compare a model's variants from Prometheus, with significance tests and a verdict")
    p.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--model", required=True, help="public model name")
    p.add_argument("--window", default="1h", help="look-back window, a Prometheus duration (default 1h)")
    p.add_argument("--baseline", help="variant the others are compared with (default: the unoptimized one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--url", help="the slimserve endpoint: also show the model's rollout and its step history "
                   "(admin key from $SLIMSERVE_ADMIN_KEYS)")
    p.set_defaults(func=_ab_report)

    from slimserve.serve.commands.rollout import add_parser as add_rollout_parser

    add_rollout_parser(sub)

    p = sub.add_parser("distill", help="teacher -> student knowledge distillation on text (torchrun for several GPUs)")
    from slimserve.optimizers.training.distill import add_arguments

    add_arguments(p)
    p.set_defaults(func=_distill)

    _verbose_after_any_command(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    use_ray_serve_env()  # before anything imports Ray Serve (its constants are read at import)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    # SIGTERM (Kubernetes, systemd, `kill`) stops every command the way Ctrl-C does.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        return args.func(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except QualityGateFailed as e:
        print(e, file=sys.stderr)
        return 2
    except RunError as e:
        print(f"slimserve: {e}", file=sys.stderr)
        return 1
    except Terminated:
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Exception as e:
        if args.verbose:
            raise
        what = str(e).strip().splitlines()
        print(f"slimserve {args.command}: {type(e).__name__}: {what[0] if what else ''}\n"
              "  (run with -v for the traceback and Ray's and vLLM's logs)", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _terminated(signum, frame):
    raise Terminated()


def _verbose_after_any_command(parser: argparse.ArgumentParser) -> None:
    """`-v` also after the command (`slimserve run x.yaml -v`), for every command, nested ones
    (`config validate`) and ones added later included. SUPPRESS: absent there, the value given
    before the command stays."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                if "-v" not in p._option_string_actions and "--verbose" not in p._option_string_actions:
                    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                   help="show Ray's and vLLM's logs (and tracebacks)")
                _verbose_after_any_command(p)


if __name__ == "__main__":
    sys.exit(main())
