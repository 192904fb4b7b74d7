"""Feedback page: what people said about replies on the Chat page (a thumb, a better answer), newest first, filtered
by model, rating and better answer; one item read whole (the conversation, the reply, the better answer, how it was
sampled), deleted after a question, and the matching feedback made into a data set.

Everything goes through the backend's feedback routes (`GET`/`DELETE /api/feedback`, `POST /api/feedback/snapshot`)
by the dashboard's one API client. A data set made of feedback is a snapshot: deleting feedback later leaves it in
that data set (the backend never changes a stored data set) and out of those made after.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from frontend import ui
from frontend.api_client import ApiClient, ApiError, BackendDown, get_client

# Session keys (comments, not docstrings: Streamlit's magic would show a string literal on the page).
NOTICE = "fb_notice"  # (kind, message, data set id or None) from the last action: a delete, a snapshot
CONFIRM = "fb_confirm_delete"  # the feedback a delete waits to be confirmed for
PAGE_SIZE = 50  # rows listed at once (the API serves up to 500)
ANY = "Any"
RATINGS = {ANY: None, "Thumbs up": 1, "Thumbs down": -1}
BETTER = {ANY: None, "With a better answer": True, "Without one": False}
KINDS = {"preference": "Preference pairs: each better answer ≻ the reply it replaces",
         "demonstration": "Demonstrations: each better answer",
         "unpaired": "Unpaired feedback: each thumb, with its reply"}
DATASETS_PAGE = "app_pages/datasets.py"


def rating_text(rating: int | None) -> str:
    """A thumb as a table cell shows it, in words (a headless Chromium has no emoji font: see `ui.STATUS_ICON`)."""
    return {1: "up", -1: "down"}.get(rating, ui.DASH)


def rating_icon(rating: int | None) -> str:
    """A thumb in markdown: Material's icon and the word; empty without one."""
    return {1: ":material/thumb_up: up", -1: ":material/thumb_down: down"}.get(rating, "")


