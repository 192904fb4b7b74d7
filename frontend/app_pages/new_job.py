"""New job page: a preset, the stages, reward-model precisions, model, data and the main hyperparameters.

Every field starts at the preset's value; only fields changed from the preset are sent as overrides, so
the job's stored config says plainly what was changed. A field's help (its ⓘ) is the field's docstring in
`edgerlhf/config.py` with its type and accepted range, as the backend serves them (`GET /api/config/fields`):
the dashboard keeps no copy of it, and the widget's kind follows the field's type. A field the config derives when
left empty says what it becomes (`auto (4)`, not "none"). The backend validates: a 422 names the field
(`ppo.batch_size`), and its message is shown right under that field's widget, or under the "Extra overrides" box for
a field the form has no widget for (an unknown one included); a short summary stands beside the Launch button.
Submitting opens the new job's page. Opened as `?clone=<job id>` (the job page's "Clone into New job"), the form
starts from that job: its preset, the fields it changed from it, its name with " (copy)". Beside the config, a job
may ask for a minimum GPU memory (`min_gpu_memory_mb`): only a worker whose GPU has that much takes it. "Arena votes" trains the job on the Arena page's votes, alone
or mixed with the data set: at launch a snapshot of them becomes `data.votes_file` (`frontend.arena`). "Data sets"
picks, per stage, one of the Data sets page's uploads or hub registrations (`datasets` in the job request: the
backend makes it that section's source).

The alignment algorithm (`algorithm`: PPO, GRPO, RLOO, DPO or KTO) decides which settings follow: the sampling
algorithms' (`ppo.*`, shared by PPO, GRPO and RLOO; a few PPO's own), DPO's (`dpo.*`) or KTO's (`kto.*`).
The defences against reward hacking (README, "Seeing reward hacking") have fields too: the validation reward
model and the ensemble under Reward model, the best policy, early stop, the ensemble's score and length control
under the sampling algorithms' section.

Below the fields, the memory plan (`POST /api/plan`, `edgerlhf.plan`) follows every change: each stage's
planned peak, whether it fits the GPU the job would be checked against, what dominates, and for a stage
that does not fit the cheapest change that makes it fit, with a button that puts that change into the form. The
backend refuses a job that does not fit (409, its message and the same button under the override box) unless
"Launch even if it does not fit" is ticked.
"""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from edgerlhf.contract import ALGORITHM_TABLE, ALGORITHMS, ENSEMBLE_SCORES, KEEP_BEST, PRECISIONS, STAGES, merge_overrides
from frontend import arena, datasets, reports, rewards_builder, ui
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
    ("Reward model", "reward.validation", "Validation reward model (second opinion)", None),
    ("Reward model", "reward.validation_share", "Share of the pairs for the validation model", None),
    ("Reward model", "reward.ensemble", "Reward models in an ensemble (1: none)", None),
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
    ("PPO", "ppo.keep_best", "Keep the best policy by", list(KEEP_BEST)),
    ("PPO", "ppo.early_stop_patience", "Stop after N weighings without improvement (0: off)", None),
    ("PPO", "ppo.ensemble_score", "Score of the reward ensemble", list(ENSEMBLE_SCORES)),
    ("PPO", "ppo.ensemble_penalty", "Ensemble disagreement penalty (lambda)", None),
    ("PPO", "ppo.length_control", "Length control (remove the score's length trend)", None),
    ("DPO", "dpo.beta", "DPO beta", None),
    ("DPO", "dpo.loss_type", "DPO loss", ["sigmoid", "ipo", "hinge"]),
    ("DPO", "dpo.max_steps", "DPO steps", None),
    ("DPO", "dpo.batch_size", "DPO batch size (pairs)", None),
    ("DPO", "dpo.grad_accum", "DPO gradient accumulation", None),
    ("DPO", "dpo.learning_rate", "DPO learning rate", None),
    ("DPO", "dpo.max_length", "DPO max tokens per pair side", None),
    ("DPO", "dpo.eval_every", "DPO held-out evaluation every N steps", None),
    ("DPO", "dpo.gradient_checkpointing", "DPO gradient checkpointing", None),
    ("KTO", "kto.beta", "KTO beta", None),
    ("KTO", "kto.desirable_weight", "Weight of desirable answers", None),
    ("KTO", "kto.undesirable_weight", "Weight of undesirable answers", None),
    ("KTO", "kto.max_steps", "KTO steps", None),
    ("KTO", "kto.batch_size", "KTO batch size (answers, at least 2)", None),
    ("KTO", "kto.grad_accum", "KTO gradient accumulation", None),
    ("KTO", "kto.learning_rate", "KTO learning rate", None),
    ("KTO", "kto.max_length", "KTO max tokens per answer with its prompt", None),
    ("KTO", "kto.eval_every", "KTO held-out evaluation every N steps", None),
    ("KTO", "kto.gradient_checkpointing", "KTO gradient checkpointing", None),
    ("Evaluate", "evaluate.n_prompts", "Evaluation prompts", None),
]
LAYOUT = [["Run", "Model", "Data"], ["SFT", "Reward model"], ["PPO", "DPO", "KTO", "Evaluate"]]
ALGORITHM_HELP = {
    "ppo": "clipped policy gradient, value head and GAE, adaptive KL penalty in the reward",
    "grpo": "each response scored against its group of samples; KL in the loss; no value head",
    "rloo": "leave-one-out baseline over a prompt's samples; KL in the reward; no value head",
    "dpo": "offline on the preference pairs: no sampling, no reward model needed",
    "kto": "offline on answers labelled good or bad (thumbs, or the pairs split): no sampling, no reward model needed",
}
"""One line per algorithm for the select box (the field's ⓘ holds `PipelineConfig.algorithm`'s docstring)."""
SECTION_ALGORITHMS = {section.upper(): tuple(a.name for a in ALGORITHM_TABLE.values() if a.section == section)
                      for section in ("ppo", "dpo", "kto")}
