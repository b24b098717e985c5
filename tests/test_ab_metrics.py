"""A/B traffic and per-variant metrics, end to end: the shared app (bf16 70 % / W8A8 30 %), Ray's
Prometheus endpoint scraped by a real Prometheus server (Debian's, on loopback, with the scrape
config in deploy/prometheus/), queries through Prometheus' HTTP API, and `slimserve ab-report`."""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import (MAIN_APP, MAIN_CONFIG, METRICS_PORT, REPO, deploy_and_wait, engine_info, free_port, main_config,
                      slimserve_info, wait_for)

pytestmark = pytest.mark.e2e

PROMETHEUS = shutil.which("prometheus")
DEPLOY = REPO / "deploy"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, _main_app_session):
    """Debian's prometheus on a free loopback port, scraping this session's Ray node every 1 s."""
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus is not installed (make setup installs it as root: apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{METRICS_PORT}"]}]
    # The shipped alert rules are loaded too: a real Prometheus must accept them.
    config["rule_files"] = [str((DEPLOY / "prometheus" / f).resolve()) for f in config.get("rule_files", [])
                            if (DEPLOY / "prometheus" / f).exists()]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, "prometheus ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def promql(url: str, query: str, at: float | None = None) -> dict:
    """An instant query; `at` (Unix time) pins the instant, so several reads see one state."""
    params = {"query": query} if at is None else {"query": query, "time": f"{at:.3f}"}
    r = httpx.get(f"{url}/api/v1/query", params=params, timeout=30)
    r.raise_for_status()
    return {tuple(sorted(s["metric"].items())): float(s["value"][1]) for s in r.json()["data"]["result"]}


def by_variant(url: str, query: str, at: float | None = None) -> dict[str, float]:
    return {dict(k).get("variant"): v for k, v in promql(url, query, at).items()}


def ok_counts(url: str) -> dict[str, float]:
    # Each ingress replica has its own series, and one replaced by an earlier test's redeploy
    # stops exporting: its last value (max over the window, counters only grow) still counts.
    return by_variant(url, 'sum by (variant) (max_over_time(slimserve_requests_total{model="smollm2",status="200"}[1h]))')


def complete(base_url: str, headers: dict | None = None, **body) -> httpx.Response:
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 1, **body}
    return httpx.post(f"{base_url}/v1/completions", json=body, headers=headers or {}, timeout=120)


def test_split_70_30_is_counted_per_variant_in_prometheus(main_app, prometheus):
    # Ray's metrics agent exports every few seconds; take the counters as they stand first.
    time.sleep(2)
    before = ok_counts(prometheus)
    n = 300
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: complete(main_app), range(n)))
    assert all(r.status_code == 200 for r in answers)
    seen = collections.Counter(r.headers["x-slimserve-variant"] for r in answers)
    # Binomial(300, 0.7): sd 7.9 requests; 4 sd leaves a 6e-5 chance of a false failure.
    assert abs(seen["baseline"] - 0.7 * n) < 4 * (n * 0.7 * 0.3) ** 0.5, seen
    # Prometheus counts exactly what the clients saw, per variant.
    expected = {v: before.get(v, 0) + seen[v] for v in ("baseline", "int8")}
    wait_for(lambda: ok_counts(prometheus) == expected, 90, f"prometheus counts {expected}")


def ttft_buckets(prometheus: str) -> dict[tuple[str, float], float]:
    q = 'sum by (variant, le) (slimserve_time_to_first_token_seconds_bucket{model="smollm2"})'
    return {(dict(k)["variant"], float(dict(k)["le"])): v for k, v in promql(prometheus, q).items()}


