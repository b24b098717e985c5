"""The operator's admin routes hold at `/` and under a Serve route prefix, through `slimserve run`
and through Ray's own `serve run`: every admin verb answers 401 without a key, with a wrong key
and with a client key, and works with the admin key (abort and promote each end a rollout in
two of the four app starts, and the other is then refused with a 409). Under a prefix Serve's proxy keeps the
prefix in the request's path while the router strips it: the guard once matched the raw path
and let `/x/slimserve/...` through without a key.

Light on purpose (as test_run_sigterm.py): the variants ask for more CPUs than the machine has,
so Ray, Serve and the ingress start but no vLLM engine does; the admin routes need none."""

from __future__ import annotations

import os
import textwrap
import time

import httpx
import pytest

from conftest import free_port
from test_run_sigterm import Run

pytestmark = [pytest.mark.standalone, pytest.mark.e2e]

API_ENV, ADMIN_ENV = "SLIMSERVE_TEST_ADMIN_ROUTES_API_KEYS", "SLIMSERVE_TEST_ADMIN_ROUTES_ADMIN_KEYS"
CLIENT_KEY, ADMIN_KEY = "sk-client-admin-routes", "sk-admin-admin-routes"
KEYS = {"no key": {}, "a wrong key": {"authorization": "Bearer sk-wrong"},
        "a client key": {"authorization": f"Bearer {CLIENT_KEY}"}}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}

APP = """
  - name: {name}
    route_prefix: {prefix}
    import_path: slimserve.serve.app:build_app
    args:
      cache_dir: {cache}
      ingress: {{api_keys_env: {api_env}, admin_keys_env: {admin_env}, health_probe_interval_s: 1}}
      models:
        - name: tiny
          deployment: {{num_cpus_per_worker: 4096}}   # never schedulable: no engine starts
          variants:
            - {{name: base}}
            - {{name: cand}}
          rollout: {{candidate: cand, steps: [50, 100]}}
"""


def serve_config(tmp_path, port: int, apps: dict[str, str]) -> str:
    text = f"http_options: {{host: 127.0.0.1, port: {port}}}\napplications:"
    for name, prefix in apps.items():
        text += APP.format(name=name, prefix=prefix, cache=tmp_path / "artifacts", api_env=API_ENV, admin_env=ADMIN_ENV)
    path = tmp_path / "serve.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def wait_for_admin_route(base: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/slimserve/rollout/tiny", headers=ADMIN, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{base}/slimserve/rollout/tiny never answered the admin key")


def check_admin_routes(base: str, finish: str) -> None:
    """Every admin verb with every kind of wrong credentials, then with the admin key: pause,
    resume, then `finish` (abort or promote) ends the rollout and the other verb is refused."""
    verbs = [("GET", "/slimserve/rollout/tiny"), ("GET", "/slimserve/variants")] + [
        ("POST", f"/slimserve/rollout/tiny/{a}") for a in ("pause", "resume", "abort", "promote")]
    for what, headers in KEYS.items():
        for method, path in verbs:
            r = httpx.request(method, base + path, headers=headers, json={"reason": "test"}, timeout=30)
            assert r.status_code == 401, (what, method, base + path, r.status_code, r.text)
            assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    # Paths the router does not match but that name the admin routes: never answered without the key.
    # The guard refuses them before any router looks (an admin prefix anywhere in the path).
    for path in ("//slimserve/rollout/tiny", "/slimserve//rollout/tiny", "/v1/../slimserve/rollout/tiny"):
        r = httpx.get(base + path, headers=KEYS["a client key"], timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.status_code, r.text)

    state = httpx.get(f"{base}/slimserve/rollout/tiny", headers=ADMIN, timeout=30).json()
    assert (state["status"], state["candidate_percent"]) == ("running", 50), state
    overview = httpx.get(f"{base}/slimserve/variants", headers=ADMIN, timeout=30).json()
    assert set(overview["variants"]) == {"tiny--base", "tiny--cand"}
    assert overview["rollouts"]["tiny"]["history"][0]["action"] == "start"
    ended, other = {"abort": ("aborted", "promote"), "promote": ("promoted", "abort")}[finish]
    for action, status in (("pause", "paused"), ("resume", "running"), (finish, ended)):
        r = httpx.post(f"{base}/slimserve/rollout/tiny/{action}", headers=ADMIN, json={"reason": f"{action} test"}, timeout=30)
        assert r.status_code == 200 and r.json()["status"] == status, (action, r.text)
    r = httpx.post(f"{base}/slimserve/rollout/tiny/{other}", headers=ADMIN, timeout=30)
    assert r.status_code == 409 and r.json()["error"]["message"] == f"cannot {other} a rollout that is {ended}", r.text
    assert httpx.get(f"{base}/slimserve/rollout/tiny", headers=ADMIN, timeout=30).json()["status"] == ended

    # Clients see where the rollout stands, not its history and reasons; a client key opens
    # the API and the admin key is not a client key.
    listing = httpx.get(f"{base}/v1/models", headers=KEYS["a client key"], timeout=30).json()
    rollout = listing["data"][0]["metadata"]["rollout"]
    assert rollout["status"] == ended and "history" not in rollout and "step_evidence" not in rollout, rollout
    assert f"{finish} test" not in str(listing)
    assert httpx.get(f"{base}/v1/models", headers=ADMIN, timeout=30).status_code == 401


