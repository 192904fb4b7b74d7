"""New job page: a preset, the stages, reward-model precisions, model, data and the main hyperparameters.

Every field starts at the preset's value; only fields changed from the preset are sent as overrides, so
the job's stored config says plainly what was changed. A field's help (its ⓘ) is the field's docstring in
`edgerlhf/config.py` with its type and accepted range, as the backend serves them (`GET /api/config/fields`):
the dashboard keeps no copy of it, and the widget's kind follows the field's type. The backend validates:
a 422 names the field (`ppo.batch_size`), and its message is shown right under that field. Submitting
opens the new job's page. Beside the config, a job may ask for a minimum GPU memory (`min_gpu_memory_mb`):
only a worker whose GPU has that much takes it. "Arena votes" trains the job on the Arena page's votes, alone
or mixed with the data set: at launch a snapshot of them becomes `data.votes_file` (`frontend.arena`). "Data sets"
picks, per stage, one of the Data sets page's uploads or hub registrations (`datasets` in the job request: the
backend makes it that section's source).

The alignment algorithm (`algorithm`: PPO, GRPO, RLOO or DPO) decides which settings follow: the sampling
algorithms' (`ppo.*`, shared by PPO, GRPO and RLOO; a few PPO's own) or DPO's (`dpo.*`).

Below the fields, the memory plan (`POST /api/plan`, `edgerlhf.plan`) follows every change: each stage's
planned peak, whether it fits the GPU the job would be checked against, what dominates, and for a stage
that does not fit the cheapest change that makes it fit. The backend refuses a job that does not fit
(409, its message shown under the override box) unless "Launch even if it does not fit" is ticked.
"""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from edgerlhf.contract import ALGORITHM_TABLE, ALGORITHMS, PRECISIONS, STAGES, merge_overrides
from frontend import arena, datasets, ui
from frontend.api_client import ApiClient, ApiError, BackendDown, get_client

# (section, config path, label, options). The widget follows the field's type from /api/config/fields:
# int, float, bool, str (a select box when options are given), list[str] (a multiselect); `| None`:
# empty means None. Only the hyperparameters people change most; anything else goes into "Extra
# overrides (JSON)".
FIELDS: list[tuple[str, str, str, list[str] | None]] = [
    ("Run", "stages", "Stages to run", list(STAGES)),
    ("Run", "algorithm", "Alignment algorithm", list(ALGORITHMS)),
    ("Run", "device", "Device", ["auto", "cpu", "cuda"]),
    ("Run", "seed", "Seed", None),
    ("Model", "model.name_or_path", "Base model", None),
    ("Model", "model.tokenizer", "Tokenizer (empty: the model's)", None),
    ("Model", "model.random_init", "Random weights", None),
    ("Data", "data.source", "Data set", None),
    ("Data", "data.data_dir", "Hub subset (empty: none)", None),
    ("Data", "data.max_pairs", "Max pairs (empty: all)", None),
    ("Data", "data.labels", "Preference labels", ["human", "gold"]),
    ("SFT", "sft.max_steps", "SFT steps", None),
    ("SFT", "sft.learning_rate", "SFT learning rate", None),
    ("SFT", "sft.batch_size", "SFT batch size", None),
    ("SFT", "sft.lora_r", "SFT LoRA rank", None),
    ("SFT", "sft.gradient_checkpointing", "SFT gradient checkpointing", None),
    ("Reward model", "reward.precisions", "Reward-model precisions", list(PRECISIONS)),
    ("Reward model", "reward.max_steps", "Reward steps (per precision)", None),
    ("Reward model", "reward.learning_rate", "Reward learning rate", None),
    ("Reward model", "reward.batch_size", "Reward batch size", None),
    ("Reward model", "reward.gradient_checkpointing", "Reward gradient checkpointing", None),
    ("PPO", "ppo.steps", "PPO steps", None),
    ("PPO", "ppo.batch_size", "PPO rollout batch size", None),
    ("PPO", "ppo.mini_batch_size", "PPO minibatch size", None),
    ("PPO", "ppo.samples_per_prompt", "Samples per prompt (group size)", None),
    ("PPO", "ppo.learning_rate", "PPO learning rate", None),
    ("PPO", "ppo.init_kl_coef", "Initial KL coefficient", None),
    ("PPO", "ppo.target_kl", "Target KL", None),
    ("PPO", "ppo.response_length", "Max response tokens", None),
    ("PPO", "ppo.missing_eos_penalty", "Penalty for an answer cut at the cap", None),
    ("PPO", "ppo.reward_precision", "Reward model scoring PPO", list(PRECISIONS)),
    ("PPO", "ppo.sample_every", "Log samples every N steps", None),
    ("PPO", "ppo.gradient_checkpointing", "Gradient checkpointing in the updates", None),
    ("DPO", "dpo.beta", "DPO beta", None),
    ("DPO", "dpo.loss_type", "DPO loss", ["sigmoid", "ipo", "hinge"]),
    ("DPO", "dpo.max_steps", "DPO steps", None),
    ("DPO", "dpo.batch_size", "DPO batch size (pairs)", None),
    ("DPO", "dpo.grad_accum", "DPO gradient accumulation", None),
    ("DPO", "dpo.learning_rate", "DPO learning rate", None),
    ("DPO", "dpo.max_length", "DPO max tokens per pair side", None),
    ("DPO", "dpo.eval_every", "DPO held-out evaluation every N steps", None),
    ("DPO", "dpo.gradient_checkpointing", "DPO gradient checkpointing", None),
    ("Evaluate", "evaluate.n_prompts", "Evaluation prompts", None),
]
LAYOUT = [["Run", "Model", "Data"], ["SFT", "Reward model"], ["PPO", "DPO", "Evaluate"]]
ALGORITHM_HELP = {
    "ppo": "clipped policy gradient, value head and GAE, adaptive KL penalty in the reward",
    "grpo": "each response scored against its group of samples; KL in the loss; no value head",
    "rloo": "leave-one-out baseline over a prompt's samples; KL in the reward; no value head",
    "dpo": "offline on the preference pairs: no sampling, no reward model needed",
}
"""One line per algorithm for the select box (the field's ⓘ holds `PipelineConfig.algorithm`'s docstring)."""
SECTION_ALGORITHMS = {section.upper(): tuple(a.name for a in ALGORITHM_TABLE.values() if a.section == section)
                      for section in ("ppo", "dpo")}
