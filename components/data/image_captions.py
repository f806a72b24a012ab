"""Model-written image captions (step `image_captions`, between `ingest` and `basic_filters`): images whose
caption is missing, empty, not UTF-8 or poor (basic_filters would drop it for too few words or characters;
with `replace_human`, every image basic_filters would keep) get a caption from a captioning model named
in config, as the paper recaptions its web images with its own earlier models.

It is Ray Data batch inference in three parts over ingest's table: opening the rows to caption in tasks
(an image ingest did not open because its caption was not UTF-8 is opened here, as ingest opens images),
captioning in an actor pool (the model loaded once per actor, `generate_batch` images per generation call,
lib/captioner.py: our exported VLM through the generation engine or a local transformers
image-text-to-text model, greedy unless `temperature` > 0), and assembling the rows in tasks. The captioner
is `models:/<name>@<alias>`, `models:/<name>/<version>` (resolved in the registry at key time: moving the
alias recomputes the step), an exported VLM folder, or a transformers folder (never downloaded).

Every row of ingest's table comes out, so the table stays a whole sample table for basic_filters (its
stats count since ingest): rows the step does not caption unchanged; an image the model captions with
its caption (usable: one basic_filters keeps) and `caption_source: model:<resolved model>` (the human
caption it replaced, if any, in `meta.human_caption`); an image whose answer is unusable keeps its human
caption (`human_kept`), or, with none, is dropped as `caption_empty`. Every kept row says who wrote its
caption (`caption_source`: `human` or `model:...`), and write_shards puts it in the shard json.
`samples/captions.json` lists every asked image's raw answer and what became of it.
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa

from components.common.contract import StageContext, StageResult, component
from components.data.basic_filters import drop_reason as basic_drop_reason
from components.data.config import ImageCaptionsConfig, ImageCaptionsJob, image_captions_view
from components.data.ingest import inspect_image
from components.data.lib.captioner import (CaptionerActor, caption_in_batches, captioner_error, captioner_folder,
                                           captioner_identity, clean_answer)
from components.data.lib.table import SAMPLE_SCHEMA, data_dir, drop_metrics, plot_counts, read_columns, write_stats

OUT_SCHEMA = SAMPLE_SCHEMA.append(pa.field("caption_source", pa.string()))
# A row to caption between the parts: the sample row, whether the model is asked, and its raw answer.
PENDING_SCHEMA = SAMPLE_SCHEMA.append(pa.field("ask", pa.bool_())).append(pa.field("answer", pa.string())).append(
    pa.field("caption_s", pa.float64()))
CAPTION_REASONS = frozenset({"caption_missing", "caption_too_few_words", "caption_too_short"})  # basic_filters'
NOT_TEXT = "caption_not_utf8"  # ingest's reason for a caption that is not text; its image was not opened


# ---- which rows are captioned --------------------------------------------------------------------------

def needs_caption(width: int, height: int, caption: str | None, job: ImageCaptionsJob) -> bool:
    """An image basic_filters keeps whose caption it would drop (missing, empty, too few words or
    characters); with `replace_human`, every image it keeps. Images it drops for their size or shape are
    not captioned."""
    reason = basic_drop_reason(width, height, caption, job.filters)
    return reason in CAPTION_REASONS or (job.captions.replace_human and reason is None)


def wants_model_caption(row: dict[str, Any], job: ImageCaptionsJob) -> bool:
    """A kept ingest row that needs a caption, or one ingest dropped because its caption was not UTF-8."""
    if row["drop_reason"] is not None:
        return row["drop_reason"] == NOT_TEXT
    return needs_caption(row["width"], row["height"], row["caption"], job)


def source_of(caption: str | None) -> str | None:
    return "human" if caption else None


def passthrough(batch: pa.Table, job: ImageCaptionsJob) -> pa.Table:
    """Ray Data UDF: the rows this step leaves as they are, with their `caption_source`."""
    rows = [{**row, "caption_source": source_of(row["caption"])} for row in batch.to_pylist()
            if not wants_model_caption(row, job)]
    return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


# ---- part 1: open ---------------------------------------------------------------------------------------

def open_pending(batch: pa.Table, job: ImageCaptionsJob) -> pa.Table:
    """Ray Data UDF (tasks): the rows to caption, `ask` set; an image with a non-UTF-8 caption is opened as
    ingest opens images (its caption is then missing, or the image's own drop reason replaces ingest's)."""
    rows = []
    for row in batch.to_pylist():
        if not wants_model_caption(row, job):
            continue
        if row["drop_reason"] == NOT_TEXT:
            row = {**row, "caption": None, "drop_reason": None} | inspect_image(row["image"], job.max_image_pixels)
        ask = row["drop_reason"] is None and needs_caption(row["width"], row["height"], row["caption"], job)
        rows.append({**row, "ask": ask, "answer": None, "caption_s": 0.0})
    return pa.Table.from_pylist(rows, schema=PENDING_SCHEMA)


# ---- part 2: caption (actor pool) -----------------------------------------------------------------------

def image_seed(seed: int, key: str) -> int:
    """A stable per-image sampling seed: the same run seed and image always draw the same caption."""
    return zlib.crc32(f"{seed}-{key}".encode())


class ImageCaptioner(CaptionerActor):
    """A Ray Data callable class: loads the captioner once, then asks it about every image of a batch that
    needs a caption (`generate_batch` images per generation call) and fills each one's raw `answer`."""

    cfg: ImageCaptionsConfig

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        asked = [row for row in rows if row["ask"]]
        started = time.perf_counter()
        answers = caption_in_batches(self.captioner, [([row["image"]], []) for row in asked],
                                     [image_seed(self.seed, row["key"]) for row in asked], self.cfg.generate_batch)
        elapsed = time.perf_counter() - started
        for row, answer in zip(asked, answers):
            row["answer"], row["caption_s"] = answer, elapsed / max(1, len(asked))
        return pa.Table.from_pylist(rows, schema=PENDING_SCHEMA)


