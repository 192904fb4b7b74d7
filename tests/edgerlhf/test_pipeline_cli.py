"""The pipeline runner: `run_stage` / `run_pipeline` in process, and `edgerlhf pipeline` as a real
subprocess on tiny budgets (data -> sft -> reward), bad configurations, unknown stages, and --resume."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgerlhf.config import HH_PREFS_SAMPLE, ConfigError, load_config
from edgerlhf.context import RunContext
from edgerlhf.data import DataError
from edgerlhf.errors import MissingPrerequisite, StageError
from edgerlhf.models import ModelLoadError, load_tokenizer
from edgerlhf.config import build_config, parse_overrides
from edgerlhf.pipeline import main, run_pipeline, run_stage
from tests.support.tiny import SFT_AND_REWARD, as_sets

TINY_SETS = as_sets(SFT_AND_REWARD)


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgerlhf.cli", "pipeline", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_parse_overrides():
    assert parse_overrides(["ppo.steps=5", 'reward.precisions=["bf16"]', "data.source=/x/y.jsonl", "seed=3"]) == {
        "ppo": {"steps": 5}, "reward": {"precisions": ["bf16"]}, "data": {"source": "/x/y.jsonl"}, "seed": 3}
    with pytest.raises(ConfigError):
        parse_overrides(["ppo.steps"])


def test_run_stage_and_pipeline_in_process(tmp_path):
    config = load_config("tiny", {"stages": ["data"], "data": {"source": HH_PREFS_SAMPLE, "max_pairs": 30}})
    ctx = RunContext(tmp_path)
    reports = {k: r.model_dump() for k, r in run_pipeline(config, ctx).items()}
    assert list(reports) == ["data"]
    report = reports["data"]
    assert json.loads((tmp_path / "data" / "report.json").read_text())["train"] == report["train"]
    assert report["train"] == 24 + report["gold_empty_pairs_added"] and report["test"] == 6  # 30 pairs, 1 per prompt
    assert json.loads((tmp_path / "config.json").read_text()) == config.to_dict()
    assert ctx.progress_by_stage["data"] == 1.0
    assert ("report", str(tmp_path / "data" / "report.json")) in ctx.artifacts

    assert run_pipeline(config, RunContext(tmp_path), skip={"data"}) == {}
    with pytest.raises(ValueError, match="unknown stage"):
        run_stage("deploy", config, ctx)


@pytest.mark.parametrize("stage, present, missing, first", [
    ("sft", [], "data/test_prefs.jsonl", "data"),
    ("reward", [], "sft/merged", "sft"),
    ("ppo", [], "data/prompts_train.jsonl", "data"),
    ("ppo", ["data/train_prefs.jsonl", "data/test_prefs.jsonl"], "sft/merged", "sft"),
    ("evaluate", [], "data/prompts_test.jsonl", "data"),
    ("evaluate", ["data/test_prefs.jsonl"], "ppo/adapter", "ppo"),
])
def test_a_missing_prerequisite_names_the_stage_to_run_first(tmp_path, stage, present, missing, first):
    for name in present:  # empty files: only their existence matters here
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    config = load_config("tiny", {"stages": [stage]})
    expected = f"{tmp_path / missing} is missing: run the {first} stage first"
    with pytest.raises(MissingPrerequisite, match=re.escape(expected)) as info:
        run_stage(stage, config, RunContext(tmp_path))
    assert info.value.stage == first


def test_the_cli_reports_a_stage_error_in_one_line(tmp_path, capsys, caplog, monkeypatch):
    """A `StageError` (here: reward before sft) is the person's to fix: its message, status 1, no traceback."""
    assert issubclass(ModelLoadError, StageError) and issubclass(DataError, StageError)
    monkeypatch.setattr("edgerlhf.log.setup_logging", lambda *args, **kwargs: None)  # keep pytest's log capture
    assert main(["--preset", "tiny", "--run-dir", str(tmp_path), "--stages", "reward"]) == 1
    err = capsys.readouterr().err
    assert f"stage reward failed: {tmp_path / 'sft' / 'merged'} is missing: run the sft stage first" in err
    assert not [r for r in caplog.records if r.exc_info], "a StageError is reported without a traceback"


