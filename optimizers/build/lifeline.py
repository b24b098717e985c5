"""`python lifeline.py PARENT_PID -- COMMAND...`: runs COMMAND and takes it, and everything it
started, down with the process that started us.

`pipeline._run_child` starts the optimizer through this wrapper, as the leader of a new process
group. The replica that asks for a build can die without a word (SIGKILL, the OOM killer, a node
drain): its `finally` then never stops the build, which goes on holding memory or a GPU while the
next replica starts a second build beside it. Here the kernel tells us (PR_SET_PDEATHSIG) and we
SIGKILL our whole process group: the optimizer and its own children (calibration workers, a
torchrun), which PR_SET_PDEATHSIG alone would leave behind, as it is not inherited across fork.

PR_SET_PDEATHSIG fires when the *thread* that forked us ends, not the process: `_run_child`
waits for us in that same thread, so it ends only when the build does or the process dies.

A plain script (no slimserve imports): it starts in milliseconds, and waits in `os.waitpid`, so
the signal's handler runs at once (a busy optimizer could hold its interpreter for long)."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Not SIGTERM: `_stop_group` sends SIGTERM to the group to let the optimizer finish gracefully.
PARENT_DIED = signal.SIGUSR2


def _kill_group(*_: object) -> None:
    os.killpg(0, signal.SIGKILL)  # our group: us, the optimizer, and all it started there


def main(argv: list[str]) -> int:
    parent, command = int(argv[0]), argv[2:]
    signal.signal(PARENT_DIED, _kill_group)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(PARENT_DIED), 0, 0, 0) != 0:
        print(f"slimserve lifeline: prctl failed (errno {ctypes.get_errno()})", file=sys.stderr)
        return 70
    if os.getppid() != parent:  # the parent died before prctl took effect
        _kill_group()
    # SIGTERM (the pipeline's graceful stop) goes to the whole group: the optimizer gets its own.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(command, restore_signals=True, preexec_fn=functools.partial(_in_child, os.getpid(), libc))
    while True:
        try:
            code = child.wait()
            break
        except InterruptedError:  # pragma: no cover (PEP 475 retries; kept for clarity)
            continue
    if code < 0:  # killed by a signal: end the same way, so the pipeline reports it as such
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _in_child(lifeline: int, libc) -> None:
    """Between fork and exec of the optimizer: SIGTERM back to its default, and SIGKILL when we die.
    Ray's raylet SIGKILLs the direct children of a worker it stops (an app's deletion): that is us,
    before our handler can run, so the optimizer must not outlive us either. (Processes the
    optimizer itself started are not covered in that case: PR_SET_PDEATHSIG is not inherited.)"""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ignored dispositions are inherited across exec
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != lifeline:  # we died before prctl took effect
        os._exit(70)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