"""Sections shown only for some algorithms: `ppo.*` holds the settings of every sampling algorithm."""
FIELD_ALGORITHMS = {"ppo.target_kl": tuple(a.name for a in ALGORITHM_TABLE.values() if a.adaptive_kl)}
"""Fields of a shown section that only some of its algorithms read (the adaptive KL controller is PPO's)."""
BY_ALGORITHM = ("ppo.samples_per_prompt",)
"""Fields whose default the config derives from the algorithm (None: 1 for PPO, 4 for GRPO and RLOO). The preset
shows the value derived for its own algorithm; for another one the field starts empty, so the config derives it."""
ERRORS = "new_job_errors"  # session key: {field path: message} from the last rejected submit
REFUSAL = "new_job_refusal"  # session key: the suggestions (`Suggestion` JSON) of the last memory refusal
NOTICE = "new_job_notice"  # session key: what the last clone or applied change did to the form
FILLED = "new_job_filled"  # session key: widget keys whose value was just set through session state
REQUEST = "request"  # the key of an error that names no field (a refusal of the whole request)
DATASET_KEY = "nj_dataset:{}"  # a data set picker's key, by config section (outside `nj:<preset>:`: no config field)
MIN_GPU = "min_gpu_memory_mb"  # the job-level field of `JobCreate` (not part of the config)
OVERRIDE = "override_memory_plan"  # the job-level field that queues a job the memory plan refuses
REWARDS = "ppo.rewards"  # set by the rewards builder (`frontend.rewards_builder`), not a plain widget
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


def auto_text(path: str, algorithm: str, values: dict[str, Any]) -> str:
    """What an empty (None) field becomes, in words: what the config derives for it (`PipelineConfig`'s checks
    and each field's docstring), e.g. `auto (4)` for GRPO's group size; `none` where None is simply none."""
    if path == "ppo.samples_per_prompt":
        return f"auto ({ALGORITHM_TABLE[algorithm].samples_per_prompt})"
    if path == "ppo.reward_precision":
        precisions = values.get("reward.precisions") or []
        return f"auto ({precisions[0]}, the first reward precision)" if precisions else "auto"
    if path == "model.tokenizer":
        return f"auto (the model's: {values.get('model.name_or_path') or 'none'})"
    if path == "data.max_pairs":
        return "all"
    return "none"


