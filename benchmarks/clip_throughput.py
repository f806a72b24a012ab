"""CLIP scoring images/s of the CLIP filter's per-batch work, at the tiny and the full architecture sizes.

    .venv/bin/python benchmarks/clip_throughput.py [--archs seedvl-tiny-clip,ViT-L-14] [--batch-sizes 64,8]
                                                   [--seconds 45] [--images 256] [--threads N]
                                                   [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--seed 0]

What one batch costs is what the CLIP filter's actor (`clip_filter.ClipScoreBatch`) does with it:
decode each image's bytes to RGB (`decode_rgb`), open_clip's preprocessing (squash-resize, normalise),
tokenise the captions, encode images and texts (normalised) and take each pair's cosine
(`pair_scores`). The models come from `clip_model.load_clip` with no weights (random init: there are
no checkpoints here, and throughput does not depend on the weights): `seedvl-tiny-clip`
(configs/open_clip/, the tiny profile's scorer) and `ViT-L-14` (the full profile's filter). Inputs are
`--images` crawl-like scenes (the synthetic crawl's `clean_size`, `random_scene`, `render`, `encode`:
85 % JPEG q90, 15 % PNG), encoded once and cycled through in batches.

`--batch-sizes` is one size per architecture (or one for all). Each row scores one untimed warm-up
batch, then batches until `--seconds` have passed (at least two). The time splits into preprocessing
(decode, transform, tokenise: CPU, one thread, as in the actor) and the model (both encoders and the
cosine, on `--device` in `--dtype`, under `torch.inference_mode()`); model-only images/s is what an
accelerator would see with preprocessing kept off its critical path. Per core is images/s divided by
the torch threads (CPU only): by default 1, because the actor calls `torch.set_num_threads` with its
`resources.num_cpus`, which is 1 in the filter's defaults. img/CPU s (images per CPU second of this
process) is the figure a busy shared machine disturbs least. On CPU in fp32 the warm-up batch's
first rows are scored again by the pipeline's own `pair_scores` as a check. Anchor: ViT-L/14 ~6,100
images/s at full H100 utilisation. Prints a table and records it in benchmarks/results/clip_throughput.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from results_file import record

import numpy as np
import pyarrow as pa

from components.common.clip_model import ClipBundle, decode_rgb, load_clip, pair_scores
from components.data.config import ClipFilterConfig, SyntheticCrawlConfig
from components.data.synthetic_crawl import clean_size, encode, random_scene, render

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "clip_throughput.json"
DTYPES = ("fp32", "bf16", "fp16")
MIN_TIMED_BATCHES = 2
CHECK_ROWS = 2  # rows of the warm-up batch scored again by the pipeline's own `pair_scores`
DEFAULT_BATCH = {"seedvl-tiny-clip": 64, "ViT-L-14": 8}  # the tiny profile's batch; ViT-L-14 is slow on CPU
OTHER_BATCH = 16


@dataclass
class Timing:
    images: int = 0
    batches: int = 0
    preprocess_s: float = 0.0
    model_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU seconds of this process (all threads)


def make_pairs(count: int, seed: int) -> pa.Table:
    """`count` encoded crawl-like images and their true captions, as the actor's batches carry them."""
    rng, cfg = random.Random(seed), SyntheticCrawlConfig()
    images, captions = [], []
    for _ in range(count):
        fmt = "png" if rng.random() < 0.15 else "jpg"
        scene = random_scene(rng, *clean_size(rng, cfg))
        images.append(encode(render(scene), fmt, cfg.jpeg_quality))
        captions.append(scene.caption())
    return pa.table({"image": pa.array(images, pa.binary()), "caption": pa.array(captions, pa.string())})


def batches(pairs: pa.Table, size: int) -> Iterator[pa.Table]:
    """Endless batches of `size` rows, cycling through `pairs`."""
    start = 0
    while True:
        yield pairs.take([(start + i) % pairs.num_rows for i in range(size)])
        start = (start + size) % pairs.num_rows


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: str, dtype: str) -> AbstractContextManager[Any]:
    import torch

    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device, dtype=torch_dtype(dtype))


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def preprocess(bundle: ClipBundle, batch: pa.Table, device: str) -> tuple[Any, Any]:
    """The actor's CPU half: bytes -> RGB -> pixel tensor, captions -> tokens; moved to `device`."""
    import torch

    images = [decode_rgb(data) for data in batch.column("image").to_pylist()]
    pixels = torch.stack([bundle.preprocess(image) for image in images])
    tokens = bundle.tokenizer(batch.column("caption").to_pylist())
    return pixels.to(device, non_blocking=True), tokens.to(device, non_blocking=True)


def model_scores(bundle: ClipBundle, pixels: Any, tokens: Any, device: str, dtype: str) -> np.ndarray:
    """`pair_scores`' model half: both encoders (normalised) and each pair's cosine."""
    import torch

    with torch.inference_mode(), autocast(device, dtype):
        image_features = bundle.model.encode_image(pixels, normalize=True)
        text_features = bundle.model.encode_text(tokens, normalize=True)
        return (image_features * text_features).sum(dim=-1).float().cpu().numpy()


def score_batch(bundle: ClipBundle, batch: pa.Table, device: str, dtype: str, timing: Timing | None) -> np.ndarray:
    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        pixels, tokens = preprocess(bundle, batch, device)
    synchronize(device)
    prepared = time.perf_counter()
    scores = model_scores(bundle, pixels, tokens, device, dtype)
    synchronize(device)
    if timing is not None:
        timing.preprocess_s += prepared - started
        timing.model_s += time.perf_counter() - prepared
        timing.images += batch.num_rows
        timing.batches += 1
    return scores


