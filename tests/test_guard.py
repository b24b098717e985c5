"""The ingress's guard in front of a real FastAPI app served the way Ray Serve's proxy serves an
application under a route prefix (`root_path` set, `path` keeping the prefix): the admin check
holds whatever the prefix, and every body json.loads refuses is a 400. The same checks through
a real Ray Serve: test_admin_routes.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI, Request

from slimserve.serve.http.guard import GuardMiddleware, admin_only, is_admin_path, json_problem

ADMIN = [b"sk-admin"]


def app() -> FastAPI:
    api = FastAPI()
    api.add_middleware(GuardMiddleware, api_keys=[b"sk-client"], max_body_bytes=2_000_000, admin_keys=ADMIN)

    async def secret(request: Request):
        return {"secret": True}

    api.add_api_route("/slimserve/secret", admin_only(secret, ADMIN), methods=["GET"])

    @api.post("/v1/echo")
    async def echo(request: Request):
        return await request.json()

    return api


def get(path: str, root_path: str = "", headers: dict | None = None, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app(), root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(kw.pop("method", "GET"), path, headers=headers or {}, **kw)

    return asyncio.run(go())


@pytest.mark.parametrize("root_path", ["", "/x", "/a/b"])
@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer sk-client"}, {"authorization": "Bearer nope"}])
def test_admin_route_needs_the_admin_key_under_any_prefix(root_path, headers):
    r = get(f"{root_path}/slimserve/secret", root_path, headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    r = get(f"{root_path}/slimserve/secret", root_path, {"authorization": "Bearer sk-admin"})
    assert r.status_code == 200 and r.json() == {"secret": True}


def test_admin_only_refuses_even_without_the_middleware():
    api = FastAPI()

    async def secret(request: Request):
        return {"secret": True}

    api.add_api_route("/s", admin_only(secret, ADMIN), methods=["GET"])

    async def go(headers):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as client:
            return await client.get("/s", headers=headers)

    assert asyncio.run(go({})).status_code == 401
    assert asyncio.run(go({"authorization": "Bearer sk-admin"})).status_code == 200


@pytest.mark.parametrize("scope,admin", [
    ({"path": "/x/slimserve/rollout/m", "root_path": "/x"}, True),
    ({"path": "/slimserve/rollout/m", "root_path": ""}, True),
    ({"path": "/x//slimserve/rollout/m", "root_path": "/x"}, True),   # the router would not match; refused anyway
    ({"path": "/y/slimserve/rollout/m", "root_path": "/x"}, True),    # a root_path that is not the path's prefix
    ({"path": "/x/v1/models", "root_path": "/x"}, False),
    ({"path": "/v1/slimserve", "root_path": ""}, False),
])
def test_is_admin_path(scope, admin):
    assert is_admin_path(scope, "/slimserve/") is admin


@pytest.mark.parametrize("body,why", [
    (b"{", "Expecting"), (b"\xff", "utf-8"), (b"[" * 100_000, "nested too deeply"),
    (b"1" * 5000, "Exceeds the limit"), (b'{"a": 1', "Expecting"), (b"NaN", "NaN is not"),
    (b'{"temperature": -Infinity}', "-Infinity is not"),
    # Lone surrogates, escaped (valid JSON syntax): in a value, a key, deep in a list.
    (rb'{"model": "\ud800", "prompt": "x"}', "lone surrogate (\\ud800)"),
    (rb'{"\udfff": 1}', "lone surrogate (\\udfff)"),
    (rb'{"messages": [{"role": "user", "content": ["ok", "a\udc00b"]}]}', "lone surrogate (\\udc00)"),
])
def test_json_problem_names_every_refusal(body, why):
    assert why in json_problem(body)


def test_json_problem_accepts_json():
    assert json_problem(b'{"model": "m"}') is None and json_problem(b"[]") is None
    # A surrogate pair is one character (U+1F600), escaped or not: text, accepted.
    assert json_problem(rb'{"prompt": "\ud83d\ude00"}') is None
    assert json_problem('{"prompt": "\U0001F600"}'.encode()) is None


def test_a_lone_surrogate_is_a_400_not_a_500():
    """The echo route quotes the body back, as an error naming an unknown model does: without
    the guard's check its answer fails to encode (a 500)."""
    r = get("/v1/echo", headers={"authorization": "Bearer sk-client", "content-type": "application/json"},
            method="POST", content=rb'{"model": "\ud800", "prompt": "x"}')
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {
        "message": "the request body is not valid JSON: a string holds a lone surrogate (\\ud800), "
                   "which is not Unicode text",
        "type": "invalid_request_error", "param": None, "code": 400,
    }


def test_deeply_nested_body_is_a_400_not_a_500():
    r = get("/v1/echo", headers={"authorization": "Bearer sk-client", "content-type": "application/json"},
            method="POST", content=b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"], r.text
