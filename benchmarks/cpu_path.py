"""CPU path images/s per core (decode, basic filters, dedup's signals, shard write), each as a ratio to a
bare decode-only loop over the same image bytes in the same run.

    .venv/bin/python benchmarks/cpu_path.py [--images 2000] [--seed 0] [--rounds 2] [--sides 32,128]

Inputs: `--images` samples from the synthetic crawl's own generator (`generate_shard`: `clean_size`,
`random_scene`, `render`, `encode`; 85 % JPEG q90 / 15 % PNG, 200-512 px sides), with the crawl's
mismatched-caption and duplicate noise but none of the kinds that fail decoding or get dropped, so
every row does the same work on every image. They are kept in memory as encoded bytes, and also
written once as img2dataset-style tars (250 samples each) for the pipeline rows.

Rows, all in this one process on one core, timed on the same bytes:
  decode only           `Image.open(BytesIO(b)).load()` (Pillow, full size): the baseline
  + basic filters       + caption decode and `drop_reason` (DataComp defaults)
  + hashes, before      + dedup's signals as computed before issue 19 on that decode (`content_hash`,
                        imagehash's pHash, Pillow's 8x8 box thumbnail)
  + shard write, before + `to_shard_rows` and `write_tar` of 1,000-sample shards in a temp dir: the
                        full path with one full decode and the old hashes
  one signals decode    the same path with the pipeline's `image_signals` instead of decode + hashes:
                        one decode reduced to >= SIGNAL_SIDE a side (JPEG DCT-scaled by simplejpeg;
                        others full, box-reduced) that validates the file and hashes it (OpenCV)
  pipeline UDFs         the steps' own batch functions in order, 256 rows a batch: ingest `read_files`
                        (tar read, the one decode that validates and computes dedup's signals),
                        `apply_basic_filters`, dedup `add_signals` (nothing left to decode),
                        `mark_duplicates`, `to_shard_rows`, `write_fragments`, `write_shard`; no Ray, no
                        parquet between the steps, no CLIP filter (benchmarks/clip_throughput.py) and no
                        rebalancing
  pipeline, before      the same with ingest's `signals` off (a full Pillow decode to validate) and the
                        old signals computed on a second full decode, as dedup did before issue 19
  pipeline, free        the floor of the pipeline's path with a full decode: ingest's `signals` off, no
                        hashing anywhere (tar read, one full decode, filters, shard write)
Each row runs `--rounds` times, interleaved with the others; the best round counts. images/s per core
is images per CPU second of this process (robust to a busy machine; wall images/s is shown too).

Then: where each path's time goes (CPU microseconds per image of each piece, per format, on the first
500 images; simplejpeg's full decode shown beside Pillow's), and the floor of a full-decode path:
decode-only against decode + caption + sha256 + shard write with hashing free; dedup's inputs and
decisions with the pipeline's signals (each of `--sides`) against the old ones, on the same ingested
and filtered rows (identical pHashes, mean and max Hamming distance, thumbnail difference, and dedup's
own `plan_drops` and `label_metrics` on both: rows dropped, rows whose verdict changes, recall on the
labelled duplicates, distinct images removed), and whether ingest with its signals on (the reduced
decode) rejects the same corrupt JPEGs (the crawl's `corrupt` applied to every JPEG) as with them off
(a full Pillow decode) (`inspect_image`). Anchors: img2dataset ~1,350 images/s per machine;
imagededup pHash with decode ~64 images/s per core. Goal: the pipeline's path at >= 0.7 of
decode-only (>= 0.5 where the floor is below 0.7). Prints the tables and records them in
benchmarks/results/cpu_path.json.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's `components`, not an installed one

from results_file import record

import numpy as np
import PIL
import pyarrow as pa
import pyarrow.compute as pc
import simplejpeg
from PIL import Image

from components.data.basic_filters import apply_basic_filters, drop_reason
from components.data.config import BasicFiltersConfig, DedupConfig, IngestConfig, NoiseRates, ShardsConfig, \
    SyntheticCrawlConfig
from components.data.dedup import label_metrics, mark_duplicates, plan_drops
from components.data.lib.signals import (SIGNAL_FIELDS, SIGNAL_NAMES, SIGNAL_SIDE, add_signals, image_signals,
                                         phash_pixels, signal_pixels, thumbnail_pixels)
from components.data.lib.dedup_core import content_hash, phash64
from components.data.ingest import inspect_image, read_files
from components.data.write_shards import to_shard_rows, write_fragments, write_shard, write_tar
from components.data.lib.sources import ReadTask
from components.data.synthetic_crawl import CrawlSample, generate_shard, write_img2dataset_shard
from components.data.synthetic_crawl import corrupt as corrupt_bytes
from components.data.lib.table import KEPT_SCHEMA

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "cpu_path.json"
CRAWL_SHARD = 250  # samples per input tar, as the tiny profile's crawl (1000 samples / 4 shards)
BATCH_ROWS = 256  # Ray Data batch size of the steps (Resources.batch_size)
GOAL = 0.7
FLOOR_GOAL = 0.5  # the goal where small images put the floor below GOAL
PIPELINE_ROW = "pipeline UDFs (one decode)"
FLOOR_PIECES = ("decode", "caption + drop_reason", "content sha256", "shard write (to_shard_rows, write_tar)")
BREAKDOWN_IMAGES = 500
SIGNALS_ROW = "one signals decode + filters + shard write"
FLOOR_ROW = "pipeline UDFs, full decode, hashing free"
SIGNAL_PIECES = ("signals' reduced decode", "pHash + thumbnail of it (OpenCV)")
SIMPLEJPEG_PIECE = "simplejpeg decode, full size"
HASHED_SCHEMA = KEPT_SCHEMA  # kept rows as dedup leaves them (the signal columns are part of it)
# Only noise that leaves every image decodable and kept: the rows then do equal work per image.
NOISE = NoiseRates(mismatched_caption=0.10, exact_duplicate=0.03, near_duplicate=0.05, tiny_image=0.0,
                   extreme_aspect=0.0, corrupt_image=0.0, empty_caption=0.0, non_utf8_caption=0.0)


@dataclass
class Item:
    """One input sample as the per-image rows see it."""

    key: str
    data: bytes
    ext: str
    caption: bytes
    meta: str  # the sample's img2dataset json, as ingest stores it


@dataclass
class Inputs:
    items: list[Item]
    tasks: pa.Table  # one ingest read task per tar, as ingest's `read_files` receives them
    out: Path  # where shard rows write their tars


def make_samples(n: int, seed: int) -> list[CrawlSample]:
    cfg = SyntheticCrawlConfig(num_samples=n, noise=NOISE)
    samples: list[CrawlSample] = []
    for shard in range(math.ceil(n / CRAWL_SHARD)):
        samples += generate_shard(cfg, shard, min(CRAWL_SHARD, n - shard * CRAWL_SHARD), seed)
    return samples


def write_crawl_tars(samples: list[CrawlSample], folder: Path) -> pa.Table:
    folder.mkdir(parents=True)
    for shard in range(math.ceil(len(samples) / CRAWL_SHARD)):
        write_img2dataset_shard(folder, shard, samples[shard * CRAWL_SHARD:(shard + 1) * CRAWL_SHARD])
    tasks = [ReadTask("webdataset", "crawl", (str(path),)).to_row() for path in sorted(folder.glob("*.tar"))]
    return pa.Table.from_pylist(tasks)


def as_item(sample: CrawlSample) -> Item:
    meta = {"key": sample.key, "status": "success", "synthetic": sample.label()}
    return Item(sample.key, sample.image, sample.ext, sample.caption, json.dumps(meta, sort_keys=True))


# --- the per-image rows: each adds one piece of work to the one before ---------------------------

def decode(item: Item) -> tuple[Image.Image, int, int]:
    """The decoded image (Pillow, full size) and its size."""
    image = Image.open(io.BytesIO(item.data))
    image.load()
    return image, *image.size


def old_thumbnail(image: Image.Image) -> bytes:
    """The thumbnail dedup computed before issue 19: Pillow's 8x8 box resize of the full image."""
    return image.convert("RGB").resize((8, 8), Image.Resampling.BOX).tobytes()


