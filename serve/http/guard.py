"""What the ingress refuses before any engine sees a request: a missing or wrong API key (401),
a body over the size limit (413), a request asking for more than the limits allow (400 naming
the parameter), a chat message without a role (400). Error bodies are OpenAI's shape, built
with Ray Serve LLM's own `ErrorResponse`."""

from __future__ import annotations

import functools
import hmac
import json
import os
import re

from fastapi import Request, status
from ray.serve.llm.openai_api_models import ErrorResponse
from starlette.responses import JSONResponse

from slimserve.serve.config.ingress import RequestLimits
from slimserve.serve.rayllm import OpenAIHTTPException

VARIANT_HEADER = "x-slimserve-variant"


def error_json(code: int, message: str, type_: str) -> bytes:
    return ErrorResponse(error={"message": message, "type": type_, "param": None, "code": code}).model_dump_json().encode()


def error_response(code: int, message: str, type_: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error answer, for errors raised outside Ray Serve LLM's handlers."""
    return JSONResponse(ErrorResponse(error={"message": message, "type": type_, "param": None, "code": code}).model_dump(),
                        status_code=code, headers=headers)


def api_keys_from_env(name: str | None) -> list[bytes]:
    """The accepted keys, read in the replica from its environment (a Kubernetes Secret):
    never from the config or the deployment's arguments, which Ray shows in its dashboard."""
    raw = os.environ.get(name, "") if name else ""
    return [k.strip().encode() for k in raw.split(",") if k.strip()]


class GuardMiddleware:
    """ASGI middleware in front of every route of the ingress: API key (when keys are set), body
    size (counted on the bytes received, so a chunked body without Content-Length is bounded
    too), a JSON body for JSON routes, and on every answer — errors included — the request id and,
    once a variant was chosen, `x-slimserve-variant`. Open paths: none here — Serve's proxy
    answers /-/healthz and /-/routes itself, and metrics are on Ray's own port."""

    def __init__(self, app, api_keys: list[bytes], max_body_bytes: int, admin_keys: list[bytes] | None = None,
                 admin_prefix: str = "/slimserve/"):
        self.app = app
        self.api_keys = api_keys
        self.admin_keys = admin_keys or []
        self.admin_prefix = admin_prefix
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_answer_headers(scope, send)
        headers = dict(scope.get("headers") or [])
        if is_admin_path(scope, self.admin_prefix):
            # The operator's routes: an admin key only (a client key is not one).
            if not self.admin_keys:
                return await _send_error(send, 403, "the admin routes are off: give the ingress admin keys "
                                         "(ingress.admin_keys_env)", "permission_error")
            if not _key_ok(headers, self.admin_keys):
                return await _send_error(send, 401, "an admin key is required: send `Authorization: Bearer ADMIN_KEY`",
                                         "authentication_error", {"www-authenticate": "Bearer"})
        elif self.api_keys and not _key_ok(headers, self.api_keys):
            token = _bearer(headers)
            message = "Incorrect API key provided" if token else "Missing API key: send `Authorization: Bearer KEY`"
            return await _send_error(send, 401, message, "authentication_error", {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(send, 413, self._too_big(int(length)), "invalid_request_error")
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            # Read the body here (it is bounded): its size is what was received, whatever the
            # headers said, and a JSON route gets a 400 for a body that is not JSON, not a 500.
            body, size = await _read_body(receive, self.max_body_bytes)
            if body is None:
                return await _send_error(send, 413, self._too_big(size), "invalid_request_error")
            if body and _json_route(scope):
                problem = json_problem(body)
                if problem:
                    return await _send_error(send, 400, f"the request body is not valid JSON: {problem}",
                                             "invalid_request_error")
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

    def _too_big(self, size: int) -> str:
        return (f"request body is {size} bytes or more; this server allows at most {self.max_body_bytes} "
                "(ingress.limits.max_body_bytes)")


def is_admin_path(scope, admin_prefix: str) -> bool:
    """Whether a request may reach an operator's route. Under a Serve route prefix `path` keeps
    the prefix (`/x/slimserve/...`) while the router matches it without (`root_path` is `/x`):
    so the check is on the route path as Starlette computes it, and, since no client route has
    the admin prefix anywhere in its path, on any path that contains it (refuse when unsure:
    a doubled slash, a prefix the proxy did not set as `root_path`)."""
    return route_path(scope).startswith(admin_prefix) or admin_prefix in scope.get("path", "")


def route_path(scope) -> str:
    """The path the app's router matches: `path` less the `root_path` Serve's proxy sets to the
    application's route prefix (what starlette.routing does)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def json_problem(body: bytes) -> str | None:
    """Why `body` is not a JSON document a route can parse, or None. `json.loads` raises
    ValueError for bad syntax, bad UTF-8 and over-long integers, and RecursionError for deep
    nesting (`[[[[...`): each of them is the client's error, not the server's. NaN and Infinity
    are not JSON (RFC 8259) though Python reads them: a validation error that quotes one back
    fails to serialize (a 500), so they are refused here too. So are strings that are not
    Unicode text: `"\\ud800"` (a lone surrogate, escaped) is valid JSON syntax, but an answer
    that quotes it back (an unknown model's name) cannot be encoded as UTF-8 (a 500 as well)."""
    try:
        document = json.loads(body, parse_constant=_not_json)
    except RecursionError:
        return "nested too deeply"
    except ValueError as e:
        return str(e).split(":")[0][:200]
    # A surrogate can only come in as a `\udXXX` escape (UTF-8 bytes cannot encode one): a body
    # without such an escape, nearly every one, is not walked.
    return _not_utf8(document) if _SURROGATE_ESCAPE.search(body) else None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _not_utf8(document) -> str | None:
    """Why a string of `document` (keys included) is not UTF-8 text, or None. A loop, not
    recursion: json.loads already accepted the depth, which may exceed the recursion limit here."""
    todo = [document]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            todo.extend(value.keys())
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"a string holds a lone surrogate (\\u{ord(value[e.start]):04x}), which is not Unicode text"
    return None


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def admin_only(handler, admin_keys: list[bytes]):
    """`handler` (a FastAPI route function taking `request`) behind its own admin-key check: a
    second lock behind the middleware's, so that an admin route never answers without the key
    whatever path rewriting happens in front of the app."""

    @functools.wraps(handler)
    async def checked(*args, request: Request, **kwargs):
        if not (admin_keys and _key_ok(dict(request.scope.get("headers") or []), admin_keys)):
            return error_response(401, "an admin key is required: send `Authorization: Bearer ADMIN_KEY`",
                                  "authentication_error", {"www-authenticate": "Bearer"})
        return await handler(*args, request=request, **kwargs)

    return checked


def _bearer(headers: dict) -> bytes:
    return bearer_token(headers.get(b"authorization", b""))


def bearer_token(auth: bytes) -> bytes:
    """The key of an `Authorization: Bearer KEY` header value (b"" when there is none)."""
    return auth[7:].strip() if auth[:7].lower() == b"bearer " else b""


def _key_ok(headers: dict, keys: list[bytes]) -> bool:
    token = _bearer(headers)
    # Compare with every key in constant time: no early exit that leaks which matched.
    return any([hmac.compare_digest(token, k) for k in keys])


async def _read_body(receive, most: int) -> tuple[bytes | None, int]:
    """The whole request body, or (None, bytes so far) once it passes `most`."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > most:
            return None, size
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), size


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then whatever comes next (a disconnect)

    return replayed


def _json_route(scope) -> bool:
    # Every POST route of the OpenAI API takes JSON, except audio uploads (multipart forms).
    return not route_path(scope).startswith("/v1/audio/")


def _with_answer_headers(scope, send):
    """Adds the request id and the chosen variant (ingress._route puts it in the request's
    state) to the answer, unless the route set them itself."""

    async def sending(message):
        if message["type"] == "http.response.start":
            headers = list(message.get("headers") or [])
            names = {k.lower() for k, _ in headers}
            state = scope.get("state") or {}
            request_id = state.get("request_id") or dict(scope.get("headers") or []).get(b"x-request-id", b"").decode()
            if request_id and b"x-request-id" not in names:
                headers.append((b"x-request-id", request_id.encode()))
            if state.get("slimserve_variant") and VARIANT_HEADER.encode() not in names:
                headers.append((VARIANT_HEADER.encode(), state["slimserve_variant"].encode()))
            message = {**message, "headers": headers}
        await send(message)

    return sending


async def _send_error(send, code: int, message: str, type_: str, headers: dict[str, str] | None = None) -> None:
    body = error_json(code, message, type_)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": code, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def check_limits(body, limits: RequestLimits) -> None:
    """Raise a 400 naming the parameter and the setting when the request asks for too much."""

    def too_many(param: str, value: int, most: int, setting: str) -> None:
        if value > most:
            raise OpenAIHTTPException(
                status.HTTP_400_BAD_REQUEST,
                f"`{param}` is {value}; this server allows at most {most} (ingress.limits.{setting})",
                "invalid_request_error",
            )

    given = [p for p in ("max_tokens", "max_completion_tokens") if getattr(body, p, None) is not None]
    for param in given:
        too_many(param, getattr(body, param), limits.max_tokens, "max_tokens")
    if not given and hasattr(body, "max_tokens"):
        # Without it vLLM generates up to the context limit (a minute and more on a CPU host).
        body.max_tokens = limits.default_max_tokens
    for param in ("n", "best_of"):
        if getattr(body, param, None) is not None:
            too_many(param, getattr(body, param), limits.max_n, "max_n")
    prompt = getattr(body, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        too_many("prompt", len(prompt), limits.max_prompts, "max_prompts")
    messages = getattr(body, "messages", None)
    if messages is not None:
        too_many("messages", len(messages), limits.max_messages, "max_messages")
        # vLLM's schema lets a free-form message without `role` through, then fails on it
        # with a 500 and a traceback (found by schemathesis): refuse it here.
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
            if not isinstance(role, str) or not role:
                raise OpenAIHTTPException(
                    status.HTTP_400_BAD_REQUEST, f"`messages[{i}].role` is required (a string)", "invalid_request_error"
                )
