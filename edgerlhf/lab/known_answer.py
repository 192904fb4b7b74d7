"""The known-answer suite: every gold (`edgerlhf.gold.SCORERS`) at several seeds, with one or more alignment
algorithms, one table.

    python -m edgerlhf.lab.known_answer --seeds 0 1 2                   # every gold, PPO, the `tiny` preset
    edgerlhf known-answer --golds you question --seeds 0 --threads 1 --out known-answer.json
    edgerlhf known-answer --golds question --seeds 0 --algorithms ppo grpo rloo dpo
    edgerlhf known-answer --compare plain.json defended.json     # does a setting help? per gold, runs nothing

Each (gold, seed) is one whole `tiny` pipeline run (data -> warm-up + sft -> reward -> alignment -> evaluate)
with `data.gold_scorer` and `seed` set, a bf16 reward model only (the precision study is the CI test's), in
`<run-root>/<gold>-seed<seed>/`; every further algorithm reuses that run's data, SFT policy and reward model
and runs only its alignment and the evaluation, in `<run-root>/<gold>-seed<seed>-<algorithm>/`, so the
algorithms are compared on the same footing. Per run the table gives the gold gain aligned - SFT and the
gain at equal length (`evaluate.stratified_difference`), each with its bootstrap interval, the length
change, the KL of the aligned policy from SFT, the reward model's held-out accuracy against the gold, the
SFT perplexity and how often answers came out empty. A gold is *learned* at a seed when the interval of
its gain excludes 0 on the good side: the gain at equal length for a gold about content, the plain gain
for `concise`, which is about length. The last lines count the seeds where it was, per gold and algorithm;
a gold that is not learned at this budget shows as such (the suite reports, it does not tune).

Like `edgerlhf bench`, a benchmark, not a test: timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from edgerlhf import gold
from edgerlhf.config import ConfigError, load_config
from edgerlhf.contract import ALGORITHMS, merge_overrides


SHARED_STAGES = ("data", "sft", "reward")
"""What every algorithm of one (gold, seed) starts from: the same pairs, SFT policy and reward model."""


def decisive_gain(content: bool) -> str:
    """The gain that decides whether a gold was learned: at equal length for a gold about content, the plain gain
    for one about length (the row's and the evaluation report's field name)."""
    return "gold_diff_equal_length" if content else "gold_diff"


def run_one(gold_name: str, seed: int, run_dir: Path, overrides: dict[str, Any], algorithm: str = "ppo",
            shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """One pipeline run on the known-answer task of `gold_name`; the figures of its table row.

    With `shared` (the row of a finished run of the same gold and seed), its data, SFT and reward stages are
    copied rather than run again, and only the alignment (`algorithm`) and the evaluation run."""
    from edgerlhf.context import RunContext
    from edgerlhf.pipeline import run_pipeline

    config = load_config("tiny", merge_overrides(
        {"seed": seed, "algorithm": algorithm, "data": {"gold_scorer": gold_name},
         "reward": {"precisions": ["bf16"]}}, overrides))
    ctx = RunContext(run_dir)
    started = time.perf_counter()
    if shared is not None:
        for stage in SHARED_STAGES:
            shutil.copytree(Path(shared["run_dir"]) / stage, run_dir / stage, dirs_exist_ok=True)
    reports = run_pipeline(config, ctx, skip=SHARED_STAGES if shared is not None else ())
    ev = reports["evaluate"]
    content = gold.get_scorer(gold_name).balance_length
    decisive = getattr(ev, decisive_gain(content))
    row = {
        "gold": gold_name, "seed": seed, "algorithm": config.algorithm, "content": content, "run_dir": str(run_dir),
        "gold_diff": ev.gold_diff.model_dump(), "gold_diff_equal_length": ev.gold_diff_equal_length.model_dump(),
        "length_diff": ev.length_diff.model_dump(), "kl": ev.kl,
        "empty_rate": {"sft": ev.sft.empty_rate, "ppo": ev.ppo.empty_rate},
        "cap_hit_rate": {"sft": ev.sft.cap_hit_rate, "ppo": ev.ppo.cap_hit_rate},
        "learned": decisive.low is not None and decisive.low > 0.0,
        # What the proxy and the validation reward model (`reward.validation`) say of the same held-out answers, and
        # which step's policy was kept (`ppo.keep_best`): the reward-hacking runs' columns (README, "Held-out golds").
        "reward_diff": ev.reward_diff.model_dump() if ev.reward_diff else None,
        "validation_reward_diff": ev.validation_reward_diff.model_dump() if ev.validation_reward_diff else None,
        "best_step": getattr(reports.get("ppo"), "best_step", None),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if shared is not None:  # the shared stages' figures are the first run's
        row.update({k: shared[k] for k in ("reward_accuracy", "warmup_perplexity", "sft_perplexity",
                                           "gold_length_correlation")})
    else:
        warmup = ctx.metric_series("warmup/perplexity")
        row.update({"reward_accuracy": reports["reward"].precisions[config.reward.precisions[0]].accuracy,
                    "warmup_perplexity": warmup[-1][1] if warmup else None,
                    "sft_perplexity": reports["sft"].perplexity,
                    "gold_length_correlation": reports["data"].gold_length_correlation[gold_name]})
    return row


def interval_text(d: dict[str, float]) -> str:
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def table(rows: list[dict[str, Any]]) -> str:
    """The suite's Markdown table: one row per run, then per gold and algorithm the seeds where it was learned. With
    runs that had a validation reward model (`reward.validation`), three more columns: the proxy's and the validation
    model's aligned − SFT on the held-out answers, and the step of the policy kept (`ppo.keep_best`)."""
    validated = any(r.get("validation_reward_diff") for r in rows)
    lines = ["| gold | algorithm | seed | gold gain aligned − SFT | gain at equal length | length Δ (tokens) | KL | "
             "RM accuracy | SFT ppl | empty SFT/aligned | capped SFT/aligned | learned |"
             + (" proxy Δ | validation RM Δ | kept step |" if validated else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * 3 * validated]
    for r in rows:
        line = (f"| {r['gold']} | {r.get('algorithm', 'ppo')} | {r['seed']} | {interval_text(r['gold_diff'])} | "
                f"{interval_text(r['gold_diff_equal_length'])} | {r['length_diff']['mean']:+.1f} | {r['kl']:.2f} | "
                f"{r['reward_accuracy']:.3f} | {r['sft_perplexity']:.0f} | "
                f"{r['empty_rate']['sft']:.0%}/{r['empty_rate']['ppo']:.0%} | "
                f"{r['cap_hit_rate']['sft']:.0%}/{r['cap_hit_rate']['ppo']:.0%} | {'yes' if r['learned'] else 'no'} |")
        if validated:
            line += "".join(f" {interval_text(r[k]) if r.get(k) else '—'} |"
                            for k in ("reward_diff", "validation_reward_diff")) + f" {r.get('best_step') or '—'} |"
        lines.append(line)
    lines.append("")
    for name, algorithm in dict.fromkeys((r["gold"], r.get("algorithm", "ppo")) for r in rows):
        runs = [r for r in rows if r["gold"] == name and r.get("algorithm", "ppo") == algorithm]
        what = "gain at equal length" if runs[0]["content"] else "plain gain: a gold about length"
        lines.append(f"- `{name}` with {algorithm}: learned in {sum(r['learned'] for r in runs)} of {len(runs)} seeds "
                     f"({what} above 0); gold-length correlation in the data {runs[0]['gold_length_correlation']:+.3f}")
    return "\n".join(lines) + "\n"


def run_key(r: dict[str, Any]) -> tuple[str, int, str]:
    """What names a run across two rows files: its gold, seed and algorithm."""
    return r["gold"], r["seed"], r.get("algorithm", "ppo")


def compare(base: list[dict[str, Any]], other: list[dict[str, Any]]) -> str:
    """Two sets of rows of the same runs but one setting (e.g. without and with a defence), per gold over the runs
    both have (same gold, seed and algorithm), judged by the README's rule for the held-out golds: the setting
    *helps* a gold when it learns it in more runs than `base`, or in as many at a higher mean decisive gain (at equal
    length for a gold about content, the plain gain for one about length); otherwise it does not help."""
    theirs = {run_key(r): r for r in other}
    lines = ["| gold | runs | learned: base → other | mean decisive gain: base → other | learned by algorithm "
             "| verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["gold"] for r in base):
        pairs = [(r, theirs[run_key(r)]) for r in base if r["gold"] == name and run_key(r) in theirs]
        if not pairs:
            continue
        decisive = decisive_gain(pairs[0][0]["content"])
        learned = [sum(r["learned"] for r in side) for side in zip(*pairs)]
        gains = [sum(r[decisive]["mean"] for r in side) / len(pairs) for side in zip(*pairs)]
        helps = learned[1] > learned[0] or (learned[1] == learned[0] and gains[1] > gains[0])
        by_algorithm = []
        for algorithm in dict.fromkeys(run_key(b)[2] for b, _ in pairs):
            runs = [(b, o) for b, o in pairs if run_key(b)[2] == algorithm]
            by_algorithm.append(f"{algorithm} {sum(b['learned'] for b, _ in runs)} → "
                                f"{sum(o['learned'] for _, o in runs)}")
        lines.append(f"| {name} | {len(pairs)} | {learned[0]} → {learned[1]} | {gains[0]:+.4f} → {gains[1]:+.4f} | "
                     f"{', '.join(by_algorithm)} | {'helps' if helps else 'does not help'} |")
    if len(lines) == 2:
        raise ValueError("the two files have no run in common (same gold, seed and algorithm)")
    return "\n".join(lines) + "\n"


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every suite of runs takes (this one, `edgerlhf.lab.verifiable`): where the runs go, the rows
    file, resuming, threads and overrides of every run."""
    parser.add_argument("--run-root", help="directory for the runs (default: a temporary directory)")
    parser.add_argument("--out", help="write the rows as JSON here, after every run")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and run only the missing ones (needs the same --run-root: "
                             "a further algorithm reuses its seed's first run)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of every run, e.g. --set ppo.steps=40 (repeatable; JSON values)")


def start_runs(args: argparse.Namespace, prog: str, base: dict[str, Any] | None = None
               ) -> tuple[dict[str, Any], Path, list[dict[str, Any]]]:
    """The overrides of `--set` (checked on the `tiny` preset over `base`), the run root and the rows kept by
    `--resume`; `ValueError` with the reason for a bad configuration or `--resume` without `--out` and `--run-root`."""
    from edgerlhf.config import parse_overrides
    from edgerlhf.log import setup_logging

    setup_logging(prog.removeprefix("edgerlhf "))
    try:
        overrides = parse_overrides(args.sets)
        load_config("tiny", merge_overrides(base or {}, overrides))
    except ConfigError as exc:
        raise ValueError(f"invalid configuration: {exc}") from None
    if args.resume and not (args.out and args.run_root):
        raise ValueError("--resume needs --out and --run-root")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    root = Path(args.run_root or tempfile.mkdtemp(prefix=prog.removeprefix("edgerlhf ") + "-")).resolve()
    done = json.loads(Path(args.out).read_text()) if args.resume and Path(args.out).exists() else []
    return overrides, root, done


def run_seed(rows: list[dict[str, Any]], done: list[dict[str, Any]], base: Path, identity: dict[str, Any],
             algorithms: list[str], run: Callable[[Path, str, dict[str, Any] | None], dict[str, Any]],
             describe: Callable[[dict[str, Any]], str], out: str | None) -> None:
    """One seed's runs, one per algorithm: the first in `base`, each further one in `<base>-<algorithm>` reusing the
    first's shared stages (`run(where, algorithm, first_row)`). A row `--resume` kept (same `identity` fields,
    algorithm and run directory) is not run again; the rows go to `out` after every run."""
    first = None
    for algorithm in algorithms:
        where = base if first is None else base.with_name(f"{base.name}-{algorithm}")
        kept = [r for r in done if all(r[k] == v for k, v in identity.items())
                and (r["algorithm"], r["run_dir"]) == (algorithm, str(where))]
        if kept:
            first = first or kept[0]
            continue
        shutil.rmtree(where, ignore_errors=True)  # what an interrupted run left
        rows.append(run(where, algorithm, first))
        first = first or rows[-1]
        print(describe(rows[-1]), file=sys.stderr)
        if out:
            Path(out).write_text(json.dumps(rows, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgerlhf known-answer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--golds", nargs="+", default=list(gold.SCORERS), choices=list(gold.SCORERS),
                        help="golds to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--algorithms", nargs="+", default=["ppo"], choices=list(ALGORITHMS),
                        help="alignment algorithms, each on the same data, SFT and reward model (default: ppo)")
    parser.add_argument("--compare", nargs=2, metavar=("BASE", "OTHER"),
                        help="run nothing: compare two --out files of the same runs but one setting, per gold "
                             "(learned runs, mean gain, whether OTHER helps by the README's rule)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.compare:
        try:
            print(compare(*(json.loads(Path(f).read_text()) for f in args.compare)))
        except (OSError, ValueError) as exc:
            print(f"edgerlhf known-answer: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        overrides, root, done = start_runs(args, "edgerlhf known-answer")
    except ValueError as exc:
        print(f"edgerlhf known-answer: {exc}", file=sys.stderr)
        return 2
    rows = list(done)
    for name in args.golds:
        for seed in args.seeds:
            run_seed(rows, done, root / f"{name}-seed{seed}", {"gold": name, "seed": seed}, args.algorithms,
                     lambda where, algorithm, first: run_one(name, seed, where, overrides, algorithm, shared=first),
                     lambda r: f"{name} seed {seed} {r['algorithm']}: gain {interval_text(r['gold_diff'])}, at equal length "
                               f"{interval_text(r['gold_diff_equal_length'])} ({r['seconds']:.0f}s)", args.out)
    print(table(rows))
    print(f"runs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
