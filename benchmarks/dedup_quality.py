"""Dedup quality on the labelled synthetic crawl: recall on the labelled exact and near duplicates and
the share of distinct images removed (goals: >= 0.95 and <= 1 %), for pHash alone and pHash + the
second signal (aspect ratio and 8x8 RGB thumbnail), with the pipeline's own functions.

    .venv/bin/python benchmarks/dedup_quality.py [--samples 2000] [--seed 0] [--drafts 0,128]

Generates the crawl in-process with the tiny profile's settings (shorter side 200-384 px, skewed
colours), keeps what ingest and the basic filters would keep, hashes each image once (`add_signals`)
and plans the drops (`plan_drops`) under each setting; scored by `label_metrics`. Each `--drafts`
value is one way of decoding for the signals: 0 decodes in full (imagehash's pHash of the full
image), N > 0 decodes JPEGs DCT-scaled to >= N px a side (`lib/signals.py`; the pipeline's is
SIGNAL_DRAFT); for each, how many pHashes differ from the full decode's is shown. Prints a table and
records it in benchmarks/results/dedup_quality.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's `components`, not an installed one

import numpy as np
import pyarrow as pa
from results_file import record

from components.data.basic_filters import drop_reason
from components.data.config import BasicFiltersConfig, DedupConfig, SyntheticCrawlConfig
from components.data.dedup import label_metrics, plan_drops
from components.data.lib.signals import SIGNAL_DRAFT, add_signals
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
    parser.add_argument("--drafts", default=f"0,{SIGNAL_DRAFT}",
                        help="comma-separated decode sizes for the signals (0: full decode)")
    args = parser.parse_args()
    crawl = pa.Table.from_pylist(crawl_rows(args.samples, args.seed))
    full = add_signals(crawl, draft=0).column("phash").to_numpy().astype(np.uint64)
    rows = []
    for draft in (int(d) for d in args.drafts.split(",") if d):
        hashed = add_signals(crawl, draft=draft)
        keys, meta = hashed.column("key").to_pylist(), hashed.column("meta").to_pylist()
        changed = np.bitwise_count(hashed.column("phash").to_numpy().astype(np.uint64) ^ full)
        for name, cfg in SETTINGS.items():
            started = time.perf_counter()
            _, dropped, stats = plan_drops(hashed, cfg)
            seconds = time.perf_counter() - started
            scores = label_metrics(meta, keys, {d["key"]: d["duplicate_of"] for d in dropped})
            rows.append({"decode": f"draft {draft}" if draft else "full", "setting": name, "rows": hashed.num_rows,
                         "labelled_duplicates": int(scores["labelled_duplicates"]),
                         "duplicate_recall": round(scores["duplicate_recall"], 4),
                         "distinct_removed_rate": round(scores["distinct_removed_rate"], 4),
                         "dropped": len(dropped), "pairs": stats.verified_pairs, "plan_s": round(seconds, 2),
                         "phash_differs_from_full": round(float(np.mean(changed > 0)), 4),
                         "phash_max_hamming_to_full": int(changed.max()) if changed.size else 0})
    print(f"\n{'decode':<10} {'setting':<44} {'recall':>7} {'distinct removed':>17} {'dropped':>8} {'pairs':>6} "
          f"{'pHash != full':>13}")
    for row in rows:
        print(f"{row['decode']:<10} {row['setting']:<44} {row['duplicate_recall']:>7.3f} "
              f"{row['distinct_removed_rate']:>17.2%} {row['dropped']:>8} {row['pairs']:>6} "
              f"{row['phash_differs_from_full']:>13.1%}")
    record(RESULTS, {"samples": args.samples, "seed": args.seed, "rows_after_filters": crawl.num_rows,
                     "signal_draft": SIGNAL_DRAFT}, rows)


if __name__ == "__main__":
    main()
