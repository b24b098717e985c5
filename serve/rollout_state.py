"""A rollout's state on disk, beside the artifact cache (a PVC under Kubernetes): it survives a
restart of the ingress or of the whole app. One ingress replica leads (holds a lock file for its
life) and is the only one that decides; every replica reads the state and routes by it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel, Field

from .rollout_config import RolloutSettings

Status = Literal["running", "paused", "promoted", "rolled_back", "aborted"]


class StepRecord(BaseModel):
    at: float = Field(description="Unix time.")
    step: int = Field(description="Index into `steps` after the event.")
    percent: float = Field(description="The candidate's share of the pair's traffic after the event, %.")
    action: str = Field(description="start, advance, promote, rollback, pause, resume, abort.")
    reason: str


class RolloutState(BaseModel):
    model: str
    baseline: str
    candidate: str
    steps: list[float]
    settings_digest: str = Field(description="Of the baseline, candidate and steps: a change starts a new rollout.")
    tuning_digest: str = Field("", description="Of the rest of the block (guardrails, durations): a change keeps the step.")
    status: Status = "running"
    step: int = 0
    step_started: float = Field(default_factory=time.time)
    history: list[StepRecord] = Field(default_factory=list)

    @property
    def percent(self) -> float:
        """The candidate's share of the two variants' traffic now, %."""
        if self.status == "promoted":
            return 100.0
        if self.status in ("rolled_back", "aborted"):
            return 0.0
        return self.steps[self.step]

    def record(self, action: str, reason: str) -> None:
        self.history.append(StepRecord(at=time.time(), step=self.step, percent=self.percent, action=action, reason=reason))


def settings_digest(baseline: str, settings: RolloutSettings) -> str:
    return _digest([baseline, settings.candidate, settings.steps])


def tuning_digest(settings: RolloutSettings) -> str:
    return _digest(settings.model_dump(mode="json", exclude={"candidate", "baseline", "steps"}))


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class StateStore:
    """`{folder}/{app}--{model}.json`, written atomically under `.write.lock`; `.lead.lock` is
    held by the leading replica for its life (the kernel releases it when the process dies)."""

    def __init__(self, folder: Path, app: str, model: str):
        self.folder = folder
        self.path = folder / f"{app}--{model}.json"
        self._lead_fd: int | None = None

    def load(self) -> RolloutState | None:
        try:
            return RolloutState.model_validate_json(self.path.read_text())
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def editing(self) -> Iterator[None]:
        """Serialises read-modify-write of the state between replicas (and admin requests)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path) + ".write.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def save(self, state: RolloutState) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(state.model_dump_json(indent=2))
        os.replace(tmp, self.path)

    def lead(self) -> bool:
        """True while this process leads: takes the lead lock if it is free, keeps it after."""
        if self._lead_fd is not None:
            return True
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path) + ".lead.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lead_fd = fd
        return True