def test_ttft_itl_and_token_metrics_exist_per_variant(main_app, prometheus):
    before = ttft_buckets(prometheus)
    client_ttft: dict[str, list[float]] = {"baseline": [], "int8": []}
    for variant in ("baseline", "int8"):
        for _ in range(3):
            body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count to five."}],
                    "max_tokens": 12, "stream": True}
            t0 = time.perf_counter()
            with httpx.stream("POST", f"{main_app}/v1/chat/completions", json=body,
                              headers={"x-slimserve-variant": variant}, timeout=120) as r:
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        if not events:
                            client_ttft[variant].append(time.perf_counter() - t0)
                        events.append(line)
            chunks = [json.loads(e[6:]) for e in events[:-1]]
            # slimserve asks the engine for usage (to count tokens) but the client did not: not passed on.
            assert all(c.get("choices") for c in chunks) and events[-1] == "data: [DONE]"
    # The TTFT histogram of these 6 requests (after minus before) agrees with what the clients
    # saw: the ingress's TTFT of a request is at most the client's, so at every bucket bound b at
    # least as many requests are counted at or below b as the clients saw at or below b.
    def these() -> dict[tuple[str, float], float]:
        after = ttft_buckets(prometheus)
        return {k: after[k] - before.get(k, 0) for k in after}

    diff = wait_for(lambda: (d := these()) and all(d.get((v, float("inf")), 0) == 3 for v in client_ttft) and d,
                    90, "TTFT histograms of the 3 + 3 requests")
    for (variant, bound), counted in diff.items():
        if variant in client_ttft:
            assert counted >= sum(t <= bound for t in client_ttft[variant]), (variant, bound, counted, client_ttft[variant])
    itl = by_variant(prometheus, 'sum by (variant) (slimserve_inter_token_latency_seconds_count{model="smollm2"})')
    assert min(itl.get("baseline", 0), itl.get("int8", 0)) >= 3, itl
    tokens = by_variant(prometheus, 'sum by (variant) (slimserve_generation_tokens_total{model="smollm2"})')
    assert min(tokens.get("baseline", 0), tokens.get("int8", 0)) >= 3 * 2, tokens


def test_usage_chunk_is_kept_when_the_client_asks_for_it(main_app):
    body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{main_app}/v1/completions", json=body, timeout=120) as r:
        events = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 4


def test_memory_and_optimization_gauges(main_app, prometheus):
    weights = wait_for(lambda: (w := by_variant(prometheus, 'max by (variant) (slimserve_model_weight_bytes{model="smollm2"})'))
                       and len(w) == 2 and w, 60, "weight gauges")
    assert weights["int8"] < 0.75 * weights["baseline"], weights  # int8 linear layers, bf16 embeddings
    checkpoint = by_variant(prometheus, 'max by (variant) (slimserve_checkpoint_bytes{model="smollm2"})')
    assert checkpoint["int8"] < checkpoint["baseline"] and checkpoint["baseline"] >= weights["baseline"]
    rss = by_variant(prometheus, 'max by (variant) (slimserve_process_rss_bytes{model="smollm2"})')
    assert all(r > 100e6 for r in rss.values()) and len(rss) == 2, rss
    quality = promql(prometheus, 'slimserve_quality_ratio{model="smollm2"}')
    ratios = {dict(k)["variant"]: v for k, v in quality.items() if dict(k)["metric"] == "ppl_ratio"}
    assert ratios["baseline"] == 1.0 and 1.0 < ratios["int8"] < 1.2, ratios
    runs = promql(prometheus, 'slimserve_optimization_runs_total{model="smollm2"}')
    assert {(dict(k)["variant"], dict(k)["method"]) for k in runs} == {("baseline", "none"), ("int8", "w8a8")}
    up = wait_for(lambda: (u := by_variant(prometheus, 'max by (variant) (slimserve_variant_up{model="smollm2"})')) and len(u) == 2 and u,
                  60, "variant_up for both")
    assert up == {"baseline": 1.0, "int8": 1.0}
    failed = by_variant(prometheus, 'max by (variant) (slimserve_quality_gate_failed{model="smollm2"})')
    assert failed == {"baseline": 0.0, "int8": 0.0}


def test_errors_are_counted_by_status_with_bounded_labels(main_app, prometheus):
    assert complete(main_app, model="no-such-model").status_code == 404
    assert complete(main_app, headers={"x-slimserve-variant": "fp4"}).status_code == 400
    q = 'sum by (model, status) (slimserve_requests_total{status=~"4.."})'
    got = wait_for(lambda: (c := promql(prometheus, q)) and len(c) >= 2 and c, 60, "4xx counters")
    labels = {(dict(k)["model"], dict(k)["status"]) for k in got}
    assert ("unknown", "404") in labels and ("smollm2", "400") in labels
    names = httpx.get(f"{prometheus}/api/v1/label/model/values", timeout=30).json()["data"]
    assert "no-such-model" not in names  # a client's string never becomes a label value