def widget(field: dict[str, Any], label: str, options: list[str] | None, default: Any, key: str,
           auto: str = "none") -> Any:
    """The input for one config field; its kind follows the field's `type`; `auto`: what an empty value means."""
    kind, optional = field["type"].removesuffix(" | None"), field["type"].endswith(" | None")
    help_ = help_text(field, default)
    # A value just put into session state (a clone, an applied change) is the widget's: a default beside it only
    # makes Streamlit log a warning.
    filled = key in st.session_state.get(FILLED, ())
    if kind == "int":
        value = int(default) if default is not None else (None if optional else 0)
        return st.number_input(label, value=None if filled else value, step=1, key=key, help=help_,
                               placeholder=auto if optional else None)
    if kind == "float":
        value = float(default) if default is not None else (None if optional else 0.0)
        return st.number_input(label, value=None if filled else value, step=abs(value or 0.0) / 10 or 0.01,
                               format="%g", key=key, help=help_, placeholder=auto if optional else None)
    if kind == "bool":
        return st.checkbox(label, value=False if filled else bool(default), key=key, help=help_)
    if kind == "list[str]":
        return st.multiselect(label, options, default=None if filled else [d for d in default if d in options],
                              key=key, help=help_)
    if kind != "str":
        raise ValueError(f"no widget for {field['path']} of type {field['type']}")
    if options is not None:
        opts = list(options)
        if default not in opts:
            opts.insert(0, default)
        if filled and st.session_state[key] not in opts:
            opts.append(st.session_state[key])
        return st.selectbox(label, opts, index=0 if filled else opts.index(default), key=key, help=help_,
                            format_func=algorithm_option if field["path"] == "algorithm" else
                            lambda o: auto if o is None else str(o))
    value = st.text_input(label, value="" if filled or default is None else str(default), key=key, help=help_,
                          placeholder=auto if optional else None)
    return (value.strip() or None) if optional else value


def widget_key(preset: str, algorithm: str, path: str) -> str:
    """The session key of a config field's widget: per preset, and per algorithm for a field whose default the
    algorithm decides (a fresh widget when the algorithm changes)."""
    return f"nj:{preset}:{algorithm}:{path}" if path in BY_ALGORITHM else f"nj:{preset}:{path}"


