"""Progressive rollout on CPU, end to end, on a compressed timeline (steps of seconds, not
minutes): a W8A8 candidate is promoted step by step under steady load; a candidate whose engine
is killed is rolled back by the availability guardrail; an unhealed pruned candidate is rolled
back by the live-agreement guardrail, where a latency-only guard would have let it through."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import (
    MAIN_APP, METRICS_PORT, REPO, deploy_and_wait, engine_info, main_config, release_main_app, undeploy, wait_for,
)

pytestmark = pytest.mark.e2e

ADMIN_ENV = "SLIMSERVE_TEST_ADMIN_KEYS"
ADMIN_KEY = os.environ[ADMIN_ENV]  # set by conftest before the cluster starts
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
# Tiny steps for a CPU test: 3 x them (the default inconclusive_after) would end a step before its
# tests could show anything, so these steps hold until shown (the fail-closed end: test_rollout.py).
FAST = {"min_requests": 4, "min_seconds": 3, "evaluate_every_s": 1, "inconclusive_after": None}
# The load's prompts: ones whose first 4 greedy tokens W8A8 SmolLM2 keeps (measured: on these 7 it
# does, on others such as "Once upon a time" it does not), so the agreement guard can pass it; the
# pruned candidate is judged on the same prompts.
PROMPTS = ["The capital of France is", "Water boils at", "One, two, three,", "The opposite of hot is",
           "The first letter of the alphabet is", "Roses are red, violets are", "The chemical symbol for water is"]


class SteadyLoad:
    """Client threads sending short requests for the public name, one after another, each as a
    new user (so the split, not stickiness, decides); every answer is kept."""

    def __init__(self, base_url: str, threads: int = 2):
        self.base_url, self.results, self.latency, self._stop = base_url, [], [], threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            body = {"model": "smollm2", "prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": 4, "user": f"load-{i}-{n}",
                    "stream": n % 2 == 0}
            sent = time.time()
            try:
                r = httpx.post(f"{self.base_url}/v1/completions", json=body, timeout=300)
                ok = r.status_code == 200 and ("error" not in r.text if body["stream"] else True)
                self.results.append((sent, r.status_code if ok else 500, r.headers.get("x-slimserve-variant")))
                self.latency.append((r.headers.get("x-slimserve-variant"), time.time() - sent))
            except httpx.HTTPError:
                self.results.append((sent, 0, None))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(300)


def rollout(base_url: str, model: str = "smollm2") -> dict:
    r = httpx.get(f"{base_url}/slimserve/rollout/{model}", headers=ADMIN, timeout=30)
    r.raise_for_status()
    return r.json()


def test_a_w8a8_candidate_is_promoted_step_by_step(main_app, session_cache):
    config = main_config(
        session_cache, ingress={"admin_keys_env": ADMIN_ENV},
        probe={"sample": 1.0, "tokens": 4},
        rollout={"candidate": "int8", "steps": [50, 75, 100], **FAST,
                 # W8A8 on a 2-core CPU is not faster than bf16, and CPU latency is noisy: the test
                 # is about the steps, not a latency verdict. A loose significance shows the
                 # guardrails met on fewer requests (the statistics are bench/rollout_sim.py's).
                 "significance": 0.3,
                 "guardrails": {"min_agreement": 0.5, "max_ttft_p95_ratio": 5, "max_e2e_p95_ratio": 5}},
    )
    deploy_and_wait(config, MAIN_APP)
    try:
        # Client keys do not open the admin routes; no key neither.
        assert httpx.get(f"{main_app}/slimserve/rollout/smollm2", timeout=30).status_code == 401
        first = rollout(main_app)
        assert first["status"] == "running" and first["candidate_percent"] == 50
        with SteadyLoad(main_app) as load:
            final = wait_for(lambda: (s := rollout(main_app))["status"] == "promoted" and s, 300, "promoted")
        assert [h["action"] for h in final["history"]][-3:] == ["advance", "advance", "promote"]
        assert [h["percent"] for h in final["history"]][-3:] == [75, 100, 100]
        assert all("live agreement" in h["reason"] for h in final["history"][-3:]), final["history"]
        assert load.results and all(code == 200 for _, code, _ in load.results), load.results
        # Promoted: every request for the public name goes to int8; /v1/models says so.
        card = httpx.get(f"{main_app}/v1/models", timeout=30).json()["data"][0]["metadata"]
        assert {v["variant"]: v["traffic_share"] for v in card["variants"]} == {"baseline": 0.0, "int8": 1.0}
        assert card["rollout"]["status"] == "promoted"
        env = {**os.environ, "SLIMSERVE_ADMIN_KEYS": ADMIN_KEY}
        out = subprocess.run([sys.executable, "-m", "slimserve.serve.commands.cli", "rollout", "status", "--url", main_app,
                              "--model", "smollm2"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        assert out.returncode == 0 and "promoted" in out.stdout and "advance" in out.stdout, out.stderr
        # Exported on Ray's metrics port (what Prometheus scrapes; the alert and dashboard use them).
        def exported() -> bool:
            text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=30).text
            return ('ray_slimserve_rollout_decisions_total{' in text and 'action="promote"' in text
                    and 'ray_slimserve_rollout_percent{' in text
                    and any(l.startswith("ray_slimserve_rollout_status{") and 'status="promoted"' in l and l.endswith(" 1.0")
                            for l in text.splitlines()))
        wait_for(exported, 60, "rollout metrics exported")
        # An operator cannot abort what is done.
        r = httpx.post(f"{main_app}/slimserve/rollout/smollm2/abort", headers=ADMIN, timeout=30)
        assert r.status_code == 409 and "promoted" in r.json()["error"]["message"]
    finally:
        deploy_and_wait(main_config(session_cache), MAIN_APP)


@pytest.mark.kills_engines
def test_a_candidate_whose_engine_dies_is_rolled_back(main_app, session_cache):
    config = main_config(
        session_cache, ingress={"admin_keys_env": ADMIN_ENV},
        rollout={"candidate": "int8", "steps": [50, 100], "min_requests": 4, "min_seconds": 600,
                 # A dead engine also fails the requests routed to it, so the error-rate guardrail
                 # can fire first (CI: 2 of 3 failed within 4 s, Fisher p=0.045). This test is about
                 # the unavailability guardrail; the error-rate one has its own (test_rollout.py).
                 "evaluate_every_s": 1, "guardrails": {"max_unavailable_s": 4, "max_error_rate": None}},
    )
    deploy_and_wait(config, MAIN_APP)
    try:
        wait_for(lambda: rollout(main_app)["status"] == "running", 60, "rollout running")
        with SteadyLoad(main_app, threads=3) as load:
            wait_for(lambda: any(v == "int8" for _, c, v in load.results if c == 200), 120, "int8 answering")
            killed_at = time.time()
            os.kill(engine_info("smollm2--int8")["pid"], signal.SIGKILL)  # as the OOM killer would
            state = wait_for(lambda: (s := rollout(main_app))["status"] == "rolled_back" and s, 120, "rolled back")
            rolled_back_at = state["history"][-1]["at"]
            # Requests sent to int8 just before the rollback wait for its replica to come back
            # (Serve restarts it); the others go on at once, to the baseline.
            wait_for(lambda: sum(t > rolled_back_at + 1 for t, _, _ in load.results) >= 4, 180, "requests after the rollback")
        assert "unavailable" in state["history"][-1]["reason"], state["history"]
        assert state["candidate_percent"] == 0
        failed = [(t, v) for t, code, v in load.results if code != 200]
        # Only requests sent to the killed candidate before the rollback failed; none after it.
        assert all(v in ("int8", None) and killed_at - 30 < t < rolled_back_at for t, v in failed), (failed, killed_at)
        after = [(code, v) for t, code, v in load.results if t > rolled_back_at + 1]
        assert after and all(code == 200 and v == "baseline" for code, v in after), after
    finally:
        deploy_and_wait(main_config(session_cache), MAIN_APP)


def test_an_unhealed_pruned_candidate_is_rolled_back_by_live_agreement(serve_url, session_cache):
    release_main_app()
    config = {
        "cache_dir": str(session_cache),
        "models": [{
            "name": "smollm2", "engine": {"max_model_len": 512},
            "probe": {"sample": 1.0, "tokens": 8},
            "rollout": {"candidate": "pruned", "steps": [25, 50, 100], **FAST,
                        "guardrails": {"min_agreement": 0.5, "max_ttft_p95_ratio": 1.5, "max_e2e_p95_ratio": 1.5}},
            "variants": [
                {"name": "baseline"},
                # Half of every MLP removed and not healed: perplexity ratio ~7 on held-out text.
                {"name": "pruned", "optimization": {"method": "structured", "mlp_keep": 0.5,
                                                    "calibration": {"samples": 8, "seq_len": 128}}},
            ],
        }],
        "ingress": {"admin_keys_env": ADMIN_ENV, "health_probe_interval_s": 2},
    }
    deploy_and_wait(config, "pruned", route_prefix="/pruned")
    base = f"{serve_url}/pruned"
    try:
        with SteadyLoad(base) as load:
            state = wait_for(lambda: (s := rollout(base))["status"] != "running" and s, 300, "a decision")
        assert state["status"] == "rolled_back" and state["history"][-1]["action"] == "rollback", state
        reason = state["history"][-1]["reason"]
        # Within the first step, and by agreement: `decide` weighs the latency and error guardrails
        # (configured above) first, so none of them caught it. (The client's own latencies of the two
        # variants are not compared: on a 2-core host beside a busy process they measure the host;
        # such a run had the pruned variant's p95 at 2.6 s against the baseline's 0.5 s, ~15 requests each.)
        assert reason.startswith("live agreement") and state["step"] == 1, reason
        assert all(code == 200 for _, code, _ in load.results), load.results
        assert "pruned" in {v for v, _ in load.latency}, load.latency  # it served before the rollback
        info = engine_info("smollm2--pruned", app="pruned")
        assert info["optimization"]["report"]["quality"]["ppl_ratio"] > 3
        metrics = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["metadata"]
        assert metrics["rollout"]["status"] == "rolled_back"
        assert {v["variant"]: v["traffic_share"] for v in metrics["variants"]} == {"baseline": 1.0, "pruned": 0.0}
    finally:
        undeploy("pruned")
