"""Streaming a chat answer from the backend's OpenAI-compatible API, for the Chat and Arena pages.

`POST /v1/chat/completions` with `stream: true` through the dashboard's one API client (its base URL and
token); the server-sent events are OpenAI's chunk objects, `data: [DONE]` ends them, and an error (before or
during the stream) is OpenAI's `{"error": {"message", ...}}`. A page shows the pieces as they arrive with
`st.write_stream`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from frontend.api_client import ApiClient, BackendDown

STREAM_TIMEOUT = httpx.Timeout(300.0, connect=2.0)
"""The first reply may wait for the model to load (and for other chats with it to finish)."""


class ChatError(Exception):
    """The backend refused or failed a chat request; the message is OpenAI's `error.message`."""


def _error_message(payload: Any, fallback: str) -> str:
    """The message of OpenAI's error body `{"error": {"message", ...}}`, which every `/v1` answer uses
    (auth included); `fallback` (the raw text) when something in between answered without JSON."""
    if isinstance(payload, dict) and "error" in payload:
        return str(payload["error"]["message"])
    return fallback


def stream_chat(client: ApiClient, model: str, messages: list[dict[str, str]], params: dict[str, Any],
                sink: list[str], meta: dict[str, Any] | None = None) -> Iterator[str]:
    """Yield the reply's text pieces from the SSE stream (appending each to `sink` too); `meta` gets the
    completion's `id` (what feedback about the reply names)."""
    body = {"model": model, "messages": messages, "stream": True, **params}
    try:
        # The chat stream reuses the API client's httpx client (base URL, token).
        with client.http.stream("POST", "/v1/chat/completions", json=body, timeout=STREAM_TIMEOUT) as resp:
            if resp.status_code >= 400:
                resp.read()
                try:
                    payload = resp.json()
                except ValueError:
                    payload = None
                raise ChatError(f"{resp.status_code}: {_error_message(payload, resp.text or resp.reason_phrase)}")
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatError(_error_message(chunk, "generation failed"))
                if meta is not None and chunk.get("id"):
                    meta["id"] = chunk["id"]
                for choice in chunk["choices"]:
                    text = choice["delta"].get("content")  # OpenAI: the last chunk's delta may be empty
                    if text:
                        sink.append(text)
                        yield text
    except (httpx.TransportError, OSError) as exc:
        raise BackendDown(client.base_url, f"{type(exc).__name__}: {exc}") from exc