# ---- part 3: assemble -----------------------------------------------------------------------------------

def outcome(row: dict[str, Any], job: ImageCaptionsJob) -> tuple[str, str | None]:
    """What became of an asked image: ('model', caption) when the answer is a caption basic_filters keeps;
    else ('human_kept', None) when it had a caption, or ('caption_empty', None)."""
    text = clean_answer(row["answer"] or "", job.captions.min_words)
    if text is not None and basic_drop_reason(row["width"], row["height"], text, job.filters) is None:
        return "model", text
    return ("human_kept" if row["caption"] else "caption_empty"), None


def assemble(batch: pa.Table, model_label: str, job: ImageCaptionsJob) -> pa.Table:
    """Ray Data UDF (tasks): each pending row with the model's caption, its human caption kept, or dropped as
    `caption_empty`; rows not asked (their image unreadable, or one basic_filters drops) as they are."""
    rows = []
    for row in batch.to_pylist():
        if not row["ask"]:
            rows.append({**row, "caption_source": source_of(row["caption"])})
            continue
        result, text = outcome(row, job)
        if result == "model":
            meta = json.loads(row["meta"]) | ({"human_caption": row["caption"]} if row["caption"] else {})
            rows.append({**row, "caption": text, "meta": json.dumps(meta, sort_keys=True),
                         "caption_source": f"model:{model_label}"})
        elif result == "human_kept":
            rows.append({**row, "caption_source": "human"})
        else:
            rows.append({**row, "drop_reason": "caption_empty", "caption_source": None})
    return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


# ---- the step -------------------------------------------------------------------------------------------

def captioner_fingerprint(job: ImageCaptionsJob) -> dict[str, Any]:
    return captioner_identity(job.captions.model, job.captions.registry_uri) if job.captions.enabled else {}


def captioner_preflight(job: ImageCaptionsJob) -> str:
    """Before anything runs: the captioner exists (a registry version, or a model folder)."""
    if not job.captions.enabled:
        return ""
    return captioner_error("data.image_captions.model", job.captions.model, job.captions.registry_uri)


def count_pending(table: Path, job: ImageCaptionsJob) -> int:
    """How many rows the step opens for captioning, read from the small columns only (images stay on disk)."""
    columns = read_columns(data_dir(table), ["caption", "width", "height", "drop_reason"]).to_pylist()
    return sum(wants_model_caption(row, job) for row in columns)


