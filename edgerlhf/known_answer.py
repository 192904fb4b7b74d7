"""The known-answer suite: every gold (`edgerlhf.gold.SCORERS`) at several seeds, one table.

    python -m edgerlhf.known_answer --seeds 0 1 2                   # every gold, the `tiny` preset
    edgerlhf known-answer --golds you question --seeds 0 --threads 1 --out known-answer.json

Each (gold, seed) is one whole `tiny` pipeline run (data -> warm-up + sft -> reward -> ppo -> evaluate) with
`data.gold_scorer` and `seed` set, a bf16 reward model only (the precision study is the CI test's), in
`<run-root>/<gold>-seed<seed>/`. Per run the table gives the gold gain PPO - SFT and the gain at equal
length (`evaluate.stratified_difference`), each with its bootstrap interval, the length change, the KL
of the PPO policy from SFT, the reward model's held-out accuracy against the gold, the SFT perplexity
and how often answers came out empty or hit the length cap. A gold is *learned* at a seed when the
interval of its gain excludes 0 on the good side: the gain at equal length for a gold about content, the
plain gain for `concise`, which is about length. The last column counts the seeds where it was; a gold
that is not learned at this budget shows as such (the suite reports, it does not tune).

Like `edgerlhf bench`, a benchmark, not a test: timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgerlhf import gold
from edgerlhf.config import ConfigError, load_config
from edgerlhf.contract import merge_overrides


def run_one(gold_name: str, seed: int, run_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """One pipeline run on the known-answer task of `gold_name`; the figures of its table row."""
    from edgerlhf.context import RunContext
    from edgerlhf.pipeline import run_pipeline

    config = load_config("tiny", merge_overrides(
        {"seed": seed, "data": {"gold_scorer": gold_name}, "reward": {"precisions": ["bf16"]}}, overrides))
    ctx = RunContext(run_dir)
    started = time.perf_counter()
    reports = run_pipeline(config, ctx)
    ev, rm = reports["evaluate"], reports["reward"].precisions[config.reward.precisions[0]]
    warmup = ctx.metric_series("warmup/perplexity")
    content = gold.get_scorer(gold_name).balance_length
    decisive = ev.gold_diff_equal_length if content else ev.gold_diff
    return {
        "gold": gold_name, "seed": seed, "content": content,
        "gold_diff": ev.gold_diff.model_dump(), "gold_diff_equal_length": ev.gold_diff_equal_length.model_dump(),
        "length_diff": ev.length_diff.model_dump(), "kl": ev.kl, "reward_accuracy": rm.accuracy,
        "warmup_perplexity": warmup[-1][1] if warmup else None, "sft_perplexity": reports["sft"].perplexity,
        "empty_rate": {"sft": ev.sft.empty_rate, "ppo": ev.ppo.empty_rate},
        "cap_hit_rate": {"sft": ev.sft.cap_hit_rate, "ppo": ev.ppo.cap_hit_rate},
        "gold_length_correlation": reports["data"].gold_length_correlation[gold_name],
        "learned": decisive.low is not None and decisive.low > 0.0,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _ci(d: dict[str, float]) -> str:
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def table(rows: list[dict[str, Any]]) -> str:
    """The suite's Markdown table: one row per run, then per gold the seeds where it was learned."""
    lines = ["| gold | seed | gold gain PPO − SFT | gain at equal length | length Δ (tokens) | KL | RM accuracy | "
             "SFT ppl | empty SFT/PPO | learned |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['gold']} | {r['seed']} | {_ci(r['gold_diff'])} | {_ci(r['gold_diff_equal_length'])} | "
                     f"{r['length_diff']['mean']:+.1f} | {r['kl']:.2f} | {r['reward_accuracy']:.3f} | "
                     f"{r['sft_perplexity']:.0f} | {r['empty_rate']['sft']:.0%}/{r['empty_rate']['ppo']:.0%} | "
                     f"{'yes' if r['learned'] else 'no'} |")
    lines.append("")
    for name in dict.fromkeys(r["gold"] for r in rows):
        runs = [r for r in rows if r["gold"] == name]
        what = "gain at equal length" if runs[0]["content"] else "plain gain: a gold about length"
        lines.append(f"- `{name}`: learned in {sum(r['learned'] for r in runs)} of {len(runs)} seeds ({what} "
                     f"above 0); gold-length correlation in the data {runs[0]['gold_length_correlation']:+.3f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgerlhf known-answer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--golds", nargs="+", default=list(gold.SCORERS), choices=list(gold.SCORERS),
                        help="golds to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--run-root", help="directory for the runs (default: a temporary directory)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of every run, e.g. --set ppo.steps=40 (repeatable; JSON values)")
    args = parser.parse_args(argv)

    from edgerlhf.log import setup_logging
    from edgerlhf.pipeline import parse_overrides

    setup_logging("known-answer")
    try:
        overrides = parse_overrides(args.sets)
        load_config("tiny", overrides)
    except ConfigError as exc:
        print(f"edgerlhf known-answer: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    root = Path(args.run_root or tempfile.mkdtemp(prefix="known-answer-")).resolve()
    rows = []
    for name in args.golds:
        for seed in args.seeds:
            rows.append(run_one(name, seed, root / f"{name}-seed{seed}", overrides))
            print(f"{name} seed {seed}: gain {_ci(rows[-1]['gold_diff'])}, at equal length "
                  f"{_ci(rows[-1]['gold_diff_equal_length'])} ({rows[-1]['seconds']:.0f}s)", file=sys.stderr)
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=2))
    print(table(rows))
    print(f"runs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
