"""slimserve's alert rules: one file (helm/slimserve/files/slimserve-alerts.yml, which
deploy/prometheus/slimserve-alerts.yml links to), checked and unit-tested with the real promtool,
its metric names checked against serve/metrics.py, and the chart's PrometheusRule built from it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helm_chart import CHART, REPO, one, render, values_file
from promql_names import exported, metric_names, unknown_names

RULES = CHART / "files" / "slimserve-alerts.yml"
DEPLOY_RULES = REPO / "deploy" / "prometheus" / "slimserve-alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "slimserve-alerts_test.yml"
ALERTS = {"SlimserveTimeToFirstTokenHigh", "SlimserveErrorRateHigh", "SlimserveQualityGateFailed", "SlimserveVariantUnavailable",
          "SlimserveRolloutRolledBack"}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _rules(path: Path) -> list[dict]:
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def test_deploy_rules_are_the_chart_rules():
    # One source: the deploy/ copy is a relative symlink into the chart (Helm's .Files cannot
    # read outside the chart).
    assert DEPLOY_RULES.is_symlink()
    assert not Path(DEPLOY_RULES.readlink()).is_absolute()
    assert DEPLOY_RULES.resolve() == RULES.resolve()


def test_alerts_present():
    assert {r["alert"] for r in _rules(RULES)} == ALERTS


def test_promtool_check_rules():
    result = promtool("check", "rules", DEPLOY_RULES.name, cwd=DEPLOY_RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_cover_every_alert():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert tested == ALERTS  # each alert is seen firing (and, in the same test, not yet firing)
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_use_only_exported_metrics():
    for rule in _rules(RULES):
        assert metric_names(rule["expr"]), rule["alert"]
        assert unknown_names(rule["expr"]) == set(), rule["alert"]


def test_metric_name_check_catches_typos():
    assert unknown_names('rate(slimserve_request_total{status="500"}[5m])') == {"slimserve_request_total"}
    assert unknown_names("slimserve_time_to_first_token_seconds") == {"slimserve_time_to_first_token_seconds"}
    assert not exported("slimserve_requests_total_bucket")
    assert unknown_names("histogram_quantile(0.95, sum by (le) (rate(ray_vllm_e2e_request_latency_seconds_bucket[5m])))") == set()


# --- templates/prometheusrule.yaml -----------------------------------------------------------


def _chart_rules(values: dict) -> list[dict]:
    return [r for g in one(render(values), "PrometheusRule")["spec"]["groups"] for r in g["rules"]]


def test_prometheusrule_carries_the_file_rules():
    assert _chart_rules({"monitoring": {"prometheusRule": {"enabled": True}}}) == _rules(RULES)


def test_prometheusrule_overrides():
    rules = {r["alert"]: r for r in _chart_rules(values_file("ab"))}
    defaults = {r["alert"]: r for r in _rules(RULES)}
    ttft, errors = rules["SlimserveTimeToFirstTokenHigh"], rules["SlimserveErrorRateHigh"]
    assert ttft["expr"] == defaults["SlimserveTimeToFirstTokenHigh"]["expr"].removesuffix("> 2") + "> 0.5"
    assert (ttft["for"], ttft["labels"]["severity"]) == ("15m", "warning")
    assert errors["expr"] == defaults["SlimserveErrorRateHigh"]["expr"].removesuffix("> 0.05") + "> 0.02"
    assert (errors["for"], errors["labels"]["severity"]) == ("5m", "page")
    for name in ("SlimserveQualityGateFailed", "SlimserveVariantUnavailable"):
        assert rules[name] == defaults[name]


def test_prometheusrule_with_overrides_passes_promtool(tmp_path):
    groups = one(render(values_file("ab")), "PrometheusRule")["spec"]["groups"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    result = promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
