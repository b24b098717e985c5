"""Build a test module's artifacts two at a time, each optimizer child on one core.

A build is partly single-threaded (imports, loading, saving, Python-side calibration), so two
builds side by side on two cores finish sooner than one after another with two threads each; the
engine replicas build that way too when two variants start at once."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from slimserve.optimizers.build.pipeline import OptimizeResult, optimize

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def build_each(specs: dict[str, dict], cache: Path, quality: dict | None = None) -> dict[str, OptimizeResult]:
    """optimize('default', spec, cache, quality) for every spec, two at a time; results by name."""
    cores = len(os.sched_getaffinity(0))
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    # The children inherit this process's environment: one thread each when they run in pairs.
    os.environ.update({k: str(max(1, cores // 2)) for k in THREAD_VARS})
    try:
        with ThreadPoolExecutor(max_workers=min(2, cores)) as pool:
            futures = {name: pool.submit(optimize, "default", spec, cache, quality) for name, spec in specs.items()}
            return {name: f.result() for name, f in futures.items()}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