@pytest.mark.slow
def test_cli_runs_data_sft_reward(tmp_path):
    run_dir = tmp_path / "run"
    args = ["--preset", "tiny", "--run-dir", str(run_dir), "--stages", "data,sft,reward"]
    for item in TINY_SETS:
        args += ["--set", item]
    result = cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in ("config.json", "data/train_prefs.jsonl", "data/report.json", "base/config.json",
                 "sft/merged/config.json", "sft/adapter/adapter_config.json", "sft/report.json",
                 "reward/bf16/score_head.pt", "reward/report.json"):
        assert (run_dir / path).exists(), path
    config = json.loads((run_dir / "config.json").read_text())
    assert config["stages"] == ["data", "sft", "reward"] and config["sft"]["max_steps"] == 2
    study = json.loads((run_dir / "reward" / "report.json").read_text())["precisions"]
    assert list(study) == ["bf16"] and 0.0 <= study["bf16"]["accuracy"] <= 1.0
    assert "[sft] 100%" in result.stderr and "[reward] done" in result.stderr  # progress display
    assert "reward: bf16: acc " in result.stdout

    # --resume skips what is done: the data report stays as it was
    before = (run_dir / "data" / "report.json").stat().st_mtime_ns
    again = cli("--preset", "tiny", "--run-dir", str(run_dir), "--stages", "data", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stage data skipped" in again.stderr
    assert (run_dir / "data" / "report.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("args, field", [
    (["--set", "sft.max_steps=0"], "sft.max_steps"),
    (["--set", "reward.precisions=[\"fp8\"]"], "reward.precisions"),
    (["--set", "sft.bogus=1"], "sft.bogus"),
    (["--stages", "data,deploy"], "stages"),
    (["--preset", "huge"], "preset"),
])
def test_cli_rejects_bad_config(tmp_path, args, field):
    result = cli("--run-dir", str(tmp_path / "run"), *args, timeout=120)
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr and field in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "config.json").exists()


def test_cli_config_file_and_stage_failure(tmp_path):
    overrides = tmp_path / "run.json"
    overrides.write_text(json.dumps({"preset": "tiny", "stages": ["data"],
                                     "data": {"source": str(tmp_path / "missing.jsonl")}}))
    result = cli("--config", str(overrides), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 1
    assert "stage data failed" in result.stderr and "missing.jsonl: no such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
    printed = cli("--config", str(overrides), "--run-dir", str(tmp_path / "run"), "--print-config",
                  "--set", "seed=7", timeout=120)
    config = json.loads(printed.stdout)
    assert config["preset"] == "tiny" and config["seed"] == 7 and config["stages"] == ["data"]


def test_cli_paths_are_absolute_and_bare_names_are_never_read_from_disk(tmp_path, monkeypatch):
    """A relative path typed on the command line is the person's; a bare name is a hub id, never `./name`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outside").mkdir()
    pairs = (tmp_path / "outside" / "pairs.jsonl")
    pairs.write_text(Path(HH_PREFS_SAMPLE).read_text().splitlines()[0] + "\n")
    config = build_config("tiny", None, ["data.source=./outside/pairs.jsonl", "model.tokenizer=outside"], None)
    assert config.data.source == str(pairs)
    assert config.model.tokenizer == "outside"  # a hub id: stays as it is

    # The stage given the bare name `outside` goes to the hub (offline here), not to ./outside.
    config = load_config("tiny", {"stages": ["data"], "data": {"source": "outside"}})
    with pytest.raises(DataError, match="hub cannot be reached"):
        run_pipeline(config, RunContext(tmp_path / "run"))
    with pytest.raises(ModelLoadError, match="hub cannot be reached"):
        load_tokenizer("outside")
    (tmp_path / "etc").mkdir()
    with pytest.raises(ModelLoadError, match="hub cannot be reached"):
        load_tokenizer("etc")


def test_algorithm_flag_is_short_for_set_algorithm(capsys, tmp_path):
    assert main(["--run-dir", str(tmp_path), "--algorithm", "grpo", "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["algorithm"] == "grpo" and config["ppo"]["samples_per_prompt"] >= 2
    assert main(["--run-dir", str(tmp_path), "--algorithm", "grpo", "--set", "algorithm=rloo", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["algorithm"] == "rloo"  # a later --set wins
    with pytest.raises(SystemExit) as exc:
        main(["--run-dir", str(tmp_path), "--algorithm", "a2c"])
    assert exc.value.code == 2 and "invalid choice: 'a2c'" in capsys.readouterr().err
