"""Config layering (base -> profile -> experiment -> --set) and load-time errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.common.config import ConfigError, dump_yaml
from components.schema import load_config


def test_profiles_layer_over_base() -> None:
    tiny, _ = load_config("tiny")
    full, _ = load_config("full")
    assert tiny.profile == "tiny" and full.profile == "full"
    assert tiny.data.synthetic_crawl.num_samples == 600  # tiny.yaml over base.yaml's 1000
    assert full.data.synthetic_crawl.num_samples == 20000
    assert tiny.data.basic_filters.min_short_side == 200  # from base.yaml, untouched by tiny


def test_experiment_then_override_win_in_order() -> None:
    config, layered = load_config("tiny", ["strict_filters"], ["data.basic_filters.max_aspect_ratio=2.5"])
    assert config.data.basic_filters.min_short_side == 256  # experiment
    assert config.data.basic_filters.max_aspect_ratio == 2.5  # --set beats the experiment's 2.0
    assert layered.source_of("data.basic_filters.min_short_side") == "configs/experiments/strict_filters.yaml"
    assert layered.source_of("data.basic_filters.max_aspect_ratio").startswith("--set")


def test_override_values_are_parsed_as_yaml() -> None:
    config, _ = load_config("tiny", overrides=[
        "data.synthetic_crawl.enabled=false", "data.shards.prefix=train", "ray.num_cpus=null",
        "data.ingest.sources=[{kind: folder, path: /tmp}]",
    ])
    assert config.data.synthetic_crawl.enabled is False
    assert config.data.shards.prefix == "train"
    assert config.ray.num_cpus is None
    assert config.data.ingest.sources[0].kind == "folder"


def test_unknown_key_names_key_file_and_closest(tmp_path: Path) -> None:
    overlay = tmp_path / "mine.yaml"
    overlay.write_text("data:\n  basic_filters:\n    min_short_sid: 100\n")
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [str(overlay)])
    message = str(error.value)
    assert "data.basic_filters.min_short_sid" in message
    assert str(overlay) in message
    assert "did you mean 'data.basic_filters.min_short_side'" in message


def test_mistyped_values_fail_with_expected_type() -> None:
    with pytest.raises(ConfigError, match=r"'data.shards.samples_per_shard' must be an integer, got str"):
        load_config("tiny", overrides=["data.shards.samples_per_shard=many"])
    with pytest.raises(ConfigError, match=r"must be true or false"):
        load_config("tiny", overrides=["data.synthetic_crawl.enabled=1"])
    with pytest.raises(ConfigError, match=r"is not one of \['webdataset', 'parquet', 'folder'\]; did you mean 'folder'"):
        load_config("tiny", overrides=["data.ingest.sources=[{kind: foldr, path: /tmp}]"])


def test_value_checks_run_at_load() -> None:
    with pytest.raises(ConfigError, match="noise rates"):
        load_config("tiny", overrides=["data.synthetic_crawl.noise.corrupt_image=2.0"])
    with pytest.raises(ConfigError, match="samples_per_shard must be >= 1"):
        load_config("tiny", overrides=["data.shards.samples_per_shard=0"])


def test_unknown_profile_and_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"no profile named 'tinny'.*\['full', 'paper', 'small', 'tiny'\]"):
        load_config("tinny")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("tiny", overrides=["data.shards.prefix"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config, _ = load_config("tiny", ["strict_filters"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(dump_yaml(config))
    reloaded, _ = load_config("tiny", [str(saved)])
    assert reloaded == config


def test_cross_section_rules_fail_at_load() -> None:
    with pytest.raises(ConfigError, match=r"'data.clip_filter.weights' is empty: set it to a local open_clip"):
        load_config("tiny", overrides=["data.clip_scorer.enabled=false", "data.clip_filter.mode=threshold"])
    with pytest.raises(ConfigError, match="calibrated' needs data.clip_scorer.enabled=true"):
        load_config("tiny", overrides=["data.clip_scorer.enabled=false", "data.clip_filter.weights=/w.pt"])
    with pytest.raises(ConfigError, match=r"'train.vit_pretrain.teacher.weights' is 'scorer' but data.clip_scorer"):
        load_config("tiny", overrides=["data.clip_filter.enabled=false", "data.clip_scorer.enabled=false"])
    with pytest.raises(ConfigError, match=r"teacher.weights' is empty, so MIM would distil a random teacher"):
        load_config("tiny", overrides=["train.vit_pretrain.teacher.weights="])
    without_vit = ["train.vit_pretrain.enabled=false"]
    with pytest.raises(ConfigError, match="train.vit_pretrain is disabled but the VLM stages"):
        load_config("tiny", overrides=without_vit)
    without_vit += [f"train.vlm.stage{n}.enabled=false" for n in range(3)]
    config, _ = load_config("tiny", overrides=["data.clip_filter.enabled=false", "data.clip_scorer.enabled=false",
                                               *without_vit])
    assert not config.data.clip_filter.enabled
    with pytest.raises(ConfigError, match="exceeds train.vit_pretrain.holdout_fraction"):
        load_config("tiny", overrides=["train.vlm.holdout_fraction=0.5"])
    with pytest.raises(ConfigError, match="text.freeze' is true but text.weights is empty"):
        load_config("tiny", overrides=["train.vit_pretrain.text.weights="])
    with pytest.raises(ConfigError, match="head width"):
        load_config("tiny", overrides=["train.vit_pretrain.vit.width=36", "train.vit_pretrain.vit.num_heads=6"])


def test_profile_extends_another_and_names_each_source(tmp_path: Path) -> None:
    config, layered = load_config("small")
    assert config.profile == "small"
    assert config.data.clip_scorer.max_steps == 250  # from tiny, which small extends
    assert layered.source_of("data.clip_scorer.max_steps") == "configs/profiles/tiny.yaml"
    assert config.train.vlm.llm.hidden_size == 192 and layered.source_of("train.vlm.llm.hidden_size").endswith("small.yaml")
    looped = tmp_path / "a.yaml"
    looped.write_text(f"extends: {looped}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(looped))


def test_vlm_stages_need_an_llm_and_valid_parts() -> None:
    with pytest.raises(ConfigError, match="train.vlm.llm.pretrained_path"):
        load_config("tiny", overrides=["train.vlm.llm_pretrain.enabled=false"])
    with pytest.raises(ConfigError, match="trainable"):
        load_config("tiny", overrides=["train.vlm.stage1.trainable=[vit, projector]"])
    with pytest.raises(ConfigError, match="mix"):
        load_config("tiny", overrides=["train.vlm.stage2.mix={audio: 1.0}"])
    assert not load_config("tiny", experiments=["skip_stage0"])[0].train.vlm.stage0.enabled


def test_base_yaml_states_the_dataclass_defaults() -> None:
    """One source of defaults: the typed configs' defaults are the paper's values, and base.yaml (which
    documents every key) restates them; a value that differs in one place only fails here."""
    from components.common.config import LayeredDict, build, flatten, read_yaml, to_dict
    from components.schema import CONFIG_DIR, PipelineConfig

    layered = LayeredDict()
    layered.merge(read_yaml(CONFIG_DIR / "base.yaml"), "configs/base.yaml")
    from_yaml, from_code = flatten(to_dict(build(PipelineConfig, layered))), flatten(to_dict(PipelineConfig()))
    assert {key: (from_code.get(key), value) for key, value in from_yaml.items() if from_code.get(key) != value} == {}
