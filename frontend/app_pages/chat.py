"""Chat page: talk to a finished job's models, one at a time or its SFT and PPO policies side by side.

It speaks the backend's OpenAI-compatible API (`GET /v1/models`, `POST /v1/chat/completions` with
`stream: true`) through the dashboard's one API client, and shows tokens as they arrive with
`st.write_stream` (Streamlit's chat-app pattern). Conversations live in the browser session, one per
model; the side-by-side mode sends each message to both policies of one job with the same sampling
seed, so the difference you read is the difference PPO made.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import streamlit as st

from edgerlhf.settings import get_settings
from frontend import ui
from frontend.api_client import ApiClient, BackendDown, get_client

STREAM_TIMEOUT = httpx.Timeout(300.0, connect=2.0)
"""The first reply may wait for the model to load (and for other chats with it to finish)."""
SINGLE, SIDE = "Single model", "Side by side: SFT vs PPO"


class ChatError(Exception):
    """The backend refused or failed a chat request; the message is OpenAI's `error.message`."""


def _error_message(payload: Any, fallback: str) -> str:
    """The message of OpenAI's error body `{"error": {"message", ...}}`, which every `/v1` answer uses
    (auth included); `fallback` (the raw text) when something in between answered without JSON."""
    if isinstance(payload, dict) and "error" in payload:
        return str(payload["error"]["message"])
    return fallback


def stream_chat(client: ApiClient, model: str, messages: list[dict[str, str]], params: dict[str, Any],
                sink: list[str]) -> Iterator[str]:
    """Yield the reply's text pieces from the SSE stream (appending each to `sink` too)."""
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
                for choice in chunk["choices"]:
                    text = choice["delta"].get("content")  # OpenAI: the last chunk's delta may be empty
                    if text:
                        sink.append(text)
                        yield text
    except (httpx.TransportError, OSError) as exc:
        raise BackendDown(client.base_url, f"{type(exc).__name__}: {exc}") from exc


def show_history(history: list[dict[str, str]]) -> None:
    for message in history:
        with st.chat_message(message["role"]):
            st.markdown(message["content"] or "_(empty reply)_")


def reply(client: ApiClient, model: str, history: list[dict[str, str]], params: dict[str, Any]) -> bool:
    """Stream the assistant's answer to `history` into an assistant bubble; keep it in the history."""
    pieces: list[str] = []
    with st.chat_message("assistant"):
        try:
            st.write_stream(stream_chat(client, model, history, params, pieces))
        except ChatError as exc:
            st.error(f"`{model}`: {exc}")
            return False
        except BackendDown as exc:
            ui.backend_down(exc, inline=True)
            return False
        if not pieces:
            st.markdown("_(empty reply)_")
    history.append({"role": "assistant", "content": "".join(pieces)})
    return True


def sampling_params() -> dict[str, Any]:
    settings = get_settings()
    with st.sidebar:
        st.subheader("Sampling")
        temperature = st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="chat_temperature",
                                help="0 picks the most likely token every time.")
        top_p = st.slider("Top-p", 0.05, 1.0, 0.95, 0.05, key="chat_top_p")
        max_tokens = st.slider("Max new tokens", 1, settings.chat_max_tokens, min(64, settings.chat_max_tokens),
                               key="chat_max_tokens")
        seed = st.number_input("Seed", min_value=-1, value=-1, step=1, key="chat_seed",
                               help="-1: a new sample every time; any other value repeats the same sample.")
    params: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "max_tokens": int(max_tokens)}
    if seed >= 0:
        params["seed"] = int(seed)
    return params


st.title("Chat")
client = get_client()
listing = ui.call(client.request, "GET", "/v1/models")
if listing is None:
    st.stop()
models = [m["id"] for m in listing["data"]]  # OpenAI's model list: {"object": "list", "data": [...]}
if not models:
    st.info("No model to chat with yet: a job's models appear here once it has finished its SFT stage.")
    st.stop()
params = sampling_params()
conversations: dict[str, Any] = st.session_state.setdefault("chat_conversations", {})
pairs = [job for job in dict.fromkeys(m.split("/")[0] for m in models)
         if f"{job}/sft" in models and f"{job}/ppo" in models]
mode = st.radio("Mode", [SINGLE, SIDE], horizontal=True, key="chat_mode",
                help="Side by side sends each message to the SFT and the PPO policy of one job.")

if mode == SINGLE:
    wanted = st.query_params.get("model")
    top = st.columns([4, 1], vertical_alignment="bottom")
    model = top[0].selectbox("Model", models, index=models.index(wanted) if wanted in models else 0,
                             key="chat_model")
    history: list[dict[str, str]] = conversations.setdefault(model, [])
    if top[1].button("Clear", icon=":material/delete:", key="chat_clear", use_container_width=True):
        history.clear()
    show_history(history)
    if prompt := st.chat_input(f"Message {model}", key="chat_input"):
        history.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            st.markdown(prompt)
        if not reply(client, model, history, params):
            history.pop()  # not answered: drop it so the user can send it again
else:
    if not pairs:
        st.info("Side by side needs a job with both an SFT and a PPO policy; none has finished PPO yet.")
        st.stop()
    top = st.columns([4, 1], vertical_alignment="bottom")
    job = top[0].selectbox("Job", pairs, key="chat_pair")
    side = conversations.setdefault(f"side:{job}", {"sft": [], "ppo": []})
    if top[1].button("Clear", icon=":material/delete:", key="chat_clear_pair", use_container_width=True):
        side["sft"].clear()
        side["ppo"].clear()
    columns = dict(zip(("sft", "ppo"), st.columns(2)))
    for which, column in columns.items():
        with column:
            st.subheader("SFT policy" if which == "sft" else "PPO policy")
            st.caption(f"`{job}/{which}`")
            show_history(side[which])
    if prompt := st.chat_input("Message both policies", key="chat_input_pair"):
        # One seed for both, so they sample with the same random numbers.
        shared = params if "seed" in params else {**params, "seed": secrets.randbelow(2**31)}
        for which, column in columns.items():
            with column:
                side[which].append({"role": "user", "content": prompt})
                with st.chat_message("user"):
                    st.markdown(prompt)
                if not reply(client, f"{job}/{which}", side[which], shared):
                    side[which].pop()