def test_sticky_users_stay_on_their_variant(main_app):
    for user in [f"user-{i}" for i in range(8)]:
        seen = {complete(main_app, user=user).headers["x-slimserve-variant"] for _ in range(3)}
        seen |= {complete(main_app, headers={"x-slimserve-user": user}).headers["x-slimserve-variant"]}
        assert len(seen) == 1, (user, seen)


def test_ab_report_reads_prometheus_and_gives_a_verdict(main_app, prometheus):
    cmd = [sys.executable, "-m", "slimserve.serve.commands.cli", "ab-report", "--prometheus", prometheus, "--model", "smollm2", "--window", "30m"]
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["baseline"] == "baseline" and set(r["variants"]) == {"baseline", "int8"}
    b, q = r["variants"]["baseline"], r["variants"]["int8"]
    # This module's Prometheus started with it, so the window holds all of its traffic: every
    # smollm2 request with a variant was answered 200 (the 404 and 400 above carry no variant).
    assert b["requests"] > q["requests"] >= 30  # the 70/30 test ran in this window
    assert b["errors"] == q["errors"] == 0 and b["error_rate"] == q["error_rate"] == 0
    for s in (b, q):  # every latency read, ordered, and the decode rate is 1 / the median ITL
        for short in ("ttft", "itl", "e2e"):
            assert 0 < s[f"{short}_p50"] <= s[f"{short}_p95"] < 60, (short, s)
        assert s["decode_tokens_per_s"] == pytest.approx(1 / s["itl_p50"])
    # What each variant is: the unoptimized baseline, and int8's smaller weights and quality cost.
    assert (b["method"], q["method"]) == ("none", "w8a8")
    assert q["weight_bytes"] < 0.75 * b["weight_bytes"]
    # (W8A8 can land a hair under the base's perplexity on held-out text: not a loss.)
    assert b["quality"]["ppl_ratio"] == 1.0 and 0.95 < q["quality"]["ppl_ratio"] < 1.2
    (c,) = r["comparisons"]
    assert (c["candidate"], c["baseline"]) == ("int8", "baseline")
    # The tests' claims agree with the data: no errors on either side shows no difference, and a
    # latency difference, when claimed, points the way the two e2e p95s do.
    assert c["error_change"] == "no significant difference" and c["error_p"] >= r["alpha"]
    assert c["latency_p"] is not None and 0 <= c["latency_p"] <= 1  # enough traffic in the window
    if c["latency_change"] == "slower":
        assert q["e2e_p95"] > b["e2e_p95"] and c["verdict"] == "keep baseline: int8 is slower"
    else:
        assert c["latency_change"] in ("faster", "no significant difference"), c
        if c["latency_change"] == "faster":
            assert q["e2e_p95"] < b["e2e_p95"]
        # Not slower, not less reliable: int8 may replace the baseline, at its stated quality cost.
        assert c["verdict"].startswith("int8 can replace baseline: not slower, not less reliable; it costs "
                                       f"quality ratio {q['quality']['ppl_ratio']:.3f}"), c["verdict"]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    last = text.stdout.strip().splitlines()[-1]
    assert last == f"verdict (smollm2, last 30m, alpha 0.05): {c['verdict']}"


