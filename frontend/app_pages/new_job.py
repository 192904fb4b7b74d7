"""New job page: a preset, the stages, reward-model precisions, model, data and the main hyperparameters.

Every field starts at the preset's value (shown in its help); only fields changed from the preset are
sent as overrides, so the job's stored config says plainly what was changed. The backend validates: a
422 names the field (`ppo.batch_size`), and its message is shown right under that field. Submitting
opens the new job's page.
"""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from frontend import ui
from frontend.api_client import ApiError, BackendDown, get_client

STAGES = ["data", "sft", "reward", "ppo", "evaluate"]
PRECISIONS = ["bf16", "int8", "int4"]

# (section, config path, label, kind, options). Kinds: int, int_opt (empty = None), float, text,
# text_opt (empty = None), bool, select, multi. Only the hyperparameters people change most; anything
# else goes into "Extra overrides (JSON)".
FIELDS: list[tuple[str, str, str, str, list[str] | None]] = [
    ("Run", "stages", "Stages to run", "multi", STAGES),
    ("Run", "device", "Device", "select", ["auto", "cpu", "cuda"]),
    ("Run", "seed", "Seed", "int", None),
    ("Model", "model.name_or_path", "Base model (hub id or local path)", "text", None),
    ("Model", "model.tokenizer", "Tokenizer (empty: the model's)", "text_opt", None),
    ("Model", "model.random_init", "Random weights (tests, benchmarks)", "bool", None),
    ("Data", "data.source", "Data set (hub id, local .jsonl[.gz] or directory)", "text", None),
    ("Data", "data.data_dir", "Hub subset (e.g. harmless-base)", "text_opt", None),
    ("Data", "data.max_pairs", "Max pairs (empty: all)", "int_opt", None),
    ("Data", "data.labels", "Preference labels", "select", ["human", "gold"]),
    ("SFT", "sft.max_steps", "SFT steps", "int", None),
    ("SFT", "sft.learning_rate", "SFT learning rate", "float", None),
    ("SFT", "sft.batch_size", "SFT batch size", "int", None),
    ("SFT", "sft.lora_r", "SFT LoRA rank", "int", None),
    ("Reward model", "reward.precisions", "Reward-model precisions", "multi", PRECISIONS),
    ("Reward model", "reward.max_steps", "Reward steps (per precision)", "int", None),
    ("Reward model", "reward.learning_rate", "Reward learning rate", "float", None),
    ("Reward model", "reward.batch_size", "Reward batch size", "int", None),
    ("PPO", "ppo.steps", "PPO steps", "int", None),
    ("PPO", "ppo.batch_size", "PPO rollout batch size", "int", None),
    ("PPO", "ppo.mini_batch_size", "PPO minibatch size", "int", None),
    ("PPO", "ppo.learning_rate", "PPO learning rate", "float", None),
    ("PPO", "ppo.init_kl_coef", "Initial KL coefficient", "float", None),
    ("PPO", "ppo.target_kl", "Target KL (adaptive controller)", "float", None),
    ("PPO", "ppo.response_length", "Max response tokens", "int", None),
    ("PPO", "ppo.reward_precision", "Reward model scoring PPO", "select", PRECISIONS),
    ("PPO", "ppo.sample_every", "Log samples every N steps", "int", None),
    ("Evaluate", "evaluate.n_prompts", "Evaluation prompts", "int", None),
]
LAYOUT = [["Run", "Model", "Data"], ["SFT", "Reward model"], ["PPO", "Evaluate"]]
ERRORS = "new_job_errors"  # session key: {field path: message} from the last rejected submit


