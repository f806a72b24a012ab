"""How perceptual dedup scales: index + find groups on n random 64-bit hashes, 5% planted near copies.

    .venv/bin/python benchmarks/dedup_scaling.py [--sizes 10000,100000,1000000] [--threshold 8]
                                                 [--bands N] [--max-bucket 1000] [--seed 0]
                                                 [--repeats 3] [--baseline] [--faiss-max 100000]
                                                 [--faiss-layouts 3x21]

Each size gets n uniformly random hashes of which 5% are near copies of others (1..threshold random
bits flipped). Timed: `find_duplicate_groups` end to end (collapsing identical hashes, the LSH
tables, verification, union-find, grouping). The per-hash cost relative to the first row says how
close to linear it is. When faiss-cpu is importable, its exact multi-index hashing
(`IndexBinaryMultiHash`, each of --faiss-layouts: M substrings of B bits probed with up to
floor(threshold / M) bit flips, so every pair within the threshold is found; 3x21 by default, 4x16
also exact at threshold 8) self-joins the same hashes up to --faiss-max, on one thread like ours, as
the library alternative (issue 19). --baseline times each size again with the comparison sort the index
used before its radix sort (same groups, asserted). Prints a table and records it in benchmarks/results/dedup_scaling.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's `components`, not an installed one

from results_file import record

import numpy as np

from components.data.lib import dedup_core
from components.data.lib.dedup_core import LSHStats, find_duplicate_groups

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "dedup_scaling.json"
PLANTED_FRACTION = 0.05


def planted_hashes(n: int, threshold: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashes, source index, copy index): the last 5% are copies of earlier ones at distance 1..threshold."""
    rng = np.random.default_rng(seed)
    copies = int(n * PLANTED_FRACTION)
    base = rng.integers(0, 2**64, size=n - copies, dtype=np.uint64)
    sources = rng.integers(0, base.size, size=copies)
    distances = rng.integers(1, threshold + 1, size=copies)
    bit_order = np.argsort(rng.random((copies, 64)), axis=1)  # a random order of the 64 bits per copy
    chosen = np.arange(64)[None, :] < distances[:, None]  # (copies, 64): flip the first d of them
    masks = np.bitwise_or.reduce(np.where(chosen, np.uint64(1) << bit_order.astype(np.uint64), np.uint64(0)), axis=1)
    hashes = np.concatenate([base, base[sources] ^ masks])
    return hashes, sources, np.arange(base.size, n)


def planted_recall(groups: list[list[int]], n: int, sources: np.ndarray, copies: np.ndarray) -> float:
    group_of = np.full(n, -1)
    for g, members in enumerate(groups):
        group_of[members] = g
    found = (group_of[sources] == group_of[copies]) & (group_of[copies] >= 0)
    return float(found.mean()) if found.size else 1.0


def run_size(n: int, threshold: int, bands: int | None, max_bucket: int, seed: int, repeats: int = 1) -> dict:
    hashes, sources, copies = planted_hashes(n, threshold, seed)
    keys = [f"h{i:08d}" for i in range(n)]
    seconds = float("inf")
    for _ in range(repeats):  # the best of a few: this machine's speed varies with its other load
        stats = LSHStats()
        started = time.perf_counter()
        groups = find_duplicate_groups(keys, hashes, threshold, bands=bands, max_bucket=max_bucket, stats=stats)
        seconds = min(seconds, time.perf_counter() - started)
    return {"n": n, "seconds": round(seconds, 3), "us_per_hash": round(seconds / n * 1e6, 2),
            "bands": stats.bands, "tables": stats.tables, "candidate_pairs": stats.candidate_pairs,
            "verified_pairs": stats.verified_pairs, "oversized_buckets": stats.oversized_buckets,
            "groups": len(groups), "planted_recall": round(planted_recall(groups, n, sources, copies), 4)}


