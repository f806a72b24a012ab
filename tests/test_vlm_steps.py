"""The VLM steps' contracts, without running them: each training stage's config is the view of
`train.vlm` it uses, so its cache key moves with its own settings and never with the evaluation's or
another stage's; an evaluation's key moves with the evaluation settings; a failing evaluation raises
(so the runner neither publishes nor caches it); the pipeline's preflight names a missing file's key."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.common.executor import run_into
from components.common.cache import ArtifactCache
from components.schema import load_config
from components.vlm.config import VlmStageJob
from components.vlm.evaluate import vlm_eval_stage1
from components.vlm.stages import llm_pretrain, vlm_stage0, vlm_stage1, vlm_stage2

TRAINING = (llm_pretrain, vlm_stage0, vlm_stage1, vlm_stage2)


def keys(*overrides: str) -> dict[str, str]:
    config, _ = load_config("tiny", [], list(overrides))
    components = (*TRAINING, vlm_eval_stage1)
    return {c.name: c.cache_key(c.config_of(config), {"shards": "s", "vit": "v"}, 0) for c in components}


def test_each_stage_keys_only_what_it_uses() -> None:
    base = keys()
    changed_eval = keys("train.vlm.eval.max_new_tokens=5", "train.vlm.eval.max_items_per_kind=3")
    assert {name: changed_eval[name] == base[name] for name in base} == {
        "llm_pretrain": True, "vlm_stage0": True, "vlm_stage1": True, "vlm_stage2": True, "vlm_eval_stage1": False}
    changed_stage2 = keys("train.vlm.stage2.learning_rate=0.5")
    assert [changed_stage2[c.name] == base[c.name] for c in TRAINING] == [True, True, True, False]
    changed_prompt = keys("train.vlm.system_prompt=Look.")  # the LLM's text pretraining never sees it
    assert [changed_prompt[c.name] == base[c.name] for c in TRAINING] == [True, False, False, False]
    run_only = keys("train.vlm.fail_at_step=3", "train.vlm.checkpoint_every=7", "train.vlm.resources.num_cpus=2")
    assert run_only == base
    # stage 1's frame count reaches its evaluation (answers see what training saw)
    assert keys("train.vlm.stage1.frames_per_clip=3")["vlm_eval_stage1"] != base["vlm_eval_stage1"]


def test_a_stage_gets_its_own_typed_slice() -> None:
    config, _ = load_config("tiny", [], ["train.vlm.stage1.steps=9"])
    job = vlm_stage1.config_of(config)
    assert isinstance(job, VlmStageJob) and job.name == "stage1" and job.stage.steps == 9
    assert job.job.num_workers == config.train.vlm.num_workers and not hasattr(job, "eval")


def test_a_failing_evaluation_fails_its_step_and_publishes_nothing(tmp_path: Path) -> None:
    config, _ = load_config("tiny")
    vlm = tmp_path / "vlm_stage1" / "vlm"
    (vlm / "model").mkdir(parents=True)  # an export without its files
    cache = ArtifactCache(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="not an exported VLM"):
        with cache.staging("vlm_eval_stage1", "k") as staged:
            run_into(vlm_eval_stage1, vlm_eval_stage1.config_of(config), {"shards": tmp_path, "vlm": vlm}, staged, 0,
                     lambda metrics, step: None)
    assert cache.lookup("vlm_eval_stage1", "k") is None


def test_preflight_names_the_key_of_a_missing_file(tmp_path: Path) -> None:
    from pipelines.full import STEPS
    from pipelines.runner import PipelineConfigError, PipelineRunner, Selection
    from components.common.tracking import NullTracker

    config, layered = load_config("tiny", [], [f"train.vlm.llm.pretrained_path={tmp_path / 'absent'}",
                                               f"run.root={tmp_path / 'runs'}"])
    runner = PipelineRunner(STEPS, config, layered, Selection(), NullTracker())
    with pytest.raises(PipelineConfigError, match="'train.vlm.llm.pretrained_path' = .*absent.* has no config.json"):
        runner.run()
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written
    assert runner.preflight() and not PipelineRunner(STEPS, config, layered, Selection(until="write_shards"),
                                                     NullTracker()).preflight()


def test_a_stage_image_size_cap_reaches_the_vit_and_is_checked() -> None:
    from components.vit.config import SeedViTConfig
    from components.vit.model import SeedViT
    from components.vlm.config import StageConfig
    from components.vlm.train_loop import at_resolution

    vit = SeedViT(SeedViTConfig(width=32, depth=1, num_heads=2, min_pixels=3136, max_pixels=12544))
    assert at_resolution(vit, 0).max_pixels == 12544  # 0 keeps the ViT's own (a later stage keeps its export's)
    assert at_resolution(vit, 50176) is vit.config and vit.config.max_pixels == 50176
    assert vit.config.min_pixels == 3136
    with pytest.raises(ValueError, match="max_pixels"):
        StageConfig(max_pixels=100)
    assert keys("train.vlm.stage1.max_pixels=25088")["vlm_stage1"] != keys()["vlm_stage1"]
    assert keys("train.vlm.adapter_output_norm=false")["vlm_stage0"] != keys()["vlm_stage0"]
    changed = keys("train.vlm.adapter_position_buckets=4")
    assert changed["vlm_stage0"] != keys()["vlm_stage0"] and changed["llm_pretrain"] == keys()["llm_pretrain"]
    from components.vlm.config import VlmConfig

    with pytest.raises(ValueError, match="adapter_position_buckets"):
        VlmConfig(adapter_position_buckets=-1)
    assert keys("train.vlm.adapter_position_frequencies=3")["vlm_stage0"] != keys()["vlm_stage0"]
    with pytest.raises(ValueError, match="adapter_position_frequencies"):
        VlmConfig(adapter_position_frequencies=-1)
    assert keys("train.vlm.adapter_position_scale=0.25")["vlm_stage0"] != keys()["vlm_stage0"]
    with pytest.raises(ValueError, match="adapter_position_scale"):
        VlmConfig(adapter_position_scale=0.0)
