"""The New-job form's rewards builder: stated rewards (`ppo.rewards`) put together with widgets, and a **Try it** box
that scores a few answers with them through `POST /api/rewards/score`, the code the job will run.

Each component is one bordered card: its kind, weight and name, then the fields its kind reads (the config's
`RewardComponent`, whose field help the backend serves with `/api/config/fields`). The builder's state is a list
of component dicts in the session; `editor` returns it, without the fields left empty, as the job's
`ppo.rewards` (None while the builder is off: the preset's reward model scores the job).
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from frontend import datasets, ui
from frontend.api_client import ApiClient, ApiError, BackendDown

KINDS = {
    "reward_model": "the learned reward model (trained by the job's reward stage)",
    "reference_answer": "the answer matches the prompt data's reference column",
    "regex": "a regular expression is found (1) or not (0)",
    "contains": "share of the listed words used",
    "not_contains": "minus the share of the listed words used",
    "length": "1 at the target length, falling to 0 at target ± tolerance",
    "repetition": "minus the share of repeated n-grams",
    "gold": "a gold scorer of the known-answer task",
    "judge": "an LLM judge's grade through an OpenAI-compatible endpoint",
}
"""Every kind of `RewardComponent`, as the builder offers them."""
EXTRACTS = ["whole", "last_number", "first_line", "tag:answer", "after:Answer:", "regex:"]
"""`reference_answer.extract` choices; `tag:`, `after:` and `regex:` take their argument after the colon."""
FIELDS: dict[str, list[tuple[str, str]]] = {
    "reference_answer": [("column", "text"), ("extract", "extract"), ("compare", "compare")],
    "regex": [("pattern", "text")],
    "contains": [("words", "words")],
    "not_contains": [("words", "words")],
    "length": [("target", "int"), ("tolerance", "float"), ("unit", "unit")],
    "repetition": [("n", "int")],
    "gold": [("scorer", "scorer")],
    "judge": [("url", "text"), ("model", "text"), ("rubric", "area"), ("max_score", "float"),
              ("api_key_env", "text"), ("concurrency", "int")],
}
"""The fields each kind reads (`RewardComponent`), and the widget that sets each."""
CHOICES = {"compare": ["text", "number", "math"], "unit": ["words", "tokens"]}
EXAMPLE = [{"kind": "reference_answer", "weight": 1.0, "name": "correct", "column": "answer", "extract": "last_number",
            "compare": "number"},
           {"kind": "regex", "weight": 0.2, "name": "format", "pattern": "^The answer is"}]
"""What a new builder starts with: a verifiable reward and a format rule (the README's example)."""


def _state(key: str) -> list[dict[str, Any]]:
    return st.session_state.setdefault(key, [dict(c) for c in EXAMPLE])


def _field_widget(component: dict[str, Any], name: str, how: str, key: str, help_text: str | None) -> Any:
    value = component.get(name)
    label = name.replace("_", " ")
    if how == "text":
        return st.text_input(label, value or "", key=key, help=help_text) or None
    if how == "area":
        return st.text_area(label, value or "", key=key, help=help_text, height=80) or None
    if how == "int":
        return st.number_input(label, value=value, step=1, key=key, help=help_text, placeholder="default")
    if how == "float":
        return st.number_input(label, value=value, key=key, help=help_text, placeholder="default")
    if how == "words":
        text = st.text_input(f"{label} (comma-separated)", ", ".join(value or []), key=key, help=help_text)
        return [w.strip() for w in text.split(",") if w.strip()] or None
    if how == "extract":
        text = st.text_input(label, value or "whole", key=key, help=(help_text or "") + " One of: " + ", ".join(EXTRACTS))
        return text or None
    if how == "scorer":
        from edgerlhf.gold import SCORERS

        options = sorted(SCORERS)
        return st.selectbox(label, options, index=options.index(value) if value in options else 0, key=key,
                            help=help_text)
    options = CHOICES[how]
    return st.selectbox(label, options, index=options.index(value) if value in options else 0, key=key,
                        help=help_text)


def cleaned(component: dict[str, Any]) -> dict[str, Any]:
    """A component as the job gets it: only its kind's fields, those left empty out (the config's default)."""
    keep = {"kind", "weight", "name", *(name for name, _ in FIELDS.get(component["kind"], []))}
    return {k: v for k, v in component.items() if k in keep and v not in (None, "", [])}


def editor(key: str, fields: dict[str, dict[str, Any]], on: bool) -> list[dict[str, Any]] | None:
    """The builder (under a switch that is `on` to start with when the job already had stated rewards): the
    components as `ppo.rewards`, or None while it is off."""
    if not st.toggle("Score with stated rewards (`ppo.rewards`) instead of the reward model alone", value=on,
                     key=f"{key}:on",
                     help="Say what a good answer is: rules, reference answers, a judge, the learned reward model, "
                          "weighted and summed. Each is logged on its own and evaluated on its own."):
        return None
    components = _state(key)
    for i, component in enumerate(components):
        with st.container(border=True, key=f"{key}-card-{i}"):
            kind_col, weight_col, name_col, remove_col = st.columns([3, 1, 2, 1], vertical_alignment="bottom")
            kinds = list(KINDS)
            component["kind"] = kind_col.selectbox(
                f"Component {i + 1}", kinds, index=kinds.index(component.get("kind", "regex")), key=f"{key}:{i}:kind",
                format_func=lambda k: f"{k} · {KINDS[k]}")
            component["weight"] = weight_col.number_input("weight", value=float(component.get("weight", 1.0)),
                                                          key=f"{key}:{i}:weight", help="Negative to penalise")
            component["name"] = name_col.text_input("name", component.get("name") or "", key=f"{key}:{i}:name",
                                                    help="In the logs and charts; default: the kind and its place") or None
            if remove_col.button("Remove", key=f"{key}:{i}:remove"):
                components.pop(i)
                st.rerun()
            spec = FIELDS.get(component["kind"], [])
            for column, (name, how) in zip(st.columns(max(1, min(3, len(spec)))) * 3, spec):
                help_text = (fields.get(f"ppo.rewards.{name}") or {}).get("help")
                with column:
                    component[name] = _field_widget(component, name, how, f"{key}:{i}:{component['kind']}:{name}",
                                                    help_text)
    if st.button("Add a component", icon=":material/add:", key=f"{key}:add"):
        components.append({"kind": "regex", "weight": 1.0, "pattern": ""})
        st.rerun()
    return [cleaned(c) for c in components]


def try_box(client: ApiClient, key: str, rewards: list[dict[str, Any]], preset: str, overrides: dict[str, Any],
            prompt_dataset: int | None, model: str, budgets: tuple[int, int]) -> None:
    """Score a few answers with `rewards` as the job would: typed, or drawn from the prompt data set (its first
    prompt, and its first rows' reference answers as the answers: the first is right, the others likely not)."""
    with st.expander("Try it: score a few answers with these rewards", expanded=False):
        columns = sorted({c["column"] for c in rewards if c["kind"] == "reference_answer" and c.get("column")})
        if prompt_dataset is not None and st.button("Fill from the prompt data set's reference answers",
                                                    key=f"{key}:draw"):
            _draw(client, key, prompt_dataset, model, columns, budgets)
        prompt = st.text_area("Prompt", key=f"{key}:prompt", height=68, placeholder="What is 12 + 30?")
        reference = {column: st.text_input(f"Reference `{column}`", key=f"{key}:ref:{column}") for column in columns}
        answers_text = st.text_area("Answers, one per line", key=f"{key}:answers", height=100,
                                    placeholder="The answer is 42.\nIt is 41.")
        answers = [line for line in answers_text.splitlines() if line.strip()][:20]
        if st.button("Score", key=f"{key}:score", disabled=not (prompt.strip() and answers)):
            try:
                scored = client.score_rewards(rewards, [{"prompt": prompt, "answer": a, "reference": reference}
                                                        for a in answers], preset, overrides)
            except BackendDown as exc:
                ui.backend_down(exc, inline=True)
                return
            except ApiError as exc:
                st.error(f"Not scored: {exc.message}", icon=":material/error:")
                return
            rows = [{"answer": a, "total": round(s["total"], 3),
                     **{f"{name} (× {scored['weights'][name]:g})": round(s["parts"][name], 3)
                        for name in scored["names"] if name in s["parts"]}}
                    for a, s in zip(answers, scored["samples"])]
            st.dataframe(rows, hide_index=True, width="stretch", key=f"{key}:scores")
            if scored["not_scored"]:
                st.caption(f"Not scored here: {', '.join(scored['not_scored'])} (the reward model the job trains); "
                           "the total is the other components'.")


def _draw(client: ApiClient, key: str, dataset_id: int, model: str, columns: list[str],
          budgets: tuple[int, int]) -> None:
    """The prompt data set's first prompt and its reference columns; its first rows' references as the answers."""
    try:
        preview = datasets.preview(client, dataset_id, model, 5, *budgets)
    except (BackendDown, ApiError) as exc:
        st.warning(f"Could not read the data set: {getattr(exc, 'message', exc)}")
        return
    rows = preview["rows_shown"]
    if not rows:
        return
    st.session_state[f"{key}:prompt"] = rows[0]["prompt"]
    for column in columns:
        st.session_state[f"{key}:ref:{column}"] = str(rows[0]["extra"].get(column, ""))
    first = columns[0] if columns else None
    st.session_state[f"{key}:answers"] = "\n".join(str(r["extra"].get(first, "")) for r in rows) if first else ""
