"""Pure ASGI middleware: the API token gate and the request body size limit.

Both run before routing, so they also cover paths no router declares (a wrong URL without the token
gets 401, not 404) and no oversized body is ever parsed. `TokenMiddleware` is the backend's only token
check: every route, `/v1` and the SSE streams included, is behind it.
"""

from __future__ import annotations

import json
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = frozenset({"/healthz"})
"""Paths that never need the token (liveness checks)."""

OPENAI_PREFIX = "/v1"
"""The OpenAI-compatible chat API: its clients expect OpenAI's error shape, `{"error": {...}}`."""


async def _send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


def error_body(path: str, message: str, code: str | None = None) -> dict:
    """`{"detail": message}`, or OpenAI's error shape on the OpenAI-compatible `/v1` paths."""
    if path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/"):
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return {"detail": message}


def token_ok(expected: str | None, authorization: str | None) -> bool:
    """Whether an `Authorization` header value carries the expected bearer token (always true without one)."""
    if not expected:
        return True
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(value.strip().encode(), expected.encode())


class TokenMiddleware:
    """401 for every HTTP request but `OPEN_PATHS` without `Authorization: Bearer <token>`."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.token or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1") or None
        if not token_ok(self.token, auth):
            return await _send_json(send, 401, error_body(scope["path"], "missing or wrong API token: send "
                                                          "'Authorization: Bearer <token>'", "invalid_api_key"),
                                    [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a request body larger than `max_bytes`, declared (Content-Length) or streamed (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        too_large = error_body(scope["path"], f"request body larger than {self.max_bytes} bytes")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _send_json(send, 400, {"detail": "invalid Content-Length"})
            if declared > self.max_bytes:
                return await _send_json(send, 413, too_large)
            # The server enforces Content-Length framing: the body cannot be longer than declared.
            return await self.app(scope, receive, send)
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            return await self.app(scope, receive, send)
        # A chunked body: read it whole (up to the limit) before the app sees any of it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_json(send, 413, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
