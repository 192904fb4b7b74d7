"""Arena page: two answers to one prompt from two models, names hidden until you vote; your votes are data.

Pick two contestants (a finished job's SFT or PPO policy; the same one twice compares two of its samples),
write a prompt or take one from a job's held-out set, and both answers stream in side by side through the
chat API (`frontend.chat_stream`, as on the Chat page), under the prompt they answer: its last human turn (the
question voted on) in full, the dialogue's earlier turns folded above it. The prompt box grows with its text, so
a held-out dialogue's last turn is never scrolled out of sight. Which model answers as A is drawn at random and
shown only after the vote: A, B, a tie or both bad, optionally with a better answer of your own. Below, the
leaderboard (win rates and Bradley–Terry ratings, with the votes each rests on) and the votes themselves,
deletable and exportable as preference pairs; the New job page trains on them (`edgerlhf.votes`).
"""

from __future__ import annotations

import random
import secrets
from typing import Any

import pandas as pd
import streamlit as st

from edgerlhf.dialogue import HUMAN, DialogueError, to_messages
from edgerlhf.votes import arena_prompt
from frontend import arena, ui
from frontend.api_client import ApiClient, ApiError, BackendDown, get_client
from frontend.chat_stream import ChatError, stream_chat

# Session keys (comments, not docstrings: Streamlit's magic would show a string literal on the page).
BATTLE = "arena_battle"  # the battle on screen: {prompt, source, models: [A, B], answers: [A, B], vote}
TAKEN = "arena_taken"  # (prompt, source) of the last held-out prompt taken: an unedited one keeps its source
NOTICE = "arena_notice"  # (kind, message) from the last action: a refused vote, a deleted vote
CHOICES = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}


def take_held_out(client: ApiClient) -> None:
    """Callback: a random held-out prompt of the chosen job into the prompt box."""
    # The picker's value from session state, not bound at render time: a click may race the rerun of a new pick.
    job_id = st.session_state["arena_prompt_job"]
    try:
        prompts = arena.held_out_prompts(client, job_id)
    except (ApiError, BackendDown) as exc:
        st.session_state[NOTICE] = ("error", f"No held-out prompt from job-{job_id}: {exc}")
        return
    if not prompts:
        st.session_state[NOTICE] = ("error", f"job-{job_id} has no held-out prompts.")
        return
    prompt = random.choice(prompts)
    st.session_state["arena_prompt"] = prompt
    st.session_state[TAKEN] = (prompt, f"job-{job_id} held-out")


def vote(client: ApiClient, choice: str) -> None:
    """Callback: store the vote on the battle on screen; the names are shown once it is stored."""
    battle = st.session_state[BATTLE]
    better = st.session_state.get("arena_better", "").strip()
    try:
        stored = arena.cast_vote(client, prompt=battle["prompt"], prompt_source=battle["source"],
                                 model_a=battle["models"][0], model_b=battle["models"][1],
                                 answer_a=battle["answers"][0], answer_b=battle["answers"][1], choice=choice,
                                 better=better or None)
    except (ApiError, BackendDown) as exc:
        st.session_state[NOTICE] = ("error", f"The vote was not stored: {exc}")
        return
    battle["vote"] = stored
    st.session_state["arena_better"] = ""


def new_battle() -> None:
    st.session_state.pop(BATTLE, None)
    st.session_state["arena_prompt"] = ""
    st.session_state.pop(TAKEN, None)


def remove_vote(client: ApiClient) -> None:
    vote_id = st.session_state.get("arena_delete_id")
    if vote_id is None:
        return
    try:
        arena.delete_vote(client, int(vote_id))
    except (ApiError, BackendDown) as exc:
        st.session_state[NOTICE] = ("error", f"Vote {vote_id} was not deleted: {exc}")
        return
    st.session_state[NOTICE] = ("success", f"Vote {vote_id} deleted.")


def show_prompt(prompt: str) -> None:
    """The prompt being voted on (an HH prompt): its last human turn in full, the earlier turns in an expander."""
    *earlier, last = to_messages(prompt)
    with st.container(border=True, key="arena-prompt"):
        st.markdown("**Prompt**")
        if earlier:
            with st.expander(f"Earlier turns of the dialogue ({len(earlier)})"):
                for message in earlier:
                    with st.chat_message(message["role"]):
                        st.text(message["content"])
        with st.chat_message(last["role"]):
            st.text(last["content"])


