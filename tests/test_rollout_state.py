"""The rollout's state file (serve/rollout/state.py), on a real folder: written atomically and
durably; a corrupt file is an error the operator sees once and resolves, never a warning every
tick nor a silent restart of the rollout."""

from __future__ import annotations

import logging
import os

from slimserve.serve.rollout.controller import RolloutController
from slimserve.serve.config.rollout import RolloutSettings
from slimserve.serve.rollout.state import StateStore


def controller(tmp_path) -> RolloutController:
    settings = RolloutSettings.model_validate({"candidate": "cand", "steps": [10, 50, 100], "min_requests": 50,
                                               "min_seconds": 10, "evaluate_every_s": 1})
    return RolloutController("m", "base", settings, StateStore(tmp_path, "app", "m"), clock=lambda: 1000.0)


def test_the_state_is_written_whole_and_synced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    c = controller(tmp_path)
    c.tick(True)
    path = c.store.path
    assert path.is_file() and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # The data (in its temporary name), then the folder that holds the rename.
    assert synced[-2].endswith(".tmp") and synced[-1] == str(tmp_path)


def test_a_corrupt_state_file_is_reported_once_and_resolved_by_an_operator(tmp_path, caplog):
    c = controller(tmp_path)
    c.tick(True)
    c.store.path.write_text('{"model": "m", "status": "roll')  # a torn write, a disk fault
    with caplog.at_level(logging.INFO, logger="slimserve.rollout"):
        for _ in range(5):
            c.tick(True)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR, [r.getMessage() for r in errors]
    assert c.store.path.read_text() == '{"model": "m", "status": "roll'  # not replaced by a fresh rollout
    error = c.summary()["error"]
    assert str(c.store.path) in error and "remove the file" in error and "/slimserve/rollout/{model}/abort" in error
    c.admin("abort", "state file was corrupt")  # writes a new state: the problem is gone
    assert "error" not in c.summary() and c.summary()["status"] == "aborted"
    assert c.store.load().status == "aborted"
