"""OpenAI-compatible chat API: `GET /v1/models`, `POST /v1/chat/completions` (plain and streamed).

Follows OpenAI's Chat Completions API closely enough that the official `openai` client and other
OpenAI-compatible tools work unchanged: the same request fields (`messages`, `temperature`, `top_p`,
`max_tokens`, `stop`, `seed`, `n`, `stream`, `stream_options`), the same response and SSE chunk
objects (`data: {...}` ... `data: [DONE]`), and the same error body,
`{"error": {"message", "type", "param", "code"}}`, with 400 for bad parameters (FastAPI's 422s are
converted), 401 for a missing or wrong token, 404 for an unknown model, 429 with `Retry-After` when the model's
queue is full (`settings.chat_max_queue` requests wait behind the one generating) or no model can be loaded now
(every loaded one in use). Messages are rendered in the model's format (`edgerlhf.dialogue.PromptFormat`: its chat
template, or the HH dialogue text); models come from `backend.chat_models`. Loading and generation run in worker
threads of their own (a limiter sized for the admitted requests), never in the thread pool the rest of the API
shares, so queued chats cannot stall `/api/jobs`; a client that goes away, streamed or not, stops its generation
between two tokens.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Literal

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend import chat_models
from backend.chat_models import ChatModelError, GenerationParams, ModelNotFound, ModelsBusy
from db import FINISHED, read
from edgerlhf.errors import ModelLoadError

logger = logging.getLogger("edgerlhf.chat")

MAX_N = 8
"""Most completions per request (all are sampled as one batch)."""
MAX_STOP = 4
"""Most stop strings per request (as OpenAI)."""
MAX_STOP_CHARS = 256
"""Longest stop string: each new token looks for a stop string beginning at the end of the text, which costs the
square of a stop string's length (a 100,000-character one held the model for seconds per request)."""
DISCONNECT_POLL_S = 0.25
"""How often a non-streamed request checks whether its client went away while the model generates."""


# --- OpenAI-shaped errors ------------------------------------------------------------------------


class OpenAIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _invalid_json() -> OpenAIError:
    return OpenAIError(400, "We could not parse the JSON body of your request. The body must be a JSON "
                       "object (see https://platform.openai.com/docs/api-reference/chat/create).",
                       param=None, code="invalid_json")


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    """FastAPI's 422 -> OpenAI's 400, naming the first offending parameter."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind in ("json_invalid", "model_attributes_type") and len(loc) <= 1:
        return _invalid_json()
    if kind == "missing":
        return OpenAIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    message = str(first.get("msg", "invalid value"))
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return OpenAIError(400, f"Invalid value for '{param}': {message}{more}.", param=param, code="invalid_value")


def _http_error(exc: StarletteHTTPException) -> OpenAIError:
    if exc.status_code == 400:  # FastAPI's "error parsing the body": not UTF-8, or JSON nested too deep
        return _invalid_json()
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    kinds = {404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}
    return OpenAIError(exc.status_code, detail, kinds.get(exc.status_code, "invalid_request_error"
                                                           if exc.status_code < 500 else "server_error"))


class OpenAIRoute(APIRoute):
    """Routes of this router answer every error in OpenAI's shape, validation included (auth is the middleware's).

    Exception handlers are app-wide, so the conversion lives in the route class (FastAPI's documented
    way to customise one router's request handling) and the rest of the API keeps its own format.
    """

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def openai_handler(request: Request):
            try:
                return await handler(request)
            except OpenAIError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return _validation_error(exc).response()
            # Starlette's base class, not FastAPI's subclass: FastAPI raises the base one itself for a
            # body it cannot parse (bad UTF-8, JSON nested too deep), and that must be a 400 too.
            except StarletteHTTPException as exc:
                return _http_error(exc).response()
            except Exception:  # as the app's handler does, but in OpenAI's shape; the traceback goes to the log
                logger.exception(f"{request.method} {request.url.path} failed")
                return OpenAIError(500, "The server had an error while processing your request.",
                                   type="server_error").response()

        return openai_handler


# --- the router ----------------------------------------------------------------------------------


def _settings(request: Request):
    return request.app.state.settings


router = APIRouter(tags=["chat"], route_class=OpenAIRoute)
"""Mounted at `/v1` by `backend.main.create_app`, behind the API token (`backend.api.middleware.TokenMiddleware`,
which answers a 401 in OpenAI's shape on `/v1`)."""


# --- jobs (read through db/) ---------------------------------------------------------------------


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if isinstance(value, (int, float)) else None


def _job_tuple(job: Any) -> tuple[int, str, float | None]:
    status = getattr(job, "status", None)
    status = getattr(status, "value", status)
    finished = _timestamp(getattr(job, "finished_at", None)) or _timestamp(getattr(job, "created_at", None))
    return int(job.id), str(status), finished


def _finished_jobs(request: Request) -> list[tuple[int, str, float | None]]:
    with request.app.state.sessions() as session:
        jobs, _ = read.list_jobs(session, statuses=FINISHED, limit=100_000)
        return [_job_tuple(job) for job in jobs]


def _one_job(request: Request, job_id: int) -> tuple[int, str, float | None] | None:
    with request.app.state.sessions() as session:
        job = read.get_job(session, job_id)
        return None if job is None else _job_tuple(job)


# --- request schema ------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # OpenAI's newer "developer" role is its "system" role.
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that a local causal LM can honour.

    Other OpenAI fields (`user`, `presence_penalty`, `logit_bias` ...) are accepted and ignored, as many
    OpenAI-compatible servers do, so that existing tools keep working.
    """

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if value is None:
            return value
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters, got "
                             f"{max(len(s) for s in stops)}")
        return value


# --- responses -----------------------------------------------------------------------------------


def _usage(prompt_tokens: int, choices: list[chat_models.Choice]) -> dict[str, int]:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _chunk(cid: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict | None = None) -> str:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "system_fingerprint": None, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Every servable model of every finished job, newest job first (OpenAI's list format)."""
    registry = chat_models.get_registry(_settings(request))

    def collect():
        return registry.list_models(_finished_jobs(request))

    specs = await run_in_threadpool(collect)
    specs.sort(key=lambda s: (-s.job_id, chat_models.KINDS.index(s.which)))
    return {"object": "list",
            "data": [{"id": s.id, "object": "model", "created": s.created, "owned_by": "edgerlhf"} for s in specs]}


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    spec = await run_in_threadpool(_resolve, request, model_id)
    return {"id": spec.id, "object": "model", "created": spec.created, "owned_by": "edgerlhf"}


def _resolve(request: Request, name: str) -> chat_models.ModelSpec:
    registry = chat_models.get_registry(_settings(request))
    try:
        job_id, _ = chat_models.parse_model_id(name)
        return registry.resolve(name, _one_job(request, job_id))
    except ModelNotFound as exc:
        raise OpenAIError(404, str(exc), param="model", code="model_not_found") from exc


def _busy(exc: ModelsBusy) -> OpenAIError:
    return OpenAIError(429, str(exc), type="rate_limit_error", param="model", code="model_busy",
                       retry_after=exc.retry_after)


def _hold(registry: chat_models.ChatModels, spec: chat_models.ModelSpec) -> chat_models.LoadedModel:
    """The loaded model, held in memory until `registry.release(model)`."""
    try:
        return registry.acquire(spec)
    except ModelNotFound as exc:
        raise OpenAIError(404, str(exc), param="model", code="model_not_found") from exc
    except ModelsBusy as exc:
        raise _busy(exc) from exc
    except ModelLoadError as exc:
        raise OpenAIError(500, str(exc), type="server_error", param="model", code="model_load_failed") from exc


def _limiter(request: Request) -> anyio.CapacityLimiter:
    """The chat's own worker threads: enough for every request the queues admit (each model's generating one and
    `chat_max_queue` waiting, for each model in memory), so an admitted request never waits for a thread and a chat
    never takes one of the threads the rest of the API runs in."""
    state = request.app.state
    limiter = getattr(state, "chat_limiter", None)
    if limiter is None:
        settings = _settings(request)
        limiter = state.chat_limiter = anyio.CapacityLimiter(settings.chat_cache_size * (settings.chat_max_queue + 2))
    return limiter


async def _in_chat_thread(request: Request, func: Callable, *args, **kwargs):
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs), limiter=_limiter(request))


