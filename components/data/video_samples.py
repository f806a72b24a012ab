"""Video step: synthetic clips with exact labels and real video files, sampled with the paper's dynamic
frame-resolution rule into task-`video` samples (frames + timestamps + caption / QA / temporal grounding).

Synthetic clips (`video_synthesis.render_clip`) are written as Motion-JPEG AVI into the `clips` output
and read back through the same decord path as real files, so both are sampled identically. Each clip
gives three samples: a caption, a multi-turn QA, and temporal grounding ("When does X happen?" ->
"From 4.0 to 7.0 seconds."), each sampled at its task's frame rate (`data.video.task_fps`: the
paper's dynamic frame rate, 1 fps by default and faster for temporal grounding), all rates of a clip
in one decode and each within the per-video token budget. A real file gives one caption sample; its caption comes from the source
config or a `.txt` beside the file. Files that cannot be decoded are kept in the table with their
reason (`video_unreadable`, `video_decode_failed`, ...), as are files without a caption
(`caption_missing`), so counts add up and nothing crashes the job.
"""

from __future__ import annotations

import importlib
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from components.common.contract import StageContext, StageResult, component, file_stats
from components.data.synthesis.avi_writer import write_bytes_atomic
from components.data.config import VIDEO_TASKS, VideoConfig, VideoSourceConfig
from components.data.lib.table import data_dir, drop_metrics, plot_counts, write_stats
from components.data.lib.tasks import encode_image, rows_to_task_table, task_row
from components.common.video import SampledVideo, VideoDecodeError, sample_video_rates, timestamp_prefix
from components.data.synthesis.video import render_clip

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm")
DESCRIBE = "Describe what happens in the video, with times."


def source_files(source: VideoSourceConfig) -> list[Path]:
    path = Path(source.path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"data.video.sources: {path} does not exist")


def video_fingerprint(cfg: VideoConfig) -> dict[str, Any]:
    """Real files and their `.txt` captions enter the cache key by name, size and mtime (the source's
    `path` is left out of the key: these stand in for it; its `name` and `caption` stay in)."""
    files = [f for source in cfg.sources for v in source_files(source) for f in (v, v.with_suffix(".txt"))
             if f.is_file()]
    return {"files": file_stats(files)}


def file_key(source: VideoSourceConfig, path: Path) -> str:
    return f"{safe_key(source.name or Path(source.path).stem)}-{safe_key(path.name)}"


def check_unique_keys(cfg: VideoConfig) -> None:
    """Two files that would get one key (same source name and file name) fail the step before any work."""
    seen: dict[str, Path] = {}
    for source in cfg.sources:
        for path in source_files(source):
            key = file_key(source, path)
            if key in seen:
                raise ValueError(f"data.video.sources: {seen[key]} and {path} both map to sample key {key!r}; "
                                 "give the sources different `name`s")
            seen[key] = path