def fight(client: ApiClient, battle: dict[str, Any], params: dict[str, Any]) -> bool:
    """Stream both answers side by side into `battle`, under the prompt; False (and the reason on screen) if one
    failed."""
    messages = to_messages(battle["prompt"])
    show_prompt(battle["prompt"])
    ok = True
    for i, column in enumerate(st.columns(2)):
        with column, st.container(border=True, key=f"arena-answer-{'ab'[i]}"):
            st.markdown(f"**Answer {'AB'[i]}**")
            pieces: list[str] = []
            try:
                st.write_stream(stream_chat(client, battle["models"][i], messages, params, pieces))
            except ChatError as exc:
                st.error(f"Answer {'AB'[i]} failed: {exc}")
                ok = False
            except BackendDown as exc:
                ui.backend_down(exc, inline=True)
                ok = False
            battle["answers"][i] = "".join(pieces)
    return ok


def show_battle(client: ApiClient, battle: dict[str, Any]) -> None:
    voted = battle["vote"]
    show_prompt(battle["prompt"])
    for i, column in enumerate(st.columns(2)):
        with column, st.container(border=True, key=f"arena-answer-{'ab'[i]}"):
            name = f" · `{battle['models'][i]}`" if voted else " · model hidden until you vote"
            st.markdown(f"**Answer {'AB'[i]}**{name}")
            st.markdown(battle["answers"][i] or "_(empty answer)_")
    if voted is None:
        with st.container(border=True, key="arena-vote"):
            st.text_area("A better answer of your own (optional)", key="arena_better",
                         help="It becomes the chosen side of a preference pair against each answer shown.")
            for column, (choice, label) in zip(st.columns(len(CHOICES)), CHOICES.items()):
                column.button(label, key=f"arena_vote_{choice}", on_click=vote, args=(client, choice),
                              use_container_width=True, type="primary" if choice in ("a", "b") else "secondary")
        return
    st.success(f"Vote {voted['id']} stored: **{CHOICES[voted['choice']]}**. A was `{voted['model_a']}`, "
               f"B was `{voted['model_b']}`; it makes {voted['pairs']} preference pair(s).",
               icon=":material/how_to_vote:")
    st.button("New battle", on_click=new_battle, key="arena_new", icon=":material/refresh:")


def last_turn(prompt: str, limit: int = 80) -> str:
    """The last human turn of an HH prompt, shortened for a table."""
    text = prompt.rsplit(HUMAN, 1)[-1].rsplit("\n\nAssistant:", 1)[0].strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show_leaderboard(client: ApiClient) -> None:
    st.subheader("Leaderboard", divider="gray")
    board = ui.call(arena.leaderboard, client)
    if board is None:
        return
    if not board["models"]:
        st.caption("No vote between two different models yet.")
        return
    rows = [{"model": m["model"], "rating": round(m["rating"]), "win rate": f"{m['win_rate']:.0%}",
             "votes": m["votes"], "wins": m["wins"], "losses": m["losses"], "ties": m["ties"]} for m in board["models"]]
    with st.container(key="arena-leaderboard"):
        st.table(pd.DataFrame(rows), hide_index=True)
    st.caption(f"Bradley–Terry ratings on the Elo scale (1000: the anchor every model ties once; 400 points = 10:1 "
               f"odds), from {board['rated_votes']} vote(s) between two different models; a tie or \"both bad\" "
               f"counts half a win each. `votes` is what each row rests on.")
    with st.expander("Head to head"):
        st.table(pd.DataFrame([{"A": p["model_a"], "B": p["model_b"], "votes": p["votes"], "A wins": p["a_wins"],
                                "B wins": p["b_wins"], "ties": p["ties"], "A win rate": f"{p['a_win_rate']:.0%}"}
                               for p in board["pairs"]]), hide_index=True)


