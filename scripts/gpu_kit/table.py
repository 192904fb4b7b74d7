"""The GPU check's table (phase 5): `gpu-check.json`'s figures as text, `gpu-check.txt`: peaks against the 1 GB
target and the floor, PPO one copy / naive / TRL, our algorithms against TRL's, and what the GPU tests recorded.
"""

from __future__ import annotations

from typing import Any

from .target import MiB

PEAK_TARGET_MIB = 1024
"""Issue 18's per-stage target for `distilgpt2-8gb`: a peak of 1 GB (taken as 1 GiB) of CUDA memory."""
REFERENCE_PRESET = "distilgpt2-8gb"
"""The preset measured first, alone on the GPU, every stage, against the 1 GB target."""


def _mib(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def bench_rows(report: dict[str, Any], target_mib: float | None) -> list[str]:
    header = f"  {'stage':<12} {'peak MiB':>9} {'floor MiB':>10} {'peak/floor':>10}"
    header += f" {'vs 1 GB':>8}" if target_mib else ""
    lines = [header + f" {'s/step':>8} {'tokens/s':>9}  note"]
    for stage, r in report.get("stages", {}).items():
        if "error" in r:
            lines.append(f"  {stage:<12} error: {str(r['error']).strip().splitlines()[-1][:90] if r['error'] else ''}")
            continue
        floor = (r.get("floor") or {}).get("total")
        floor_mib = floor / MiB if floor else None
        line = f"  {stage:<12} {r['peak_mb']:>9,.0f} {_mib(floor_mib):>10} " \
               f"{(r['peak_mb'] / floor_mib if floor_mib else float('nan')):>10.2f}"
        if target_mib:
            line += f" {'under' if r['peak_mb'] <= target_mib else 'OVER':>8}"
        note = r.get("design", r.get("trainer", r.get("precision", "")))
        if "network_copies" in r:
            note += f" ({r['network_copies']} network copies)"
        lines.append(line + f" {r['step_s']:>8.3f} {r['tokens_per_s']:>9,.0f}  {note}")
    return lines


def summary_table(result: dict[str, Any]) -> str:
    """The human-readable summary of `result` (also written as gpu-check.txt)."""
    lines = ["EdgeRLHF GPU check (scripts/gpu-check, issue 18)"]
    gpus = result.get("machine", {}).get("gpus") or []
    torch_info = result.get("torch") or {}
    if gpus:
        g = gpus[0]
        lines.append(f"GPU: {g['name']}, {g['memory_total_mib']:,.0f} MiB, driver {g['driver']}; torch "
                     f"{torch_info.get('torch')} (CUDA {torch_info.get('cuda')}), Python {torch_info.get('python')}")
    cap = result.get("cap") or {}
    if cap.get("applied"):
        lines.append(f"bench capped at {cap['cap_gib']:g} GiB per process ({cap['how']}, fraction "
                     f"{cap['fraction']:.4f}; a 1 GiB allocation over the cap was refused)")
    elif cap:
        lines.append(f"bench NOT capped: {cap.get('why')}")
    setup = result.get("phases", {}).get("setup", {})
    errors = (setup.get("imports") or {}).get("errors")
    if errors:
        lines.append(f"imports that failed: {errors}")
    lines.append(f"elapsed {result.get('elapsed_s', 0):.0f}s of {result.get('budget_s', 0):.0f}s")

    tests = result.get("phases", {}).get("tests")
    if tests:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(tests["counts"].items())) or "no test ran"
        lines += ["", f"pytest -m gpu: {counts}" + (" (killed at its time limit)" if tests.get("killed") else "")]
        for name, row in tests["outcomes"].items():
            if row["outcome"] != "passed":
                lines.append(f"  {row['outcome'].upper()} {name} ({row['when']}): {row.get('message', '')[:300]}")
        figures = tests.get("figures", {})
        lines += recorded_figure_lines(figures)

    for preset, report in (result.get("bench") or {}).items():
        reference = preset == REFERENCE_PRESET
        cfg = report.get("config") or {}
        ppo = cfg.get("ppo", {})
        lines += ["", f"bench {preset}" + (f": {report.get('model')}" if report.get("model") else "")]
        if ppo:
            lines.append(f"  configuration: PPO batch {ppo.get('batch_size')}, minibatch {ppo.get('mini_batch_size')}, "
                         f"response {ppo.get('response_length')}, {ppo.get('ppo_epochs')} epochs; SFT "
                         f"{cfg['sft']['batch_size']} x {cfg['sft']['max_length']} ({cfg['sft']['precision']}); reward "
                         f"{cfg['reward']['batch_size']} pairs x {cfg['reward']['max_length']}; {report['steps']} "
                         f"timed step(s) after {report['warmup']} warm-up; CUDA peak allocated")
        if report.get("note"):
            lines.append(f"  note: {report['note']}")
        if report.get("error"):
            lines.append(f"  error: {report['error'][:300]}")
        lines += bench_rows(report, PEAK_TARGET_MIB if reference else None)
        c, s = report.get("comparisons") or {}, report.get("stages", {})
        ours, naive, rloo = s.get("ppo", {}), s.get("ppo_naive", {}), s.get("trl_rloo", {})
        if "peak_mb" in ours and ("peak_mb" in naive or "peak_mb" in rloo):
            text = f"  PPO on the GPU: one copy {ours['peak_mb']:,.0f} MiB"
            if "peak_mb" in naive:
                text += (f"; naive {naive['peak_mb']:,.0f} MiB = {c.get('naive_vs_ours_peak_ratio', 0):.2f}x the "
                         f"memory, {c.get('naive_vs_ours_step_time_ratio', 0):.2f}x the step time")
            if "peak_mb" in rloo:
                text += (f"; TRL RLOO {rloo['peak_mb']:,.0f} MiB, our PPO/TRL RLOO step time "
                         f"{c.get('ppo_vs_trl_rloo_step_time_ratio', 0):.2f}")
            lines.append(text)
        for algorithm in ("grpo", "rloo", "dpo"):  # ours against TRL's trainer (bench.compare): below 1, ours wins
            key = f"{algorithm}_ours_vs_trl"
            if f"{key}_peak_ratio" in c:
                lines.append(f"  {algorithm.upper()} ours/TRL: {c[f'{key}_peak_ratio']:.2f}x the memory, "
                             f"{c[f'{key}_step_time_ratio']:.2f}x the step time")
        if reference:
            over = [st for st, r in s.items() if "peak_mb" in r and r["peak_mb"] > PEAK_TARGET_MIB]
            lines.append(f"  1 GB target ({PEAK_TARGET_MIB} MiB per stage): " +
                         (f"over in {', '.join(over)}" if over else "every measured stage under it"))
    return "\n".join(lines)


