"""Task samples (OCR, grounding, counting, video): the table the synthesis and video steps write and
the shard writer reads, one row per training sample with its conversation.

A task row holds one image or an ordered list of frames, a caption, a LLaVA-style conversation
(`[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]`) and the exact
annotations it was built from (text, boxes, points, counts, timestamps) as JSON. Captioning samples
from the curated crawl keep the sample table of `table.py` and are converted by `caption_record`.
Coordinates in conversations and annotations are integers in [0, 999] (`components.common.coords`).
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from PIL import Image

TASK_TYPES = ("caption", "ocr", "grounding", "counting", "video")
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

TASK_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("task", pa.string()),  # one of TASK_TYPES: the shard folder it lands in
        ("images", pa.list_(pa.binary())),  # one encoded image, or the sampled frames of a video in order
        ("image_ext", pa.string()),
        ("width", pa.int32()),  # of the image / of each sampled frame
        ("height", pa.int32()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("conversations", pa.string()),  # JSON list of {"from": "human" | "gpt", "value": str}
        ("annotations", pa.string()),  # JSON: the exact labels (text, boxes, counts, timestamps, ...)
        ("meta", pa.string()),  # JSON: where the sample came from (generator, seed, file, fps, ...)
        ("drop_reason", pa.string()),
    ]
)


def conversation(turns: list[tuple[str, str]], media_token: str = IMAGE_TOKEN) -> list[dict[str, str]]:
    """Question-answer turns as a LLaVA conversation; the media token opens the first question."""
    messages: list[dict[str, str]] = []
    for index, (question, answer) in enumerate(turns):
        value = f"{media_token}\n{question}" if index == 0 else question
        messages += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return messages


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 90) -> bytes:
    """PNG keeps rendered text and thin lines exact; JPEG is for photographic frames."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", optimize=False)
    else:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def task_row(*, key: str, task: str, images: list[bytes], image_ext: str, width: int, height: int, source: str,
             caption: str, turns: list[tuple[str, str]], annotations: dict[str, Any], meta: dict[str, Any],
             drop_reason: str | None = None) -> dict[str, Any]:
    if task not in TASK_TYPES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASK_TYPES}")
    media_token = VIDEO_TOKEN if task == "video" else IMAGE_TOKEN
    return {
        "key": key, "task": task, "images": images, "image_ext": image_ext, "width": width, "height": height,
        "source": source, "caption": caption, "conversations": json.dumps(conversation(turns, media_token)) if turns else "[]",
        "annotations": json.dumps(annotations, sort_keys=True), "meta": json.dumps(meta, sort_keys=True),
        "drop_reason": drop_reason,
    }


def rows_to_task_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TASK_SCHEMA)


def caption_record(row: dict[str, Any]) -> dict[str, Any]:
    """A curated crawl row (table.py's schema) in task form: task `caption`, one image, no conversation."""
    return {
        "key": row["key"], "task": "caption", "images": [row["image"]], "image_ext": row["image_ext"],
        "width": row["width"], "height": row["height"], "source": row["source"], "caption": row["caption"],
        "conversations": "[]", "annotations": "{}", "meta": row["meta"],
    }


def synthesize(ctx: Any, stage: str, num_samples: int, render_rows: Callable[..., pa.Table],
               fn_kwargs: dict[str, Any], resources: Any) -> dict[str, Any]:
    """Run a synthesis step on Ray Data: sample indices in blocks -> `render_rows(batch, **fn_kwargs)` ->
    the task table in `ctx.outputs["samples"]`, with stats. Each sample's rng is seeded by (seed, stage,
    index), so the output does not depend on how Ray splits the work."""
    import ray.data

    from components.data.lib.table import data_dir, write_stats

    table = ctx.outputs["samples"]
    blocks = max(1, -(-num_samples // resources.batch_size))  # one block per batch: rendering is the work
    ray.data.range(num_samples, override_num_blocks=blocks).map_batches(
        render_rows, fn_kwargs=fn_kwargs | {"seed": ctx.seed}, batch_size=resources.batch_size,
        batch_format="pyarrow", **resources.map_kwargs(),
    ).write_parquet(str(data_dir(table)))
    return write_stats(table, stage, upstream=None)


def sample_rng(seed: int, stage: str, index: int) -> random.Random:
    return random.Random(f"{seed}-{stage}-{index}")

