"""The dedup step's planning on real images: exact and near copies grouped, the largest image kept."""

from __future__ import annotations

import io
import json

import pyarrow as pa
from PIL import Image, ImageDraw

from components.data.config import DedupConfig
from components.data.dedup import label_metrics, mark_duplicates, plan_drops
from components.data.lib.signals import add_signals


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _scene(seed: int) -> Image.Image:
    image = Image.new("RGB", (320, 240), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i in range(4):
        x, y = (seed * 37 + i * 71) % 260, (seed * 53 + i * 29) % 180
        draw.ellipse((x, y, x + 60, y + 60), fill=((seed * 40 + i * 60) % 255, (i * 90) % 255, (seed * 17) % 255))
    return image


def test_exact_and_near_copies_are_grouped_and_the_largest_kept() -> None:
    original = _scene(1)
    rows = [
        ("a-original", _jpeg(original), 320, 240),
        ("b-exact", _jpeg(original), 320, 240),
        ("c-reencoded", _jpeg(original, 50), 320, 240),
        ("d-larger", _jpeg(original.resize((400, 300))), 400, 300),
        ("e-other", _jpeg(_scene(7)), 320, 240),
    ]
    batch = pa.table({"key": [r[0] for r in rows], "image": [r[1] for r in rows],
                      "width": pa.array([r[2] for r in rows], pa.int32()),
                      "height": pa.array([r[3] for r in rows], pa.int32())})
    hashed = add_signals(batch)
    reasons, dropped, stats = plan_drops(hashed, DedupConfig(phash_threshold=6))
    assert set(reasons) == {"a-original", "b-exact", "c-reencoded"}  # the 400x300 copy is kept
    assert all(d["duplicate_of"] == "d-larger" for d in dropped)
    assert reasons["c-reencoded"] == "duplicate_near"
    assert stats.unique_hashes == 2  # the copies share one pHash here; the other scene has its own
    marked = mark_duplicates(hashed, reasons)
    assert {"content_sha256", "phash", "thumbnail"} <= set(marked.column_names)  # sample-table columns, kept
    assert marked.column("drop_reason").to_pylist()[3:] == [None, None]


def test_label_metrics_score_groups_against_the_labels() -> None:
    def label(noise: str | None, of: str | None = None) -> str:
        return json.dumps({"synthetic": {"noise": noise, "duplicate_of": of}})

    keys = ["c-0-a", "c-0-b", "c-0-c", "c-0-d", "c-0-e", "c-0-f"]
    meta = [label(None), label("near_duplicate", "a"), label("exact_duplicate", "a"), label(None),
            label("near_duplicate", "d"), label(None)]
    # b kept over its smaller original a (correct), c grouped with b (correct), e missed,
    # f dropped for d: a distinct image wrongly removed
    kept_for = {"c-0-a": "c-0-b", "c-0-c": "c-0-b", "c-0-f": "c-0-d"}
    metrics = label_metrics(meta, keys, kept_for)
    assert metrics["labelled_duplicates"] == 3
    assert metrics["duplicate_recall"] == 2 / 3
    assert metrics["distinct_removed_rate"] == 1 / 3  # of a, d, f: only f was removed for another image


def _sample_table(folder, named_images: list[tuple[str, Image.Image]]):
    from pathlib import Path

    import pyarrow.parquet as pq

    from components.data.lib.table import SAMPLE_SCHEMA, data_dir, write_stats

    rows = [{"key": key, "image": _jpeg(image), "image_ext": "jpg", "caption": f"scene {key}", "width": image.width,
             "height": image.height, "source": "t", "meta": "{}", "drop_reason": None} for key, image in named_images]
    folder = Path(folder)
    data_dir(folder).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), data_dir(folder) / "part.parquet")
    write_stats(folder, "ingest", upstream=None)
    return folder


def test_dedup_against_earlier_shards(tmp_path, local_ray) -> None:
    """A sample already in an earlier run's shards is dropped; shards with and without stored pHash work."""
    from components.common.executor import run_into
    from components.data.config import DedupConfig, ShardsConfig
    from components.data.dedup import against_fingerprint, dedup
    from components.data.write_shards import write_shards
    from components.data.lib.table import read_columns, data_dir

    first = _sample_table(tmp_path / "first", [("old-a", _scene(1)), ("old-b", _scene(2))])
    run_into(dedup, DedupConfig(), {"samples": first}, tmp_path / "dedup1", seed=0)
    run_into(write_shards, ShardsConfig(), {"samples": tmp_path / "dedup1" / "samples"}, tmp_path / "run1", seed=0)
    raw = _sample_table(tmp_path / "raw", [("old-c", _scene(3))])  # shards without a stored pHash
    run_into(write_shards, ShardsConfig(), {"samples": raw}, tmp_path / "run0", seed=0)

    second = _sample_table(tmp_path / "second", [("new-a", _scene(1).resize((330, 248))), ("new-c", _scene(3)),
                                                 ("new-d", _scene(9))])
    cfg = DedupConfig(against=[str(tmp_path / "run1" / "shards"), str(tmp_path / "run0" / "shards")])
    result, _ = run_into(dedup, cfg, {"samples": second}, tmp_path / "dedup2", seed=0)
    table = read_columns(data_dir(tmp_path / "dedup2" / "samples"), ["key", "drop_reason"]).to_pylist()
    reasons = {row["key"]: row["drop_reason"] for row in table}
    assert reasons == {"new-a": "duplicate_earlier_shard", "new-c": "duplicate_earlier_shard", "new-d": None}
    assert result.metrics["earlier_images"] == 3 and result.metrics["dropped_seen_before"] == 2
    assert against_fingerprint(cfg)["against"][0][0].endswith(".tar")

    import pytest

    with pytest.raises(FileNotFoundError, match="data.dedup.against"):
        against_fingerprint(DedupConfig(against=[str(tmp_path / "nowhere")]))
