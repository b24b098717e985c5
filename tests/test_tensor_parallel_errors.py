"""A TP size that does not divide the model's heads fails at load with a message naming the
variant (a `required` variant fails the app; test_ab_metrics.py covers one that is not). Its own module: it needs both cores, so the TP=2 app of test_tensor_parallel.py must be
gone (module fixtures end with their module)."""

from __future__ import annotations

import pytest

from conftest import deploy_and_wait, release_main_app, undeploy

pytestmark = pytest.mark.e2e


def test_tp_that_does_not_divide_the_heads_fails_with_a_clear_message(serve_url, session_cache):
    release_main_app()
    with pytest.raises(RuntimeError, match="tensor_parallel_size 2 does not divide the 9 attention heads"):
        deploy_and_wait(
            {
                "cache_dir": str(session_cache),
                "models": [{"name": "bad", "variants": [{"name": "tp2", "required": True, "engine": {"tensor_parallel_size": 2}}]}],
            },
            "badtp",
            timeout_s=300,
            route_prefix="/badtp",
        )
    undeploy("badtp")
