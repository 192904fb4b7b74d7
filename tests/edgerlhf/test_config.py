"""Stage configs: presets build, validation names the field, JSON round trip is lossless."""

import json

import pytest

from edgerlhf.config import PRESETS, ConfigError, PipelineConfig, load_config, preset_dict


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip(name):
    config = load_config(name)
    assert config.preset == name
    again = PipelineConfig.from_dict(json.loads(config.to_json()))
    assert again == config


def test_reference_preset_matches_the_design():
    c = load_config("distilgpt2-8gb")
    assert c.model.name_or_path == "distilgpt2" and not c.model.random_init
    assert (c.sft.lora_r, c.sft.target_modules) == (16, ["c_attn", "c_proj"])
    assert (c.ppo.batch_size, c.ppo.mini_batch_size, c.ppo.response_length) == (32, 2, 64)
    assert (c.ppo.learning_rate, c.ppo.init_kl_coef, c.ppo.top_k, c.ppo.top_p) == (1.41e-5, 0.1, 50, 0.95)
    assert c.reward.precisions == ["bf16", "int8", "int4"]


def test_overrides_merge_into_the_preset():
    c = load_config("tiny", {"ppo": {"steps": 3}, "stages": ["data", "sft"]})
    assert c.ppo.steps == 3
    assert c.ppo.batch_size == preset_dict("tiny")["ppo"]["batch_size"]
    assert c.stages == ["data", "sft"]


@pytest.mark.parametrize("overrides, field", [
    ({"ppo": {"batch_size": -1}}, "ppo.batch_size"),
    ({"ppo": {"batch_size": "32"}}, "ppo.batch_size"),
    ({"ppo": {"batch_size": 30, "mini_batch_size": 4}}, "ppo.mini_batch_size"),
    ({"ppo": {"bogus": 1}}, "ppo.bogus"),
    ({"reward": {"precisions": ["fp8"]}}, "reward.precisions"),
    ({"reward": {"precisions": ["int8"]}, "ppo": {"reward_precision": "int4"}}, "ppo.reward_precision"),
    ({"stages": ["data", "train"]}, "stages"),
    ({"data": {"test_fraction": 1.5}}, "data.test_fraction"),
    ({"sft": {"completion_only_loss": "yes"}}, "sft.completion_only_loss"),
    ({"device": "tpu"}, "device"),
    ({"model": "distilgpt2"}, "model"),
])
def test_invalid_values_name_their_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config("distilgpt2-8gb", overrides)
    assert err.value.field == field


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        load_config("gpt4-on-a-toaster")
    assert err.value.field == "preset"


def test_ppo_scores_with_the_first_trained_precision_by_default():
    assert load_config("tiny", {"reward": {"precisions": ["int4", "bf16"]}}).ppo.reward_precision == "int4"
    assert load_config("distilgpt2-8gb").ppo.reward_precision == "bf16"


def test_stages_are_kept_in_pipeline_order():
    assert load_config("tiny", {"stages": ["ppo", "data"]}).stages == ["data", "ppo"]


@pytest.mark.parametrize("overrides, field", [
    ({"ppo": {"batch_size": 10**12}}, "ppo.batch_size"),
    ({"ppo": {"steps": 10**12}}, "ppo.steps"),
    ({"data": {"max_pairs": 10**12}}, "data.max_pairs"),
    ({"ppo": {"response_length": 10**9}}, "ppo.response_length"),
    ({"ppo": {"learning_rate": 1e308}}, "ppo.learning_rate"),
    ({"ppo": {"temperature": float("nan")}}, "ppo.temperature"),
    ({"model": {"n_layer": 10**6}}, "model.n_layer"),
    ({"model": {"n_positions": 10**9}}, "model.n_positions"),
    ({"sft": {"lora_r": 10**9}}, "sft.lora_r"),
    ({"seed": 10**19}, "seed"),
    ({"seed": -1}, "seed"),
    ({"evaluate": {"n_bootstrap": 10**12}}, "evaluate.n_bootstrap"),
    ({"device": "cuda:1000000"}, "device"),
])
def test_every_numeric_field_has_an_upper_bound_quoted_in_the_error(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert err.value.field == field
    assert err.value.message.startswith(("must be in [", "must be in (", "must be auto"))


def test_every_numeric_field_declares_a_range():
    import typing

    from edgerlhf.config import DataConfig, EvalConfig, ModelConfig, PPOConfig, RewardConfig, SFTConfig, ranges

    for cls in (PipelineConfig, ModelConfig, DataConfig, SFTConfig, RewardConfig, PPOConfig, EvalConfig):
        for name, hint in typing.get_type_hints(cls).items():
            if int in (hint, *typing.get_args(hint)) or float in (hint, *typing.get_args(hint)):
                assert name in ranges(cls), f"{cls.__name__}.{name} has no Range"


@pytest.mark.parametrize("field, value", [
    ("data_dir", "../../../../tmp/x"), ("data_dir", "/etc"), ("data_dir", "harmless-base/../.."), ("data_dir", ".."),
    ("data_dir", "a//b"), ("data_dir", "~/x"), ("data_dir", "x\\..\\y"),
    ("split", "../train"), ("split", "/train"), ("split", "train/../../x"), ("split", ""),
])
def test_the_hub_subset_and_split_are_simple_names_never_paths(field, value):
    """`datasets` joins `data.data_dir` to the snapshot: `..` or an absolute path would read any directory the worker
    can. The config itself refuses them, so the API, the command line and the worker (which rebuilds the config from
    the database) all do."""
    with pytest.raises(ConfigError) as err:
        load_config("tiny", {"data": {field: value}})
    assert err.value.field == f"data.{field}"
    with pytest.raises(ConfigError):
        stored = load_config("tiny").to_dict()  # as the worker rebuilds a job's config from the database
        PipelineConfig.from_dict({**stored, "data": {**stored["data"], field: value}})


@pytest.mark.parametrize("field, value", [
    ("data_dir", "harmless-base"), ("data_dir", "helpful-rejection-sampled"), ("data_dir", "data/en.v2"),
    ("data_dir", None), ("data_dir", ""), ("split", "train"), ("split", "test"), ("split", "train[:1000]"),
    ("split", "train[10%:20%]"), ("split", "train+test"),
])
def test_hub_subsets_and_splits_that_datasets_names_are_accepted(field, value):
    assert getattr(load_config("tiny", {"data": {field: value}}).data, field) == value
