"""The optimizer's child dies with the process that started it (optimizers/build/lifeline.py), for
real: a real parent process starts a build through `pipeline._run_child` from a worker thread (as
the replica does, asyncio.to_thread), the build starts a grandchild, the parent is SIGKILLed (no
`finally` runs), and both are gone within seconds. The build itself is a stand-in script that
sleeps (a real optimization would take minutes of CPU beside the other tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import process_alive as alive
from slimserve.optimizers.build import pipeline
from slimserve.optimizers.registry import parse

# The stand-in build: writes its pid and its grandchild's, ignores SIGTERM, sleeps.
BUILD = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[1], "w").write(f"{os.getpid()} {grandchild.pid}")
time.sleep(300)
"""

# The parent: like a replica, it runs the build from a thread of its asyncio loop.
PARENT = """
import asyncio, sys
from pathlib import Path
from slimserve.optimizers.build import pipeline
from slimserve.optimizers.registry import parse
build, pids, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
pipeline._child_command = lambda python, request: [sys.executable, build, pids]
asyncio.run(asyncio.to_thread(
    pipeline._run_child, sys.executable, parse("none"), out, out / "artifact", None, 600))
"""


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_build_dies_with_its_parent_killed_outright(tmp_path):
    (tmp_path / "build.py").write_text(textwrap.dedent(BUILD))
    (tmp_path / "parent.py").write_text(textwrap.dedent(PARENT))
    pids = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(tmp_path / "build.py"), str(pids), str(tmp_path)])
    try:
        assert wait_for(lambda: pids.exists() and pids.read_text().strip(), 60), "the build never started"
        build, grandchild = map(int, pids.read_text().split())
        assert alive(build) and alive(grandchild)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert wait_for(lambda: not alive(build) and not alive(grandchild), 5), (
            f"left running after the parent's SIGKILL: build {alive(build)}, grandchild {alive(grandchild)}")
    finally:
        parent.kill()
        for pid in (int(p) for p in (pids.read_text().split() if pids.exists() else [])):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_build_still_reports_how_it_ended(tmp_path, monkeypatch):
    """Through the lifeline, a build killed by a signal is still reported as killed by it."""
    script = tmp_path / "oom.py"
    script.write_text("import os, signal; print('allocating', flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")
    monkeypatch.setattr(pipeline, "_child_command", lambda python, request: [sys.executable, str(script)])
    try:
        pipeline._run_child(sys.executable, parse("none"), tmp_path, tmp_path / "out", None, 60)
    except pipeline.OptimizationFailed as e:
        assert "was killed by SIGKILL (out of memory?)" in str(e)
    else:
        raise AssertionError("a killed build was not reported")
