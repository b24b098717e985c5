"""A rollout's state: written by the rollout's one owner (rollout/owner.py) to Ray's GCS key-value
store, where Ray Serve's controller keeps its own checkpoint (it survives the owner's restart, a
node's loss and a redeploy), and to a file beside the artifact cache (a PVC under Kubernetes: it
survives a new Ray cluster too). Reads take the newer of the two (`revision`), so a node-local
cache folder with an old file never wins over the GCS copy."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Literal, Protocol

from pydantic import BaseModel, Field

from slimserve.serve.config.rollout import RolloutSettings

log = logging.getLogger("slimserve.rollout")
ROLLOUT_ADMIN_PATH = "/slimserve/rollout"  # rollout_routes.py's admin routes

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
    revision: int = Field(0, description="Saves so far: of two stored copies the higher one is current.")
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


class KeyValue(Protocol):
    """Where a copy of the state lives besides the file (Ray's GCS store: rayllm.GcsKeyValue)."""

    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, value: str) -> None: ...


class StateStore:
    """`{folder}/{app}--{model}.json`, written atomically and durably under `.write.lock`, and its
    copy under `rollout/{app}--{model}` in `mirror`. `.lead.lock` is held by the deciding process
    for its life (the kernel releases it when the process dies): the rollout's owner, of which
    there is one per app, so the lock only matters while a redeploy replaces it.

    A state file that cannot be read (a disk fault, a hand edit) is the operator's to resolve,
    never silently replaced by a fresh rollout (which could send traffic again to a candidate that
    was rolled back): it is logged once, shown as `error` in the rollout's summary (the admin
    GET), nobody leads meanwhile, and removing the file or an admin action (abort, promote),
    which writes a new state, ends it."""

    def __init__(self, folder: Path, app: str, model: str, mirror: "KeyValue | None" = None):
        self.folder = folder
        self.path = folder / f"{app}--{model}.json"
        self.key = f"rollout/{app}--{model}"
        self.mirror = mirror  # Ray's GCS key-value store when running in Ray (rayllm.GcsKeyValue)
        self._lead_fd: int | None = None
        self.problem: str | None = None  # why the state file cannot be read, for the summary
        self._reported: tuple | None = None  # the corrupt file's (size, mtime) that was logged

    def load(self) -> RolloutState | None:
        """The stored state (the newer of the GCS copy and the file); None when there is none or
        it cannot be read (see `problem`)."""
        mirrored = self._load_mirror()
        try:
            raw = self.path.read_text()
            state = RolloutState.model_validate_json(raw)
        except FileNotFoundError:
            self._resolved()
            return mirrored
        except (OSError, ValueError) as e:  # ValueError: bad JSON or a pydantic ValidationError
            if mirrored is not None:  # the GCS copy is whole: the next save rewrites the file
                return mirrored
            self._corrupt(e)
            return None
        self._resolved()
        return mirrored if mirrored is not None and mirrored.revision > state.revision else state

    def _load_mirror(self) -> RolloutState | None:
        if self.mirror is None:
            return None
        raw = self.mirror.get(self.key)
        if raw is None:
            return None
        try:
            return RolloutState.model_validate_json(raw)
        except ValueError as e:
            log.error("rollout state %s in Ray's key-value store cannot be read (%s); using the file", self.key, e)
            return None

    def _corrupt(self, error: Exception) -> None:
        first = str(error).splitlines()[0]
        self.problem = (
            f"the rollout state file {self.path} cannot be read ({type(error).__name__}: {first}); the rollout "
            f"is stuck where it was until an operator acts: remove the file (the rollout starts again from its "
            f"first step) or POST {ROLLOUT_ADMIN_PATH}/{{model}}/abort (or /promote), which writes a new state"
        )
        try:
            st = self.path.stat()
            seen = (st.st_size, st.st_mtime_ns)
        except OSError:
            seen = None
        if seen != self._reported:  # once per corrupt content, not every tick
            self._reported = seen
            log.error("%s", self.problem)

    def _resolved(self) -> None:
        if self.problem is not None:
            log.info("rollout state file %s is readable again", self.path)
        self.problem, self._reported = None, None

    def annotate(self, summary: dict) -> dict:
        """The rollout's summary, with the state file's problem when there is one."""
        return {**summary, "error": self.problem} if self.problem else summary

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
        """Atomic and durable: a crash or power loss leaves the old state or the new, whole. The
        GCS copy first: it is the one every node sees."""
        state.revision += 1
        if self.mirror is not None:
            self.mirror.put(self.key, state.model_dump_json())
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(state.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.folder, os.O_RDONLY)  # the rename itself, on disk
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._resolved()

    def lead(self) -> bool:
        """True while this process leads: takes the lead lock if it is free, keeps it after.
        False while the state file cannot be read: no decision is made on a state nobody knows."""
        if self.path.exists() and self.load() is None and self.problem:
            return False
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