def old_signals(data: bytes, image: Image.Image) -> dict[str, Any]:
    """Dedup's signals before issue 19, on a loaded full decode: sha256, imagehash's pHash, box thumbnail."""
    return {"content_sha256": content_hash(data), "phash": phash64(image), "thumbnail": old_thumbnail(image)}


def filter_row(item: Item, width: int, height: int, cfg: BasicFiltersConfig) -> dict[str, Any]:
    caption = item.caption.decode("utf-8").strip()
    return {"key": item.key, "image": item.data, "image_ext": item.ext, "caption": caption, "width": width,
            "height": height, "source": "crawl", "meta": item.meta,
            "drop_reason": drop_reason(width, height, caption, cfg)}


def with_hashes(item: Item, cfg: BasicFiltersConfig, signals: bool) -> dict[str, Any]:
    """One decode and its signals: the old way (full decode, old hashes) or the pipeline's (`image_signals`)."""
    if signals:
        with Image.open(io.BytesIO(item.data)) as image:
            width, height = image.size
            found = image_signals(item.data, image)
        return filter_row(item, width, height, cfg) | found
    image, width, height = decode(item)
    return filter_row(item, width, height, cfg) | old_signals(item.data, image)


def run_decode(inputs: Inputs) -> None:
    for item in inputs.items:
        decode(item)


