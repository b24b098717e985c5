"""Metric names used by PromQL expressions, and the check that each one is exported: a key of
slimserve.serve.metrics.METRICS (for a histogram, one of its _bucket/_sum/_count series), or a
Ray Serve / vLLM-through-Ray metric (ray_serve_*, ray_vllm_*)."""

from __future__ import annotations

import re

from slimserve.serve.metrics import METRICS

_FUNCTIONS = {
    # aggregations and their modifiers, binary operators and keywords
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset",
    # functions
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "abs", "absent",
    "absent_over_time", "ceil", "floor", "round", "clamp", "clamp_min", "clamp_max", "exp", "ln",
    "log2", "log10", "sqrt", "label_replace", "label_join", "vector", "scalar", "time", "timestamp",
    "sort", "sort_desc", "changes", "resets", "predict_linear", "avg_over_time", "min_over_time",
    "max_over_time", "sum_over_time", "count_over_time", "last_over_time", "quantile_over_time",
    "stddev_over_time", "present_over_time", "histogram_count", "histogram_sum", "histogram_fraction",
}


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (label matchers, grouping clauses, ranges,
    strings and Grafana variables removed first)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+|\$\{[^}]*\}", " ", text)  # Grafana variables
    names = set(re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*", text))
    return {n for n in names - _FUNCTIONS if not re.fullmatch(r"(?i)inf|nan|e\d*", n)}


def exported(name: str) -> bool:
    if name.startswith(("ray_vllm_", "ray_serve_")):
        return True
    if name in METRICS:
        return METRICS[name][0] != "histogram"  # a histogram has only its three series
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and METRICS.get(base, ("",))[0] == "histogram":
            return True
    return False


def unknown_names(expr: str) -> set[str]:
    return {n for n in metric_names(expr) if not exported(n)}