def safe_key(text: str) -> str:
    """Keys hold no dots (WebDataset splits member names at the first one)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "video"


def sample(path: Path, cfg: VideoConfig, tasks: tuple[str, ...] = VIDEO_TASKS) -> dict[str, SampledVideo]:
    """Sample one video at each task's frame rate ({task: SampledVideo}), in a child process: ffmpeg can
    abort or hang on a broken file, and then only the child goes down (`video_decoder_crashed` /
    `video_decode_timeout`), never the Ray worker."""
    import multiprocessing

    rates = tuple(dict.fromkeys(cfg.fps_for(task) for task in tasks))
    context = multiprocessing.get_context("forkserver")
    receiver, sender = context.Pipe(duplex=False)
    args = (sender, str(path), rates, cfg.min_frames, tuple(cfg.budgets), cfg.max_tokens, cfg.decode_timeout_s)
    # by its importable name: under `python -m components.data.video_samples` this module is __main__, which the
    # forkserver child cannot look functions up in
    target = importlib.import_module("components.data.video_samples")._sample_into
    child = context.Process(target=target, args=args, daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(cfg.decode_timeout_s + 30):
            raise VideoDecodeError("video_decode_timeout", f"{path}: no result after {cfg.decode_timeout_s:g} s")
        status, *payload = receiver.recv()
    except EOFError:
        child.join(5)
        raise VideoDecodeError("video_decoder_crashed", f"{path}: decoder exited with {child.exitcode}") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
        receiver.close()
    if status == "error":
        raise VideoDecodeError(*payload)
    by_rate = payload[0]
    return {task: by_rate[cfg.fps_for(task)] for task in tasks}


def _sample_into(sender: Any, path: str, rates: tuple[float, ...], min_frames: int, budgets: tuple[int, ...],
                 max_tokens: int, timeout_s: float) -> None:
    try:
        sender.send(("ok", sample_video_rates(path, rates, min_frames, budgets, max_tokens, timeout_s)))
    except VideoDecodeError as error:
        sender.send(("error", error.reason, str(error).removeprefix(f"{error.reason}: ")))
    except Exception as error:  # anything else is still this file's failure, named as such
        sender.send(("error", "video_sample_failed", f"{path}: {error!r}"))
    finally:
        sender.close()


def frame_fields(sampled: SampledVideo, cfg: VideoConfig) -> dict[str, Any]:
    frames = [encode_image(Image.fromarray(np.asarray(f)), "jpg", cfg.frame_quality) for f in sampled.frames]
    width, height = sampled.size
    return {"images": frames, "image_ext": "jpg", "width": width, "height": height}


def sampling_annotations(sampled: SampledVideo, fps: float) -> dict[str, Any]:
    return {"sample_fps": fps, "timestamps": list(sampled.timestamps), "frame_indices": list(sampled.frame_indices),
            "tokens_per_frame": sampled.tokens_per_frame,
            "frame_prefixes": [timestamp_prefix(t) for t in sampled.timestamps]}


def clip_rows(index: int, cfg: VideoConfig, seed: int, clips_dir: Path) -> list[dict[str, Any]]:
    """Render one synthetic clip, write it, sample it back, and make its caption, QA and grounding rows."""
    rng = random.Random(f"{seed}-video-{index}")
    clip = render_clip(rng, rng.uniform(cfg.min_duration_s, cfg.max_duration_s), rng.choice(cfg.clip_fps),
                       cfg.clip_width, cfg.clip_height, cfg.max_objects)
    key = f"synthvideo-{index:06d}"
    path = clips_dir / f"{key}.avi"
    write_bytes_atomic(path, clip.video)
    sampled = sample(path, cfg)
    meta = {"generator": "video_synthesis", "seed": seed, "index": index, "clip": path.name, "fps": clip.fps,
            "num_frames": clip.num_frames, "duration_s": clip.duration_s}
    events = {"events": [event_dict(e) for e in clip.events]}
    fields: dict[float, dict[str, Any]] = {}  # frames encoded once per rate, shared by the tasks at that rate
    for task in VIDEO_TASKS:
        if cfg.fps_for(task) not in fields:
            fields[cfg.fps_for(task)] = frame_fields(sampled[task], cfg)

    def row(task: str, turns: list[tuple[str, str]], labels: dict[str, Any]) -> dict[str, Any]:
        truth = sampling_annotations(sampled[task], cfg.fps_for(task)) | events | labels
        return task_row(key=f"{key}-{task}", task="video", turns=turns, annotations=truth, meta=meta,
                        source="synthetic_video", caption=clip.caption, **fields[cfg.fps_for(task)])

    return [
        row("caption", [(DESCRIBE, clip.caption)], {}),
        row("qa", [(q["question"], q["answer"]) for q in clip.qa], {"qa": clip.qa}),
        row("grounding", grounding_turns(clip.temporal_grounding), {"temporal_grounding": clip.temporal_grounding}),
    ]


def event_dict(event: Any) -> dict[str, Any]:
    return {"kind": event.kind, "subject": event.subject, "detail": event.detail, "start_s": event.start_s,
            "end_s": event.end_s}


def grounding_turns(spans: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Temporal-grounding turns from spans {"query", "start_s", "end_s"} (a synthetic clip's exact events, or
    model-written caption segments in video_captions)."""
    return [(f"When does this happen: {g['query']}? Answer with the start and end second.",
             f"From {g['start_s']:.1f} to {g['end_s']:.1f} seconds.") for g in spans]