def run_filters(inputs: Inputs) -> None:
    cfg = BasicFiltersConfig()
    for item in inputs.items:
        _, width, height = decode(item)
        filter_row(item, width, height, cfg)


def run_hashes(inputs: Inputs) -> None:
    cfg = BasicFiltersConfig()
    for item in inputs.items:
        with_hashes(item, cfg, signals=False)


def run_full_path(inputs: Inputs, signals: bool = False) -> None:
    """One decode per image with its signals (old or the pipeline's), filters, and 1,000-sample shards."""
    cfg, per_shard = BasicFiltersConfig(), ShardsConfig().samples_per_shard
    rows: list[dict[str, Any]] = []
    shards = 0
    for item in inputs.items:
        row = with_hashes(item, cfg, signals)
        if row.pop("drop_reason") is None:
            rows.append(row)
        if len(rows) == per_shard:
            write_rows(inputs.out / f"path-{shards:06d}.tar", rows)
            rows, shards = [], shards + 1
    if rows:
        write_rows(inputs.out / f"path-{shards:06d}.tar", rows)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> int:
    """Kept caption rows into one tar, through the shard writer's own row builder."""
    table = pa.Table.from_pylist(rows, schema=HASHED_SCHEMA)
    return write_tar(path, to_shard_rows(table, {"caption": 1}).to_pylist())


# --- the pipeline's own batch UDFs, in step order -------------------------------------------------

def kept(batch: pa.Table) -> pa.Table:
    """What `read_kept` hands the next step: rows without a drop reason, without the column."""
    return batch.filter(pc.is_null(batch.column("drop_reason"))).drop_columns(["drop_reason"])


def in_batches(table: pa.Table, fn: Callable[[pa.Table], pa.Table]) -> pa.Table:
    parts = [fn(table.slice(start, BATCH_ROWS)) for start in range(0, table.num_rows, BATCH_ROWS)]
    return pa.concat_tables(parts) if parts else table


def ingest_and_filter(tasks: pa.Table, signals: bool = True) -> pa.Table:
    """ingest's `read_files` per tar, then `apply_basic_filters`: the rows dedup reads."""
    max_pixels, cfg = IngestConfig().max_image_pixels, BasicFiltersConfig()
    ingested = pa.concat_tables([b for task in tasks.to_batches(1) for b in
                                 read_files(pa.Table.from_batches([task]), max_pixels, signals)])
    return kept(in_batches(kept(ingested), lambda b: apply_basic_filters(b, cfg)))


def old_add_signals(batch: pa.Table) -> pa.Table:
    """Dedup's hashing UDF before issue 19: a second full decode per row and the old signals."""
    columns: dict[str, list[Any]] = {name: [] for name in SIGNAL_NAMES}
    for data in batch.column("image").to_pylist():
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            for name, value in old_signals(data, image).items():
                columns[name].append(value)
    batch = batch.drop_columns([name for name in SIGNAL_NAMES if name in batch.column_names])
    for field in SIGNAL_FIELDS:
        batch = batch.append_column(field, pa.array(columns[field.name], field.type))
    return batch


