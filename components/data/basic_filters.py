"""Basic filters (DataComp's defaults, all in config): image size, aspect ratio, caption length.

Pure column arithmetic on the ingest table (width, height, caption), so no image is decoded again.
Each dropped row gets the first reason that applies, in the order the checks are listed.
"""

from __future__ import annotations


import pyarrow as pa

from components.common.contract import StageContext, StageResult, component
from components.data.config import BasicFiltersConfig
from components.data.lib.table import data_dir, drop_metrics, plot_counts, read_kept, write_stats


def drop_reason(width: int, height: int, caption: str | None, cfg: BasicFiltersConfig) -> str | None:
    if min(width, height) < cfg.min_short_side:
        return "image_too_small"
    if max(width, height) / max(1, min(width, height)) > cfg.max_aspect_ratio:
        return "aspect_ratio_too_extreme"
    if not caption:
        return "caption_missing"
    if len(caption.split()) < cfg.min_caption_words:
        return "caption_too_few_words"
    if len(caption) < cfg.min_caption_chars:
        return "caption_too_short"
    return None


def apply_basic_filters(batch: pa.Table, cfg: BasicFiltersConfig) -> pa.Table:
    """Ray Data UDF: adds `drop_reason` to a batch of kept ingest rows."""
    widths = batch.column("width").to_pylist()
    heights = batch.column("height").to_pylist()
    captions = batch.column("caption").to_pylist()
    reasons = [drop_reason(w, h, c, cfg) for w, h, c in zip(widths, heights, captions)]
    return batch.append_column("drop_reason", pa.array(reasons, pa.string()))


@component(name="basic_filters", version="1", config="data.basic_filters", inputs=("samples",),
           outputs=("samples",))
def basic_filters(ctx: StageContext[BasicFiltersConfig]) -> StageResult:
    cfg = ctx.config
    table = ctx.outputs["samples"]
    ds = read_kept(ctx.inputs["samples"]).map_batches(
        apply_basic_filters, fn_kwargs={"cfg": cfg}, batch_size=cfg.resources.batch_size,
        batch_format="pyarrow", **cfg.resources.map_kwargs(),
    )
    ds.write_parquet(str(data_dir(table)))
    stats = write_stats(table, "basic_filters", upstream=ctx.inputs["samples"])
    return StageResult(metrics=drop_metrics(stats), artifacts=["samples/stats.json", plot_counts(table, stats)])


if __name__ == "__main__":
    import sys

    from components.common.cli import component_main

    sys.exit(component_main(basic_filters))
