"""A captioning model in the loop, end to end: a second pipeline run (the shared run's data steps copied in, the
real clip ../shared/data/real/pancake.mkv added as a video source without a caption) captions the clip with
the shared run's registered model (`models:/seedvl@latest-pipeline` in the shared run's registry), and the
clip reaches the video shards as a caption and a grounding sample whose json says a model wrote them."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from pipeline_runs import DATA_STEPS, PipelineRun, copy_cached_steps, last_summary, pipeline

pytestmark = pytest.mark.e2e


def test_the_shared_runs_model_captions_the_real_clip_into_the_shards(tiny_run: PipelineRun, tmp_path: Path,
                                                                      real_data: Path) -> None:
    from mlflow.tracking import MlflowClient

    from components.data.write_shards import list_shards

    root = tmp_path / "runs"
    copy_cached_steps(tiny_run.root, root, DATA_STEPS)
    registry = f"sqlite:///{tiny_run.root / 'mlflow.db'}"
    # The shared run trains each stage a handful of steps: greedy decoding can repeat one token (a newline)
    # forever, which is refused as unparseable. Seeded sampling writes words (poor ones): the path is the point.
    pipeline(root, "--until", "write_shards", "--set", "serve.keep_alive=false",
             "--set", f"data.video.sources=[{{path: {real_data / 'pancake.mkv'}, name: real}}]",
             "--set", "data.video_captions.enabled=true",
             "--set", "data.video_captions.model=models:/seedvl@latest-pipeline",
             "--set", f"data.video_captions.registry_uri={registry}",
             "--set", "data.video_captions.temperature=1.0", timeout=600)
    steps = last_summary(root)
    ran = {name for name, step in steps.items() if step["status"] == "ran"}
    assert ran == {"video_samples", "video_captions", "write_shards"}  # the rest from the shared run's cache

    version = MlflowClient(tracking_uri=registry).get_model_version_by_alias("seedvl", "latest-pipeline").version
    source = f"model:models:/seedvl/{version}"
    captions = steps["video_captions"]["metrics"]
    assert captions["videos_in"] == 1 and captions["windows"] == 3 and captions["segments"] >= 1
    assert captions["windows_per_s"] > 0

    members: dict[str, dict] = {}
    for shard in list_shards(Path(steps["write_shards"]["output_dir"]) / "shards", "video"):
        with tarfile.open(shard) as tar:
            members |= {m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")}
    caption = members["real-pancake_mkv-caption.json"]
    assert caption["caption_source"] == source and caption["source"] == "real"
    segments = caption["annotations"]["segments"]
    assert segments and all(0 <= s["start_s"] < s["end_s"] <= 10.4 for s in segments)
    assert caption["caption"].startswith(f"From {segments[0]['start_s']:.1f} to ")
    grounding = members.get("real-pancake_mkv-grounding.json")
    if grounding is not None:  # written when some segment's text is unique
        assert grounding["caption_source"] == source
        spans = grounding["annotations"]["temporal_grounding"]
        assert {(s["start_s"], s["end_s"]) for s in spans} <= {(s["start_s"], s["end_s"]) for s in segments}
    assert {m["caption_source"] for name, m in members.items() if name.startswith("synthvideo")} == {"synthetic"}