def no_signals(batch: pa.Table) -> pa.Table:
    """Hashing free: the signal columns left null (the floor row; dedup could not run on them)."""
    return batch


def run_pipeline(inputs: Inputs, before: bool = False, floor: bool = False) -> None:
    """The steps' UDFs; `before`: ingest's signals off and dedup's old hashing on a second full decode;
    `floor`: ingest's signals off (one full Pillow decode to validate) and no hashing at all."""
    filtered = ingest_and_filter(inputs.tasks, signals=not (before or floor))
    hashing = no_signals if floor else old_add_signals if before else add_signals
    deduped = kept(in_batches(filtered, lambda b: mark_duplicates(hashing(b), {})))
    num_shards = {"caption": max(1, math.ceil(deduped.num_rows / ShardsConfig().samples_per_shard))}
    with tempfile.TemporaryDirectory(dir=inputs.out) as fragments:
        groups = in_batches(deduped, lambda b: write_fragments(to_shard_rows(b, num_shards), fragments))
        for group in groups.group_by(["task", "shard"]).aggregate([]).to_batches(1):
            write_shard(pa.Table.from_batches([group]), fragments, str(inputs.out), "shard")


# --- timing ----------------------------------------------------------------------------------------

def timed(fn: Callable[[Inputs], None], inputs: Inputs) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn(inputs)
    return time.process_time() - cpu, time.perf_counter() - wall


def throughput_rows(inputs: Inputs, rows: dict[str, Callable[[Inputs], None]], rounds: int) -> list[dict[str, Any]]:
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for name, fn in rows.items():
            cpu, wall = timed(fn, inputs)
            previous = best.get(name, (math.inf, math.inf))
            best[name] = (min(previous[0], cpu), min(previous[1], wall))
    n = len(inputs.items)
    base = n / best["decode only"][0]
    out = []
    for name, (cpu, wall) in best.items():
        out.append({"row": name, "images_per_s_per_core": round(n / cpu, 1), "wall_images_per_s": round(n / wall, 1),
                    "us_per_image": round(cpu / n * 1e6, 1), "ratio_vs_decode": round(n / cpu / base, 3)})
    return out


class Laps:
    """Adds the CPU seconds of this thread since the previous lap to `spent[name]`."""

    def __init__(self, spent: dict[str, float]) -> None:
        self.spent = spent
        self.last = time.thread_time()

    def __call__(self, name: str) -> None:
        now = time.thread_time()
        self.spent[name] = self.spent.get(name, 0.0) + now - self.last
        self.last = now


def breakdown(items: list[Item]) -> dict[str, dict[str, float]]:
    """Microseconds per image of each piece of the old one-decode path and of the pipeline's signals
    decode, for all images and per format; the shard write is timed for all rows at once, so only
    under `all`. simplejpeg's full decode is timed on the JPEGs, beside Pillow's."""
    cfg = BasicFiltersConfig()
    spent: dict[str, dict[str, float]] = {"all": {}, "jpg": {}, "png": {}}
    rows: list[dict[str, Any]] = []
    for item in items:
        lap = Laps(spent[item.ext])
        image, width, height = decode(item)
        lap("decode")
        row = filter_row(item, width, height, cfg)
        lap("caption + drop_reason")
        content_hash(item.data)
        lap("content sha256")
        gray = image.convert("L")
        lap("before: pHash: convert L")
        small = gray.resize((32, 32), Image.LANCZOS)  # what imagehash.phash does, in two steps
        lap("before: pHash: resize to 32x32 (Lanczos)")
        phash64(small)  # its own convert and resize are no-ops on a 32x32 L image
        lap("before: pHash: DCT, median, bits")
        old_thumbnail(image)
        lap("before: thumbnail (Pillow RGB, 8x8 box)")
        del row["drop_reason"]
        rows.append(row | old_signals(item.data, image))
        lap("(row dict)")
        with Image.open(io.BytesIO(item.data)) as lazy:
            rgb = signal_pixels(item.data, lazy)
        lap(SIGNAL_PIECES[0])
        phash_pixels(rgb)
        thumbnail_pixels(rgb)
        lap(SIGNAL_PIECES[1])
        if item.ext == "jpg":
            simplejpeg.decode_jpeg(item.data, colorspace="RGB")
            lap(SIMPLEJPEG_PIECE)
    with tempfile.TemporaryDirectory() as folder:
        started = time.thread_time()
        write_rows(Path(folder) / "b.tar", rows)
        write_seconds = time.thread_time() - started
    counts = {"jpg": sum(item.ext == "jpg" for item in items), "png": sum(item.ext == "png" for item in items)}
    for fmt in counts:
        spent[fmt].pop("(row dict)", None)
        for name, seconds in spent[fmt].items():
            if name != SIMPLEJPEG_PIECE:  # JPEG only: shown per JPEG, not averaged over PNGs
                spent["all"][name] = spent["all"].get(name, 0.0) + seconds
    spent["all"]["shard write (to_shard_rows, write_tar)"] = write_seconds
    counts["all"] = len(items)
    return {fmt: {name: round(seconds / max(1, counts[fmt]) * 1e6, 1) for name, seconds in pieces.items()}
            for fmt, pieces in spent.items()}


