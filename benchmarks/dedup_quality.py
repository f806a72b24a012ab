"""Dedup quality on the labelled synthetic crawl: recall on the labelled exact and near duplicates and
the share of distinct images removed (goals: >= 0.95 and <= 1 %), for pHash alone and pHash + the
second signal (aspect ratio and 8x8 RGB thumbnail), with the pipeline's own functions.

    .venv/bin/python benchmarks/dedup_quality.py [--samples 2000] [--seed 0] [--sides 128,64,32]

Generates the crawl in-process with the tiny profile's settings (shorter side 200-384 px, skewed
colours), keeps what ingest and the basic filters would keep, hashes each image once (`add_signals`)
and plans the drops (`plan_drops`) under each setting; scored by `label_metrics`. The signals come
two ways: `imagehash` is how dedup hashed before issue 19 (a full Pillow decode, imagehash's pHash
with Lanczos and scipy, Pillow's 8x8 box thumbnail); `signals N` is the pipeline's `lib/signals.py`
on a decode reduced to >= N px a side (JPEG DCT-scaled, OpenCV area resize and DCT), for each of
`--sides` (the pipeline's is SIGNAL_SIDE). For each, how many pHashes differ from imagehash's and by
how much is shown, with the CPU time of decoding and hashing. Prints a table and records it in
benchmarks/results/dedup_quality.json.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's `components`, not an installed one

import numpy as np
import pyarrow as pa
from PIL import Image
from results_file import record

from components.data.basic_filters import drop_reason
from components.data.config import BasicFiltersConfig, DedupConfig, SyntheticCrawlConfig
from components.data.dedup import label_metrics, plan_drops
from components.data.lib.dedup_core import content_hash, phash64
from components.data.lib.signals import SIGNAL_FIELDS, SIGNAL_SIDE, add_signals
from components.data.ingest import inspect_image
from components.data.synthetic_crawl import generate_shard, shard_sizes

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "dedup_quality.json"
SETTINGS = {
    "pHash <= 6 alone (before)": DedupConfig(phash_threshold=6, verify=False),
    "pHash <= 8 alone": DedupConfig(phash_threshold=8, verify=False),
    "pHash <= 8 + aspect + thumbnail (default)": DedupConfig(),
    "pHash <= 12 + aspect + thumbnail <= 64": DedupConfig(phash_threshold=12, max_thumbnail_diff=64),
}


def crawl_rows(samples: int, seed: int) -> list[dict[str, Any]]:
    cfg = SyntheticCrawlConfig(num_samples=samples, num_shards=4, max_side=384, colour_skew=1.0)
    filters = BasicFiltersConfig()
    rows = []
    for shard, count in enumerate(shard_sizes(cfg.num_samples, cfg.num_shards)):
        for sample in generate_shard(cfg, shard, count, seed):
            info = inspect_image(sample.image, 10**9)
            if "drop_reason" in info or drop_reason(info["width"], info["height"], "a caption kept here", filters):
                continue
            rows.append({"key": f"crawl-{shard:05d}-{sample.key}", "image": sample.image, "width": info["width"],
                         "height": info["height"], "meta": json.dumps({"synthetic": sample.label()})})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", default=f"{SIGNAL_SIDE},64,32",
                        help="comma-separated decode sizes for the pipeline's signals")
    args = parser.parse_args()
    crawl = pa.Table.from_pylist(crawl_rows(args.samples, args.seed))
    started = time.process_time()
    before = imagehash_signals(crawl)
    hash_seconds = {"imagehash": time.process_time() - started}
    full = before.column("phash").to_numpy().astype(np.uint64)
    tables = {"imagehash": before}
    for side in (int(d) for d in args.sides.split(",") if d):
        started = time.process_time()
        tables[f"signals {side}"] = add_signals(crawl, side)
        hash_seconds[f"signals {side}"] = time.process_time() - started
    rows = []
    for method, hashed in tables.items():
        keys, meta = hashed.column("key").to_pylist(), hashed.column("meta").to_pylist()
        changed = np.bitwise_count(hashed.column("phash").to_numpy().astype(np.uint64) ^ full)
        for name, cfg in SETTINGS.items():
            started = time.perf_counter()
            _, dropped, stats = plan_drops(hashed, cfg)
            seconds = time.perf_counter() - started
            scores = label_metrics(meta, keys, {d["key"]: d["duplicate_of"] for d in dropped})
            rows.append({"signals": method, "setting": name, "rows": hashed.num_rows,
                         "hash_us_per_image": round(hash_seconds[method] / max(1, hashed.num_rows) * 1e6),
                         "labelled_duplicates": int(scores["labelled_duplicates"]),
                         "duplicate_recall": round(scores["duplicate_recall"], 4),
                         "distinct_removed_rate": round(scores["distinct_removed_rate"], 4),
                         "dropped": len(dropped), "pairs": stats.verified_pairs, "plan_s": round(seconds, 2),
                         "phash_differs_from_imagehash": round(float(np.mean(changed > 0)), 4),
                         "phash_mean_hamming_to_imagehash": round(float(changed.mean()), 3) if changed.size else 0.0,
                         "phash_max_hamming_to_imagehash": int(changed.max()) if changed.size else 0})
    print(f"\n{'signals':<12} {'setting':<44} {'recall':>7} {'distinct removed':>17} {'dropped':>8} {'pairs':>6} "
          f"{'pHash != imagehash':>18} {'mean bits':>9} {'us/img':>7}")
    for row in rows:
        print(f"{row['signals']:<12} {row['setting']:<44} {row['duplicate_recall']:>7.3f} "
              f"{row['distinct_removed_rate']:>17.2%} {row['dropped']:>8} {row['pairs']:>6} "
              f"{row['phash_differs_from_imagehash']:>18.1%} {row['phash_mean_hamming_to_imagehash']:>9.2f} "
              f"{row['hash_us_per_image']:>7}")
    print(f"(the pipeline's signals: signals {SIGNAL_SIDE}; us/img: CPU time to decode and hash, this process)")
    record(RESULTS, {"samples": args.samples, "seed": args.seed, "rows_after_filters": crawl.num_rows,
                     "signal_side": SIGNAL_SIDE}, rows)


def imagehash_signals(crawl: pa.Table) -> pa.Table:
    """The signals as dedup computed them before issue 19: a full Pillow decode, imagehash's pHash and
    Pillow's 8x8 box thumbnail."""
    columns: dict[str, list[Any]] = {field.name: [] for field in SIGNAL_FIELDS}
    for data in crawl.column("image").to_pylist():
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            columns["content_sha256"].append(content_hash(data))
            columns["phash"].append(phash64(image))
            columns["thumbnail"].append(image.convert("RGB").resize((8, 8), Image.Resampling.BOX).tobytes())
    for field in SIGNAL_FIELDS:
        crawl = crawl.append_column(field, pa.array(columns[field.name], field.type))
    return crawl


if __name__ == "__main__":
    main()