_running: set[asyncio.Future] = set()
"""Generations started for a stream, kept referenced until they end."""


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    settings = _settings(request)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens > settings.chat_max_tokens:
        raise OpenAIError(400, f"max_tokens is too large: {max_tokens}. This server allows at most "
                          f"{settings.chat_max_tokens} completion tokens (EDGERLHF_CHAT_MAX_TOKENS).",
                          param=param, code="invalid_value")
    messages = [m.as_dict() for m in body.messages]
    try:
        chat_models.check_messages(messages)
    except ValueError as exc:  # DialogueError: unknown role, no user message ...
        raise OpenAIError(400, f"Invalid 'messages': {exc}.", param="messages", code="invalid_value") from exc

    spec = await run_in_threadpool(_resolve, request, body.model)
    registry = chat_models.get_registry(settings)
    loaded = await _in_chat_thread(request, _hold, registry, spec)
    handed_over = False  # to the generation thread, which releases the model and its queue place when it ends
    try:
        try:  # a long prompt takes a while to tokenize
            prompt_ids = await _in_chat_thread(request, loaded.prompt_ids, messages)
        except ValueError as exc:  # the model's chat template refused the messages
            raise OpenAIError(400, f"Invalid 'messages': {exc}.", param="messages", code="invalid_value") from exc
        limit = min(settings.chat_max_prompt_tokens, loaded.context_length - 1)
        if len(prompt_ids) > limit:
            raise OpenAIError(400, f"This model's maximum prompt length is {limit} tokens. However, your messages "
                              f"resulted in {len(prompt_ids)} tokens. Please reduce the length of the messages.",
                              param="messages", code="context_length_exceeded")
        room = loaded.context_length - len(prompt_ids)
        if max_tokens is None:
            max_tokens = min(settings.chat_max_tokens, room)
        elif max_tokens > room:
            raise OpenAIError(400, f"This model's maximum context length is {loaded.context_length} tokens. "
                              f"However, you requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the "
                              f"messages, {max_tokens} in the completion). Please reduce the length of the messages "
                              f"or completion.", param=param, code="context_length_exceeded")
        stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
        params = GenerationParams(max_tokens=max_tokens,
                                  temperature=1.0 if body.temperature is None else body.temperature,
                                  top_p=1.0 if body.top_p is None else body.top_p,
                                  stop=stop, seed=body.seed, n=body.n or 1)
        if not loaded.admit(settings.chat_max_queue):
            raise OpenAIError(429, f"The model `{spec.id}` is busy: {settings.chat_max_queue} requests already wait "
                              f"for it (EDGERLHF_CHAT_MAX_QUEUE). Try again shortly.", type="rate_limit_error",
                              param="model", code="model_busy", retry_after=max(1, settings.chat_max_queue))
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        cancel = threading.Event()

        def generate(on_delta=None):
            try:
                return loaded.generate(prompt_ids, params, on_delta=on_delta, cancel=cancel)
            finally:
                loaded.leave()
                registry.release(loaded)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()

            def put(item) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:  # the event loop is gone (server shutting down)
                    cancel.set()

            def work() -> None:
                try:
                    put(("done", generate(on_delta=lambda i, t: put(("delta", i, t)))))
                except Exception as exc:  # reported to the client as an error event
                    put(("error", exc))

            # Started now, not when the response starts streaming: the thread releases the model however the
            # client behaves (one that leaves before the first byte never runs the stream's code).
            task = asyncio.ensure_future(_in_chat_thread(request, work))
            handed_over = True
            _running.add(task)
            task.add_done_callback(_running.discard)
            return StreamingResponse(_stream(queue, cancel, spec.id, len(prompt_ids), params.n, cid, created,
                                             include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        task = asyncio.ensure_future(_in_chat_thread(request, generate))
        handed_over = True
        while not task.done():  # a client that goes away stops the generation between two tokens
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and not cancel.is_set() and await request.is_disconnected():
                cancel.set()
        try:
            choices = task.result()
        except ChatModelError as exc:
            raise OpenAIError(500, str(exc), type="server_error") from exc
    finally:
        if not handed_over:
            registry.release(loaded)
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": spec.id, "system_fingerprint": None,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                     "logprobs": None, "finish_reason": _finish(c.finish_reason)} for c in choices],
        "usage": _usage(len(prompt_ids), choices),
    })


async def _stream(queue: asyncio.Queue, cancel: threading.Event, model: str, prompt_tokens: int, n: int,
                  cid: str, created: int, include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks of what the generation thread puts in `queue`; a client that goes away stops the generation."""
    try:
        yield _chunk(cid, created, model, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None} for i in range(n)])
        while True:
            item = await queue.get()
            if item[0] == "delta":
                _, index, text = item
                yield _chunk(cid, created, model, [{"index": index, "delta": {"content": text},
                                                    "logprobs": None, "finish_reason": None}])
            elif item[0] == "error":
                error = OpenAIError(500, f"Generation failed: {type(item[1]).__name__}: {item[1]}", type="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            else:
                choices = item[1]
                for c in choices:
                    yield _chunk(cid, created, model, [{"index": c.index, "delta": {}, "logprobs": None,
                                                        "finish_reason": _finish(c.finish_reason)}])
                if include_usage:
                    yield _chunk(cid, created, model, [], usage=_usage(prompt_tokens, choices))
                yield "data: [DONE]\n\n"
                return
    finally:
        # The client is gone or the stream ended: the token loop sees this between two tokens and
        # returns, releasing the model's lock for the next request.
        cancel.set()