def recorded_figure_lines(figures: dict[str, dict[str, Any]]) -> list[str]:
    """The figures the GPU tests recorded, one block per kind (keys written by tests/gpu)."""
    lines = []
    for f in figures.values():
        if "precision_study" in f:
            lines += ["", f"reward precision study on the GPU ({f.get('what', '')}):",
                      f"  {'precision':<9} {'accuracy':>8} {'spearman vs bf16':>16} {'pairs/s':>8} {'weights MB':>10} "
                      f"{'peak train MiB':>14}"]
            for p, row in f["precision_study"].items():
                sp = row.get("spearman_vs_bf16")
                lines.append(f"  {p:<9} {row['accuracy']:>8.3f} {('-' if sp is None else f'{sp:.4f}'):>16} "
                             f"{row['throughput_pairs_per_s']:>8,.0f} {row['memory_footprint_mb']:>10.2f} "
                             f"{row['peak_train_mb']:>14,.0f}")
        if "quantization_only_spearman" in f:
            lines.append("  the bf16-trained reward loaded in int8 / int4 (quantization alone): Spearman vs bf16 " +
                         " / ".join(f"{v:.4f}" for v in f["quantization_only_spearman"].values()))
        if "planner" in f:
            lines += ["", "planner against torch.cuda.max_memory_allocated:"]
            for row in f["planner"]:
                lines.append(f"  {row['config']:<18} {row['stage']:<12} planned {row['planned_bytes'] / MiB:8.1f} MiB "
                             f"measured {row['measured_bytes'] / MiB:8.1f} MiB  ratio {row['ratio']:.2f}")
        if "ppo_network_bytes" in f:
            lines += ["", f"PPO step on the GPU: one network {f['ppo_network_bytes'] / MiB:.1f} MiB; building PPO's "
                          f"models allocated {f['ppo_built_bytes'] / MiB:.1f} MiB "
                          f"({f['ppo_built_bytes'] / f['ppo_network_bytes']:.2f} copies); the step's peak "
                          f"{f['ppo_step_peak_bytes'] / MiB:.1f} MiB above that"]
        if "gpu_used_mib" in f:
            m = f["gpu_used_mib"]
            lines.append(f"cancelled job ({f.get('how')}): GPU memory used (nvidia-smi) {m['before']:,.0f} MiB before, "
                         f"{m['during']:,.0f} while it trained, {m['after']:,.0f} after")
        if "chat_tokens_per_s" in f:
            lines.append(f"chat endpoint on the GPU: {f['chat_completion_tokens']} tokens at "
                         f"{f['chat_tokens_per_s']:.0f} tokens/s, first streamed token after "
                         f"{f['chat_first_token_ms']:.0f} ms")
    return lines