def leaves(overrides: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested overrides as (dotted path, value) pairs: `{"ppo": {"steps": 3}}` -> `[("ppo.steps", 3)]`."""
    out: list[tuple[str, Any]] = []
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            out.extend(leaves(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def fill_form(preset: str, algorithm: str, change: dict[str, Any], fields: dict[str, dict[str, Any]]) -> list[str]:
    """Put nested overrides into the form of `preset` through session state (before its widgets are drawn): a field
    the form shows for `algorithm` takes its value; any other goes into the extra overrides box, merged with what
    it holds. Returns the paths changed."""
    sections = {path: section for section, path, _, _ in FIELDS}
    filled = set(st.session_state.get(FILLED, ()))
    rest: dict[str, Any] = {}
    for path, value in leaves(change):
        if path == REWARDS and value:  # stated rewards go to the builder's cards, switched on
            st.session_state[f"nj:{preset}:rewards"] = [dict(c) for c in value]
            st.session_state[f"nj:{preset}:rewards:on"] = True
        elif path in sections and shown(sections[path], path, algorithm):
            key = widget_key(preset, algorithm, path)
            kind = fields[path]["type"].removesuffix(" | None")
            st.session_state[key] = float(value) if kind == "float" and value is not None else value
            filled.add(key)
        else:
            set_path(rest, path, value)
    if rest:
        extra_key = f"nj:{preset}:extra"
        try:
            held = json.loads(st.session_state.get(extra_key) or "{}")
        except ValueError:
            held = None
        st.session_state[extra_key] = json.dumps(merge_overrides(held, rest) if isinstance(held, dict) else rest,
                                                 indent=1)
    st.session_state[FILLED] = filled
    return [path for path, _ in leaves(change)]


def apply_change(preset: str, algorithm: str, change: dict[str, Any], fields: dict[str, dict[str, Any]],
                 what: str) -> None:
    """Callback of "Apply the suggested change": the memory plan's change into the form; the refusal it answers
    goes (the form changed), and a notice says what was changed."""
    fill_form(preset, algorithm, change, fields)
    st.session_state.pop(ERRORS, None)
    st.session_state.pop(REFUSAL, None)
    st.session_state[NOTICE] = f"Applied the suggested change: {what}. The memory plan below follows it."


def apply_button(preset: str, algorithm: str, suggestion: dict[str, Any], fields: dict[str, dict[str, Any]],
                 key: str) -> None:
    """The button that puts a memory plan's suggestion (`Suggestion` JSON) into the form (none when the change is
    not a config option: its `overrides` are empty)."""
    if suggestion.get("overrides"):
        st.button("Apply the suggested change", key=key, icon=":material/auto_fix_high:", on_click=apply_change,
                  args=(preset, algorithm, suggestion["overrides"], fields, suggestion["change"]),
                  help=f"Sets {', '.join(f'`{p}`' for p, _ in leaves(suggestion['overrides']))} in the form "
                       "(a field without its own widget goes into the extra overrides); nothing is launched.")


def clone_into_form(client: ApiClient, job_id: str, presets: dict[str, dict[str, Any]],
                    fields: dict[str, dict[str, Any]]) -> None:
    """Fill the form from job `job_id` (`?clone=`): its preset, the fields its config changed from that preset
    (`frontend.reports.config_overrides`), its name with " (copy)" and its minimum GPU memory."""
    try:
        job = client.get_job(int(job_id))
    except ValueError:
        st.session_state[NOTICE] = f"Nothing to clone: `{job_id}` is not a job id."
        return
    except ApiError as exc:
        st.session_state[NOTICE] = f"Could not clone job {job_id}: {exc.message}"
        return
    except BackendDown as exc:
        st.session_state[NOTICE] = f"Could not clone job {job_id}: the backend is unreachable ({exc.reason})."
        return
    preset = job["preset"]
    if preset not in presets:
        st.session_state[NOTICE] = f"Could not clone job #{job['id']}: the backend no longer offers its preset `{preset}`."
        return
    st.session_state["nj_preset"] = preset
    st.session_state["nj_name"] = f"{job['name']} (copy)"
    if job.get(MIN_GPU) is not None:
        st.session_state["nj_min_gpu_memory_mb"] = job[MIN_GPU]
    changed = fill_form(preset, job["config"]["algorithm"],
                        reports.config_overrides(job["config"], presets[preset]["config"]), fields)
    st.session_state[FILLED] = {*st.session_state[FILLED], "nj_preset"}
    st.session_state[NOTICE] = (f"Cloned job #{job['id']} ({job['name']}): the `{preset}` preset with the "
                                f"{len(changed)} field(s) it changed" + (f" ({', '.join(f'`{p}`' for p in changed)})"
                                                                        if changed else "") + ".")


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


def show_plan(result, source: str, preset: str, algorithm: str, fields: dict[str, dict[str, Any]]) -> None:
    """Each stage's planned peak against the GPU, the terms that dominate, and a fix for what does not fit (with a
    button that applies it to the form)."""
    st.subheader("Memory plan", divider="gray")
    checked = f"checked against {_gib(result.gpu_memory_bytes)} GiB ({source})" if result.gpu_memory_bytes \
        else source
    st.caption(f"{result.model} · {result.compute_dtype} · {checked}. {result.note}")
    rows = [{"stage": s.stage, "peak GiB": round(s.peak_bytes / 2**30, 2),
             "fits": {True: "yes", False: "no", None: ui.DASH}[s.fits], "peak in": s.phase,
             "largest terms": " · ".join(f"{i.name} {_gib(i.bytes)}" for i in s.items[:3])} for s in result.stages]
    st.dataframe(rows, hide_index=True, width="stretch", key="nj-plan")
    for s in result.stages:
        if s.fits is False:
            fix = (f"Cheapest change that fits: **{s.suggestion.change}** → {_gib(s.suggestion.peak_bytes)} GiB"
                   + (f" (overrides `{json.dumps(s.suggestion.overrides)}`)" if s.suggestion.overrides else "")
                   if s.suggestion else "No single change tried here makes it fit.")
            st.warning(f"`{s.stage}` does not fit: {_gib(s.peak_bytes)} GiB at its {s.phase}. {fix}",
                       icon=":material/memory:")
            if s.suggestion is not None:
                apply_button(preset, algorithm, s.suggestion.model_dump(), fields, key=f"nj_apply_plan:{s.stage}")
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


def about(name: str, path: str) -> bool:
    """Whether error `name` is about field `path` (or one of its items, e.g. `reward.precisions[1]`)."""
    return name == path or name.startswith(path + "[") or name.startswith(path + ".")


def field_error(path: str, errors: dict[str, str]) -> None:
    """The backend's message for this field, under it."""
    for name, message in errors.items():
        if about(name, path):
            st.error(message, icon=":material/error:")


