"""Pure ASGI middleware, the backend's edge, outermost first: the API token, the Host and Origin checks, the body size
limit, and the body's Unicode.

All run before routing, so they also cover paths no router declares (a wrong URL without the token gets 401, not
404). The token comes first so that an unauthenticated request is answered from its headers alone: its body is
never read, not even its declared size (issue 28, finding 19). `TokenMiddleware` is the backend's only token check:
every route, `/v1` and the SSE streams included, is behind it. `SameSiteMiddleware` serves only trusted `Host`
names (DNS rebinding) and refuses state changes a browser says come from another site (cross-site request forgery:
what a token would stop, for the default setup without one). `BodyLimitMiddleware` counts the bytes that arrive,
whatever `Content-Length` or `Transfer-Encoding` claim, and `UnicodeMiddleware` refuses a body that is not UTF-8
or holds a lone surrogate (`"\\ud800"`, which JSON can spell but no UTF-8 response can carry), so nothing of the
kind is stored. A file upload (`multipart/form-data` to a path of `BodyLimitMiddleware`'s `uploads`: the data set
route) is the one exception: its own, larger limit, its bytes counted as they stream to the route instead of being
held here, and no Unicode check (a file is bytes; the route checks its fields).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = frozenset({"/healthz"})
"""Paths that never need the token and answer any Host (liveness checks come by whatever name)."""

OPENAI_PREFIX = "/v1"
"""The OpenAI-compatible chat API: its clients expect OpenAI's error shape, `{"error": {...}}`."""

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing: a cross-site page may send them (without CORS it cannot read the answer)."""

OPENAI_ERROR_TYPES = {401: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}


async def _send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()  # ASCII: whatever a message quotes, the answer renders
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def error_body(path: str, message: str, code: str | None = None, status: int = 400) -> dict:
    """`{"detail": message}`, or OpenAI's error shape on the OpenAI-compatible `/v1` paths."""
    if is_openai_path(path):
        kind = "server_error" if status >= 500 else OPENAI_ERROR_TYPES.get(status, "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
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
                                                          "'Authorization: Bearer <token>'", "invalid_api_key", 401),
                                    [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


# --- Host and Origin -----------------------------------------------------------------------------------


def host_name(host: str) -> str:
    """The name in a `Host` header, lower case, without port or brackets: `[::1]:8000` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


def _host_port(host: str) -> int | None:
    tail = host.strip().rsplit("]", 1)[-1]
    if ":" not in tail:
        return None
    try:
        return int(tail.rsplit(":", 1)[1])
    except ValueError:
        return -1  # no port matches it


def same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether a browser's `Origin` names the site this request was sent to (scheme, name and port of `Host`)."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.scheme != scheme:
        return False
    default = 443 if parts.scheme == "https" else 80
    return (parts.hostname.lower(), port or default) == (host_name(host), _host_port(host) or default)


def cross_site(headers: dict[bytes, bytes], host: str, scheme: str) -> str | None:
    """Why a browser's request comes from another site (its `Sec-Fetch-Site` or `Origin`), or None. Clients that
    send neither (curl, httpx, the dashboard's server) are no browser page and may."""
    site = headers.get(b"sec-fetch-site")
    if site is not None and site.strip().lower() not in (b"same-origin", b"none"):
        return f"Sec-Fetch-Site is {site.decode('latin-1')[:40]!r}"
    origin = headers.get(b"origin")
    if origin is not None and not same_origin(origin.decode("latin-1"), host, scheme):
        return f"Origin {origin.decode('latin-1')[:100]!r} is not this site"
    return None


class SameSiteMiddleware:
    """400 for a `Host` not in `hosts` (DNS rebinding: a foreign name that resolves here); 403 for a state-changing
    request (not GET, HEAD or OPTIONS) that a browser marks as coming from another site. `"*"` in `hosts`: any Host
    (behind a proxy that checks it). `OPEN_PATHS` are exempt."""

    def __init__(self, app: ASGIApp, hosts: Collection[str]):
        self.app = app
        self.hosts = frozenset(h.lower() for h in hosts)
        self.any_host = "*" in self.hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.any_host and host_name(host) not in self.hosts:
            shown = repr(host[:100]) if host else "(none)"
            return await _send_json(send, 400, error_body(
                scope["path"], f"Host {shown} is not served here: a name this service does not know (DNS rebinding "
                               "is refused); add it to EDGERLHF_TRUSTED_HOSTS to serve it", "untrusted_host"))
        if scope["method"] not in SAFE_METHODS and (why := cross_site(headers, host, scope.get("scheme", "http"))):
            return await _send_json(send, 403, error_body(
                scope["path"], f"cross-site request refused: {why}; state changes come from this site's own pages "
                               "or from clients that are no browser page", "cross_site", 403))
        return await self.app(scope, receive, send)


# --- the body --------------------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


async def _read_body(receive: Receive, limit: int | None = None) -> bytes | None:
    """The whole request body (None: the client went away); `_TooLarge` past `limit` bytes."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if limit is not None and len(body) > limit:
            raise _TooLarge
        if not message.get("more_body", False):
            return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` as one message, then what `receive` gives (a disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


UPLOAD = "edgerlhf.upload"
"""The scope key `BodyLimitMiddleware` sets on a file upload, so that `UnicodeMiddleware` lets its bytes pass."""


def _counted(receive: Receive, limit: int, message: str) -> Receive:
    """A `receive` that raises a 413 `HTTPException` once more than `limit` body bytes have arrived (FastAPI lets an
    `HTTPException` raised while it reads a form through, so the client gets the 413 and no route runs)."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        received = await receive()
        if received["type"] == "http.request":
            seen += len(received.get("body", b""))
            if seen > limit:
                raise HTTPException(413, message)
        return received

    return counted


class BodyLimitMiddleware:
    """413 for a request body larger than `max_bytes`: a declared length at once, and on every request the bytes
    that actually arrive, counted before the app sees any of them (`Transfer-Encoding` in any case or form, or a
    length the server's framing got wrong, changes nothing). `uploads` maps a path to the limit of a
    `multipart/form-data` POST to it (a file upload): counted as it streams to the route, never held here."""

    def __init__(self, app: ASGIApp, max_bytes: int, uploads: Mapping[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = dict(uploads or {})

    def upload_limit(self, scope: Scope) -> int | None:
        """The limit of this request's body if it is a file upload, else None."""
        if scope["method"] != "POST" or scope["path"] not in self.uploads:
            return None
        kind = dict(scope.get("headers") or []).get(b"content-type", b"")
        return self.uploads[scope["path"]] if kind.lower().startswith(b"multipart/form-data") else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = self.upload_limit(scope)
        limit = self.max_bytes if upload is None else upload
        too_large = error_body(scope["path"], f"request body larger than {limit} bytes" if upload is None else
                               f"the upload is larger than its limit: {limit:,} bytes with its form fields "
                               "(EDGERLHF_MAX_UPLOAD_BYTES)", status=413)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _send_json(send, 400, error_body(scope["path"], "invalid Content-Length"))
            if declared > limit:
                return await _send_json(send, 413, too_large)
        if upload is not None:
            return await self.app({**scope, UPLOAD: True}, _counted(receive, limit, too_large["detail"]), send)
        try:
            body = await _read_body(receive, self.max_bytes)
        except _TooLarge:
            return await _send_json(send, 413, too_large)
        if body is None:
            return  # the client went away
        return await self.app(scope, _replay(body, receive), send)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
"""A JSON escape of a UTF-16 surrogate: only then can a parsed string hold a lone one."""


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def lone_surrogate_at(data: Any) -> list[str | int] | None:
    """The location of the first string (or key) of parsed JSON that holds a lone surrogate, or None. Iterative:
    nesting too deep for recursion is the route's to refuse."""
    stack: list[tuple[Any, list[str | int]]] = [(data, [])]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return loc
        elif isinstance(value, dict):
            if any(_has_surrogate(k) for k in value):
                return loc
            stack.extend((v, [*loc, k]) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, [*loc, i]) for i, v in reversed(list(enumerate(value))))
    return None


class UnicodeMiddleware:
    """A request body must be UTF-8 (else 400: it cannot be parsed), and none of its JSON strings may hold a lone
    surrogate (422 naming where). Under `/v1` both are OpenAI's 400 (`invalid_json`, `invalid_unicode`). Runs inside
    `BodyLimitMiddleware`, so the body it reads is bounded."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get(UPLOAD):
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        if body is None:
            return
        path = scope["path"]
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            message = f"the body is not valid UTF-8 (byte {exc.start}), so not JSON"
            return await _send_json(send, 400, error_body(path, f"We could not parse the JSON body of your request: "
                                                                f"{message}." if is_openai_path(path) else message,
                                                          "invalid_json"))
        loc = self.surrogate_at(body, text)
        if loc is not None:
            message = ("not a valid string: it holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                       "which is no Unicode")
            if is_openai_path(path):
                where = ".".join(map(str, loc)) or "body"
                return await _send_json(send, 400, error_body(path, f"Invalid value for '{where}': {message}.",
                                                              "invalid_unicode"))
            return await _send_json(send, 422, {"detail": [{"loc": ["body", *loc], "msg": message, "type": "unicode"}]})
        return await self.app(scope, _replay(body, receive), send)

    @staticmethod
    def surrogate_at(body: bytes, text: str) -> list[str | int] | None:
        """Where the JSON `text` holds a lone surrogate, or None (also when it is no JSON: the route says so)."""
        if not _SURROGATE_ESCAPE.search(body):
            return None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return None
        return lone_surrogate_at(data)
