"""Probe prompts page: the same fixed prompts answered by every checkpoint of a job, side by side.

The pipeline logs `kind == "probe"` samples for a fixed set of held-out prompts at each checkpoint
(`sft/step-30`, then `ppo/step-10`, `ppo/step-20` ... for whichever algorithm aligns: the page names them after
it, `charts.checkpoint_name`). Grouped by prompt, a person reads how the answers change from SFT through the
aligned steps (and spots a policy that learned to game the reward). A probe is scored with the known-answer
task's gold scorer (`gold.probe_score`), never the reward model, so the page says "gold score".
"""

from __future__ import annotations

import streamlit as st

from edgerlhf.contract import algorithm_traits
from frontend import charts, live, ui
from frontend.api_client import ApiError, BackendDown, get_client

COLUMNS = 4  # checkpoints per row before wrapping


def group_probes(samples: list[dict]) -> tuple[dict[str, dict[str, dict]], list[str]]:
    """{prompt: {checkpoint: sample}} in first-seen prompt order, and all checkpoints in training order."""
    by_prompt: dict[str, dict[str, dict]] = {}
    for s in samples:
        if s["kind"] != "probe":
            continue
        # A re-logged checkpoint replaces the old one.
        by_prompt.setdefault(s["prompt"], {})[charts.checkpoint_label(s)] = s
    order = sorted({c for per in by_prompt.values() for c in per}, key=ui.checkpoint_order)
    return by_prompt, order


def gold_scorer(job: dict | None) -> str | None:
    """The gold scorer that scores the job's probes (`data.gold_scorer` on the known-answer task), else None."""
    data = ((job or {}).get("config") or {}).get("data") or {}
    return data.get("gold_scorer") if data.get("labels") == "gold" else None


st.title("Probe prompts")
st.caption("Fixed prompts answered by each checkpoint: SFT first, then the aligned policy's steps.")
job_id = ui.pick_job(key="probes_job")
if job_id is None:
    st.stop()
client = get_client()
feed = live.feed_for(st.session_state, job_id)


live_refresh = feed.job is None or feed.active


def panel() -> None:
    try:
        live.pull(client, feed, metrics=False, logs=False)
        ui.backend_back()
    except BackendDown as exc:
        ui.backend_down(exc, inline=True)
    except ApiError as exc:
        st.error(f"Backend error {exc.status}: {exc.message}")
        return
    if live_refresh and feed.job is not None and not feed.active:
        st.rerun()  # finished: draw once more without the refresh timer
    by_prompt, order = group_probes(feed.samples)
    algorithm = feed.algorithm
    if not by_prompt:
        st.info(f"No probe generations yet: they are logged at each SFT and "
                f"{algorithm_traits(algorithm).label} checkpoint.")
        return
    scorer = gold_scorer(feed.job)
    gold = f"gold ({scorer})" if scorer else "gold score"
    probes = [s for per in by_prompt.values() for s in per.values()]
    if any(s["reward"] is not None for s in probes):
        st.plotly_chart(charts.probe_reward_figure(probes, order, scorer=scorer, algorithm=algorithm),
                        key=f"probe-rewards-{job_id}", width="stretch")
    else:
        st.caption("The probe answers are scored only on the known-answer task (`data.labels = gold`), with its "
                   "gold scorer: a reward model cannot score SFT's checkpoints, which come before it.")
    shown = st.multiselect("Checkpoints", order, default=order if len(order) <= COLUMNS else
                           [order[0], *order[-(COLUMNS - 1):]], key=f"probe-ckpts-{job_id}",
                           format_func=lambda c: charts.checkpoint_name(c, algorithm))
    shown = sorted(shown, key=ui.checkpoint_order)
    for i, (prompt, per) in enumerate(by_prompt.items(), start=1):
        with st.container(border=True, key=f"probe-{i}"):
            st.markdown(f"**Probe {i}**")
            st.text(ui.tail(prompt, 800))
            for start in range(0, len(shown), COLUMNS):
                row = shown[start:start + COLUMNS]
                for col, ckpt in zip(st.columns(COLUMNS), row):
                    s = per.get(ckpt)
                    score = f" · {gold} **{ui.fmt(s['reward'])}**" if s and s["reward"] is not None else ""
                    col.markdown(f"`{charts.checkpoint_name(ckpt, algorithm)}`" + score)
                    col.text((s["response"] or "(empty)") if s else "—")


st.fragment(run_every=3.0 if live_refresh else None)(panel)()