def file_rows(path: Path, source: VideoSourceConfig, cfg: VideoConfig) -> list[dict[str, Any]]:
    """One caption sample for a real file, or a dropped row with the reason it cannot be used."""
    key = file_key(source, path)
    sidecar = path.with_suffix(".txt")
    caption = source.caption or (sidecar.read_text().strip() if sidecar.is_file() else "")
    meta: dict[str, Any] = {"file": str(path)}
    empty = {"images": [], "image_ext": "jpg", "width": 0, "height": 0, "source": source.name or "video",
             "caption": caption, "turns": [], "annotations": {}}
    try:
        sampled = sample(path, cfg, ("caption",))["caption"]
    except VideoDecodeError as error:
        return [task_row(key=key, task="video", meta=meta | {"error": str(error)}, drop_reason=error.reason, **empty)]
    if not caption:
        return [task_row(key=key, task="video", meta=meta, drop_reason="caption_missing", **empty)]
    return [task_row(key=key, task="video", source=source.name or "video", caption=caption,
                     turns=[(DESCRIBE, caption)], annotations=sampling_annotations(sampled, cfg.fps_for("caption")),
                     meta=meta,
                     **frame_fields(sampled, cfg))]


def make_rows(batch: pa.Table, cfg: VideoConfig, seed: int, clips_dir: str) -> pa.Table:
    """Ray Data UDF: one work item (a clip index or a file) in, its sample rows out."""
    rows: list[dict[str, Any]] = []
    for item in batch.column("item").to_pylist():
        spec = json.loads(item)
        if spec["kind"] == "clip":
            rows += clip_rows(spec["index"], cfg, seed, Path(clips_dir))
        else:
            rows += file_rows(Path(spec["path"]), cfg.sources[spec["source"]], cfg)
    return rows_to_task_table(rows)


@component(name="video_samples", version="2", config="data.video", outputs=("samples", "clips"),
           external_fingerprint=video_fingerprint, key_exclude=("path",))
def video_samples(ctx: StageContext[VideoConfig]) -> StageResult:
    import ray.data

    cfg = ctx.config
    table, clips_dir = ctx.outputs["samples"], ctx.outputs["clips"]
    clips_dir.mkdir(parents=True, exist_ok=True)
    items = [{"kind": "clip", "index": i} for i in range(cfg.synthetic_clips)]
    items += [{"kind": "file", "source": s, "path": str(f)} for s, source in enumerate(cfg.sources)
              for f in source_files(source)]
    if not items:
        raise ValueError("data.video has nothing to do: set synthetic_clips > 0 or add sources")
    check_unique_keys(cfg)
    ray.data.from_items([{"item": json.dumps(i)} for i in items], override_num_blocks=len(items)).map_batches(
        make_rows, fn_kwargs={"cfg": cfg, "seed": ctx.seed, "clips_dir": str(clips_dir)}, batch_size=1,
        batch_format="pyarrow", **cfg.resources.map_kwargs(),
    ).write_parquet(str(data_dir(table)))
    stats = write_stats(table, "video_samples", upstream=None)
    metrics = drop_metrics(stats) | {"synthetic_clips": float(cfg.synthetic_clips),
                                     "files": float(len(items) - cfg.synthetic_clips)}
    return StageResult(metrics=metrics, artifacts=["samples/stats.json", plot_counts(table, stats)])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(video_samples))
