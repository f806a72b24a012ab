"""Visual-token redistribution in simulation: per-step load imbalance (max / mean visual tokens per
worker) with each worker keeping the images it loaded, with a count-balanced round robin inside each
group, and with greedy least-loaded assignment inside each group (the paper's scheme).

    .venv/bin/python benchmarks/token_redistribution.py [--workers 384] [--images-per-worker 8]
                                                         [--steps 50] [--groups 1,8,32,192] [--seed 0]

Image sizes come from a mix meant to look like a VLM pretraining batch: web photos (short side
200-1000 px, aspect up to 3:1), document pages and screenshots (up to the 1024x1024 pixel cap),
thumbnails and icons, and video frames at the dynamic frame-resolution budgets (128-640 tokens). Each
is sized by Seed-ViT's native-resolution rule and costs its pooled visual tokens (one per 28x28
pixels). The step takes as long as its most loaded worker, so max / mean is the time lost to
imbalance. Prints a table and records it in benchmarks/results/token_redistribution.json.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from results_file import record

from components.vit.preprocess import native_size
from components.vlm.token_balance import greedy_assign, imbalance, round_robin_assign

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "token_redistribution.json"
FACTOR, MIN_PIXELS, MAX_PIXELS = 28, 56 * 56, 1024 * 1024
MIX = (("web_photo", 0.6), ("document", 0.1), ("thumbnail", 0.1), ("video_frame", 0.2))


def sample_tokens(rng: random.Random) -> int:
    """Pooled visual tokens of one image drawn from the mix."""
    kind = rng.choices([k for k, _ in MIX], weights=[w for _, w in MIX])[0]
    if kind == "video_frame":
        return rng.choice([640, 512, 384, 256, 160, 128])
    if kind == "document":
        short, aspect = rng.randint(1000, 1700), rng.uniform(1.2, 1.5)
    elif kind == "thumbnail":
        short, aspect = rng.randint(48, 200), rng.uniform(1.0, 1.5)
    else:
        short, aspect = rng.randint(200, 1000), rng.uniform(1.0, 3.0)
    long = int(short * aspect)
    height, width = (short, long) if rng.random() < 0.5 else (long, short)
    h, w = native_size(height, width, FACTOR, MIN_PIXELS, MAX_PIXELS)
    return (h // FACTOR) * (w // FACTOR)


def step_imbalance(per_worker: list[list[int]], group_size: int, strategy: str) -> float:
    """max / mean load over all workers after assigning within groups with `strategy`."""
    loads: list[float] = []
    for start in range(0, len(per_worker), group_size):
        group = per_worker[start:start + group_size]
        if strategy == "keep":
            loads += [float(sum(images)) for images in group]
            continue
        costs = [cost for images in group for cost in images]
        assign = greedy_assign if strategy == "greedy" else round_robin_assign
        owner = assign(costs, len(group))
        group_loads = [0.0] * len(group)
        for cost, worker in zip(costs, owner):
            group_loads[worker] += cost
        loads += group_loads
    return imbalance(loads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=384)
    parser.add_argument("--images-per-worker", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--groups", default="1,8,32,192")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    steps = [[[sample_tokens(rng) for _ in range(args.images_per_worker)] for _ in range(args.workers)]
             for _ in range(args.steps)]
    all_tokens = [t for step in steps for worker in step for t in worker]
    rows = []
    print(f"{args.workers} workers x {args.images_per_worker} images, {args.steps} steps; tokens per image: "
          f"mean {sum(all_tokens) / len(all_tokens):.0f}, min {min(all_tokens)}, max {max(all_tokens)}\n")
    print(f"{'group':>6} {'keep own max/mean':>18} {'round robin':>12} {'greedy':>8} {'step time greedy/keep':>22}")
    for group_size in (int(g) for g in args.groups.split(",")):
        ratios = {s: sum(step_imbalance(step, group_size, s) for step in steps) / len(steps)
                  for s in ("keep", "round_robin", "greedy")}
        rows.append({"group_size": group_size, "keep_max_over_mean": round(ratios["keep"], 3),
                     "round_robin_max_over_mean": round(ratios["round_robin"], 3),
                     "greedy_max_over_mean": round(ratios["greedy"], 3),
                     "step_time_greedy_over_keep": round(ratios["greedy"] / ratios["keep"], 3)})
        print(f"{group_size:>6} {ratios['keep']:>18.3f} {ratios['round_robin']:>12.3f} {ratios['greedy']:>8.3f} "
              f"{ratios['greedy'] / ratios['keep']:>22.3f}")
    record(RESULTS, {"workers": args.workers, "images_per_worker": args.images_per_worker, "steps": args.steps,
                     "seed": args.seed, "mix": dict(MIX), "max_pixels": MAX_PIXELS,
                     "mean_tokens_per_image": round(sum(all_tokens) / len(all_tokens), 1)}, rows)


if __name__ == "__main__":
    main()
