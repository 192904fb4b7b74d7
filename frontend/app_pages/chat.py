"""Chat page: talk to a finished job's models, one at a time or its SFT and PPO policies side by side, and say what
you think of each reply (a thumb, or a better answer: stored by `POST /api/feedback`, made into training data on
the Data sets page's terms by `POST /api/feedback/snapshot`).

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
from frontend.api_client import ApiClient, ApiError, BackendDown, get_client
from frontend.chat_stream import ChatError, stream_chat

SINGLE, SIDE = "Single model", "Side by side: SFT vs PPO"


def show_history(history: list[dict[str, str]], model: str, key: str) -> None:
    """The conversation, with a thumb and a better answer under each reply (`feedback_row`)."""
    for i, message in enumerate(history):
        with st.chat_message(message["role"]):
            st.markdown(message["content"] or "_(empty reply)_")
            if message["role"] == "assistant":
                feedback_row(model, history[:i], message["content"], f"{key}:{i}")


def reply(client: ApiClient, model: str, history: list[dict[str, str]], params: dict[str, Any], key: str) -> bool:
    """Stream the assistant's answer to `history` into an assistant bubble; keep it in the history, and its
    completion id and sampling settings for feedback about it (`REPLY_META`, by the reply's key)."""
    pieces: list[str] = []
    meta: dict[str, Any] = {"sampling": dict(params)}
    with st.chat_message("assistant"):
        try:
            st.write_stream(stream_chat(client, model, history, params, pieces, meta))
        except ChatError as exc:
            st.error(f"`{model}`: {exc}")
            return False
        except BackendDown as exc:
            ui.backend_down(exc, inline=True)
            return False
    st.session_state.setdefault(REPLY_META, {})[f"{key}:{len(history)}"] = meta
    history.append({"role": "assistant", "content": "".join(pieces)})
    return True


REPLY_META = "chat_reply_meta"  # session key: a reply's key -> its completion id and sampling settings
SAVED = "chat_feedback"  # session key: a feedback widget's key -> the id the backend stored it under


def feedback_row(model: str, before: list[dict[str, str]], answer: str, key: str) -> None:
    """👍/👎 and "Write a better answer" under a reply; each is stored at once (`POST /api/feedback`) with the
    conversation up to the reply, the model, the reply's sampling settings and its completion id."""
    saved: dict[str, int] = st.session_state.setdefault(SAVED, {})
    meta = st.session_state.get(REPLY_META, {}).get(key, {})

    def store(widget: str, **said: Any) -> None:
        try:
            row = get_client().give_feedback(model=model, messages=before, reply=answer, sampling=meta.get("sampling"),
                                             completion_id=meta.get("id"), **said)
        except BackendDown as exc:
            ui.backend_down(exc, inline=True)
        except ApiError as exc:
            st.error(f"Feedback not saved: {exc.message}")
        else:
            saved[widget] = row["id"]

    # One row, not columns: the side-by-side mode's two columns stay the page's only ones.
    with st.container(horizontal=True, vertical_alignment="center", key=f"{key}:row"):
        thumb = st.feedback("thumbs", key=f"{key}:thumb")  # None, 0 (down) or 1 (up)
        if thumb is not None and saved.get(f"{key}:thumb:{thumb}") is None:  # a changed thumb is stored again
            store(f"{key}:thumb:{thumb}", rating=1 if thumb == 1 else -1)
        with st.popover("Write a better answer", icon=":material/edit:"):
            better = st.text_area("A better answer", key=f"{key}:better", height=120)
            # Never disabled: the text box sends its value as the click takes the focus from it.
            if st.button("Save", key=f"{key}:save"):
                if better.strip():
                    store(f"{key}:better:{len(saved)}", better=better.strip())
                else:
                    st.warning("Write the better answer first.")
        stored = [i for k, i in saved.items() if k.startswith(key + ":")]
        if stored:
            st.caption("Feedback saved: " + ", ".join(f"#{i}" for i in stored))


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
    show_history(history, model, f"chat:{model}")
    if prompt := st.chat_input(f"Message {model}", key="chat_input"):
        history.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            st.markdown(prompt)
        if not reply(client, model, history, params, f"chat:{model}"):
            history.pop()  # not answered: drop it so the user can send it again
        else:
            st.rerun()  # draw the reply again with its feedback row
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
            show_history(side[which], f"{job}/{which}", f"side:{job}:{which}")
    if prompt := st.chat_input("Message both policies", key="chat_input_pair"):
        # One seed for both, so they sample with the same random numbers.
        shared = params if "seed" in params else {**params, "seed": secrets.randbelow(2**31)}
        answered = []
        for which, column in columns.items():
            with column:
                side[which].append({"role": "user", "content": prompt})
                with st.chat_message("user"):
                    st.markdown(prompt)
                answered.append(reply(client, f"{job}/{which}", side[which], shared, f"side:{job}:{which}"))
                if not answered[-1]:
                    side[which].pop()
        if all(answered):
            st.rerun()  # draw both replies again with their feedback rows