# --- do the pipeline's signals change what dedup decides? ------------------------------------------

def hashed(filtered: pa.Table, side: int | None) -> pa.Table:
    """The rows with the pipeline's signals on a decode reduced to >= side px, or the old ones (None)."""
    bare = filtered.drop_columns(list(SIGNAL_NAMES))
    return in_batches(bare, old_add_signals if side is None else lambda b: add_signals(b, side))


def dedup_outcome(rows: pa.Table, cfg: DedupConfig) -> tuple[dict[str, str], dict[str, float]]:
    """Dedup's verdicts (key -> drop reason) on hashed rows, and its label metrics, as the step computes them."""
    reasons, dropped, _ = plan_drops(rows, cfg)
    kept_for = {d["key"]: d["duplicate_of"] for d in dropped}
    return reasons, label_metrics(rows.column("meta").to_pylist(), rows.column("key").to_pylist(), kept_for)


def label_scores(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items() if k in ("duplicate_recall", "distinct_removed_rate")}


def thumbnails(rows: pa.Table) -> np.ndarray:
    return np.frombuffer(b"".join(rows.column("thumbnail").to_pylist()), dtype=np.uint8).reshape(rows.num_rows, -1)


def signal_agreement(tasks: pa.Table, sides: list[int]) -> list[dict[str, Any]]:
    """The pipeline's signals (each decode side) against the old ones: pHashes, thumbnails and dedup's
    verdicts on the same rows; and whether ingest's stored signals are exactly those of SIGNAL_SIDE."""
    cfg = DedupConfig()
    filtered = ingest_and_filter(tasks)
    reference = hashed(filtered, None)
    ref_reasons, ref_metrics = dedup_outcome(reference, cfg)
    ref_hashes = reference.column("phash").to_numpy().astype(np.uint64)
    is_jpeg = np.array([ext == "jpg" for ext in reference.column("image_ext").to_pylist()])
    out = [{"signals": "before (imagehash, full decode)", "rows": reference.num_rows, "dropped": len(ref_reasons),
            **label_scores(ref_metrics)}]
    for side in sides:
        rows = hashed(filtered, side)
        distance = np.bitwise_count(rows.column("phash").to_numpy().astype(np.uint64) ^ ref_hashes)
        thumb_diff = np.abs(thumbnails(rows).astype(np.int16) - thumbnails(reference).astype(np.int16)).max(axis=1)
        reasons, metrics = dedup_outcome(rows, cfg)
        changed = sum(reasons.get(k) != ref_reasons.get(k) for k in set(reasons) | set(ref_reasons))
        out.append({"signals": f"pipeline, side {side}", "rows": rows.num_rows, "dropped": len(reasons),
                    **label_scores(metrics), "verdicts_changed": changed,
                    "phash_identical": round(float((distance == 0).mean()), 4),
                    "phash_identical_jpeg": round(float((distance[is_jpeg] == 0).mean()), 4),
                    "phash_mean_hamming": round(float(distance.mean()), 3), "phash_max_hamming": int(distance.max()),
                    "thumbnail_mean_max_diff": round(float(thumb_diff.mean()), 2),
                    "thumbnail_max_diff": int(thumb_diff.max()), "pipeline": side == SIGNAL_SIDE,
                    "equals_ingest_signals": all(rows.column(n).equals(filtered.column(n)) for n in SIGNAL_NAMES)})
    return out


