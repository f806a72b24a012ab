"""Model-written video captions (step `video_captions`, after `video_samples`): real video files that have
no hand-written caption (video_samples drops them as `caption_missing`; with `replace_human`, those that
have one too) get dense, timestamped captions from a captioning model named in config, and from those a
caption sample and a temporal-grounding sample, as the paper captions with its own earlier models.

The design follows the dense-caption pipelines of LLaVA-Video and ShareGPT4Video: a clip is cut into
fixed windows (`window_s`), each window's frames (the caption rate of `data.video`, thinned to
`max_frames_per_window`, each prefixed with its `[t second]` time) are described by the model, and the
segments [start, end] + text make the caption ("From 0.0 to 4.0 seconds, ... From 4.0 to 8.0 seconds,
...") and the grounding turns ("When does this happen: <segment>?" -> "From 4.0 to 8.0 seconds."; only
segments whose text is unique, so each question has one answer).

It is Ray Data batch inference in three parts: decoding in tasks (the same child-process decoder as
video_samples, at the caption and the grounding rate), captioning in an actor pool (the model loaded
once per actor: our own exported VLM through the generation engine, or a local transformers
image-text-to-text model through `generate`, greedy; lib/captioner.py, shared with image_captions), and
assembling the rows in tasks. The captioner
is `models:/<name>@<alias>`, `models:/<name>/<version>` (resolved in the registry at key time: moving
the alias recomputes the step), an exported VLM folder, or a transformers folder (never downloaded).

Every row of the input table comes out: rows the step does not caption unchanged; each captioned file
as its caption and grounding rows, or one dropped row with the reason (`video_*` decode errors,
`caption_empty` when no window's answer had `min_words` words). Every row gets `caption_source`
(`human`, `synthetic` for the generator's exact template captions, or `model:<resolved model>`), which
write_shards puts in the shard json. A file that had a hand-written caption and whose model captions
all fail keeps its human caption (`human_kept` in the metrics).
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from components.common.contract import StageContext, StageResult, component
from components.common.video import VideoDecodeError
from components.data.config import VideoCaptionsConfig, VideoCaptionsJob, VideoConfig, video_captions_view
from components.data.lib.captioner import (CaptionerActor, caption_in_batches, captioner_error, captioner_folder,
                                           captioner_identity, clean_answer)
from components.data.lib.table import data_dir, plot_counts, write_stats
from components.data.lib.tasks import TASK_SCHEMA, task_row
from components.data.video_samples import DESCRIBE, frame_fields, grounding_turns, sample, sampling_annotations

OUT_SCHEMA = TASK_SCHEMA.append(pa.field("caption_source", pa.string()))
# One captioned file between the parts: its frames at both rates, then the model's segments.
PENDING_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("meta", pa.string()), ("human_caption", pa.string()),
    ("caption_images", pa.list_(pa.binary())), ("grounding_images", pa.list_(pa.binary())),
    ("sampling", pa.string()),  # JSON {"caption": {annotations, width, height}, "grounding": {...}}
    ("drop_reason", pa.string()),
    ("segments", pa.string()),  # JSON [{"start_s", "end_s", "text"}] (the captioner fills it)
    ("answers", pa.list_(pa.string())),  # the model's raw answer per window, for the step's report
    ("unparseable", pa.int64()), ("windows", pa.int64()), ("caption_s", pa.float64()),
])


# ---- which rows are captioned --------------------------------------------------------------------------

def is_real_file(meta: dict[str, Any]) -> bool:
    return "file" in meta and "generator" not in meta


def wants_model_caption(drop_reason: str | None, meta: dict[str, Any], cfg: VideoCaptionsConfig) -> bool:
    """A real file without a hand-written caption; with `replace_human`, every readable real file."""
    if not is_real_file(meta):
        return False
    return drop_reason == "caption_missing" or (cfg.replace_human and drop_reason is None)


def caption_source_of(source: str, meta: dict[str, Any]) -> str:
    return "human" if is_real_file(meta) else "synthetic"


def passthrough(batch: pa.Table, cfg: VideoCaptionsConfig) -> pa.Table:
    """Ray Data UDF: the rows this step leaves as they are, with their `caption_source`."""
    rows = []
    for row in batch.to_pylist():
        meta = json.loads(row["meta"])
        if not wants_model_caption(row["drop_reason"], meta, cfg):
            rows.append({**row, "caption_source": caption_source_of(row["source"], meta)})
    return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


# ---- part 1: decode -----------------------------------------------------------------------------------

def decode_for_captions(batch: pa.Table, video: VideoConfig) -> pa.Table:
    """Ray Data UDF (tasks): each pending file sampled at the caption and the grounding rate, or its decode
    error as the drop reason."""
    rows = []
    for item in batch.to_pylist():
        meta = json.loads(item["meta"])
        row = {**item, "caption_images": [], "grounding_images": [], "sampling": "{}", "drop_reason": None,
               "segments": "[]", "answers": [], "unparseable": 0, "windows": 0, "caption_s": 0.0}
        try:
            sampled = sample(Path(meta["file"]), video, ("caption", "grounding"))
        except VideoDecodeError as error:
            rows.append({**row, "drop_reason": error.reason, "meta": json.dumps({**meta, "error": str(error)},
                                                                                  sort_keys=True)})
            continue
        sampling = {}
        for task in ("caption", "grounding"):
            fields = frame_fields(sampled[task], video)
            row[f"{task}_images"] = fields["images"]
            sampling[task] = {"annotations": sampling_annotations(sampled[task], video.fps_for(task)),
                              "width": fields["width"], "height": fields["height"]}
        rows.append({**row, "sampling": json.dumps(sampling)})
    return pa.Table.from_pylist(rows, schema=PENDING_SCHEMA)


def windows(timestamps: list[float], window_s: float, max_frames: int) -> list[tuple[float, float, list[int]]]:
    """Fixed windows of `window_s` seconds over the sampled frames: (start, end, frame indices), the
    indices thinned evenly to `max_frames`; empty windows are skipped. The last window ends half a frame
    step after the last frame: frames are sampled at the middles of equal slices of the clip, so that is
    where the clip ends."""
    if not timestamps:
        return []
    step = float(np.median(np.diff(timestamps))) if len(timestamps) > 1 else 2 * timestamps[0]
    extent = timestamps[-1] + step / 2
    out = []
    for index in range(int(np.ceil(extent / window_s - 1e-9))):
        start, end = index * window_s, min((index + 1) * window_s, extent)
        frames = [i for i, t in enumerate(timestamps) if start <= t < end]
        if frames:
            keep = np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)
            out.append((round(start, 3), round(end, 3), [frames[k] for k in sorted(set(keep.tolist()))]))
    return out


# ---- part 2: caption (actor pool) ---------------------------------------------------------------------

def window_seed(seed: int, key: str, start: float) -> int:
    """A stable per-window sampling seed: the same run seed, file and window always draw the same caption."""
    return zlib.crc32(f"{seed}-{key}-{start:.3f}".encode())


class SegmentCaptioner(CaptionerActor):
    """A Ray Data callable class: loads the captioner once, then captions every window of a batch of files
    (`generate_batch` windows per generation call) and fills each file's `segments`."""

    cfg: VideoCaptionsConfig

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        requests: list[tuple[list[bytes], list[float]]] = []
        seeds: list[int] = []
        owners: list[tuple[int, float, float]] = []
        for index, row in enumerate(rows):
            if row["drop_reason"] is not None:
                continue
            stamps = json.loads(row["sampling"])["caption"]["annotations"]["timestamps"]
            spans = windows(stamps, self.cfg.window_s, self.cfg.max_frames_per_window)
            row["windows"] = len(spans)
            for start, end, frames in spans:
                requests.append(([row["caption_images"][i] for i in frames], [stamps[i] for i in frames]))
                seeds.append(window_seed(self.seed, row["key"], start))
                owners.append((index, start, end))
        started = time.perf_counter()
        answers = caption_in_batches(self.captioner, requests, seeds, self.cfg.generate_batch)
        elapsed = time.perf_counter() - started
        segments: dict[int, list[dict[str, Any]]] = {}
        for (index, start, end), answer in zip(owners, answers):
            rows[index]["answers"] = [*rows[index]["answers"], answer]
            text = clean_answer(answer, self.cfg.min_words)
            if text is None:
                rows[index]["unparseable"] += 1
            else:
                segments.setdefault(index, []).append({"start_s": start, "end_s": end, "text": text})
        for index, row in enumerate(rows):
            if row["drop_reason"] is None:
                row["segments"] = json.dumps(segments.get(index, []))
                row["caption_s"] = elapsed * row["windows"] / max(1, len(requests))
        return pa.Table.from_pylist(rows, schema=PENDING_SCHEMA)


