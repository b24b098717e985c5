"""`cpu_threads_bind: auto` gives every CPU engine replica cores of its own — replicas of one
variant included (they once shared theirs). Real lock files in a temporary folder."""

from __future__ import annotations

import pytest

from slimserve.serve.engine import cpu_binding
from slimserve.serve.app import llm_config_for
from slimserve.serve.config.file import load_config
from slimserve.serve.engine.cpu_binding import SLOTS_ENV, claim_slot, core_binder, slots_for


@pytest.fixture(autouse=True)
def lock_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_binding, "LOCK_DIR", tmp_path)


def test_each_replica_gets_its_own_cores():
    take = core_binder(n_cores=4, n_ranks=2 * 1)  # one variant, 2 replicas, TP 1
    assert slots_for(take, replicas=2, tensor_parallel_size=1) == ["0,1", "2,3"]
    take = core_binder(n_cores=8, n_ranks=2 * 2)  # 2 replicas of TP 2
    assert slots_for(take, replicas=2, tensor_parallel_size=2) == ["0,1|2,3", "4,5|6,7"]


def test_replicas_claim_different_slots_and_a_released_slot_is_reused():
    slots = ["0", "1"]
    a, b = claim_slot("m/v", slots), claim_slot("m/v", slots)
    assert {a.binding, b.binding} == {"0", "1"}
    a.release()
    c = claim_slot("m/v", slots)
    assert c.binding == a.binding
    # Another variant's slots are its own.
    assert claim_slot("m/w", slots).binding == "0"


def test_with_every_slot_held_a_replica_shares_rather_than_never_starting():
    held = claim_slot("m/v", ["0"])
    assert claim_slot("m/v", ["0"], wait_s=0.2).binding == "0"
    held.release()


def test_the_app_hands_out_disjoint_slots_per_replica():
    cfg = load_config({"models": [{"name": "m", "deployment": {"replicas": 2}, "variants": [{"name": "a"}, {"name": "b"}]}]})
    model = cfg.models[0]
    take = core_binder(n_cores=4, n_ranks=4)  # what build_from_config makes for 2 variants x 2 replicas on 4 cores
    cores = []
    for variant in model.variants:
        env = llm_config_for(cfg, model, variant, "cpu", bind_cores=take).runtime_env["env_vars"]
        assert "VLLM_CPU_OMP_THREADS_BIND" not in env
        cores += env[SLOTS_ENV].split(";")
    assert sorted(cores) == ["0", "1", "2", "3"]  # 4 replicas, 4 cores, none shared