# Every kind of body json.loads refuses (syntax, encoding, digits, depth) and JSON that is not a
# request object: each is the client's error, a 400 in OpenAI's shape, never a 500.
MALFORMED_BODIES = {
    "truncated": b'{"model": "tiny", "messages": [',
    "not JSON": b"model=tiny",
    "bad UTF-8": b'{"model": "\xff\xfe"}',
    "UTF-16 without a BOM": '{"model": "tiny"}'.encode("utf-16-le"),
    "an integer of 5000 digits": b'{"model": "tiny", "max_tokens": ' + b"9" * 5000 + b"}",
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "an array": b"[]",
    "null": b"null",
    "a string": b'"hi"',
    "NaN": b"NaN",
    "Infinity in a field": b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
}


def check_malformed_bodies(base: str) -> None:
    for what, body in MALFORMED_BODIES.items():
        for route in ("/v1/chat/completions", "/v1/completions"):
            r = httpx.post(base + route, content=body, timeout=60,
                           headers={**KEYS["a client key"], "content-type": "application/json"})
            assert r.status_code == 400, (what, route, r.status_code, r.text[:300])
            error = r.json()["error"]
            # Ray Serve LLM's own validation errors keep pydantic's type (e.g. `missing`): the shape is OpenAI's.
            assert set(error) >= {"message", "type", "code"} and error["message"] and "Traceback" not in r.text, (what, error)


@pytest.fixture
def keyed_env(monkeypatch):
    # As a Kubernetes Secret puts them in the pods: the processes' environment, never the config.
    monkeypatch.setenv(API_ENV, CLIENT_KEY)
    monkeypatch.setenv(ADMIN_ENV, ADMIN_KEY)


# `slimserve run` serves one slimserve application: one start per route prefix.
@pytest.mark.parametrize("prefix, finish", [("/", "abort"), ("/x", "promote")])
def test_admin_routes_through_slimserve_run(tmp_path, keyed_env, prefix, finish):
    port = free_port()
    run = Run(serve_config(tmp_path, port, {"app": prefix}), port=port)
    base = f"http://127.0.0.1:{port}{prefix.rstrip('/')}"
    try:
        wait_for_admin_route(base)
        check_admin_routes(base, finish)
        check_malformed_bodies(base)
        if prefix != "/":  # nothing is served at the root: the app is only under its prefix
            assert httpx.get(f"http://127.0.0.1:{port}/slimserve/rollout/tiny", headers=ADMIN, timeout=30).status_code == 404
    finally:
        run.stop()


def test_admin_routes_at_the_root_and_under_a_prefix_through_serve_run(tmp_path, keyed_env):
    port = free_port()
    config = serve_config(tmp_path, port, {"root": "/", "prefixed": "/x"})
    run = Run(config, port=port, command=[os.path.join(os.path.dirname(os.sys.executable), "serve"), "run", config])
    try:
        for base, finish in ((f"http://127.0.0.1:{port}", "promote"), (f"http://127.0.0.1:{port}/x", "abort")):
            wait_for_admin_route(base)
            check_admin_routes(base, finish)
    finally:
        run.stop()