"""Sections shown only for some algorithms: `ppo.*` holds the settings of every sampling algorithm."""
FIELD_ALGORITHMS = {"ppo.target_kl": tuple(a.name for a in ALGORITHM_TABLE.values() if a.adaptive_kl)}
"""Fields of a shown section that only some of its algorithms read (the adaptive KL controller is PPO's)."""
BY_ALGORITHM = ("ppo.samples_per_prompt",)
"""Fields whose default the config derives from the algorithm (None: 1 for PPO, 4 for GRPO and RLOO). The preset
shows the value derived for its own algorithm; for another one the field starts empty, so the config derives it."""
ERRORS = "new_job_errors"  # session key: {field path: message} from the last rejected submit
DATASET_KEY = "nj_dataset:{}"  # a data set picker's key, by config section (outside `nj:<preset>:`: no config field)
MIN_GPU = "min_gpu_memory_mb"  # the job-level field of `JobCreate` (not part of the config)
OVERRIDE = "override_memory_plan"  # the job-level field that queues a job the memory plan refuses
PLAN_SECONDS = 10  # a plan depends on the registered workers' GPUs too: recompute it now and then
CACHE_SECONDS = 300  # presets and field docs change only when the backend is upgraded


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def presets_of(base_url: str, _client: ApiClient) -> dict[str, dict[str, Any]]:
    """The backend's presets (`PresetPublic` by name), fetched once per backend URL for a few minutes."""
    return _client.presets()


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def fields_of(base_url: str, _client: ApiClient) -> dict[str, dict[str, Any]]:
    """The backend's config fields (`ConfigFieldPublic`) by dotted path, cached like the presets."""
    return {f["path"]: f for f in _client.config_fields()}


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def range_text(rng: dict[str, Any]) -> str:
    """A `RangePublic` as an interval: `[1, 1,000,000]`, `(0, 1]`."""
    return (f"{'(' if rng['low_open'] else '['}{_number(rng['low'])}, {_number(rng['high'])}"
            f"{')' if rng['high_open'] else ']'}")