def check_against_pipeline(bundle: ClipBundle, batch: pa.Table, scores: np.ndarray) -> float:
    """Largest difference between `scores` of a batch's first rows and the pipeline's `pair_scores`."""
    head = batch.slice(0, CHECK_ROWS)
    images = [decode_rgb(data) for data in head.column("image").to_pylist()]
    expected = pair_scores(bundle, images, head.column("caption").to_pylist())
    return float(np.abs(scores[:CHECK_ROWS] - expected).max())


def load(architecture: str, device: str) -> tuple[ClipBundle, float]:
    started = time.perf_counter()
    bundle = load_clip(architecture, "", device=device)
    return bundle, time.perf_counter() - started


def parameter_counts(bundle: ClipBundle) -> tuple[int, int]:
    """(all parameters, those of the image encoder)."""
    model = bundle.model
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.visual.parameters())


def run_row(architecture: str, batch_size: int, pairs: pa.Table, args: argparse.Namespace,
            threads: int) -> dict[str, Any]:
    bundle, load_s = load(architecture, args.device)
    source = batches(pairs, batch_size)
    warm_up = next(source)
    scores = score_batch(bundle, warm_up, args.device, args.dtype, None)  # not counted
    check = check_against_pipeline(bundle, warm_up, scores) if args.device == "cpu" and args.dtype == "fp32" else None
    timing = Timing()
    wall, cpu = time.perf_counter(), time.process_time()
    while timing.batches < MIN_TIMED_BATCHES or time.perf_counter() - wall < args.seconds:
        score_batch(bundle, next(source), args.device, args.dtype, timing)
    timing.wall_s, timing.cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    total, visual = parameter_counts(bundle)
    rate = timing.images / timing.wall_s
    return {
        "architecture": architecture, "image_size": bundle.model.visual.image_size, "params_m": round(total / 1e6, 2),
        "visual_params_m": round(visual / 1e6, 2), "batch_size": batch_size, "device": args.device,
        "dtype": args.dtype, "torch_threads": threads, "batches": timing.batches, "images": timing.images,
        "seconds": round(timing.wall_s, 2), "images_per_s": round(rate, 2),
        "images_per_s_per_core": round(rate / threads, 2) if args.device == "cpu" else None,
        "images_per_cpu_s": round(timing.images / timing.cpu_s, 2),
        "model_images_per_s": round(timing.images / timing.model_s, 2),
        "preprocess_share": round(timing.preprocess_s / (timing.preprocess_s + timing.model_s), 3),
        "cpu_utilisation": round(timing.cpu_s / timing.wall_s / threads, 2), "load_s": round(load_s, 1),
        "max_abs_diff_vs_pair_scores": check,
    }


def batch_sizes(text: str | None, archs: list[str]) -> list[int]:
    if text is None:
        return [DEFAULT_BATCH.get(arch, OTHER_BATCH) for arch in archs]
    sizes = [int(s) for s in text.split(",") if s]
    if len(sizes) == 1:
        return sizes * len(archs)
    if len(sizes) != len(archs):
        sys.exit(f"--batch-sizes needs one size per architecture ({len(archs)}) or one for all, got {text!r}")
    return sizes


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'architecture':<18} {'params':>8} {'batch':>5} {'device':>6} {'dtype':>5} {'threads':>7} "
          f"{'images':>6} {'img/s':>8} {'img/s/core':>10} {'img/CPU s':>9} {'model img/s':>11} {'preproc':>7} "
          f"{'cpu util':>8}")
    for r in rows:
        per_core = f"{r['images_per_s_per_core']:>10.2f}" if r["images_per_s_per_core"] is not None else f"{'-':>10}"
        print(f"{r['architecture']:<18} {r['params_m']:>7.1f}M {r['batch_size']:>5} {r['device']:>6} {r['dtype']:>5} "
              f"{r['torch_threads']:>7} {r['images']:>6} {r['images_per_s']:>8.2f} {per_core} "
              f"{r['images_per_cpu_s']:>9.2f} {r['model_images_per_s']:>11.2f} {r['preprocess_share']:>7.1%} "
              f"{r['cpu_utilisation']:>8.2f}")
    checks = [f"{r['architecture']} {r['max_abs_diff_vs_pair_scores']:.1e}" for r in rows
              if r["max_abs_diff_vs_pair_scores"] is not None]
    if checks:
        print(f"max |score - pair_scores score| on {CHECK_ROWS} check rows: {', '.join(checks)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="seedvl-tiny-clip,ViT-L-14", help="comma-separated open_clip names")
    parser.add_argument("--batch-sizes", default=None,
                        help=f"one per architecture, or one for all; default {DEFAULT_BATCH}, else {OTHER_BATCH}")
    parser.add_argument("--seconds", type=float, default=45.0, help="timed seconds per row (after a warm-up batch)")
    parser.add_argument("--images", type=int, default=256, help="distinct inputs, cycled through")
    parser.add_argument("--threads", type=int, default=int(ClipFilterConfig().resources.num_cpus),
                        help="torch threads; default: what the filter's actor sets (its resources.num_cpus)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="autocast dtype of the model half")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    archs = [a for a in args.archs.split(",") if a]
    sizes = batch_sizes(args.batch_sizes, archs)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch here")
    torch.set_num_threads(max(1, args.threads))
    threads = torch.get_num_threads()
    pairs = make_pairs(args.images, args.seed)
    rows = [run_row(arch, size, pairs, args, threads) for arch, size in zip(archs, sizes)]
    print_table(rows)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    record(RESULTS, {"seconds_per_row": args.seconds, "images": args.images, "seed": args.seed,
                     "device_name": device_name, "torch": torch.__version__,
                     "open_clip": _version("open_clip_torch")}, rows)


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


if __name__ == "__main__":
    main()