def comparison_sort_by_key(key: np.ndarray, key_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """dedup_core.sort_by_key before its radix sort (one comparison sort of key and position packed
    into a uint64), the baseline for --baseline; same order, so the same groups."""
    n = key.size
    pos_bits = max(1, (n - 1).bit_length())
    if key_bits + pos_bits <= 64:
        packed = np.sort((key << np.uint64(pos_bits)) | np.arange(n, dtype=np.uint64))
        return packed >> np.uint64(pos_bits), (packed & np.uint64((1 << pos_bits) - 1)).astype(np.int64)
    order = np.argsort(key, kind="stable")
    return key[order], order


def faiss_pairs(hashes: np.ndarray, threshold: int, tables: int = 3, bits: int = 21) -> tuple[float, int] | None:
    """(seconds, distinct pairs within threshold) by faiss's binary multi-index hashing; None
    without faiss. `tables` substrings of `bits` bits probed with up to floor(threshold / tables)
    flips cover every pair: a pair within the threshold differs in at most that many bits in one of
    the substrings."""
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(1)
    codes = hashes.astype("<u8").view(np.uint8).reshape(-1, 8)  # (n, 8) bytes, 64-bit codes
    started = time.perf_counter()
    index = faiss.IndexBinaryMultiHash(64, tables, bits)
    index.nflip = threshold // tables
    index.add(codes)
    limits, _, found = index.range_search(codes, threshold + 1)  # distances < radius
    seconds = time.perf_counter() - started
    rows = np.repeat(np.arange(hashes.size), np.diff(limits.astype(np.int64)))
    return seconds, int(np.count_nonzero(rows < found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated numbers of hashes")
    parser.add_argument("--threshold", type=int, default=8)
    parser.add_argument("--bands", type=int, default=None, help="force a layout; default: choose_bands per size")
    parser.add_argument("--max-bucket", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="time each size this many times, keep the best")
    parser.add_argument("--baseline", action="store_true",
                        help="also time each size with the comparison sort used before the radix sort")
    parser.add_argument("--faiss-max", type=int, default=100_000, help="largest size faiss is run on (0: never)")
    parser.add_argument("--faiss-layouts", default="3x21", help="comma-separated MxB: M substrings of B bits")
    args = parser.parse_args()
    layouts = [tuple(int(v) for v in layout.split("x")) for layout in args.faiss_layouts.split(",") if layout]
    if any(m * b > 64 for m, b in layouts):
        parser.error("--faiss-layouts: M substrings of B bits must fit in 64 bits")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    run_size(1000, args.threshold, args.bands, args.max_bucket, args.seed)  # warm-up, not recorded
    rows = []
    for n in sizes:
        rows.append(run_size(n, args.threshold, args.bands, args.max_bucket, args.seed, args.repeats))
        first = rows[0]["us_per_hash"]
        rows[-1]["ratio_vs_first"] = round(rows[-1]["us_per_hash"] / first, 2) if first else None
        if len(rows) > 1:
            rows[-1]["seconds_vs_previous"] = round(rows[-1]["seconds"] / max(rows[-2]["seconds"], 1e-9), 1)
        for m, b in layouts if n <= args.faiss_max else []:
            measured = faiss_pairs(planted_hashes(n, args.threshold, args.seed)[0], args.threshold, m, b)
            if measured is None:
                break
            suffix = "" if (m, b) == layouts[0] else f"_{m}x{b}"
            rows[-1][f"faiss_mih{suffix}_seconds"] = round(measured[0], 3)
            rows[-1][f"faiss_mih{suffix}_pairs"] = measured[1]
        if args.baseline:
            radix_sort, dedup_core.sort_by_key = dedup_core.sort_by_key, comparison_sort_by_key
            try:
                before = run_size(n, args.threshold, args.bands, args.max_bucket, args.seed, args.repeats)
            finally:
                dedup_core.sort_by_key = radix_sort
            assert before["groups"] == rows[-1]["groups"] and before["verified_pairs"] == rows[-1]["verified_pairs"]
            rows[-1]["comparison_sort_seconds"] = before["seconds"]
    print(f"\nthreshold {args.threshold}, {PLANTED_FRACTION:.0%} planted near copies, max_bucket {args.max_bucket}")
    print(f"{'n':>9} {'seconds':>8} {'us/hash':>8} {'ratio':>6} {'bands':>5} {'tables':>6} {'candidates':>12} "
          f"{'groups':>7} {'recall':>7} {'x prev':>6} {'before s':>8} {'faiss s':>8} {'pairs ours/faiss':>17}")
    for r in rows:
        faiss_s = f"{r['faiss_mih_seconds']:>8.2f}" if "faiss_mih_seconds" in r else f"{'-':>8}"
        before_s = f"{r['comparison_sort_seconds']:>8.2f}" if "comparison_sort_seconds" in r else f"{'-':>8}"
        pairs = f"{r['verified_pairs']}/{r.get('faiss_mih_pairs', '-')}"
        print(f"{r['n']:>9} {r['seconds']:>8.2f} {r['us_per_hash']:>8.2f} {r['ratio_vs_first']:>6.2f} {r['bands']:>5} "
              f"{r['tables']:>6} {r['candidate_pairs']:>12,} {r['groups']:>7} {r['planted_recall']:>7.4f} "
              f"{r.get('seconds_vs_previous', '-'):>6} {before_s} {faiss_s} {pairs:>17}")
    for m, b in layouts[1:]:
        for r in rows:
            if f"faiss_mih_{m}x{b}_seconds" in r:
                print(f"faiss MIH {m}x{b} at {r['n']}: {r[f'faiss_mih_{m}x{b}_seconds']:.2f} s, "
                      f"{r[f'faiss_mih_{m}x{b}_pairs']} pairs")
    record(RESULTS, {"threshold": args.threshold, "bands": args.bands, "max_bucket": args.max_bucket,
                     "faiss_layouts": args.faiss_layouts,
                     "seed": args.seed, "repeats": args.repeats, "planted_fraction": PLANTED_FRACTION, "numpy": np.__version__}, rows)


if __name__ == "__main__":
    main()