def help_text(field: dict[str, Any], default: Any) -> str:
    """The field's docstring, then its path, type, accepted range and the preset's value."""
    facts = [f"`{field['path']}`", f"`{field['type']}`"]
    if field["range"] is not None:
        facts.append(f"accepts {range_text(field['range'])}")
    facts.append(f"preset default: `{json.dumps(default)}`")
    return f"{field['help']}\n\n{' · '.join(facts)}"


def get_path(config: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a full configuration (a preset's `config` has every field)."""
    node: Any = config
    for part in path.split("."):
        node = node[part]
    return node


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def algorithm_option(name: str) -> str:
    """`GRPO — each response scored against its group …`: an algorithm and what sets it apart."""
    return f"{name.upper()} — {ALGORITHM_HELP[name]}" if name in ALGORITHM_HELP else name


def shown(section: str, path: str, algorithm: str) -> bool:
    """Whether the form shows field `path` of `section` for the chosen algorithm."""
    return algorithm in SECTION_ALGORITHMS.get(section, (algorithm,)) and \
        algorithm in FIELD_ALGORITHMS.get(path, (algorithm,))


def widget(field: dict[str, Any], label: str, options: list[str] | None, default: Any, key: str) -> Any:
    """The input for one config field; its kind follows the field's `type`."""
    kind, optional = field["type"].removesuffix(" | None"), field["type"].endswith(" | None")
    help_ = help_text(field, default)
    if kind == "int":
        value = int(default) if default is not None else (None if optional else 0)
        return st.number_input(label, value=value, step=1, key=key, help=help_,
                               placeholder="none" if optional else None)
    if kind == "float":
        value = float(default) if default is not None else (None if optional else 0.0)
        return st.number_input(label, value=value, step=abs(value or 0.0) / 10 or 0.01, format="%g", key=key,
                               help=help_, placeholder="none" if optional else None)
    if kind == "bool":
        return st.checkbox(label, value=bool(default), key=key, help=help_)
    if kind == "list[str]":
        return st.multiselect(label, options, default=[d for d in default if d in options], key=key, help=help_)
    if kind != "str":
        raise ValueError(f"no widget for {field['path']} of type {field['type']}")
    if options is not None:
        opts = list(options)
        if default not in opts:
            opts.insert(0, default)
        return st.selectbox(label, opts, index=opts.index(default), key=key, help=help_,
                            format_func=algorithm_option if field["path"] == "algorithm" else str)
    value = st.text_input(label, value="" if default is None else str(default), key=key, help=help_)
    return (value.strip() or None) if optional else value


@st.cache_data(ttl=PLAN_SECONDS, show_spinner=False)
def plan_of(base_url: str, _client: ApiClient, preset: str, overrides_json: str, gpu_memory_mb: int | None):
    """The backend's memory plan of a configuration (`(MemoryPlan, gpu_source)`), cached for a few seconds."""
    return _client.plan(preset, json.loads(overrides_json), gpu_memory_mb)


def form_overrides(values: dict[str, Any], defaults: dict[str, Any], extra_text: str) -> dict[str, Any]:
    """The fields changed from the preset, then the extra JSON overrides; `ValueError` for bad JSON."""
    overrides: dict[str, Any] = {}
    for path, value in values.items():
        if value != get_path(defaults, path):
            set_path(overrides, path, value)
    if extra_text.strip():
        extra = json.loads(extra_text)
        if not isinstance(extra, dict):
            raise ValueError("must be a JSON object")
        overrides = merge_overrides(overrides, extra)
    return overrides


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def show_plan(result, source: str) -> None:
    """Each stage's planned peak against the GPU, the terms that dominate, and a fix for what does not fit."""
    st.subheader("Memory plan", divider="gray")
    checked = f"checked against {_gib(result.gpu_memory_bytes)} GiB ({source})" if result.gpu_memory_bytes \
        else source
    st.caption(f"{result.model} · {result.compute_dtype} · {checked}. {result.note}")
    rows = [{"stage": s.stage, "peak GiB": round(s.peak_bytes / 2**30, 2),
             "fits": {True: "yes", False: "no", None: "–"}[s.fits], "peak in": s.phase,
             "largest terms": " · ".join(f"{i.name} {_gib(i.bytes)}" for i in s.items[:3])} for s in result.stages]
    st.dataframe(rows, hide_index=True, width="stretch", key="nj-plan")
    for s in result.stages:
        if s.fits is False:
            fix = (f"Cheapest change that fits: **{s.suggestion.change}** → {_gib(s.suggestion.peak_bytes)} GiB"
                   + (f" (overrides `{json.dumps(s.suggestion.overrides)}`)" if s.suggestion.overrides else "")
                   if s.suggestion else "No single change tried here makes it fit.")
            st.warning(f"`{s.stage}` does not fit: {_gib(s.peak_bytes)} GiB at its {s.phase}. {fix}",
                       icon=":material/memory:")
    with st.expander("What each stage's peak is made of"):
        for s in result.stages:
            st.markdown(f"**{s.stage}** — {_gib(s.peak_bytes)} GiB at the {s.phase}")
            st.dataframe([{"term": i.name, "GiB": round(i.bytes / 2**30, 3), "note": i.note} for i in s.items],
                         hide_index=True, width="stretch")


def dataset_pickers(client: ApiClient, errors: dict[str, str]) -> dict[str, int]:
    """A data set per config section (`data`, `sft_data`, `prompt_data`) from the Data sets page's list, each
    offering only the data sets that section can read (`DatasetPublic.sections`): section -> the id chosen."""
    st.subheader("Data sets", divider="gray")
    try:
        items = datasets.list_datasets(client)
    except BackendDown as exc:
        ui.backend_down(exc, inline=True)
        return {}
    except ApiError as exc:
        st.error(f"No data sets: {exc.message}")
        return {}
    st.caption("Your uploads and hub registrations (the **Data sets** page). A stage given one reads it instead of "
               "the Data fields above; a stage left at its default reads what they say (SFT: the preferred answers "
               "of the preference data; prompts: its prompts)." if items else
               "No data sets yet: upload your own on the **Data sets** page.")
    by_id = {d["id"]: d for d in items}
    chosen: dict[str, int] = {}
    for column, (section, label) in zip(st.columns(len(datasets.SECTIONS)), datasets.SECTIONS.items()):
        with column:
            ids = [None, *(d["id"] for d in items if section in d["sections"])]
            picked = st.selectbox(label, ids, key=DATASET_KEY.format(section),
                                  format_func=lambda i: "— the default —" if i is None else datasets.label(by_id[i]))
            if picked is not None:
                chosen[section] = picked
            field_error(f"datasets.{section}", errors)
    return chosen


def field_error(path: str, errors: dict[str, str]) -> None:
    """The backend's message for this field (or one of its items, e.g. `reward.precisions[1]`), under it."""
    for name, message in errors.items():
        if name == path or name.startswith(path + "[") or name.startswith(path + "."):
            st.error(message, icon=":material/error:")


st.title("New job")
client = get_client()
presets = ui.call(presets_of, client.base_url, client)
fields = ui.call(fields_of, client.base_url, client) if presets is not None else None
if presets is None or fields is None:
    st.stop()
if not presets:
    st.error("The backend offers no presets.")
    st.stop()

names = list(presets)
preset = st.selectbox("Preset", names, index=names.index("tiny") if "tiny" in names else 0, key="nj_preset",
                      format_func=lambda name: f"{name} · {presets[name]['model']}",
                      on_change=lambda: st.session_state.pop(ERRORS, None),
                      help="The starting configuration; every field below starts at its value.")
defaults = presets[preset]["config"]
if presets[preset]["description"]:
    st.caption(presets[preset]["description"])
with st.expander(f"Full `{preset}` configuration"):
    st.json(defaults, expanded=False)

errors: dict[str, str] = st.session_state.get(ERRORS, {})
known = {path for _, path, _, _ in FIELDS}
other = {k: v for k, v in errors.items()
         if not any(k == p or k.startswith(p + "[") or k.startswith(p + ".") for p in known)
         and k not in ("overrides", MIN_GPU, OVERRIDE) and not k.startswith("datasets.")}

values: dict[str, Any] = {}
# Plain widgets rather than a form: the memory plan below follows every change as it is made.
with st.container(border=True):
    if other:
        st.error("The backend rejected the job:\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in other.items()))
    st.caption(f"Every field starts at the `{preset}` preset's value (its ⓘ explains the config field and "
               "gives its range); only what you change is sent as an override. The backend checks the whole config.")
    name_col, gpu_col = st.columns([2, 1])
    name = name_col.text_input("Job name", key="nj_name", placeholder="optional, e.g. tiny-lr-1e-3")
    with gpu_col:
        min_gpu = st.number_input("Minimum GPU memory (MB)", value=None, step=1, key="nj_min_gpu_memory_mb",
                                  placeholder="any worker",
                                  help="Only a worker whose GPU has at least this much memory takes the job "
                                       "(the System page lists each worker's GPU); empty: any worker.")
        field_error(MIN_GPU, errors)
    for column, sections in zip(st.columns(len(LAYOUT)), LAYOUT):
        with column:
            for section in sections:
                # The Run column comes first, so the algorithm is chosen before its settings are drawn.
                algorithm = values.get("algorithm", defaults["algorithm"])
                if algorithm not in SECTION_ALGORITHMS.get(section, (algorithm,)):
                    continue
                algorithm_label = ALGORITHM_TABLE[algorithm].label
                sampling = section == "PPO" and algorithm_label != section  # GRPO and RLOO read the `ppo` section
                st.subheader(f"{algorithm_label} (`ppo.*`)" if sampling else section, divider="gray")
                if section == "DPO" and "reward" not in values.get("stages", defaults["stages"]):
                    st.caption("Without the reward stage, the evaluation measures gold, length and KL, not reward.")
                for sec, path, label, options in FIELDS:
                    if sec != section or not shown(section, path, algorithm):
                        continue
                    default, key = get_path(defaults, path), f"nj:{preset}:{path}"
                    if path in BY_ALGORITHM:
                        default = default if algorithm == defaults["algorithm"] else None
                        key = f"nj:{preset}:{algorithm}:{path}"  # a fresh widget when the algorithm changes
                    values[path] = widget(fields[path], label.replace("PPO", algorithm_label) if sampling else label,
                                          options, default, key=key)
                    field_error(path, errors)
    chosen_datasets = dataset_pickers(client, errors)  # the Data sets page's uploads, per stage
    arena_votes = arena.votes_option(client, key=f"nj:{preset}:votes")  # train on the Arena page's votes
    extra_text = st.text_area("Extra overrides (JSON, applied last)", key=f"nj:{preset}:extra",
                              placeholder='{"ppo": {"top_k": 0, "temperature": 0.7}}',
                              help="Any other config field, as nested JSON; see the full configuration above.")
    field_error("overrides", errors)

    try:
        overrides = form_overrides(values, defaults, extra_text)
        overrides_error = None
    except ValueError as exc:
        overrides, overrides_error = {}, f"Extra overrides are not valid JSON: {exc}"
    if overrides_error is None:
        try:
            result, source = plan_of(client.base_url, client, preset, json.dumps(overrides, sort_keys=True),
                                     None if min_gpu is None else int(min_gpu))
        except BackendDown as exc:
            ui.backend_down(exc, inline=True)
        except ApiError as exc:  # a field being typed is invalid: its message comes on submit
            st.info(f"Memory plan unavailable: {exc.message}", icon=":material/memory:")
        else:
            show_plan(result, source)
    override = st.checkbox("Launch even if the memory plan says it does not fit", key="nj_override_memory_plan",
                           help="The backend refuses a job a stage of which the plan says cannot fit the GPU it is "
                                "checked against; tick this to queue it anyway (e.g. when the plan is too cautious).")
    field_error(OVERRIDE, errors)
    submitted = st.button("Launch job", type="primary", icon=":material/rocket_launch:")

if submitted:
    new_errors: dict[str, str] = {"overrides": overrides_error} if overrides_error else {}
    if not new_errors:
        try:
            job = client.create_job(preset, arena.with_votes(client, overrides, arena_votes), name=name.strip() or None,
                                    min_gpu_memory_mb=None if min_gpu is None else int(min_gpu),
                                    override_memory_plan=override, datasets=chosen_datasets)
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
