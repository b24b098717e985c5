"""deploy/grafana/slimserve-dashboard.json: valid JSON, a `model` variable, every panel queried,
and every metric it queries exported (serve/metrics.py, or Ray Serve's / vLLM's own)."""

from __future__ import annotations

import json
import re

from helm_chart import REPO
from promql_names import metric_names, unknown_names

DASHBOARD = REPO / "deploy" / "grafana" / "slimserve-dashboard.json"


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_model_variable():
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert "model" in variables and variables["model"]["type"] == "query"
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            assert "$model" in target["expr"], panel["title"]


def test_every_panel_has_a_query():
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]


def _variable_queries(dashboard: dict) -> list[str]:
    # label_values(SERIES, label): the series part is PromQL.
    queries = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return [re.fullmatch(r"label_values\((.*),\s*\w+\)", q).group(1) for q in queries]


def test_queries_use_only_exported_metrics():
    dashboard = _dashboard()
    for query in _queries(dashboard) + _variable_queries(dashboard):
        assert metric_names(query), query
        assert unknown_names(query) == set(), query


def test_panels_cover_the_variant_metrics():
    used = set().union(*(metric_names(q) for q in _queries(_dashboard())))
    wanted = {
        "slimserve_requests_total", "slimserve_requests_in_flight",
        "slimserve_time_to_first_token_seconds_bucket", "slimserve_inter_token_latency_seconds_bucket",
        "slimserve_e2e_request_latency_seconds_bucket", "slimserve_generation_tokens_total",
        "slimserve_model_weight_bytes", "slimserve_checkpoint_bytes", "slimserve_process_rss_bytes",
        "slimserve_quality_ratio", "slimserve_variant_up", "ray_vllm_kv_cache_usage_perc",
    }
    assert wanted <= used, wanted - used