def signal_validation(items: list[Item], seed: int) -> dict[str, Any]:
    """Does ingest with its signals on (the reduced decode) reject the same corrupt JPEGs (the crawl's
    `corrupt`) as with them off (a full Pillow decode)? And no intact one?"""
    rng = random.Random(seed)
    jpegs = [item.data for item in items if item.ext == "jpg"]
    broken = [corrupt_bytes(rng, data) for data in jpegs]
    max_pixels = IngestConfig().max_image_pixels

    def rejected(data: bytes, signals: bool) -> bool:
        return inspect_image(data, max_pixels, signals=signals).get("drop_reason") == "image_corrupt"

    full = [rejected(data, False) for data in broken]
    reduced = [rejected(data, True) for data in broken]
    return {"corrupt_jpegs": len(broken), "rejected_full_decode": sum(full), "rejected_signals_decode": sum(reduced),
            "disagree": sum(a != b for a, b in zip(full, reduced)),
            "intact_rejected_by_signals_decode": sum(rejected(data, True) for data in jpegs)}


# --- output ----------------------------------------------------------------------------------------

def print_throughput(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'row':<44} {'img/s/core':>10} {'wall img/s':>10} {'us/img':>8} {'vs decode':>9}")
    for r in rows:
        print(f"{r['row']:<44} {r['images_per_s_per_core']:>10.1f} {r['wall_images_per_s']:>10.1f} "
              f"{r['us_per_image']:>8.1f} {r['ratio_vs_decode']:>9.3f}")
    pipeline = next(r for r in rows if r["row"] == PIPELINE_ROW)
    for goal in (GOAL, FLOOR_GOAL):
        verdict = "met" if pipeline["ratio_vs_decode"] >= goal else "not met"
        print(f"goal: the pipeline's path >= {goal} of decode-only: {verdict} ({pipeline['ratio_vs_decode']:.3f})")


def print_breakdown(spent: dict[str, dict[str, float]]) -> None:
    signals = [*SIGNAL_PIECES, SIMPLEJPEG_PIECE]
    path = {k: v for k, v in spent["all"].items() if k not in signals}
    total = sum(path.values())
    print(f"\nwhere the old one-decode path's time goes (CPU us per image; {total:.0f} in all)")
    print(f"  floor of a full-decode path (hashing free): decode-only at {floor_ratio(spent):.3f} of decode + "
          "caption + sha256 + shard write")
    print(f"  {'piece':<44} {'all':>8} {'share':>6} {'jpg':>8} {'png':>8}")
    for name, us in path.items():
        print(f"  {name:<44} {us:>8.1f} {us / total:6.1%} {spent['jpg'].get(name, 0):>8.1f} "
              f"{spent['png'].get(name, 0):>8.1f}")
    print(f"  the pipeline's signals instead (decode reduced to >= {SIGNAL_SIDE} px; PNG: full decode, box-reduced):")
    for name in SIGNAL_PIECES:
        print(f"  {name:<44} {spent['all'][name]:>8.1f} {'':>6} {spent['jpg'][name]:>8.1f} {spent['png'][name]:>8.1f}")
    print(f"  {SIMPLEJPEG_PIECE:<44} {'':>8} {'':>6} {spent['jpg'][SIMPLEJPEG_PIECE]:>8.1f}   (JPEG only, full size)")


def floor_ratio(spent: dict[str, dict[str, float]]) -> float:
    """decode-only over a full-decode path with hashing free: the most hashing after a full decode can reach."""
    pieces = spent["all"]
    return pieces["decode"] / sum(pieces[k] for k in FLOOR_PIECES)