def show_votes(client: ApiClient) -> None:
    st.subheader("Votes", divider="gray")
    listing = ui.call(arena.votes, client)
    if listing is None:
        return
    items, total = listing
    if not items:
        st.caption("No votes yet.")
        return
    rows = [{"vote": f"#{v['id']}", "time": ui.parse_time(v["created_at"]).astimezone().strftime("%Y-%m-%d %H:%M"),
             "prompt": last_turn(v["prompt"]), "A": v["model_a"], "B": v["model_b"], "choice": CHOICES[v["choice"]],
             "better answer": "yes" if v["better"] else "", "pairs": v["pairs"]} for v in items]
    with st.container(key="arena-votes"):
        st.table(pd.DataFrame(rows), hide_index=True)
    if total > len(items):
        st.caption(f"The newest {len(items)} of {total} votes; the export has them all.")
    left, middle, right = st.columns([2, 1, 2], vertical_alignment="bottom")
    left.selectbox("Vote", [v["id"] for v in items], key="arena_delete_id", format_func=lambda i: f"#{i}")
    middle.button("Delete vote", on_click=remove_vote, args=(client,), key="arena_delete", icon=":material/delete:",
                  use_container_width=True)
    right.download_button("Export votes (JSONL)", data=lambda: arena.export_jsonl(client),
                          file_name="arena-votes.jsonl", mime="application/x-ndjson", key="arena_export",
                          on_click="ignore", icon=":material/download:", use_container_width=True,
                          help="Every vote's preference pairs: prompt, chosen, rejected (and the vote id) per line.")


st.title("Arena")
st.caption("Two models answer one prompt; which is which stays hidden until you vote. Your votes are stored as "
           "preference data: train the next reward model on them from the **New job** page.")
client = get_client()
if notice := st.session_state.pop(NOTICE, None):
    getattr(st, notice[0])(notice[1])
models = ui.call(arena.contestants, client)
if models is None:
    st.stop()
params = ui.sampling_sidebar(
    "arena", "0 picks the most likely token every time (two samples of one model then agree).")
battle = st.session_state.get(BATTLE)

if not models:
    st.info("No model to compare yet: a job's policies appear here once it has finished its SFT stage.")
else:
    with st.container(border=True, key="arena-setup"):
        first, second = st.columns(2)
        model_1 = first.selectbox("Model 1", models, index=0, key="arena_model_1")
        model_2 = second.selectbox("Model 2", models, index=min(1, len(models) - 1), key="arena_model_2")
        st.caption("Which of the two answers as A is drawn at random. Choose one model twice to compare two of its "
                   "samples.")
        jobs = list(dict.fromkeys(int(m.split("/")[0].removeprefix("job-")) for m in models))
        pick, take = st.columns([3, 1], vertical_alignment="bottom")
        pick.selectbox("Held-out prompts of", jobs, key="arena_prompt_job", format_func=lambda j: f"job-{j}",
                                help="Prompts the job never trained on (its data/test_prefs.jsonl).")
        take.button("Take a held-out prompt", on_click=take_held_out, args=(client,), key="arena_take",
                    use_container_width=True)
        prompt = st.text_area("Prompt", key="arena_prompt", placeholder="Ask something, or take a held-out prompt",
                              height="content",  # a dialogue's last turn, the question, at the bottom: all shown
                              help="One message; a held-out prompt may be a whole dialogue ('Human: ...').")
        # Never disabled: the click that takes focus from the prompt box is the one that sends its text.
        go = st.button("Get two answers", type="primary", key="arena_go", icon=":material/compare_arrows:")
    if go and not prompt.strip():
        st.warning("Write a prompt first, or take a held-out one.")
    elif go:
        try:
            hh_prompt = arena_prompt(prompt)
        except DialogueError as exc:
            st.error(f"Not a prompt: {exc}")
            st.stop()
        taken = st.session_state.get(TAKEN)
        sides = [model_1, model_2]
        if secrets.randbelow(2):
            sides.reverse()
        battle = {"prompt": hh_prompt, "source": taken[1] if taken and taken[0] == prompt else None,
                  "models": sides, "answers": ["", ""], "vote": None}
        st.session_state.pop(BATTLE, None)
        if fight(client, battle, params):
            st.session_state[BATTLE] = battle
            st.rerun()
    elif battle is not None:
        show_battle(client, battle)

show_leaderboard(client)
show_votes(client)
