"""What the ingress refuses before any engine sees a request: a missing or wrong API key (401),
a body over the size limit (413), a request asking for more than the limits allow (400 naming
the parameter), a chat message without a role (400). Error bodies are OpenAI's shape, built
with Ray Serve LLM's own `ErrorResponse`."""

from __future__ import annotations

import hmac
import os

from fastapi import status
from ray.serve.llm.openai_api_models import ErrorResponse
from starlette.responses import JSONResponse

from .config import RequestLimits
from .rayllm import OpenAIHTTPException


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
    """ASGI middleware in front of every route of the ingress: API key (when keys are set) and
    body size. Open paths: none here — Serve's proxy answers /-/healthz and /-/routes itself,
    and metrics are on Ray's own port, so probes and scrapers need no key."""

    def __init__(self, app, api_keys: list[bytes], max_body_bytes: int):
        self.app = app
        self.api_keys = api_keys
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_keys:
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            # Compare with every key in constant time: no early exit that leaks which matched.
            if not any([hmac.compare_digest(token, k) for k in self.api_keys]):
                message = "Incorrect API key provided" if token else "Missing API key: send `Authorization: Bearer KEY`"
                return await _send_error(send, 401, message, "authentication_error", {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(
                send, 413, f"request body is {int(length)} bytes; this server allows at most {self.max_body_bytes} "
                "(ingress.limits.max_body_bytes)", "invalid_request_error"
            )
        return await self.app(scope, receive, send)


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

    for param in ("max_tokens", "max_completion_tokens"):
        if getattr(body, param, None) is not None:
            too_many(param, getattr(body, param), limits.max_tokens, "max_tokens")
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
