"""Retrying a variant that failed to prepare: the policy (a variant's `prepare_retry:` block),
which failures are worth another try, and what the replica reports while it waits.

A transient cause — another replica's build holding the cache lock too long, the OOM killer
taking the optimizer beside another build, a full disk — may be gone a minute later; a
deterministic one (the quality gate, a method vLLM's CPU build cannot run, a bad config, a build
that ran its whole build_timeout_s) would fail the same way again, so it is not retried."""

from __future__ import annotations

import errno
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from slimserve.optimizers.cache.store import LockTimeout
from slimserve.optimizers.build.pipeline import OptimizationFailed, OptimizationTimedOut

# What a failed build's output says when the machine, not the method, was the cause.
_TRANSIENT_OUTPUT = ("out of memory", "outofmemoryerror", "no space left on device", "cannot allocate memory",
                     "was killed by sigkill")
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.ENOMEM, errno.EDQUOT, errno.EAGAIN, errno.EBUSY, errno.EIO}


class PrepareRetry(BaseModel):
    """How a variant that failed to prepare for a transient reason tries again (in its replica,
    which stays up meanwhile; the other variants serve on)."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(
        3, ge=0, le=100,
        description="Retries after the first failure (0: none). Only transient failures are retried: the cache "
        "lock timing out, the optimizer killed (out of memory), a full disk. A failed quality gate, a method the "
        "engine cannot run, a bad config or a build past its build_timeout_s is not.",
    )
    backoff_s: float = Field(
        30.0, gt=0, le=3600,
        description="Wait before the first retry; each next wait doubles (30, 60, 120 s by default).",
    )

    def delay_s(self, attempt: int) -> float:
        """The wait before retry `attempt` (1-based)."""
        return self.backoff_s * 2 ** (attempt - 1)


def transient(exc: BaseException) -> bool:
    """Whether `exc`, raised while preparing a variant, may not happen again on a retry."""
    if isinstance(exc, (LockTimeout, MemoryError)):
        return True
    if isinstance(exc, OptimizationTimedOut):
        return False  # it ran its whole budget: another run takes as long
    if isinstance(exc, OptimizationFailed):
        return any(s in str(exc).lower() for s in _TRANSIENT_OUTPUT)
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return False


def retry_status(attempt: int, of: int, next_at: float | None, last_error: str) -> dict[str, Any]:
    """What `slimserve_info` reports while a variant retries; `next_at` None: retrying now."""
    return {"attempt": attempt, "of": of, "next_at": next_at, "last_error": last_error}


def describe_retry(retry: dict[str, Any], now: float | None = None) -> str:
    """`retrying (attempt 2 of 3, next in 25 s): <first line of the last error>`."""
    when = "now" if retry.get("next_at") is None else f"next in {max(0, round(retry['next_at'] - (now or time.time())))} s"
    return f"retrying (attempt {retry['attempt']} of {retry['of']}, {when}): {retry['last_error'].splitlines()[0]}"