def summary(errors: dict[str, str], placed: dict[str, str]) -> str:
    """The short text beside the Launch button: what was refused, and where each message is (`placed`: error name
    -> the widget it is shown under)."""
    if OVERRIDE in errors:  # a memory refusal: what to do is under the override box
        return ("**Not launched:** the memory plan says it does not fit; the cheapest change that fits is under "
                "\"Launch even if the memory plan says it does not fit\".")
    where = [f"`{name}` (under {placed[name]})" for name in errors if name in placed]
    text = f"**Not launched.** {len(where)} field(s) to fix: {', '.join(where)}." if where else "**Not launched.**"
    if REQUEST in errors:
        text += f" {errors[REQUEST]}"
    return text


st.title("New job")
client = get_client()
presets = ui.call(presets_of, client.base_url, client)
fields = ui.call(fields_of, client.base_url, client) if presets is not None else None
if presets is None or fields is None:
    st.stop()
if not presets:
    st.error("The backend offers no presets.")
    st.stop()
if clone := st.query_params.get("clone"):
    del st.query_params["clone"]  # filled once: from here on the form is the person's, and a later clone fills it again
    st.session_state.pop(ERRORS, None)
    clone_into_form(client, clone, presets, fields)
if notice := st.session_state.pop(NOTICE, None):
    st.info(notice, icon=":material/content_copy:" if notice.startswith("Cloned") else ":material/info:")

names = list(presets)
cloned = "nj_preset" in st.session_state.get(FILLED, ())  # the preset a clone set: no default beside it
preset = st.selectbox("Preset", names, index=0 if cloned else names.index("tiny") if "tiny" in names else 0,
                      key="nj_preset",
                      format_func=lambda name: f"{name} · {presets[name]['model']}",
                      on_change=lambda: st.session_state.pop(ERRORS, None),
                      help="The starting configuration; every field below starts at its value.")
defaults = presets[preset]["config"]
if presets[preset]["description"]:
    st.caption(presets[preset]["description"])
with st.expander(f"Full `{preset}` configuration"):
    st.json(defaults, expanded=False)

errors: dict[str, str] = st.session_state.get(ERRORS, {})
placed: dict[str, str] = {}  # error name -> the widget its message is under (for the summary beside Launch)

