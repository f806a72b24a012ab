"""Model-written video captions: the windows and answer cleaning, the config's and the loader's errors, a
transformers image-text-to-text folder (a tiny random LLaVA, tests/vlm_exports.py) captioning, and the step on
Ray Data between video_samples and write_shards: the uncaptioned real clip gets model segments, a caption
and a grounding sample marked `caption_source: model:...`, the human caption stays, a broken file is
dropped with its reason, and the shard json carries `caption_source`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.common.executor import run_into
from components.data.config import (ShardsConfig, VideoCaptionsConfig, VideoCaptionsJob, VideoConfig,
                                    VideoSourceConfig)
from components.data.lib.captioner import check_model_folder, clean_answer, load_captioner
from components.data.lib.table import data_dir, read_stats
from components.data.video_captions import (PENDING_SCHEMA, assemble, captioner_preflight, dense_caption,
                                            unique_segments, video_captions, windows)
from vlm_exports import TINY_LLAVA_WORDS as WORDS
from vlm_exports import make_tiny_llava


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


def test_windows_cover_the_clip_with_thinned_frames() -> None:
    stamps = [0.5 + i for i in range(10)]  # 1 fps over 10 s
    spans = windows(stamps, 4.0, 3)
    assert [(s, e) for s, e, _ in spans] == [(0.0, 4.0), (4.0, 8.0), (8.0, 10.0)]
    assert [f for _, _, f in spans] == [[0, 2, 3], [4, 6, 7], [8, 9]]
    assert windows([], 4.0, 3) == [] and windows([2.0], 4.0, 8) == [(0.0, 4.0, [0])]


@pytest.mark.parametrize(("answer", "expected"), [
    ("", None), ("   ", None), ("a 1 ,", None), ("pancake", None),
    ("<think>looks at it</think> someone flips a pancake", "someone flips a pancake"),
    ("<|vision_start|>the pan\n is  hot<|im_end|>", "the pan is hot"), ("\n\n\n\n", None),
    ("a\x10pan\ufffd is\rhot", "a pan is hot"),
])
def test_answers_are_cleaned_or_refused(answer: str, expected: str | None) -> None:
    assert clean_answer(answer, 2) == expected


def test_segments_make_the_dense_caption_and_unique_grounding_queries() -> None:
    segments = [{"start_s": 0.0, "end_s": 4.0, "text": "a pan heats."}, {"start_s": 4.0, "end_s": 8.0, "text": "a flip"},
                {"start_s": 8.0, "end_s": 10.5, "text": "A pan heats."}]
    assert dense_caption(segments[:2]) == "From 0.0 to 4.0 seconds, a pan heats. From 4.0 to 8.0 seconds, a flip."
    assert unique_segments(segments) == [segments[1]]


def test_config_errors_name_the_key_and_the_fix() -> None:
    from components.common.config import ConfigError
    from components.schema import load_config

    with pytest.raises((ConfigError, ValueError), match="data.video_captions.model is empty"):
        load_config("tiny", overrides=["data.video_captions.enabled=true"])
    with pytest.raises((ConfigError, ValueError), match="models:/<name>@<alias>"):
        VideoCaptionsConfig(enabled=True, model="models:/seedvl")
    with pytest.raises(ValueError, match="window_s > 0"):
        VideoCaptionsConfig(window_s=0)
    config, _ = load_config("tiny", overrides=["data.video_captions.enabled=true",
                                               "data.video_captions.model=models:/seedvl@latest-pipeline"])
    assert config.data.video_captions.registry_uri == config.tracking_uri  # the pipeline's own registry
    assert not load_config("tiny")[0].data.video_captions.enabled  # off by default


def test_a_folder_that_is_not_a_model_is_refused_before_anything_runs(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="is not a model folder.*AutoProcessor"):
        check_model_folder(tmp_path)
    job = VideoCaptionsJob(VideoCaptionsConfig(enabled=True, model=str(tmp_path)), VideoConfig())
    assert "data.video_captions.model" in captioner_preflight(job)
    missing = VideoCaptionsJob(VideoCaptionsConfig(enabled=True, model="models:/seedvl@latest-pipeline",
                                                   registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), VideoConfig())
    assert "not in the model registry" in captioner_preflight(missing)


def test_a_transformers_folder_captions_windows_in_one_batch(tiny_llava: Path) -> None:
    from PIL import Image

    def jpeg(shade: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (56, 42), (shade, 90, 30)).save(buffer, format="JPEG")
        return buffer.getvalue()

    assert check_model_folder(tiny_llava) == "transformers"
    requests = [([jpeg(10), jpeg(200)], [0.5, 1.5]), ([jpeg(90)], [4.5])]
    greedy = load_captioner(tiny_llava, VideoCaptionsConfig(prompt="describe", max_new_tokens=6))
    answers = greedy.caption(requests, [1, 2])
    assert len(answers) == 2 and all(set(a.split()) <= set(WORDS) and a.split() for a in answers)
    sampled = load_captioner(tiny_llava, VideoCaptionsConfig(prompt="describe", max_new_tokens=6, temperature=1.0))
    assert sampled.caption(requests, [7, 8]) == sampled.caption(requests, [7, 8])  # seeded


def pending(key: str, segments: list[dict], human: str = "", drop: str | None = None) -> dict:
    sampling = {task: {"annotations": {"timestamps": [0.5, 1.5], "sample_fps": 1.0}, "width": 56, "height": 28}
                for task in ("caption", "grounding")}
    return {"key": key, "source": "decord", "meta": json.dumps({"file": f"/v/{key}.mkv"}), "human_caption": human,
            "caption_images": [b"a", b"b"], "grounding_images": [b"a", b"b"], "sampling": json.dumps(sampling),
            "drop_reason": drop, "segments": json.dumps(segments), "answers": [], "unparseable": 0, "windows": 1, "caption_s": 0.1}


def test_failed_captions_drop_the_file_or_keep_its_human_caption() -> None:
    segment = [{"start_s": 0.0, "end_s": 2.0, "text": "someone flips a pancake"}]
    batch = pa.Table.from_pylist([pending("ok", segment), pending("empty", []), pending("human", [], human="a cook"),
                                  pending("broken", [], drop="video_unreadable")], schema=PENDING_SCHEMA)
    rows = {r["key"]: r for r in assemble(batch, "models:/seedvl/3", VideoConfig()).to_pylist()}
    assert set(rows) == {"ok-caption", "ok-grounding", "empty", "human", "broken"}
    assert rows["ok-caption"]["caption_source"] == rows["ok-grounding"]["caption_source"] == "model:models:/seedvl/3"
    assert json.loads(rows["ok-grounding"]["annotations"])["temporal_grounding"] == [
        {"query": "someone flips a pancake", "start_s": 0.0, "end_s": 2.0}]
    assert "From 0.0 to 2.0 seconds." in rows["ok-grounding"]["conversations"]
    assert rows["empty"]["drop_reason"] == "caption_empty" and rows["broken"]["drop_reason"] == "video_unreadable"
    assert rows["human"]["drop_reason"] is None and rows["human"]["caption"] == "a cook"
    assert rows["human"]["caption_source"] == "human"


def test_the_step_captions_the_uncaptioned_clip_and_the_shards_say_so(tmp_path: Path, real_data: Path,
                                                                      tiny_llava: Path, local_ray: None) -> None:
    from components.data.video_samples import video_samples
    from components.data.write_shards import list_shards, write_shards
    from sample_tables import caption_table

    video = VideoConfig(synthetic_clips=1, min_duration_s=8, max_duration_s=8, clip_fps=[2.0], sources=[
        VideoSourceConfig(str(real_data / "pancake.mkv"), name="nocaption"),
        VideoSourceConfig(str(real_data / "pancake.mkv"), name="human", caption="someone flips a pancake in a pan"),
    ])
    run_into(video_samples, video, {}, tmp_path / "video", seed=0)
    job = VideoCaptionsJob(VideoCaptionsConfig(enabled=True, model=str(tiny_llava), max_new_tokens=6, min_words=1),
                           video)
    result, _ = run_into(video_captions, job, {"samples": tmp_path / "video" / "samples"}, tmp_path / "captions", seed=0)
    table = tmp_path / "captions" / "samples"
    rows = {r["key"]: r for f in sorted(data_dir(table).glob("*.parquet")) for r in pq.read_table(f).to_pylist()}
    caption, grounding = rows["nocaption-pancake_mkv-caption"], rows["nocaption-pancake_mkv-grounding"]
    source = f"model:{tiny_llava.resolve()}"
    assert caption["drop_reason"] is None and caption["caption_source"] == source
    notes = json.loads(caption["annotations"])
    # 16 frames at the middles of 16 slices of the 310-frame, 30 fps clip: the last window ends at ~10.33 s
    assert [(s["start_s"], s["end_s"]) for s in notes["segments"]] == [(0.0, 4.0), (4.0, 8.0), (8.0, pytest.approx(10.33, abs=0.05))]
    assert caption["caption"].startswith("From 0.0 to 4.0 seconds, ") and len(caption["images"]) == 16
    assert grounding["caption_source"] == source and len(grounding["images"]) > len(caption["images"])  # 2 fps
    assert rows["human-pancake_mkv"]["caption"] == "someone flips a pancake in a pan"
    assert rows["human-pancake_mkv"]["caption_source"] == "human"
    assert {r["caption_source"] for k, r in rows.items() if k.startswith("synthvideo")} == {"synthetic"}
    assert result.metrics["videos_in"] == 1 and result.metrics["windows"] == 3 and result.metrics["windows_per_s"] > 0
    stats = read_stats(table)
    assert stats["in"] == len(rows) == 3 + 2 + 1 and stats["kept"] == 6
    assert json.loads((table / "captions.json").read_text())["videos"][0]["segments"] == notes["segments"]

    captions = caption_table(tmp_path / "curated", ["a red circle on grey", "two blue squares"])
    run_into(write_shards, ShardsConfig(samples_per_shard=100),
             {"samples": captions, "video": table}, tmp_path / "shards", seed=0)
    members = {}
    for shard in list_shards(tmp_path / "shards" / "shards", "video"):
        with tarfile.open(shard) as tar:
            members |= {m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")}
    assert members["nocaption-pancake_mkv-caption.json"]["caption_source"] == source
    assert members["human-pancake_mkv.json"]["caption_source"] == "human"
