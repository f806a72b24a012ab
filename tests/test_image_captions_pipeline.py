"""Model-written image captions end to end: a second pipeline run (the shared run's data steps copied in)
turns `image_captions` on with the shared run's registered model (`models:/seedvl@latest-pipeline` in its
registry), and the crawl's images with an empty or non-UTF-8 caption reach the caption shards with the
model's caption and `caption_source: model:models:/seedvl/<version>`, every other image as `human`."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from pipeline_runs import DATA_STEPS, PipelineRun, copy_cached_steps, last_summary, pipeline

pytestmark = pytest.mark.e2e


def test_the_shared_runs_model_captions_uncaptioned_images_into_the_shards(tiny_run: PipelineRun,
                                                                           tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from components.data.write_shards import list_shards

    root = tmp_path / "runs"
    copy_cached_steps(tiny_run.root, root, DATA_STEPS)
    registry = f"sqlite:///{tiny_run.root / 'mlflow.db'}"
    # The shared run's model is trained a handful of steps: greedy decoding can repeat one token, which is
    # refused; seeded sampling writes words (poor ones): the path is the point. The CLIP filter is off, as it
    # would rightly drop such captions.
    pipeline(root, "--until", "write_shards", "--set", "serve.keep_alive=false",
             "--set", "data.clip_filter.enabled=false",
             "--set", "data.image_captions.enabled=true",
             "--set", "data.image_captions.model=models:/seedvl@latest-pipeline",
             "--set", f"data.image_captions.registry_uri={registry}",
             "--set", "data.image_captions.temperature=1.0", "--set", "data.image_captions.max_new_tokens=16",
             timeout=600)
    steps = last_summary(root)
    ran = {name for name, step in steps.items() if step["status"] == "ran"}
    assert ran == {"image_captions", "basic_filters", "dedup", "rebalance", "write_shards"}  # the rest cached

    version = MlflowClient(tracking_uri=registry).get_model_version_by_alias("seedvl", "latest-pipeline").version
    source = f"model:models:/seedvl/{version}"
    metrics = steps["image_captions"]["metrics"]
    assert metrics["images_in"] >= 1 and metrics["captioned"] >= 1
    assert metrics["images_asked"] == metrics["captioned"] + metrics["human_kept"] + metrics["caption_empty"]
    assert metrics["rows_in"] == metrics["rows_kept"] + sum(v for k, v in metrics.items() if k.startswith("dropped."))

    members: dict[str, dict] = {}
    for shard in list_shards(Path(steps["write_shards"]["output_dir"]) / "shards", "caption"):
        with tarfile.open(shard) as tar:
            members |= {m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")}
    by_model = [m for m in members.values() if m.get("caption_source") == source]
    assert by_model and all(m["caption"].strip() for m in by_model)
    assert {m["meta"]["synthetic"]["noise"] for m in by_model} <= {"empty_caption", "non_utf8_caption"}
    assert {m.get("caption_source") for m in members.values()} == {source, "human"}