@component(name="image_captions", version="1", config="data", view=image_captions_view, inputs=("samples",),
           outputs=("samples",), external_fingerprint=captioner_fingerprint, key_exclude=("registry_uri",),
           preflight=captioner_preflight)
def image_captions(ctx: StageContext[ImageCaptionsJob]) -> StageResult:
    import ray.data

    job = ctx.config
    cfg, tasks = job.captions, job.filters.resources
    source_table, table = ctx.inputs["samples"], ctx.outputs["samples"]
    files = sorted(str(f) for f in data_dir(source_table).glob("*.parquet"))
    pending = count_pending(source_table, job) if files else 0
    metrics: dict[str, float] = {"images_in": float(pending)}
    if not files:
        data_dir(table).mkdir(parents=True)
    download = ctx.workdir / "_captioner"
    try:
        if files:
            rows = ray.data.read_parquet(files)
            out = rows.map_batches(passthrough, fn_kwargs={"job": job}, batch_format="pyarrow",
                                   batch_size=tasks.batch_size, **tasks.map_kwargs())
            if pending:
                folder, label = captioner_folder(cfg.model, cfg.registry_uri, download)
                started = time.perf_counter()
                captioned = rows.map_batches(
                    open_pending, fn_kwargs={"job": job}, batch_format="pyarrow", batch_size=tasks.batch_size,
                    **tasks.map_kwargs()).map_batches(
                    ImageCaptioner, fn_constructor_kwargs={"folder": str(folder), "cfg": cfg, "seed": ctx.seed,
                                                           "threads": max(1, int(cfg.resources.num_cpus))},
                    batch_size=cfg.resources.batch_size, batch_format="pyarrow", num_gpus=cfg.num_gpus,
                    **cfg.resources.map_kwargs(actors=True)).materialize()
                metrics["captioning_job_s"] = time.perf_counter() - started
                report = captions_report(captioned, job)
                metrics |= captioning_metrics(report, captioned)
                table.mkdir(parents=True, exist_ok=True)
                (table / "captions.json").write_text(json.dumps(
                    {"captioner": label, "config": cfg.model, "images": report}, indent=1))
                out = out.union(captioned.map_batches(
                    assemble, fn_kwargs={"model_label": label, "job": job}, batch_size=tasks.batch_size,
                    batch_format="pyarrow", **tasks.map_kwargs()))
            out.write_parquet(str(data_dir(table)))
    finally:
        shutil.rmtree(download, ignore_errors=True)
    stats = write_stats(table, "image_captions", upstream=None)  # a whole table again: its counts are since ingest
    metrics |= drop_metrics(stats)
    artifacts = ["samples/stats.json", plot_counts(table, stats)] + (["samples/captions.json"] if pending else [])
    return StageResult(metrics=metrics, artifacts=artifacts)


def captions_report(captioned: Any, job: ImageCaptionsJob) -> list[dict[str, Any]]:
    """Each asked image's human caption, the model's raw answer and what became of it (model, human_kept,
    caption_empty)."""
    rows = captioned.select_columns(["key", "ask", "caption", "answer", "width", "height"]).take_all()
    return [{"key": r["key"], "human_caption": r["caption"], "answer": r["answer"], "outcome": outcome(r, job)[0]}
            for r in sorted(rows, key=lambda r: r["key"]) if r["ask"]]


def captioning_metrics(report: list[dict[str, Any]], captioned: Any) -> dict[str, float]:
    """Per asked image: captioned by the model, human caption kept, dropped as caption_empty (asked =
    their sum), and the captioner's throughput (images per second of model time, summed over actors)."""
    outcomes = [r["outcome"] for r in report]
    model_s = float(sum(r["caption_s"] for r in captioned.select_columns(["caption_s"]).take_all()))
    metrics = {"images_asked": float(len(report)), "captioned": float(outcomes.count("model")),
               "human_kept": float(outcomes.count("human_kept")), "caption_empty": float(outcomes.count("caption_empty")),
               "caption_model_s": model_s}
    if model_s > 0:
        metrics["images_per_s"] = len(report) / model_s
    return metrics


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(image_captions))