values: dict[str, Any] = {}
labels: dict[str, str] = {}
# Plain widgets rather than a form: the memory plan below follows every change as it is made.
with st.container(border=True):
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
                traits = ALGORITHM_TABLE[algorithm]  # an offline algorithm's own section: DPO, KTO
                if not traits.samples and section == traits.section.upper() \
                        and "reward" not in values.get("stages", defaults["stages"]):
                    st.caption("Without the reward stage, the evaluation measures gold, length and KL, not reward.")
                for sec, path, label, options in FIELDS:
                    if sec != section or not shown(section, path, algorithm):
                        continue
                    default, key = get_path(defaults, path), widget_key(preset, algorithm, path)
                    if path in BY_ALGORITHM:
                        default = default if algorithm == defaults["algorithm"] else None
                    labels[path] = label.replace("PPO", algorithm_label) if sampling else label
                    values[path] = widget(fields[path], labels[path], options, default, key=key,
                                          auto=auto_text(path, algorithm, values))
                    field_error(path, errors)
    chosen_datasets = dataset_pickers(client, errors)  # the Data sets page's uploads, per stage
    if ALGORITHM_TABLE[values["algorithm"]].samples:  # what scores PPO's, GRPO's or RLOO's answers
        st.subheader("Rewards", divider="gray")
        rewards = rewards_builder.editor(f"nj:{preset}:rewards", fields, on=bool(get_path(defaults, REWARDS)))
        if rewards is not None:
            values[REWARDS], labels[REWARDS] = rewards, "Rewards"
            field_error(REWARDS, errors)
    arena_votes = arena.votes_option(client, key=f"nj:{preset}:votes")  # train on the Arena page's votes
    extra_text = st.text_area("Extra overrides (JSON, applied last)", key=f"nj:{preset}:extra",
                              placeholder='{"ppo": {"top_k": 0, "temperature": 0.7}}',
                              help="Any other config field, as nested JSON; see the full configuration above.")
    # Under the box: its own JSON error, and every field the form has no widget for (an unknown field, one of
    # another algorithm's): the box is where such a field is set.
    for field_name, message in errors.items():
        if field_name == REQUEST or any(about(field_name, p) for p in (*values, MIN_GPU, OVERRIDE, "datasets")):
            continue
        st.error(message if field_name == "overrides" else f"`{field_name}`: {message}", icon=":material/error:")
        placed[field_name] = "Extra overrides"
    placed.update({e: labels[p] for e in errors for p in values if about(e, p)})
    placed.update({e: label for e in errors for p, label in (
        (MIN_GPU, "Minimum GPU memory"), ("datasets", "Data sets")) if about(e, p)})

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
            show_plan(result, source, preset, values["algorithm"], fields)
        if values.get(REWARDS):
            rewards_builder.try_box(client, f"nj:{preset}:try", values[REWARDS], preset, overrides,
                                    chosen_datasets.get("prompt_data"), values.get("model.name_or_path")
                                    or get_path(defaults, "model.name_or_path"),
                                    (get_path(defaults, "data.max_prompt_tokens"),
                                     get_path(defaults, "data.max_response_tokens")))
    override = st.checkbox("Launch even if the memory plan says it does not fit", key="nj_override_memory_plan",
                           help="The backend refuses a job a stage of which the plan says cannot fit the GPU it is "
                                "checked against; tick this to queue it anyway (e.g. when the plan is too cautious).")
    field_error(OVERRIDE, errors)
    for i, suggestion in enumerate(st.session_state.get(REFUSAL, []) if OVERRIDE in errors else []):
        apply_button(preset, values["algorithm"], suggestion, fields, key=f"nj_apply_refusal:{i}")
    launch, beside = st.columns([1, 4], vertical_alignment="center")
    submitted = launch.button("Launch job", type="primary", icon=":material/rocket_launch:")
    if errors:
        beside.error(summary(errors, placed), icon=":material/block:")
st.session_state.pop(FILLED, None)  # drawn: from now on the widgets hold what the person types

if submitted:
    new_errors: dict[str, str] = {"overrides": overrides_error} if overrides_error else {}
    st.session_state.pop(REFUSAL, None)
    if not new_errors:
        try:
            job = client.create_job(preset, arena.with_votes(client, overrides, arena_votes), name=name.strip() or None,
                                    min_gpu_memory_mb=None if min_gpu is None else int(min_gpu),
                                    override_memory_plan=override, datasets=chosen_datasets)
        except BackendDown as exc:
            ui.backend_down(exc, inline=True)
            st.stop()
        except ApiError as exc:
            new_errors = exc.field_errors or {REQUEST: exc.message}
            plan = exc.detail.get("plan") if isinstance(exc.detail, dict) else None
            if plan:  # a memory refusal: offer each distinct change that makes a stage fit
                suggestions = {json.dumps(s["suggestion"], sort_keys=True): s["suggestion"] for s in plan["stages"]
                               if s.get("fits") is False and s.get("suggestion")}
                st.session_state[REFUSAL] = list(suggestions.values())
        else:
            st.session_state.pop(ERRORS, None)
            st.switch_page(ui.JOB_PAGE, query_params={"job": str(job["id"])})
    st.session_state[ERRORS] = new_errors
    st.rerun()  # draw the messages next to their fields
