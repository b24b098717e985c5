"""A real Ray Serve replica SIGKILLed in the middle of its variant's build (as Serve does after the
graceful timeout, or the OOM killer): the build goes with it, and the replica Serve starts next
builds alone; deleting the app ends that build too — there Ray's raylet SIGKILLs the replica's
direct child, the lifeline, before it can act, so the build itself dies with the lifeline
(optimizers/build/lifeline.py; before that fix the build outlived the deleted app). tests/test_lifeline.py shows the mechanism on a plain
parent process; this is the replica itself.

The build is a stand-in optimizer interpreter (`deployment.env` SLIMSERVE_OPTIMIZER_PYTHON): it
answers the library-version check, then, as the build, writes its pid and sleeps (a real W8A8 build
would take minutes of CPU beside the other tests; what is tested is who stops it)."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import process_alive as alive, release_main_app, undeploy, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.heavy]

APP = "killed-build"

STAND_IN = """\
#!{python}
import json, os, sys, time
if sys.argv[1] == "-c":  # the library-version check: any versions will do
    print(json.dumps({{name: "0" for name in sys.argv[3:]}}))
    sys.exit()
with open({pids!r}, "a") as f:  # the build: one line per build started
    f.write(f"{{os.getpid()}}\\n")
time.sleep(600)
"""


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def chain(pid: int) -> list[str]:
    """The process and its ancestors, as `pid: command` (for a failure's message)."""
    out = []
    while pid > 1 and len(out) < 4:
        try:
            out.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_text().replace(chr(0), ' ')[:120]}")
            pid = parent_of(pid)
        except OSError:
            break
    return out


def test_a_replica_killed_mid_build_takes_its_build_with_it(serve_url, tmp_path):
    from ray import serve

    from slimserve.serve.app import build_app

    release_main_app()  # the variant's placement group needs a core's worth of Ray's CPUs
    pids = tmp_path / "builds"
    stand_in = tmp_path / "python"
    stand_in.write_text(textwrap.dedent(STAND_IN).format(python=sys.executable, pids=str(pids)))
    stand_in.chmod(0o755)
    config = {
        "cache_dir": str(tmp_path / "cache"),
        "models": [{"name": "m", "source": "default", "engine": {"max_model_len": 256},
                    "deployment": {"env": {"SLIMSERVE_OPTIMIZER_PYTHON": str(stand_in)}},
                    "variants": [{"name": "int8", "optimization": {"method": "w8a8"}, "quality": {"measure": False}}]}],
    }
    serve.run_many([serve.RunTarget(build_app(config), name=APP, route_prefix="/killed-build")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    try:
        first = int(wait_for(lambda: pids.exists() and pids.read_text().split()[:1], 180, "the build started")[0])
        lifeline = parent_of(first)
        replica = parent_of(lifeline)  # the replica process that asked for the build
        assert alive(first) and "ServeReplica" in Path(f"/proc/{replica}/cmdline").read_text().replace("\0", " "), (
            Path(f"/proc/{replica}/cmdline").read_text())
        os.kill(replica, signal.SIGKILL)  # no `finally` runs in the replica
        t0 = time.monotonic()
        while (alive(first) or alive(lifeline)) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert not alive(first) and not alive(lifeline), "the build outlived its replica"
        # Serve starts another replica, which builds again: alone, not beside the killed one's build.
        builds = wait_for(lambda: len(lines := pids.read_text().split()) >= 2 and lines, 180, "the next replica's build")
        assert [p for p in map(int, builds) if alive(p)] == [int(builds[1])]
    finally:
        undeploy(APP)
    # Deleting the app ends the second build too (Serve stops the replica, the raylet kills its
    # children: the lifeline, and with it the build). Within Serve's graceful timeout (20 s) and then some.
    t0 = time.monotonic()
    while (leftover := [int(p) for p in pids.read_text().split() if alive(int(p))]) and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    why = [(pid, chain(pid)) for pid in leftover]
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, why