def get_path(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def widget(path: str, label: str, kind: str, options: list[str] | None, default: Any, key: str) -> Any:
    help_text = f"`{path}` · preset default: `{json.dumps(default)}`"
    if kind == "int":
        return st.number_input(label, value=int(default) if default is not None else 0, step=1, key=key, help=help_text)
    if kind == "int_opt":
        return st.number_input(label, value=int(default) if default is not None else None, step=1, key=key,
                               help=help_text, placeholder="all")
    if kind == "float":
        value = float(default) if default is not None else 0.0
        return st.number_input(label, value=value, step=abs(value) / 10 or 0.01, format="%g", key=key, help=help_text)
    if kind == "bool":
        return st.checkbox(label, value=bool(default), key=key, help=help_text)
    if kind == "select":
        opts = list(options or [])
        if default is not None and default not in opts:
            opts.insert(0, default)
        return st.selectbox(label, opts, index=opts.index(default) if default in opts else 0, key=key, help=help_text)
    if kind == "multi":
        return st.multiselect(label, options or [], default=[d for d in (default or []) if d in (options or [])],
                              key=key, help=help_text)
    value = st.text_input(label, value="" if default is None else str(default), key=key, help=help_text)
    return value if kind == "text" else (value.strip() or None)


def field_error(path: str, errors: dict[str, str]) -> None:
    """The backend's message for this field (or one of its items, e.g. `reward.precisions[1]`), under it."""
    for name, message in errors.items():
        if name == path or name.startswith(path + "[") or name.startswith(path + "."):
            st.error(message, icon=":material/error:")


st.title("New job")
client = get_client()
presets = ui.call(client.presets)
if presets is None:
    st.stop()
if not presets:
    st.error("The backend offers no presets.")
    st.stop()

names = list(presets)
preset = st.selectbox("Preset", names, index=names.index("tiny") if "tiny" in names else 0, key="nj_preset",
                      on_change=lambda: st.session_state.pop(ERRORS, None),
                      help="The starting configuration; every field below starts at its value.")
defaults = presets[preset]
if isinstance(defaults, dict) and isinstance(defaults.get("config"), dict):
    defaults = defaults["config"]
with st.expander(f"Full `{preset}` configuration"):
    st.json(defaults, expanded=False)

errors: dict[str, str] = st.session_state.get(ERRORS, {})
known = {path for _, path, *_ in FIELDS}
other = {k: v for k, v in errors.items()
         if not any(k == p or k.startswith(p + "[") or k.startswith(p + ".") for p in known) and k != "overrides"}

values: dict[str, Any] = {}
with st.form("new_job", border=True):
    if other:
        st.error("The backend rejected the job:\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in other.items()))
    st.caption(f"Every field starts at the `{preset}` preset's value (its ⓘ shows the config field and the "
               "default); only what you change is sent as an override. The backend checks the whole config.")
    name = st.text_input("Job name", key="nj_name", placeholder="optional, e.g. tiny-lr-1e-3")
    for column, sections in zip(st.columns(len(LAYOUT)), LAYOUT):
        with column:
            for section in sections:
                st.subheader(section, divider="gray")
                for sec, path, label, kind, options in FIELDS:
                    if sec != section:
                        continue
                    values[path] = widget(path, label, kind, options, get_path(defaults, path),
                                          key=f"nj:{preset}:{path}")
                    field_error(path, errors)
    extra_text = st.text_area("Extra overrides (JSON, applied last)", key=f"nj:{preset}:extra",
                              placeholder='{"ppo": {"top_k": 0, "temperature": 0.7}}',
                              help="Any other config field, as nested JSON; see the full configuration above.")
    field_error("overrides", errors)
    submitted = st.form_submit_button("Launch job", type="primary", icon=":material/rocket_launch:")

if submitted:
    overrides: dict[str, Any] = {}
    for path, value in values.items():
        if value != get_path(defaults, path):
            set_path(overrides, path, value)
    new_errors: dict[str, str] = {}
    if extra_text.strip():
        try:
            extra = json.loads(extra_text)
            if not isinstance(extra, dict):
                raise ValueError("must be a JSON object")
            overrides = merge(overrides, extra)
        except ValueError as exc:
            new_errors["overrides"] = f"Extra overrides are not valid JSON: {exc}"
    if not new_errors:
        try:
            job = client.create_job(preset, overrides, name=name.strip() or None)
        except BackendDown as exc:
            ui.backend_down(exc, inline=True)
            st.stop()
        except ApiError as exc:
            new_errors = exc.field_errors or {"request": exc.message}
        else:
            st.session_state.pop(ERRORS, None)
            st.switch_page(ui.JOB_PAGE, query_params={"job": str(job["id"])})
    st.session_state[ERRORS] = new_errors
    st.rerun()  # draw the messages next to their fields