# ---- part 3: assemble ---------------------------------------------------------------------------------

def dense_caption(segments: list[dict[str, Any]]) -> str:
    return " ".join(f"From {s['start_s']:.1f} to {s['end_s']:.1f} seconds, {s['text'].rstrip('.')}." for s in segments)


def unique_segments(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Segments whose text no other segment shares: a grounding question must have one answer."""
    counts: dict[str, int] = {}
    for segment in segments:
        counts[segment["text"].casefold()] = counts.get(segment["text"].casefold(), 0) + 1
    return [s for s in segments if counts[s["text"].casefold()] == 1]


def assemble(batch: pa.Table, model_label: str, video: VideoConfig) -> pa.Table:
    """Ray Data UDF (tasks): a captioned file's caption and grounding rows, a human row kept when the model
    failed on a file that had one, or one dropped row with the reason."""
    rows = []
    source_mark = f"model:{model_label}"
    for item in batch.to_pylist():
        meta = json.loads(item["meta"])
        segments = json.loads(item["segments"])
        human = item["human_caption"] or ""
        empty = {"images": [], "image_ext": "jpg", "width": 0, "height": 0, "turns": [], "annotations": {},
                 "source": item["source"], "caption": human}
        if item["drop_reason"] is not None:
            rows.append({**task_row(key=item["key"], task="video", meta=meta, drop_reason=item["drop_reason"], **empty),
                         "caption_source": None})
            continue
        sampling = json.loads(item["sampling"])

        def fields(task: str) -> dict[str, Any]:
            return {"images": item[f"{task}_images"], "image_ext": "jpg", "width": sampling[task]["width"],
                    "height": sampling[task]["height"]}

        if not segments and human:  # the model failed; the hand-written caption stays
            rows.append({**task_row(key=item["key"], task="video", source=item["source"], caption=human,
                                    turns=[(DESCRIBE, human)], annotations=sampling["caption"]["annotations"],
                                    meta=meta, **fields("caption")), "caption_source": "human"})
            continue
        if not segments:
            rows.append({**task_row(key=item["key"], task="video", meta=meta | {"windows": item["windows"]},
                                    drop_reason="caption_empty", **empty), "caption_source": None})
            continue
        caption = dense_caption(segments)
        labels = {"segments": segments, "caption_source": source_mark}
        meta = meta | {"caption_source": source_mark} | ({"human_caption": human} if human else {})
        rows.append({**task_row(key=f"{item['key']}-caption", task="video", source=item["source"], caption=caption,
                                turns=[(DESCRIBE, caption)], annotations=sampling["caption"]["annotations"] | labels,
                                meta=meta, **fields("caption")), "caption_source": source_mark})
        spans = [{"query": s["text"], "start_s": s["start_s"], "end_s": s["end_s"]} for s in unique_segments(segments)]
        grounding = {"key": f"{item['key']}-grounding", "task": "video", "source": item["source"], "caption": caption,
                     "meta": meta}
        if spans:
            rows.append({**task_row(**grounding, turns=grounding_turns(spans), **fields("grounding"),
                                    annotations=sampling["grounding"]["annotations"] | labels
                                    | {"temporal_grounding": spans}), "caption_source": source_mark})
        else:
            rows.append({**task_row(**grounding, turns=[], annotations=labels, images=[], image_ext="jpg", width=0,
                                    height=0, drop_reason="grounding_no_unique_segment"),
                         "caption_source": source_mark})
    return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


# ---- the step ------------------------------------------------------------------------------------------

def captioner_fingerprint(job: VideoCaptionsJob) -> dict[str, Any]:
    """The captioner as key material (lib/captioner.py): moving an alias recomputes the step."""
    if not job.captions.enabled:
        return {}
    return captioner_identity(job.captions.model, job.captions.registry_uri)


def captioner_preflight(job: VideoCaptionsJob) -> str:
    """Before anything runs: the captioner exists (a registry version, or a model folder)."""
    if not job.captions.enabled:
        return ""
    return captioner_error("data.video_captions.model", job.captions.model, job.captions.registry_uri)


def pending_items(table: Path, cfg: VideoCaptionsConfig) -> list[dict[str, Any]]:
    """The rows to caption, read from the small columns only (frames stay on disk)."""
    from components.data.lib.table import read_columns

    columns = read_columns(data_dir(table), ["key", "source", "meta", "caption", "drop_reason"]).to_pylist()
    items = []
    for row in columns:
        meta = json.loads(row["meta"])
        if wants_model_caption(row["drop_reason"], meta, cfg):
            human = row["caption"] if row["drop_reason"] is None else ""
            items.append({"key": row["key"], "source": row["source"], "meta": row["meta"], "human_caption": human})
    return items


@component(name="video_captions", version="1", config="data", view=video_captions_view, inputs=("samples",),
           outputs=("samples",), external_fingerprint=captioner_fingerprint, key_exclude=("registry_uri", "path"),
           preflight=captioner_preflight)
def video_captions(ctx: StageContext[VideoCaptionsJob]) -> StageResult:
    import ray.data

    cfg, video = ctx.config.captions, ctx.config.video
    source_table, table = ctx.inputs["samples"], ctx.outputs["samples"]
    files = sorted(str(f) for f in data_dir(source_table).glob("*.parquet"))
    items = pending_items(source_table, cfg)
    kept_rows = ray.data.read_parquet(files).map_batches(passthrough, fn_kwargs={"cfg": cfg}, batch_format="pyarrow",
                                                        batch_size=video.resources.batch_size)
    metrics: dict[str, float] = {"videos_in": float(len(items))}
    download = ctx.workdir / "_captioner"
    try:
        if items:
            folder, label = captioner_folder(cfg.model, cfg.registry_uri, download)
            threads = max(1, int(cfg.resources.num_cpus))
            started = time.perf_counter()
            decoded = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                decode_for_captions, fn_kwargs={"video": video}, batch_size=1, batch_format="pyarrow",
                **video.resources.map_kwargs())
            captioned = decoded.map_batches(
                SegmentCaptioner, fn_constructor_kwargs={"folder": str(folder), "cfg": cfg, "seed": ctx.seed,
                                                        "threads": threads},
                batch_size=cfg.resources.batch_size, batch_format="pyarrow", num_gpus=cfg.num_gpus,
                **cfg.resources.map_kwargs(actors=True)).materialize()
            metrics["captioning_job_s"] = time.perf_counter() - started
            metrics |= captioning_metrics(captioned)
            table.mkdir(parents=True, exist_ok=True)
            (table / "captions.json").write_text(json.dumps(
                {"captioner": label, "config": cfg.model, "videos": captions_report(captioned)}, indent=1))
            kept_rows = kept_rows.union(captioned.map_batches(
                assemble, fn_kwargs={"model_label": label, "video": video}, batch_size=cfg.resources.batch_size,
                batch_format="pyarrow", **video.resources.map_kwargs()))
        kept_rows.write_parquet(str(data_dir(table)))
    finally:
        shutil.rmtree(download, ignore_errors=True)
    stats = write_stats(table, "video_captions", upstream=None)
    metrics |= {"kept": float(stats["kept"])} | {f"dropped.{r}": float(n) for r, n in stats["dropped"].items()}
    artifacts = ["samples/stats.json", plot_counts(table, stats)] + (["samples/captions.json"] if items else [])
    return StageResult(metrics=metrics, artifacts=artifacts)


def captioning_metrics(captioned: Any) -> dict[str, float]:
    """Per file and per window: how many were captioned, dropped (by reason) or unparseable, and the
    captioner's throughput (windows and frames per second of model time, summed over actors)."""
    rows = captioned.select_columns(["drop_reason", "segments", "unparseable", "windows", "caption_s"]).take_all()
    captioned_rows = [r for r in rows if r["drop_reason"] is None]
    windows_total = sum(int(r["windows"]) for r in captioned_rows)
    model_s = sum(float(r["caption_s"]) for r in captioned_rows)
    metrics = {"videos_decoded": float(len(captioned_rows)),
               "videos_with_segments": float(sum(bool(json.loads(r["segments"])) for r in captioned_rows)),
               "windows": float(windows_total),
               "segments": float(sum(len(json.loads(r["segments"])) for r in captioned_rows)),
               "segments_unparseable": float(sum(int(r["unparseable"]) for r in captioned_rows)),
               "caption_model_s": model_s}
    if model_s > 0:
        metrics["windows_per_s"] = windows_total / model_s
    return metrics


def captions_report(captioned: Any) -> list[dict[str, Any]]:
    """Each captioned file's segments and the model's raw answers (or its drop reason), for the step's artifacts."""
    rows = captioned.select_columns(["key", "drop_reason", "segments", "answers", "unparseable", "windows"]).take_all()
    return [{"key": r["key"], "drop_reason": r["drop_reason"], "windows": int(r["windows"]),
             "unparseable": int(r["unparseable"]), "segments": json.loads(r["segments"]),
             "answers": list(r["answers"])} for r in rows]


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(video_captions))