def test_ab_report_says_what_is_wrong(main_app, prometheus):
    out = subprocess.run([sys.executable, "-m", "slimserve.serve.commands.cli", "ab-report", "--prometheus", prometheus, "--model", "gpt-17"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "no slimserve requests for model 'gpt-17'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "slimserve.serve.commands.cli", "ab-report", "--prometheus", "http://127.0.0.1:1", "--model", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "cannot query Prometheus" in out.stderr


def test_shadow_variant_gets_copies_without_the_client_waiting(main_app, prometheus, session_cache):
    """Redeploying with `shadow: int8` changes only the ingress (the engines keep running)."""
    pids = engine_pids(main_app)
    redeploy(main_app, session_cache, shadow="int8")
    try:
        assert engine_pids(main_app) == pids
        q = 'sum by (status) (slimserve_shadow_requests_total{model="smollm2",variant="int8"})'
        before = {dict(k)["status"]: v for k, v in promql(prometheus, q).items()}
        answers = [complete(main_app, headers={"x-slimserve-variant": "baseline"}, max_tokens=4) for _ in range(6)]
        assert all(r.status_code == 200 and r.headers["x-slimserve-variant"] == "baseline" for r in answers)
        target = before.get("200", 0) + 6
        wait_for(lambda: {dict(k)["status"]: v for k, v in promql(prometheus, q).items()}.get("200", 0) == target, 90,
                 f"shadow 200 count {target}")
        assert by_variant(prometheus, 'sum by (variant) (slimserve_shadow_e2e_request_latency_seconds_count{model="smollm2"})')["int8"] >= 6
    finally:
        redeploy(main_app, session_cache)


def test_live_probes_compare_served_prompts_with_the_baseline(main_app, prometheus, session_cache):
    """With `probe: {sample: 1}` every request's prompt is also sent, in the background, to the
    baseline and to int8 as an 8-token greedy completion; each probe's outcome, the shared prefix
    and the KL estimate are exported, and the agreement gauge is the fraction of matches."""
    # Room for every probe at once: the requests below come faster than two probes each finish.
    redeploy(main_app, session_cache, probe={"sample": 1.0, "tokens": 8, "window": 50, "max_in_flight": 8})
    try:
        prompts = ["The capital of France is", "Water boils at", "The largest planet is", "Once upon a time",
                   "The chemical symbol for gold is", "Two plus two equals"]
        for i, prompt in enumerate(prompts):
            # The client is answered by whichever variant the split picks, with its own settings.
            r = complete(main_app, prompt=prompt, max_tokens=2, temperature=0.8, user=f"probe-user-{i}")
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        # Raw series values (no rate()/increase(), which extrapolate), all read at one instant
        # once every one of the 6 probes is in each of them.
        def int8_series(at: float) -> dict:
            sel = '{model="smollm2",variant="int8"}'
            outcomes = {dict(k)["outcome"]: v for k, v in
                        promql(prometheus, f"sum by (outcome) (slimserve_live_probes_total{sel})", at).items()}
            read = {name: sum(promql(prometheus, f"{name}{sel}", at).values()) for name in (
                "slimserve_live_prefix_tokens_count", "slimserve_live_kl_per_token_count",
                "slimserve_live_shared_tokens_total", "slimserve_live_kl_nats_total")}
            agreement = by_variant(prometheus, 'max by (variant) (slimserve_live_agreement{model="smollm2"})', at)
            return {"outcomes": outcomes, "agreement": agreement, **read}

        n = len(prompts)
        wait_for(lambda: (s := int8_series(time.time())) and sum(s["outcomes"].values()) == n
                 and s["slimserve_live_prefix_tokens_count"] == s["slimserve_live_kl_per_token_count"] == n
                 and s["agreement"], 90, "6 probes recorded")
        # A few scrapes later, whatever the 6th probe recorded in the same export is in too.
        time.sleep(3)
        seen = int8_series(time.time())
        assert sum(seen["outcomes"].values()) == seen["slimserve_live_prefix_tokens_count"] == n, seen
        outcomes = seen["outcomes"]
        assert set(outcomes) <= {"match", "mismatch"}, seen  # none dropped or failed at this load
        match, mismatch = outcomes.get("match", 0), outcomes.get("mismatch", 0)
        assert set(seen["agreement"]) == {"int8"}, seen  # the baseline is not compared with itself
        assert seen["agreement"]["int8"] == pytest.approx(match / n), seen
        # A matched probe shares all 8 tokens, a mismatched one at most 7 (the exact counter: the
        # histogram's _sum is rebuilt by Ray from bucket midpoints, 8 read as 6).
        shared = seen["slimserve_live_shared_tokens_total"]
        assert 8 * match <= shared <= 8 * match + 7 * mismatch and shared == int(shared), seen
        # Every probe has a KL estimate; W8A8's log-probabilities differ from bf16's, so the
        # estimate is above 0 (the code clamps each term at 0), and small (W8A8 keeps perplexity
        # within 20 % of the base: test_memory_and_optimization_gauges).
        assert seen["slimserve_live_kl_per_token_count"] == n, seen
        assert 0 < seen["slimserve_live_kl_nats_total"] / n < 0.5, seen
    finally:
        redeploy(main_app, session_cache)


def test_new_weights_reach_the_live_ingress_without_replacing_anything(main_app, session_cache):
    """Weights are the ingress's user_config: a change reaches the running ingress replica
    (SlimserveIngress.reconfigure); no process is replaced, no stream is cut."""
    pids, ingress_pid = engine_pids(main_app), ingress_info()["pid"]
    results: list[tuple[int, str, dict | None, str | None]] = []
    streaming = [threading.Event() for _ in range(4)]

    def stream_one(i: int):
        body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True, "stream": True,
                "temperature": 0, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{main_app}/v1/completions", json=body, timeout=300) as r:
            parts, usage, finish = [], None, None
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    for choice in chunk["choices"]:  # the last chunk, usage only, has none
                        parts.append(choice["text"])
                        finish = choice.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
                    streaming[i].set()
            results.append((r.status_code, "".join(parts), usage, finish))

    threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for event in streaming:  # every stream is in flight (its first chunk arrived) before the redeploy
        assert event.wait(120), "a stream did not start"
    try:
        redeploy(main_app, session_cache, variants=[
            {"name": "baseline", "weight": 20}, {"name": "int8", "weight": 80, "optimization": {"method": "w8a8"}}])
        for t in threads:
            t.join(300)
        # None cut by the change: each got all 48 tokens asked for (ignore_eos) and ended normally.
        assert len(results) == 4 and all((code, usage["completion_tokens"], finish) == (200, 48, "length") and text.strip()
                                         for code, text, usage, finish in results), results
        assert engine_pids(main_app) == pids
        assert ingress_info() == {"pid": ingress_pid, "weights": {"smollm2": {"baseline": 20.0, "int8": 80.0}}}
        shares = {v["variant"]: v["traffic_share"] for v in
                  httpx.get(f"{main_app}/v1/models", timeout=30).json()["data"][0]["metadata"]["variants"]}
        assert shares == {"baseline": 0.2, "int8": 0.8}
    finally:
        redeploy(main_app, session_cache)


def test_a_variant_that_fails_to_load_gets_no_traffic_and_says_why(main_app, prometheus, session_cache):
    """A third variant whose optimization cannot run here (FP8: no vLLM CPU kernels) does not take
    the app down: it is marked unavailable with the reason, its 50 % goes to the others, forcing
    it gives a 503 naming the reason, and slimserve_variant_up / _optimization_failed show it."""
    variants = MAIN_CONFIG["models"][0]["variants"] + [{"name": "broken", "weight": 50, "optimization": {"method": "fp8"}}]
    deploy_and_wait(main_config(session_cache, variants=variants), MAIN_APP)
    try:
        def broken_card():
            # Until its replica is placed it is `loading` or `waiting_for_resources`; then `failed`.
            v = {x["variant"]: x for x in public_card(main_app)["variants"]}
            return "broken" in v and v["broken"]["state"] == "failed" and not v["broken"]["available"] and v["broken"]

        card = wait_for(broken_card, 300, "the broken variant reported unavailable")
        assert "no kernels" in card["unavailable_because"] and "fp8" in card["unavailable_because"]
        seen = collections.Counter(complete(main_app, user=f"u{i}").headers["x-slimserve-variant"] for i in range(30))
        assert set(seen) <= {"baseline", "int8"} and sum(seen.values()) == 30, seen
        forced = complete(main_app, headers={"x-slimserve-variant": "broken"})
        assert forced.status_code == 503 and "fp8" in forced.json()["error"]["message"]
        q = 'max by (variant) (slimserve_variant_up{model="smollm2"})'
        wait_for(lambda: by_variant(prometheus, q) == {"baseline": 1.0, "int8": 1.0, "broken": 0.0}, 90, "variant_up")
        failed = wait_for(lambda: by_variant(prometheus, 'max by (variant) (slimserve_optimization_failed{model="smollm2"})').get("broken"),
                          90, "optimization_failed gauge")
        assert failed == 1.0
    finally:
        redeploy(main_app, session_cache)


def test_ab_report_counts_across_a_redeploy(main_app, prometheus, session_cache):
    """A changed ingress setting replaces the ingress, whose counters start again at 0 in new
    series while the old ones stop: the report still counts every request of the window."""
    cmd = [sys.executable, "-m", "slimserve.serve.commands.cli", "ab-report", "--prometheus", prometheus, "--model", "smollm2",
           "--window", "1h", "--json"]

    def reported() -> float:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["variants"]["baseline"]["requests"]

    before = reported()
    for _ in range(10):
        assert complete(main_app, headers={"x-slimserve-variant": "baseline"}, max_tokens=1).status_code == 200
    wait_for(lambda: reported() == before + 10, 90, "report before the redeploy")
    old_ingress = ingress_info()["pid"]
    redeploy(main_app, session_cache, ingress={"shadow_max_in_flight": 4})
    wait_for(lambda: (ingress_info() or {}).get("pid") not in (None, old_ingress), 120, "the ingress replaced")
    try:
        for _ in range(5):
            assert complete(main_app, headers={"x-slimserve-variant": "baseline"}, max_tokens=1).status_code == 200
        # Once the old ingress is gone its series stop; the report keeps their requests.
        wait_for(lambda: reported() == before + 15, 120, f"report {before + 15} after the redeploy")
    finally:
        redeploy(main_app, session_cache)


def test_dashboard_and_alert_rules_use_metrics_that_exist(main_app, prometheus):
    # Last in this module: the shadow and weight tests above make the shadow_* series exist.
    """Every slimserve_*, ray_vllm_* and ray_serve_* name in the Grafana dashboard and the alert
    rules is in this real scrape (histograms by their _bucket/_count/_sum series), and vLLM labels
    its series with the variant's model id, as the dashboard assumes."""
    exprs = []
    dashboard = DEPLOY / "grafana" / "slimserve-dashboard.json"
    if dashboard.exists():
        exprs += [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p.get("targets", [])]
    rules = DEPLOY / "prometheus" / "slimserve-alerts.yml"
    if rules.exists():
        exprs += [r["expr"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]]
    if not exprs:
        pytest.skip("no dashboard or alert rules in deploy/ yet")
    used = {n for e in exprs for n in re.findall(r"\b(?:slimserve|ray_vllm|ray_serve)_[a-z0-9_]+", e)}
    present = set(httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=30).json()["data"])
    # Not on a CPU host; written by engines on GPU hosts only. Rollout metrics exist only while
    # a rollout runs: test_rollout_e2e.py finds them in Ray's scrape.
    cpu_absent = {"slimserve_gpu_memory_used_bytes", "slimserve_rollout_decisions_total",
                  "slimserve_rollout_percent"}
    missing = {n for n in used - cpu_absent if n not in present}
    assert not missing, f"used by dashboard/alerts but not exported: {sorted(missing)}"
    # Over time: Ray drops a gauge that is not set again, and vLLM sets this one only while busy.
    kv = promql(prometheus, "max by (model_name) (max_over_time(ray_vllm_kv_cache_usage_perc[30m]))")
    assert {dict(k)["model_name"] for k in kv} >= {"smollm2--baseline", "smollm2--int8"}


def engine_pids(base_url: str) -> dict[str, int]:
    cards = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]
    ids = [c["id"] for c in cards if "engine" in c.get("metadata", {})]
    return {m: engine_info(m)["pid"] for m in ids}


def ingress_info(timeout_s: float = 10) -> dict | None:
    """The ingress replica's pid and weights, read through Ray (SlimserveIngress.slimserve_info)."""
    try:
        return slimserve_info("SlimserveIngress", MAIN_APP, timeout_s)
    except Exception:
        return None


def public_card(base_url: str) -> dict:
    return httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["metadata"]


def redeploy(base_url: str, session_cache: Path, **model_overrides) -> None:
    """serve.run the shared app with changes; return once the new ingress answers."""
    cfg = main_config(session_cache, **model_overrides)
    model = cfg["models"][0]
    total = sum(v["weight"] for v in model["variants"])
    want = ({v["name"]: round(v["weight"] / total, 4) for v in model["variants"]}, model.get("shadow"))
    deploy_and_wait(cfg, MAIN_APP)

    def current():
        meta = public_card(base_url)
        return ({v["variant"]: v["traffic_share"] for v in meta["variants"]}, meta["shadow"]) == want

    wait_for(current, 120, f"ingress with {want}")
