"""OCR step: rendered text, documents, tables and charts (`ocr_synthesis`) into task-`ocr` samples with
the exact ground-truth text, line boxes in [0, 999] and question-answer pairs, on Ray Data.

Each sample's conversation opens with a full transcription ("Read all the text in the image." -> the
exact text, lines in reading order) followed by the generator's questions (cell lookups, chart values,
...). Images are PNG so the text's pixels are exactly what was rendered. Fonts come from the configured
folders (their names and sizes enter the cache key); with none found, Pillow's built-in font is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from components.common.contract import StageContext, StageResult, component
from components.common.coords import normalise_box
from components.data.config import OcrConfig
from components.data.synthesis.ocr import available_fonts, render_ocr_sample
from components.data.lib.table import drop_metrics, plot_counts
from components.data.synthetic_crawl import native_size
from components.data.lib.tasks import encode_image, rows_to_task_table, sample_rng, synthesize, task_row

STAGE = "ocr_samples"
TRANSCRIBE = "Read all the text in the image."


def ocr_fingerprint(cfg: OcrConfig) -> dict[str, Any]:
    return {"fonts": [(Path(f).name, Path(f).stat().st_size) for f in available_fonts(cfg.font_dirs)]}


def sample_row(index: int, cfg: OcrConfig, fonts: list[str], seed: int) -> dict[str, Any]:
    rng = sample_rng(seed, STAGE, index)
    kind = rng.choices(list(cfg.kinds), weights=list(cfg.kinds.values()))[0]
    width, height = native_size(rng, cfg.min_side, cfg.max_side, cfg.max_aspect)
    sample = render_ocr_sample(rng, kind, width, height, fonts, cfg.max_rotation_deg)
    lines = [{"text": line.text, "box": list(normalise_box(line.box, width, height))} for line in sample.lines]
    turns = [(TRANSCRIBE, sample.text)] + [(qa["question"], qa["answer"]) for qa in sample.qa[:cfg.max_questions]]
    return task_row(
        key=f"synthocr-{index:06d}", task="ocr", images=[encode_image(sample.image, "png")], image_ext="png",
        width=width, height=height, source="synthetic_ocr", caption=f"a {kind.replace('_', ' ')} image with text",
        turns=turns, annotations={"kind": kind, "text": sample.text, "lines": lines, "fields": sample.fields,
                                  "qa": sample.qa},
        meta={"generator": "ocr_synthesis", "seed": seed, "index": index, "font": Path(sample.font).name})


def render_rows(batch: pa.Table, cfg: OcrConfig, fonts: list[str], seed: int) -> pa.Table:
    """Ray Data UDF: sample indices in, OCR rows out."""
    return rows_to_task_table([sample_row(index, cfg, fonts, seed) for index in batch.column("id").to_pylist()])


@component(name="ocr_samples", version="1", config="data.ocr", outputs=("samples",),
           external_fingerprint=ocr_fingerprint, key_exclude=("font_dirs",))
def ocr_samples(ctx: StageContext[OcrConfig]) -> StageResult:
    cfg = ctx.config
    fonts = available_fonts(cfg.font_dirs)
    stats = synthesize(ctx, STAGE, cfg.num_samples, render_rows, {"cfg": cfg, "fonts": fonts}, cfg.resources)
    table = ctx.outputs["samples"]
    return StageResult(metrics=drop_metrics(stats) | {"fonts": float(len(fonts))},
                       artifacts=["samples/stats.json", plot_counts(table, stats)])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(ocr_samples))
