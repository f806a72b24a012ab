"""The video step on Ray Data: synthetic clips and the real files, sampled, labelled, and sharded."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from sample_tables import caption_table

from components.common.executor import run_into
from components.data.config import ShardsConfig, VideoConfig, VideoSourceConfig
from components.data.write_shards import list_shards, write_shards
from components.data.lib.table import data_dir, read_columns, read_stats
from components.data.video_samples import video_samples


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory, real_data: Path, local_ray: None) -> Path:
    staged = tmp_path_factory.mktemp("video")
    cfg = VideoConfig(synthetic_clips=2, min_duration_s=8, max_duration_s=12, clip_fps=[5.0], sources=[
        VideoSourceConfig(str(real_data / "pancake.mkv"), name="decord", caption="someone flips a pancake in a pan"),
        VideoSourceConfig(str(real_data / "corrupted.mp4"), name="decord"),
    ])
    run_into(video_samples, cfg, {}, staged, seed=0)
    return staged


def _rows(videos: Path) -> dict[str, dict]:
    files = sorted(data_dir(videos / "samples").glob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return {r["key"]: r for r in rows}


def test_real_files_sampled_or_dropped_with_reason(videos: Path) -> None:
    rows = _rows(videos)
    pancake = rows["decord-pancake_mkv"]
    assert pancake["drop_reason"] is None
    notes = json.loads(pancake["annotations"])
    # 310 frames at ~29.97 fps is ~10.3 s: 1 fps gives 10 < 16 frames, so 16 frames at 640 tokens each
    assert len(pancake["images"]) == len(notes["timestamps"]) == 16 and notes["tokens_per_frame"] == 640
    assert notes["frame_indices"] == [int((i + 0.5) * 310 / 16) for i in range(16)]
    assert pancake["width"] % 28 == 0 and pancake["height"] % 28 == 0
    with Image.open(io.BytesIO(pancake["images"][0])) as frame:
        assert frame.size == (pancake["width"], pancake["height"])
    assert notes["frame_prefixes"][0] == "[0.3 second]" and notes["timestamps"][-1] < 10.4
    corrupt = rows["decord-corrupted_mp4"]
    assert corrupt["drop_reason"].startswith("video_") and corrupt["images"] == []
    stats = read_stats(videos / "samples")
    assert stats["in"] == 2 * 3 + 2 and stats["kept"] == 7 and stats["dropped"] == {corrupt["drop_reason"]: 1}


def test_synthetic_clips_give_caption_qa_and_grounding(videos: Path) -> None:
    rows = _rows(videos)
    clip = [r for k, r in rows.items() if k.startswith("synthvideo-000000")]
    assert sorted(r["key"].rsplit("-", 1)[1] for r in clip) == ["caption", "grounding", "qa"]
    assert (videos / "clips" / "synthvideo-000000.avi").is_file()
    grounding = next(r for r in clip if r["key"].endswith("grounding"))
    notes = json.loads(grounding["annotations"])
    talk = json.loads(grounding["conversations"])
    assert talk[0]["from"] == "human" and talk[0]["value"].startswith("<video>\n")
    assert len(talk) == 2 * len(notes["temporal_grounding"])
    first = notes["temporal_grounding"][0]
    assert talk[1]["value"] == f"From {first['start_s']:.1f} to {first['end_s']:.1f} seconds."
    assert len(grounding["images"]) == len(notes["timestamps"]) >= 16


def test_each_video_task_is_sampled_at_its_own_frame_rate(videos: Path) -> None:
    """Dynamic frame rate: captions and QA at 1 fps, temporal grounding at VideoConfig's 2 fps; each plan is
    the paper's rule at that rate for this clip, within the per-video token budget."""
    from components.common.video import plan_sampling

    cfg = VideoConfig()
    assert (cfg.fps_for("caption"), cfg.fps_for("qa"), cfg.fps_for("grounding")) == (1.0, 1.0, 2.0)
    rows = _rows(videos)
    for index in range(2):
        clip = {r["key"].rsplit("-", 1)[1]: r for k, r in rows.items() if k.startswith(f"synthvideo-{index:06d}")}
        meta = json.loads(clip["caption"]["meta"])
        for task, row in clip.items():
            notes = json.loads(row["annotations"])
            fps = cfg.fps_for(task)
            plan = plan_sampling(meta["num_frames"] / meta["fps"], meta["fps"], meta["num_frames"], fps,
                                 cfg.min_frames, tuple(cfg.budgets), cfg.max_tokens)
            assert notes["sample_fps"] == fps and tuple(notes["frame_indices"]) == plan.frame_indices
            assert len(row["images"]) * notes["tokens_per_frame"] <= cfg.max_tokens
        caption, grounding = (json.loads(clip[t]["annotations"]) for t in ("caption", "grounding"))
        assert len(grounding["frame_indices"]) >= len(caption["frame_indices"])
    durations = [json.loads(r["meta"])["duration_s"] for k, r in rows.items() if k.endswith("-grounding")]
    longest = max(durations)
    if longest * 2 >= cfg.min_frames + 1:  # long enough that 2 fps gives more than min_frames
        g = next(json.loads(r["annotations"]) for k, r in rows.items()
                 if k.endswith("-grounding") and json.loads(r["meta"])["duration_s"] == longest)
        assert len(g["frame_indices"]) > cfg.min_frames


