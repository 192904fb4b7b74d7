"""Data sets page: bring your own data (upload a file or register a hub id), see what each holds, preview it as a
model will see it, delete it.

An upload is stored once per content under the backend's data directory, its format detected (preference pairs,
demonstrations, prompts or unpaired feedback; text or conversational); a file with a bad row is refused with the
file, line and column, and nothing is kept. The preview renders the first rows through the chosen model's tokenizer
(its chat template when it has one), prompt and answers apart, draws the token lengths the data stage's budgets
compare with those budgets as lines, says how many records the budgets would drop, and lists the bad rows. The New
job page picks a data set per stage from this list (`frontend.datasets`).
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from frontend import charts, datasets, ui
from frontend.api_client import ApiClient, ApiError, BackendDown, get_client

# Session keys (comments, not docstrings: Streamlit's magic would show a string literal on the page).
NOTICE = "ds_notice"  # (kind, message) from the last action: an upload, a registration, a delete
CONFIRM = "ds_confirm_delete"  # the data set a delete waits to be confirmed for
PREVIEW_ROWS = 10  # rows drawn by default (the API serves up to 100)


@st.cache_data(ttl=300, show_spinner=False)
def presets_of(base_url: str, _client: ApiClient) -> dict[str, dict[str, Any]]:
    return _client.presets()


def _notice(kind: str, message: str) -> None:
    st.session_state[NOTICE] = (kind, message)


def _show(dataset_id: int) -> None:
    st.query_params["dataset"] = str(dataset_id)


def do_upload(client: ApiClient) -> None:
    """Callback of the upload form: store the file, then show it."""
    file = st.session_state.get("ds_file")
    if file is None:
        _notice("error", "Choose a file to upload first.")
        return
    try:
        columns = datasets.parse_mapping(st.session_state.get("ds_columns", ""))
        added = datasets.upload(client, file.name, file.getvalue(), name=st.session_state.get("ds_name", "").strip(),
                                format=st.session_state.get("ds_format", "auto"), columns=columns,
                                skip_bad_rows=st.session_state.get("ds_skip_bad", False))
    except ValueError as exc:
        _notice("error", f"The column mapping is not a JSON object: {exc}")
        return
    except (ApiError, BackendDown) as exc:
        _notice("error", f"{file.name} was not stored: {exc}")
        return
    _notice("success", (f"{file.name} is data set #{added['id']} already (the same content)." if added["duplicate"]
                        else f"Stored {file.name} as data set #{added['id']}: {added['kind']} data, "
                             f"{added['rows']:,} rows ({added['reason']})."))
    _show(added["id"])


def do_register(client: ApiClient) -> None:
    """Callback of the hub form: register the hub data set, then show it."""
    hub_id = st.session_state.get("ds_hub_id", "").strip()
    try:
        columns = datasets.parse_mapping(st.session_state.get("ds_hub_columns", ""))
        added = datasets.register_hub(client, hub_id, hub_name=st.session_state.get("ds_hub_name", "").strip(),
                                      data_dir=st.session_state.get("ds_hub_data_dir", "").strip(),
                                      split=st.session_state.get("ds_hub_split", "").strip() or "train",
                                      format=st.session_state.get("ds_hub_format", "auto"), columns=columns)
    except ValueError as exc:
        _notice("error", f"The column mapping is not a JSON object: {exc}")
        return
    except (ApiError, BackendDown) as exc:
        _notice("error", f"{hub_id or 'The hub data set'} was not registered: {exc}")
        return
    _notice("success", f"{hub_id} is data set #{added['id']}: {added['kind']} data, {added['rows']:,} rows.")
    _show(added["id"])


def do_delete(client: ApiClient, dataset_id: int) -> None:
    st.session_state.pop(CONFIRM, None)
    try:
        datasets.delete(client, dataset_id)
    except (ApiError, BackendDown) as exc:
        _notice("error", f"Data set #{dataset_id} was not deleted: {exc}")
        return
    st.query_params.pop("dataset", None)
    _notice("success", f"Data set #{dataset_id} deleted.")


FEEDBACK_KINDS = {"preference": "preference pairs: each better answer ≻ the reply it replaces",
                  "demonstration": "demonstrations: each better answer",
                  "unpaired": "unpaired feedback: each thumb, with its reply"}
"""What chat feedback can become (`POST /api/feedback/snapshot`'s `kind`)."""


def do_snapshot(client: ApiClient) -> None:
    """The Chat page's feedback as a data set (`POST /api/feedback/snapshot`)."""
    body = {"kind": st.session_state["ds_fb_kind"]}
    if st.session_state.get("ds_fb_model"):
        body["model"] = st.session_state["ds_fb_model"]
    try:
        made = client.request("POST", "/api/feedback/snapshot", json=body)
    except BackendDown as exc:
        _notice("error", f"Backend unreachable: {exc.reason}")
        return
    except ApiError as exc:
        _notice("error", f"No data set made: {exc.message}")
        return
    _notice("success", f"{'Stored already' if made['duplicate'] else 'Made'}: data set #{made['id']} "
                       f"\u201c{made['name']}\u201d, {len(made['feedback_ids'])} record(s) from feedback "
                       + ", ".join(f"#{i}" for i in made["feedback_ids"][:20])
                       + (" …" if len(made["feedback_ids"]) > 20 else ""))
    _show(made["id"])


def feedback_form(client: ApiClient) -> None:
    """How much feedback the Chat page has stored, and a data set made of it."""
    try:
        total = client.request("GET", "/api/feedback", params={"limit": 1})["total"]
        better = client.request("GET", "/api/feedback", params={"limit": 1, "has_better": True})["total"]
    except (BackendDown, ApiError) as exc:
        st.caption(f"Feedback unavailable: {getattr(exc, 'message', exc)}")
        return
    st.caption(f"{total} feedback row(s) from the Chat page, {better} with a better answer. A data set made of them "
               "is a snapshot: feedback deleted later stays in it, and its records name their feedback ids.")
    with st.form("ds-feedback"):
        left, right = st.columns(2)
        left.selectbox("Make", list(FEEDBACK_KINDS), format_func=FEEDBACK_KINDS.get, key="ds_fb_kind")
        right.text_input("Only about the model (empty: any)", key="ds_fb_model", placeholder="job-3/ppo")
        st.form_submit_button("Make a data set", icon=":material/thumbs_up_down:", on_click=do_snapshot,
                              args=(client,), key="ds-feedback-submit", disabled=not total)


def add_forms(client: ApiClient) -> None:
    upload_tab, hub_tab, feedback_tab = st.tabs(["Upload a file", "Register a hub data set", "From chat feedback"])
    with feedback_tab:
        feedback_form(client)
    with upload_tab, st.form("ds-upload"):
        st.file_uploader("Data file (.jsonl, .json, .csv, .parquet, each also .gz)",
                         type=["jsonl", "json", "csv", "parquet", "gz"], key="ds_file")
        left, right = st.columns(2)
        left.text_input("Name (empty: the file name)", key="ds_name")
        right.selectbox("Format", datasets.FORMATS, key="ds_format",
                        help="What the file holds; `auto` detects it from the columns (and says why).")
        st.text_input("Column mapping (JSON, optional)", key="ds_columns",
                      placeholder='{"question": "prompt", "answer": "completion"}',
                      help="Your column names -> the format's (prompt, chosen, rejected, completion, messages, text, "
                           "label), applied before the format is detected.")
        st.checkbox("Keep it without its bad rows (counted and listed) instead of refusing it", key="ds_skip_bad")
        st.form_submit_button("Upload", type="primary", icon=":material/upload:", on_click=do_upload, args=(client,),
                              key="ds-upload-submit")
    with hub_tab, st.form("ds-hub"):
        st.text_input("Hub id", key="ds_hub_id", placeholder="trl-lib/ultrafeedback_binarized")
        a, b, c = st.columns(3)
        a.text_input("Configuration (empty: none)", key="ds_hub_name")
        b.text_input("Subset folder, data_dir (empty: none)", key="ds_hub_data_dir")
        c.text_input("Split", value="train", key="ds_hub_split")
        left, right = st.columns(2)
        left.selectbox("Format", datasets.FORMATS, key="ds_hub_format")
        right.text_input("Column mapping (JSON, optional)", key="ds_hub_columns")
        st.caption("The backend reads it once now to detect its format; a job that uses it downloads it.")
        st.form_submit_button("Register", icon=":material/cloud_download:", on_click=do_register, args=(client,),
                              key="ds-hub-submit")


def _size(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def dataset_table(items: list[dict[str, Any]]) -> None:
    rows = [{"id": d["id"], "name": d["name"],
             "holds": d["kind"] + (" (conversational)" if d["conversational"] else ""),
             "rows": d["rows"], "records": d["records"], "bad rows": d["bad_rows"],
             "from": d["file_name"] or d["source"], "size": _size(d["size"]),
             "used by jobs": ", ".join(f"#{i}" for i in d["used_by"])} for d in items]
    with st.container(key="ds-list"):
        st.dataframe(rows, hide_index=True, width="stretch")


def delete_controls(client: ApiClient, dataset: dict[str, Any]) -> None:
    used = dataset["used_by"]
    help_ = (f"Read by queued or running job(s) {', '.join(f'#{i}' for i in used)}: it can be deleted once they "
             "finish." if used else "Removes the data set and its stored file.")
    if st.button("Delete data set", key="ds_delete", disabled=bool(used), help=help_, icon=":material/delete:"):
        st.session_state[CONFIRM] = dataset["id"]
    if st.session_state.get(CONFIRM) == dataset["id"]:
        st.warning(f"Delete data set #{dataset['id']} ({dataset['name']})?")
        yes, no = st.columns(2)
        yes.button("Yes, delete", key="ds_delete_yes", type="primary", on_click=do_delete,
                   args=(client, dataset["id"]))
        no.button("Keep it", key="ds_delete_no", on_click=lambda: st.session_state.pop(CONFIRM, None))


def model_choice(client: ApiClient) -> str | None:
    """The tokenizer to preview with: a preset's model, or any hub id or local directory typed."""
    presets = ui.call(presets_of, client.base_url, client) or {}
    choices = datasets.tokenizer_choices(presets)
    tiny = presets.get("tiny", {}).get("config", {}).get("model", {})
    default = tiny.get("tokenizer") or tiny.get("name_or_path")
    options = [*choices, "other"]
    picked = st.selectbox("Model whose tokenizer renders and counts", options,
                          index=options.index(default) if default in options else 0, key="ds_model",
                          format_func=lambda o: choices.get(o, "Another hub id or local directory…"))
    if picked == "other":
        typed = st.text_input("Hub id or absolute local directory", key="ds_model_other").strip()
        return typed or None
    return picked


def show_preview(client: ApiClient, dataset: dict[str, Any]) -> None:
    st.subheader("Preview", divider="gray")
    left, mid, right, far = st.columns([3, 1, 1, 1])
    with left:
        model = model_choice(client)
    limit = mid.number_input("Rows shown", 1, 100, PREVIEW_ROWS, key="ds_limit")
    max_prompt = right.number_input("max_prompt_tokens", 1, 32768, 256, key="ds_max_prompt",
                                    help="`data.max_prompt_tokens`: longer prompts are dropped by the data stage.")
    max_answer = far.number_input("max_response_tokens", 1, 32768, 128, key="ds_max_answer",
                                  help="`data.max_response_tokens`: pairs with a longer answer are dropped.")
    if model is None:
        st.info("Type a hub id or an absolute local directory to preview with.")
        return
    with st.spinner("Reading and tokenizing…"):
        try:
            view = datasets.preview(client, dataset["id"], model, int(limit), int(max_prompt), int(max_answer))
        except BackendDown as exc:
            ui.backend_down(exc, inline=True)
            return
        except ApiError as exc:
            st.error(f"No preview: {exc.message}", icon=":material/error:")
            return
    with st.container(key="ds-preview"):
        st.markdown(f"**{view['kind']}** data{' (conversational)' if view['conversational'] else ''}: "
                    f"{view['reason']}. Shown through `{model}`'s "
                    + ("chat template." if view["chat_template"] else "tokenizer, without a chat template (HH text)."))
        a, b, c, d = st.columns(4)
        a.metric("Rows", f"{view['rows']:,}")
        b.metric("Records", f"{view['records']:,}", help="A multi-turn conversation gives one per assistant turn.")
        c.metric("Bad rows", f"{view['bad_rows']:,}")
        dropped = sum(view["dropped"].values())
        d.metric("Dropped at these budgets", f"{dropped:,} of {view['measured']:,}",
                 help="What the data stage's cleaning would drop of the measured records (the first 20,000).")
        if view["dropped"]:
            st.caption("Dropped by reason: " + " · ".join(f"{k} {v:,}" for k, v in view["dropped"].items())
                       + f". Kept: {view['kept']:,}.")
        charts_left, charts_right = st.columns(2)
        charts_left.plotly_chart(charts.histogram_figure(view["prompt_tokens"], "Prompt length (tokens)",
                                                         int(max_prompt)), key="ds-hist-prompt")
        if view["answer_tokens"] is not None:
            charts_right.plotly_chart(charts.histogram_figure(view["answer_tokens"], "Answer length (tokens)",
                                                              int(max_answer), charts.COLORS[2]), key="ds-hist-answer")
        if view["problems"]:
            with st.container(key="ds-problems"):
                st.warning("Bad rows (skipped):\n\n" + "\n".join(f"- `{p}`" for p in view["problems"]),
                           icon=":material/report:")
        st.caption("Prompt and answers as the model sees them; token counts as the budgets count them (the stored "
                   "prompt, the answer after a space).")
        for i, row in enumerate(view["rows_shown"]):
            with st.container(border=True, key=f"ds-row-{i}"):
                prompt_col, answer_col = st.columns(2)
                with prompt_col:
                    st.caption(f"Row {i + 1} · prompt · {row['prompt_tokens']} tokens")
                    st.code(row["prompt"], language=None, wrap_lines=True)
                    if row["extra"]:
                        st.caption("Other columns: " + ", ".join(f"{k}={v!r}"[:200] for k, v in row["extra"].items()))
                with answer_col:
                    for answer in row["answers"]:
                        mark = {None: "", True: " · labelled good", False: " · labelled bad"}[row["label"]]
                        st.caption(f"{answer['role']} · {answer['tokens']} tokens{mark}")
                        st.code(answer["text"], language=None, wrap_lines=True)
                    if not row["answers"]:
                        st.caption("A prompt set: the policy writes the answers.")


st.title("Data sets")
st.caption("Your own preference pairs, demonstrations, prompts or feedback: upload a file or register a hub data set, "
           "preview it as a model will see it, then pick it per stage on the **New job** page.")
client = get_client()
notice = st.session_state.pop(NOTICE, None)
if notice:
    (st.success if notice[0] == "success" else st.error)(notice[1])
with st.container(border=True):
    add_forms(client)

items = ui.call(datasets.list_datasets, client)
if items is None:
    st.stop()
if not items:
    st.info("No data sets yet: upload one above.")
    st.stop()
dataset_table(items)
by_id = {d["id"]: d for d in items}
try:
    wanted = int(st.query_params.get("dataset", items[0]["id"]))
except ValueError:
    wanted = items[0]["id"]
ids = list(by_id)
chosen = st.selectbox("Data set", ids, index=ids.index(wanted) if wanted in by_id else 0, key=f"ds_pick:{wanted}",
                      format_func=lambda i: datasets.label(by_id[i]))
if str(chosen) != st.query_params.get("dataset"):
    _show(chosen)
dataset = by_id[chosen]
st.caption(f"Read from `{dataset['source']}`" + (f" ({dataset['data_dir'] or ''}/{dataset['split']})"
                                                 if dataset["origin"] == "hub" else "")
           + (f" with columns {dataset['columns']}" if dataset["columns"] else "") + ". Jobs can read it as: "
           + ", ".join(f"`{s}`" for s in dataset["sections"]) + ".")
delete_controls(client, dataset)
show_preview(client, dataset)
