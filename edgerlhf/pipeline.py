"""Runs pipeline stages in order (data -> sft -> reward -> ppo -> evaluate), from Python or the command line.

From Python (the worker does this with its database-backed context):

    config = load_config("tiny", {"ppo": {"steps": 5}})
    run_pipeline(config, RunContext("runs/demo"), skip={"data"})

From the command line (`edgerlhf pipeline ...` dispatches here):

    edgerlhf pipeline --preset tiny --run-dir runs/tiny
    edgerlhf pipeline --preset tiny --run-dir runs/tiny --set ppo.steps=5 --set reward.precisions='["bf16"]'
    edgerlhf pipeline --preset tiny --run-dir runs/tiny --stages data,sft
    edgerlhf pipeline --config my_run.json --run-dir runs/mine --resume
    edgerlhf pipeline --run-dir runs/round2 --from-run runs/tiny --set data.votes_file=/abs/votes.jsonl

`--set KEY=VALUE` takes a dotted field and a JSON value (plain text when it is not JSON); `--config` reads
a JSON object of overrides (it may name its `preset`), applied before `--set`. `--resume` skips stages
whose `<stage>/report.json` already exists. A bad configuration exits with status 2 and names the field;
a stage error exits with status 1 (one line for a `StageError`, such as a `MissingPrerequisite` naming the
stage to run first; a traceback for anything else); a cancelled run (Ctrl-C) with 130. `--from-run DIR` runs the
next round of RLHF from a finished run (`round.parent_run`, `round.number`: `edgerlhf.config.RoundConfig`): its
aligned policy is this run's SFT policy.

Each stage's module (`STAGE_MODULES`) is imported only when it runs, so `data` and `sft` work without the
alignment stage's dependencies loaded, and a stage's `run(config, ctx)` returns its report, which `run_stage`
writes to `<run_dir>/<stage>/report.json`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgerlhf.config import STAGES, ConfigError, PipelineConfig, build_config, next_round
from edgerlhf.context import Cancelled, ConsoleContext, RunContext
from edgerlhf.contract import ALGORITHMS, CONFIG_FILE, REPORT_FILE, algorithm_metric, algorithm_traits
from edgerlhf.errors import StageError
from edgerlhf.reports import DataReport, EvalReport, PPOReport, Report, RewardReport, SFTReport

logger = logging.getLogger("edgerlhf.pipeline")


STAGE_MODULES = {"data": "edgerlhf.data", "sft": "edgerlhf.sft", "reward": "edgerlhf.reward", "ppo": "edgerlhf.align",
                 "evaluate": "edgerlhf.evaluate"}
"""The module of each stage, whose `run(config, ctx)` is the stage (the alignment stage keeps its old name, `ppo`)."""


def stage_module(name: str):
    """The module that implements stage `name`, imported on first use."""
    if name not in STAGE_MODULES:
        raise ValueError(f"unknown stage {name!r}; choose from {list(STAGES)}")
    return importlib.import_module(STAGE_MODULES[name])


def run_stage(name: str, config: PipelineConfig, ctx: RunContext) -> Report:
    """Run one stage: begin, `run(config, ctx)`, write `<stage>/report.json`, end. Returns the typed report.

    With `EDGERLHF_MAX_ALLOC_MB` set, the stage runs under that allocation limit (`edgerlhf.oom`), to try
    its out-of-memory recovery on any machine."""
    from edgerlhf.oom import allocation_limit  # loads torch, which only running a stage needs

    module = stage_module(name)
    ctx.begin_stage(name)
    started = time.perf_counter()
    with allocation_limit():
        report = module.run(config, ctx)
    report.seconds = round(time.perf_counter() - started, 2)
    path = ctx.stage_dir(name) / REPORT_FILE
    path.write_text(report.model_dump_json(indent=2))
    ctx.artifact("report", path)
    ctx.end_stage(name, json.loads(report.model_dump_json()))  # plain JSON data for the database
    return report


def run_pipeline(config: PipelineConfig, ctx: RunContext, skip: Iterable[str] = frozenset()) -> dict[str, Report]:
    """Run `config.stages` in order, skipping `skip`; writes `<run_dir>/config.json`. Returns reports by stage."""
    skip = set(skip)
    (ctx.run_dir / CONFIG_FILE).write_text(config.to_json())
    reports = {}
    for name in config.stages:
        if name in skip:
            ctx.log(f"stage {name} skipped (already completed)")
            continue
        reports[name] = run_stage(name, config, ctx)
    return reports


# --- command line --------------------------------------------------------------------------------

class CLIContext(ConsoleContext):
    """Prints stage progress as a bar on a terminal, or a line every 10 % otherwise."""

    def __init__(self, run_dir, stream=None):
        super().__init__(run_dir)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._shown = -1
        self._stage_started = time.monotonic()

    def begin_stage(self, stage):
        self._shown = -1
        self._stage_started = time.monotonic()
        super().begin_stage(stage)

    def end_stage(self, stage, report=None):
        super().end_stage(stage, report)
        if self.tty:
            self.stream.write("\n")
        self.stream.write(f"[{stage}] done in {time.monotonic() - self._stage_started:.1f}s\n")
        self.stream.flush()

    def _emit_progress(self, fraction):
        pct = int(fraction * 100)
        if self.tty:
            bar = "#" * (pct // 4) + "." * (25 - pct // 4)
            self.stream.write(f"\r[{self.stage}] [{bar}] {pct:3d}%")
        elif pct // 10 > self._shown // 10 or pct == 100 and self._shown < 100:
            self.stream.write(f"[{self.stage}] {pct}%\n")
        else:
            return
        self._shown = pct
        self.stream.flush()


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _summary(report: Report) -> str:
    """One line per stage for the end of a CLI run."""
    if isinstance(report, DataReport):
        return f"{report.train} train / {report.test} test pairs, dropped {report.dropped}"
    if isinstance(report, SFTReport) and not report.trained:
        return f"round {report.round}: the aligned policy of {report.parent_run}, as is (no demonstrations)"
    if isinstance(report, SFTReport):
        return (f"loss {_num(report.first_loss)} -> {_num(report.final_loss)}, "
                f"eval perplexity {_num(report.perplexity, 1)}")
    if isinstance(report, RewardReport):
        return "; ".join(f"{p}: acc {_num(r.accuracy)} spearman {_num(r.spearman_vs_bf16)}"
                         for p, r in report.precisions.items())
    if isinstance(report, PPOReport):
        final = {name: report.final.get(algorithm_metric(report.algorithm, name)) for name in ("reward_mean", "kl")}
        reward = f"reward {_num(final['reward_mean'])}, " if algorithm_traits(report.algorithm).samples else ""
        return (f"{report.algorithm}: {report.steps} steps, {reward}KL {_num(final['kl'])}, "
                f"{report.network_copies:.2f} network copies held")
    if isinstance(report, EvalReport):
        gold = f", gold aligned - SFT {_num(report.gold_diff.mean)}" if report.gold_diff else ""
        reward = (f"reward aligned - SFT {_num(report.reward_diff.mean)} [{_num(report.reward_diff.low)}, "
                  f"{_num(report.reward_diff.high)}], win rate {_num(report.win_rate)}, "
                  if report.reward_diff is not None else "no reward model, ")
        return f"{reward}KL {_num(report.kl)}{gold}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgerlhf pipeline", description="Run the EdgeRLHF pipeline locally.")
    parser.add_argument("--preset", help="preset to start from (default: tiny, or the config file's preset)")
    parser.add_argument("--run-dir", required=True, help="directory for the run's artifacts and reports")
    parser.add_argument("--config", help="JSON file of config overrides (may name its preset)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set ppo.steps=5 (repeatable; JSON values)")
    parser.add_argument("--algorithm", choices=ALGORITHMS,
                        help="alignment algorithm of the ppo stage, short for --set algorithm=NAME (a later --set "
                             "algorithm=... wins): ppo (clipped policy gradient with a value head), grpo (advantages "
                             "within a group of samples per prompt), rloo (leave-one-out baseline), dpo (offline on "
                             "the preference pairs; settings under dpo.*), kto (offline on answers labelled desirable "
                             "or undesirable; settings under kto.*)")
    parser.add_argument("--from-run", metavar="RUN_DIR",
                        help="the next round of RLHF from a finished run: its aligned policy (merged) is this run's "
                             "SFT policy, which SFT fine-tunes only on demonstrations of this run's own; sets "
                             "round.parent_run and round.number (the parent's + 1); the run's settings are the "
                             "parent's (its config.json) unless --config is given")
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--resume", action="store_true", help="skip stages whose report.json already exists")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    if args.algorithm:
        args.sets.insert(0, f"algorithm={args.algorithm}")
    if args.from_run:
        parent = Path(args.from_run).expanduser().resolve()
        try:
            stored = json.loads((parent / CONFIG_FILE).read_text())
        except (OSError, ValueError) as exc:
            print(f"edgerlhf pipeline: --from-run: {parent} is not a run directory ({exc})", file=sys.stderr)
            return 2
        args.sets[:0] = [f"round.{key}={json.dumps(value)}" for key, value in next_round(parent, stored).items()]
        args.config = args.config or str(parent / CONFIG_FILE)  # the parent's settings, unless a config is given

    from edgerlhf.log import setup_logging

    setup_logging("pipeline")
    try:
        config = build_config(args.preset, args.config, args.sets, args.stages)
    except ConfigError as exc:
        print(f"edgerlhf pipeline: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_json())
        return 0
    ctx = CLIContext(Path(args.run_dir).resolve())
    skip = {s for s in config.stages if (ctx.run_dir / s / REPORT_FILE).exists()} if args.resume else set()
    try:
        reports = run_pipeline(config, ctx, skip=skip)
    except KeyboardInterrupt:
        print("\nedgerlhf pipeline: interrupted", file=sys.stderr)
        return 130
    except Cancelled as exc:
        print(f"edgerlhf pipeline: {exc}", file=sys.stderr)
        return 130
    except Exception as exc:  # a failed stage: say which and why; a traceback only for a bug
        if not isinstance(exc, (StageError, ConfigError)):
            logger.exception("stage %s failed", ctx.stage)
        print(f"edgerlhf pipeline: stage {ctx.stage} failed: {exc}", file=sys.stderr)
        return 1
    for name, report in reports.items():
        print(f"{name}: {_summary(report)}")
    print(f"run directory: {ctx.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