def print_agreement(agreement: list[dict[str, Any]], validation: dict[str, Any]) -> None:
    print(f"\ndedup with the pipeline's signals vs the old ones (same {agreement[0]['rows']} rows, DedupConfig "
          f"defaults); the pipeline's side is {SIGNAL_SIDE}: ingest's stored signals equal it: "
          f"{all(a['equals_ingest_signals'] for a in agreement if a.get('pipeline'))}")
    print(f"{'signals':<32} {'dropped':>7} {'changed':>7} {'dup recall':>10} {'distinct rm':>11} {'pHash ident':>11} "
          f"{'jpeg ident':>10} {'mean ham':>8} {'max':>4} {'thumb diff':>10}")
    for a in agreement:
        thumb = f"{a['thumbnail_mean_max_diff']:.2f}/{a['thumbnail_max_diff']}" if "thumbnail_max_diff" in a else "-"
        print(f"{a['signals']:<32} {a['dropped']:>7} {a.get('verdicts_changed', 0):>7} "
              f"{a.get('duplicate_recall', float('nan')):>10.4f} {a.get('distinct_removed_rate', float('nan')):>11.4f} "
              f"{a.get('phash_identical', 1.0):>11.4f} {a.get('phash_identical_jpeg', 1.0):>10.4f} "
              f"{a.get('phash_mean_hamming', 0.0):>8.3f} {a.get('phash_max_hamming', 0):>4} {thumb:>10}")
    print("(thumb diff: mean over images of the largest per-cell difference / the largest anywhere, 0-255)")
    v = validation
    print(f"\ncorrupt JPEGs (the crawl's truncate/garbage/header corruption of each JPEG), rejected by ingest: "
          f"full Pillow decode {v['rejected_full_decode']}/{v['corrupt_jpegs']}, the signals' reduced decode "
          f"{v['rejected_signals_decode']}/{v['corrupt_jpegs']}, disagreements {v['disagree']}; intact JPEGs "
          f"rejected by the reduced decode: {v['intact_rejected_by_signals_decode']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per row, interleaved; the best counts")
    parser.add_argument("--sides", default=f"{SIGNAL_SIDE},128",
                        help="comma-separated decode sides of the signals compared with the old ones")
    args = parser.parse_args()
    sides = [int(s) for s in args.sides.split(",") if s]
    samples = make_samples(args.images, args.seed)
    items = [as_item(s) for s in samples]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out"
        out.mkdir()
        inputs = Inputs(items, write_crawl_tars(samples, Path(folder) / "crawl"), out)
        rows_to_run: dict[str, Callable[[Inputs], None]] = {
            "decode only": run_decode,
            "+ basic filters": run_filters,
            "+ hashes, before (imagehash, Pillow thumb)": run_hashes,
            "+ shard write, before (one full decode)": run_full_path,
            SIGNALS_ROW: lambda i: run_full_path(i, signals=True),
            PIPELINE_ROW: run_pipeline,
            "pipeline UDFs, before (two full decodes)": lambda i: run_pipeline(i, before=True),
            FLOOR_ROW: lambda i: run_pipeline(i, floor=True),
        }
        run_pipeline(Inputs(items[:CRAWL_SHARD], inputs.tasks.slice(0, 1), out))  # warm-up: imports, caches
        rows = throughput_rows(inputs, rows_to_run, args.rounds)
        agreement = signal_agreement(inputs.tasks, sides)
    spent = breakdown(items[:BREAKDOWN_IMAGES])
    validation = signal_validation(items, args.seed)
    print_throughput(rows)
    print_breakdown(spent)
    print_agreement(agreement, validation)
    jpeg = sum(item.ext == "jpg" for item in items)
    record(RESULTS, {"images": args.images, "seed": args.seed, "rounds": args.rounds, "jpeg": jpeg,
                     "png": len(items) - jpeg, "pillow": PIL.__version__, "simplejpeg": simplejpeg.__version__,
                     "goal_ratio": GOAL, "signal_side": SIGNAL_SIDE, "floor_ratio": round(floor_ratio(spent), 3),
                     "breakdown_us_per_image": spent, "signal_agreement": agreement,
                     "signal_validation": validation}, rows)


if __name__ == "__main__":
    main()
