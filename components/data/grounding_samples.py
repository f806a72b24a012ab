"""Grounding and counting step: synthetic scenes (`grounding_synthesis`) into task-`grounding` samples
(referring expression -> box or point) and task-`counting` samples (question -> exact count), on Ray Data.

Each rendered scene gives one sample of each task, with the same image (PNG, so every pixel the labels
describe is exact). Boxes and points are integers in [0, 999] (`components.common.coords`), written
as `<box>[x0, y0, x1, y1]</box>` and `<point>[x, y]</point>` in answers. Layouts (sparse, crowded,
partly occluded) are drawn in the configured proportions; every counted object stays at least
`min_visible_fraction` visible, so counts are exact.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from components.common.contract import StageContext, StageResult, component
from components.common.coords import format_box, format_point
from components.data.config import GroundingConfig
from components.data.synthesis.grounding import GroundingSample, render_grounding_sample
from components.data.lib.table import drop_metrics, plot_counts
from components.data.synthetic_crawl import native_size
from components.data.lib.tasks import encode_image, rows_to_task_table, sample_rng, synthesize, task_row

STAGE = "grounding_samples"


def grounding_turns(sample: GroundingSample, limit: int, ask_points: bool) -> list[tuple[str, str]]:
    """Referring expressions as box questions (and, alternately, point questions)."""
    turns = []
    for index, ref in enumerate(sample.referring[:limit]):
        if ask_points and index % 2 == 1:
            turns.append((f"Point to {ref['expression']}.", format_point(ref["point"])))
        else:
            turns.append((f"Give the bounding box of {ref['expression']}.", format_box(ref["box"])))
    return turns


def counting_turns(sample: GroundingSample, limit: int) -> list[tuple[str, str]]:
    return [(q["question"], str(q["answer"])) for q in sample.counting[:limit]]


def scene_rows(index: int, cfg: GroundingConfig, seed: int) -> list[dict[str, Any]]:
    rng = sample_rng(seed, STAGE, index)
    width, height = native_size(rng, cfg.min_side, cfg.max_side, cfg.max_aspect)
    layout = rng.choices(list(cfg.layouts), weights=list(cfg.layouts.values()))[0]
    sample = render_grounding_sample(rng, width, height, layout, cfg.min_visible_fraction)
    key = f"synthground-{index:06d}"
    base = {"images": [encode_image(sample.image, "png")], "image_ext": "png", "width": width, "height": height,
            "source": "synthetic_grounding",
            "meta": {"generator": "grounding_synthesis", "seed": seed, "index": index, "layout": layout}}
    objects = [{"shape": o.shape, "colour": o.colour, "size": o.size, "box": list(o.box), "point": list(o.point),
                "visible_fraction": round(o.visible_fraction, 4)} for o in sample.objects]
    caption = f"{len(sample.objects)} shapes on a {sample.background} background ({layout} layout)"
    rows = []
    if sample.referring:
        rows.append(task_row(key=f"{key}-ground", task="grounding", caption=caption,
                             turns=grounding_turns(sample, cfg.max_questions, cfg.ask_points),
                             annotations={"objects": objects, "referring": sample.referring[:cfg.max_questions]},
                             **base))
    if sample.counting:
        rows.append(task_row(key=f"{key}-count", task="counting", caption=caption,
                             turns=counting_turns(sample, cfg.max_questions),
                             annotations={"objects": objects, "counting": sample.counting[:cfg.max_questions]},
                             **base))
    return rows


def render_rows(batch: pa.Table, cfg: GroundingConfig, seed: int) -> pa.Table:
    """Ray Data UDF: sample indices in, grounding and counting rows out."""
    return rows_to_task_table([row for index in batch.column("id").to_pylist() for row in scene_rows(index, cfg, seed)])


@component(name="grounding_samples", version="1", config="data.grounding", outputs=("samples",))
def grounding_samples(ctx: StageContext[GroundingConfig]) -> StageResult:
    cfg = ctx.config
    stats = synthesize(ctx, STAGE, cfg.num_samples, render_rows, {"cfg": cfg}, cfg.resources)
    table = ctx.outputs["samples"]
    return StageResult(metrics=drop_metrics(stats), artifacts=["samples/stats.json", plot_counts(table, stats)])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(grounding_samples))
