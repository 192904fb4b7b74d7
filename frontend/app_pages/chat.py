"""Chat page: talk to a finished job's models, one at a time or its SFT and PPO policies side by side.

It speaks the backend's OpenAI-compatible API (`GET /v1/models`, `POST /v1/chat/completions` with
`stream: true`: `frontend.chat_stream`) through the dashboard's one API client, and shows tokens as they
arrive with `st.write_stream` (Streamlit's chat-app pattern). Conversations live in the browser session, one per
model; the side-by-side mode sends each message to both policies of one job with the same sampling
seed, so the difference you read is the difference PPO made.
"""

from __future__ import annotations

import secrets
from typing import Any

import streamlit as st

from frontend import ui
from frontend.api_client import ApiClient, BackendDown, get_client
from frontend.chat_stream import ChatError, stream_chat

SINGLE, SIDE = "Single model", "Side by side: SFT vs PPO"


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


st.title("Chat")
client = get_client()
listing = ui.call(client.request, "GET", "/v1/models")
if listing is None:
    st.stop()
models = [m["id"] for m in listing["data"]]  # OpenAI's model list: {"object": "list", "data": [...]}
if not models:
    st.info("No model to chat with yet: a job's models appear here once it has finished its SFT stage.")
    st.stop()
params = ui.sampling_sidebar("chat", "0 picks the most likely token every time.", seed=True)
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