def test_task_fps_is_checked() -> None:
    with pytest.raises(ValueError, match="task_fps.grounding"):
        VideoConfig(task_fps={"grounding": 6.0})
    with pytest.raises(ValueError, match="unknown video tasks"):
        VideoConfig(task_fps={"tracking": 2.0})


def test_video_shards_hold_frames_in_order(videos: Path, tmp_path: Path) -> None:
    captions = caption_table(tmp_path / "captions", ["a red circle on white"] * 3)
    run_into(write_shards, ShardsConfig(samples_per_shard=4), {"samples": captions, "video": videos / "samples"},
             tmp_path / "out", seed=0)
    job = json.loads((tmp_path / "out" / "shards" / "stats.json").read_text())
    assert job["tasks"]["video"]["written"] == 7 and job["tasks"]["caption"]["written"] == 3
    assert job["in"] == job["kept"] + sum(job["dropped"].values()) == 8 + 4
    shards = list_shards(tmp_path / "out" / "shards", "video")
    assert len(shards) == 2
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    key = names[0].split(".")[0]
    frames = [n for n in names if n.startswith(key + ".frame")]
    assert frames == sorted(frames) and frames[0] == f"{key}.frame0000.jpg"
    keys = read_columns(data_dir(videos / "samples"), ["key"]).column(0).to_pylist()
    assert key in keys


def test_sources_whose_files_share_a_key_fail_before_work(tmp_path: Path) -> None:
    from components.data.video_samples import check_unique_keys, video_fingerprint

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "clip.mp4").write_bytes(b"x")
    same = VideoConfig(sources=[VideoSourceConfig(str(tmp_path / "a"), name="s"),
                                VideoSourceConfig(str(tmp_path / "b"), name="s")])
    with pytest.raises(ValueError, match="both map to sample key 's-clip_mp4'"):
        check_unique_keys(same)
    captioned = VideoConfig(sources=[VideoSourceConfig(str(tmp_path / "a"), name="s", caption="a dog")])
    from components.data.video_samples import video_samples as step

    other = VideoConfig(sources=[VideoSourceConfig(str(tmp_path / "a"), name="s", caption="a cat")])
    assert step.cache_key(captioned, {}) != step.cache_key(other, {})  # captions are in the key, paths are not
    (tmp_path / "a" / "clip.txt").write_text("a bird")
    assert len(video_fingerprint(captioned)["files"]) == 2  # the sidecar caption is fingerprinted


def test_bad_video_config_fails_at_load() -> None:
    with pytest.raises(ValueError, match="min_frames"):
        VideoConfig(min_frames=0)
    with pytest.raises(ValueError, match="budgets"):
        VideoConfig(budgets=[0])