def last_user_turn(messages: list[dict[str, str]]) -> str:
    """The question the reply answers: the conversation's last user message."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def when(item: dict[str, Any]) -> str:
    moment = ui.parse_time(item["created_at"])
    return moment.astimezone().strftime("%Y-%m-%d %H:%M") if moment else ui.DASH


def _notice(kind: str, message: str, dataset_id: int | None = None) -> None:
    st.session_state[NOTICE] = (kind, message, dataset_id)


def _first_page() -> None:
    """A filter changed: list from the newest again."""
    st.session_state["fb_page"] = 1


def do_delete(client: ApiClient, feedback_id: int) -> None:
    st.session_state.pop(CONFIRM, None)
    try:
        client.delete_feedback(feedback_id)
    except BackendDown as exc:
        _notice("error", f"Feedback #{feedback_id} was not deleted: backend unreachable ({exc.reason}).")
        return
    except ApiError as exc:
        _notice("error", f"Feedback #{feedback_id} was not deleted: {exc.message}")
        return
    _notice("success", f"Feedback #{feedback_id} deleted. Data sets made from it before keep it.")


def matching_ids(client: ApiClient, filters: dict[str, Any]) -> list[int]:
    """The ids of every feedback row the filters match (all pages)."""
    ids: list[int] = []
    while True:
        items, total = client.list_feedback(**filters, limit=500, offset=len(ids))
        ids += [item["id"] for item in items]
        if not items or len(ids) >= total:
            return ids


def do_snapshot(client: ApiClient, filters: dict[str, Any]) -> None:
    """The feedback the filters match as a data set (`POST /api/feedback/snapshot`): by its model when only the model
    is filtered, else by the ids of the matching rows."""
    kind = st.session_state["fb_kind"]
    try:
        if filters["rating"] is None and filters["has_better"] is None:
            made = client.snapshot_feedback(kind, model=filters["model"])
        else:
            made = client.snapshot_feedback(kind, ids=matching_ids(client, filters))
    except BackendDown as exc:
        _notice("error", f"No data set made: backend unreachable ({exc.reason}).")
        return
    except ApiError as exc:
        _notice("error", f"No data set made: {exc.message}")
        return
    ids = made["feedback_ids"]
    _notice("success", f"{'Stored already' if made['duplicate'] else 'Made'}: data set #{made['id']} "
                       f"\u201c{made['name']}\u201d, {len(ids)} record(s) from feedback "
                       + ", ".join(f"#{i}" for i in ids[:20]) + (" …" if len(ids) > 20 else ""), made["id"])


def show_notice() -> None:
    notice = st.session_state.pop(NOTICE, None)
    if not notice:
        return
    kind, message, dataset_id = notice
    (st.success if kind == "success" else st.error)(message)
    if dataset_id is not None:
        st.page_link(DATASETS_PAGE, label=f"Open data set #{dataset_id} on the Data sets page",
                     icon=":material/dataset:", query_params={"dataset": str(dataset_id)})


def served_models(client: ApiClient) -> list[str]:
    """The models the chat API serves now (`GET /v1/models`), offered by the model filter; none when it fails (the
    filter still takes a typed name)."""
    try:
        return [m["id"] for m in client.request("GET", "/v1/models")["data"]]
    except (BackendDown, ApiError):
        return []


def filters_row(models: list[str], chosen: dict[str, Any]) -> None:
    """The three filters, drawn after the list was read with their values (so the model box can offer the models
    the list shows); a change lists from the newest again."""
    options = [ANY, *dict.fromkeys(sorted(models) + ([chosen["model"]] if chosen["model"] else []))]
    model, rating, better = st.columns(3)
    model.selectbox("Model", options, key="fb_model", on_change=_first_page, accept_new_options=True,
                    help="The chat model that replied (`job-3/ppo`); type another name to filter on it.")
    rating.selectbox("Rating", list(RATINGS), key="fb_rating", on_change=_first_page)
    better.selectbox("Better answer", list(BETTER), key="fb_better", on_change=_first_page)


def feedback_table(items: list[dict[str, Any]]) -> None:
    rows = [{"id": item["id"], "when": when(item), "model": item["model"], "rating": rating_text(item["rating"]),
             "prompt (last user turn)": ui.head(ui.clean_text(last_user_turn(item["messages"])), 80),
             "reply": ui.head(ui.clean_text(item["reply"]), 80) or ui.DASH,
             "better answer": ui.head(ui.clean_text(item["better"]), 80) if item["better"] else ui.DASH}
            for item in items]
    with st.container(key="fb-list"):
        st.table(pd.DataFrame(rows), hide_index=True)


def item_label(item: dict[str, Any]) -> str:
    return (f"#{item['id']} · {item['model']}" + (f" · thumb {rating_text(item['rating'])}" if item["rating"] else "")
            + (" · a better answer" if item["better"] else "")
            + f" · {ui.head(ui.clean_text(last_user_turn(item['messages'])), 50)}")


def show_item(client: ApiClient, item: dict[str, Any]) -> None:
    """One feedback item whole: the conversation up to the reply, the reply, the better answer, how it was sampled;
    and its delete button, which asks first."""
    with st.container(border=True, key="fb-item"):
        st.markdown(" · ".join(part for part in (f"**Feedback #{item['id']}**", when(item), f"`{item['model']}`",
                                                 rating_icon(item["rating"]),
                                                 f"by {item['author']}" if item["author"] else "") if part))
        st.caption(f"The conversation up to the reply ({len(item['messages'])} message(s))")
        for message in item["messages"]:
            with st.chat_message(message["role"]):
                st.markdown(ui.clean_text(message["content"]) or "_(empty)_")
        with st.chat_message("assistant"):
            st.caption(f"The reply of `{item['model']}`" + (f" · {rating_icon(item['rating'])}" if item["rating"]
                                                            else ""))
            st.markdown(ui.clean_text(item["reply"]) or "_(empty reply)_")
        if item["better"]:
            with st.chat_message("assistant", avatar=":material/edit:"), st.container(key="fb-better"):
                st.caption("The better answer written for it")
                st.markdown(ui.clean_text(item["better"]))
        sampling = item["sampling"] or {}
        facts = [f"{k} {ui.fmt(v)}" for k, v in sampling.items() if v is not None]
        if item["completion_id"]:
            facts.append(f"completion `{item['completion_id']}`")
        if facts:
            st.caption("Sampled with " + " · ".join(facts))
        if st.button("Delete feedback", key="fb_delete", icon=":material/delete:"):
            st.session_state[CONFIRM] = item["id"]
        if st.session_state.get(CONFIRM) == item["id"]:
            st.warning(f"Delete feedback #{item['id']}? Data sets made from it before keep it (a data set never "
                       "changes); data sets made from now on leave it out.", icon=":material/help:")
            yes, no, _ = st.columns([1, 1, 3])
            yes.button("Yes, delete it", key="fb_delete_yes", type="primary", width="stretch", on_click=do_delete,
                       args=(client, item["id"]))
            no.button("No, keep it", key="fb_delete_no", width="stretch",
                      on_click=lambda: st.session_state.pop(CONFIRM, None))


def snapshot_form(client: ApiClient, filters: dict[str, Any], total: int) -> None:
    with st.container(border=True, key="fb-snapshot"):
        st.markdown(f"**Make a data set of the {total} matching row(s)**")
        st.caption("A snapshot: stored like an upload, read by a job like any data set (pick it on the **New job** "
                   "page); each record names its feedback id, and deleting feedback later does not change it.")
        kind, make = st.columns([3, 1], vertical_alignment="bottom")
        kind.selectbox("Make", list(KINDS), format_func=KINDS.get, key="fb_kind")
        make.button("Make a data set", key="fb_snapshot", icon=":material/thumbs_up_down:", on_click=do_snapshot,
                    args=(client, filters), width="stretch")
        st.page_link(DATASETS_PAGE, label="Or the Data sets page's *From chat feedback* tab",
                     icon=":material/dataset:")


st.title("Feedback")
st.caption("What was said about replies on the **Chat** page: each thumb (:material/thumb_up: or "
           ":material/thumb_down:) and better answer, newest first. Make them into training data below, or on the "
           "**Data sets** page.")
client = get_client()
show_notice()

filters = {"model": st.session_state.get("fb_model") if st.session_state.get("fb_model") != ANY else None,
           "rating": RATINGS.get(st.session_state.get("fb_rating", ANY)),
           "has_better": BETTER.get(st.session_state.get("fb_better", ANY))}
page_no = int(st.session_state.get("fb_page", 1))
listing = ui.call(client.list_feedback, **filters, limit=PAGE_SIZE, offset=(page_no - 1) * PAGE_SIZE)
if listing is None:
    st.stop()
items, total = listing
if not items and page_no > 1:  # deleted down to an empty last page: the first one
    st.session_state["fb_page"], page_no = 1, 1
    items, total = ui.call(client.list_feedback, **filters, limit=PAGE_SIZE) or ([], 0)
filtered = any(v is not None for v in filters.values())
everything = (ui.call(client.list_feedback, limit=1) or ([], total))[1] if filtered else total
if not everything:
    st.info("No feedback yet: give a thumb or write a better answer under a reply on the **Chat** page.")
    st.stop()

filters_row(served_models(client) + [item["model"] for item in items], filters)
with st.container(key="fb-count"):
    st.markdown(f"**{total}** feedback row(s)" + (f" match (of {everything} in all)" if filtered else "")
                + (f"; rows {(page_no - 1) * PAGE_SIZE + 1}–{(page_no - 1) * PAGE_SIZE + len(items)} shown"
                   if total > PAGE_SIZE else "") + ".")
if not items:
    st.info("No feedback matches these filters.")
    st.stop()
feedback_table(items)
if total > PAGE_SIZE:
    st.number_input("Page", 1, -(-total // PAGE_SIZE), key="fb_page", help=f"{PAGE_SIZE} rows a page, newest first.")

by_id = {item["id"]: item for item in items}
chosen = st.selectbox("Read one", list(by_id), format_func=lambda i: item_label(by_id[i]), key="fb_pick")
show_item(client, by_id[chosen])
snapshot_form(client, filters, total)
