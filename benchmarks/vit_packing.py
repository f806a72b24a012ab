"""Seed-ViT training-step speed on mixed-resolution batches: one packed sequence vs images padded to the longest.

    .venv/bin/python benchmarks/vit_packing.py [--width 128] [--depth 4] [--heads 4] [--max-pixels 262144]
                                               [--short-side 100,500] [--images-per-batch 4,8]
                                               [--batches 5] [--warmup 1] [--threads N]
                                               [--device cpu|cuda] [--dtype fp32|bf16] [--seed 0]

Image sizes are drawn like web images (seeded): short side uniform in --short-side pixels, aspect
ratio log-uniform in 1:3..3:1, then resized by `preprocess.native_size` (multiples of 28, at most
--max-pixels). At full size that is 200..1000 under 1024*1024 (`--short-side 200,1000 --max-pixels
1048576`, as in vit_gpu.py); the CPU default is the same mix at half the side and a quarter of the cap,
so lengths spread relative to the longest as they do at full size, with a quarter of the patches,
and a run ends in under 3 minutes on two cores. Pixel values are random: speed does not depend on
them. Each batch is run both ways on the same weights, in the same
process, alternating which goes first: packed (`model(...)`, the config's default attention backend,
"auto": per-image SDPA on CPU, a varlen flash kernel on GPU) and padded (`model.forward_padded(...)`:
each image padded to the batch's longest, one masked SDPA call). A step is forward + backward of a
scalar loss on the pooled tokens (no optimiser). The first --warmup batches are untimed; on the first
one the two outputs are compared as a check. Padding waste is the share of the padded batch's tokens
that are padding; tokens/s counts real patches only, for both; ratio is packed over padded tokens/s
over the row, "pair med" the median over batches of padded over packed seconds (each pair ran back to
back, so it is the figure a busy machine disturbs least). Prints a table and records it in
benchmarks/results/vit_packing.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from results_file import record

import torch

from components.vit.config import SeedViTConfig
from components.vit.model import SeedViT, ViTOutput, _flash_varlen
from components.vit.preprocess import native_size

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "vit_packing.json"
SHORT_SIDE = (200, 1000)  # pixels, at full size (max_pixels 1024*1024)
MAX_ASPECT = 3.0  # long side / short side at most


@dataclass
class Batch:
    """Random packed pixel values for a list of patch grids."""

    pixel_values: torch.Tensor  # (num_patches, 3*14*14)
    grid_hw: torch.Tensor  # (num_images, 2)

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def padded_patches(self) -> int:
        """Tokens in the padded layout: every image as long as the batch's longest."""
        lengths = self.grid_hw[:, 0] * self.grid_hw[:, 1]
        return int(lengths.max()) * len(lengths)


def web_image_grids(count: int, config: SeedViTConfig, generator: torch.Generator,
                    short_side: tuple[int, int] = SHORT_SIDE) -> list[tuple[int, int]]:
    """`count` patch grids (h, w) of web-like image sizes after the native-resolution resize."""
    factor = config.patch_size * config.merge_size
    grids = []
    for _ in range(count):
        short = int(torch.randint(short_side[0], short_side[1] + 1, (1,), generator=generator))
        log_aspect = (torch.rand(1, generator=generator).item() * 2 - 1) * math.log(MAX_ASPECT)
        height, width = (short, round(short * math.exp(log_aspect))) if log_aspect >= 0 else \
            (round(short * math.exp(-log_aspect)), short)
        h, w = native_size(height, width, factor, config.min_pixels, config.max_pixels)
        grids.append((h // config.patch_size, w // config.patch_size))
    return grids


def make_batch(grids: list[tuple[int, int]], config: SeedViTConfig, generator: torch.Generator,
               device: torch.device) -> Batch:
    grid_hw = torch.tensor(grids, dtype=torch.long)
    num_patches = int((grid_hw[:, 0] * grid_hw[:, 1]).sum())
    pixel_values = torch.randn(num_patches, config.patch_dim, generator=generator)
    return Batch(pixel_values.to(device), grid_hw.to(device))


def budget_batch(budget: int, config: SeedViTConfig, generator: torch.Generator, device: torch.device,
                 short_side: tuple[int, int] = SHORT_SIDE) -> Batch:
    """Web-like images added while they fit in `budget` patches (at least one image)."""
    grids: list[tuple[int, int]] = []
    total = 0
    while True:
        (h, w), = web_image_grids(1, config, generator, short_side)
        if grids and total + h * w > budget:
            return make_batch(grids, config, generator, device)
        grids.append((h, w))
        total += h * w


def autocast_for(device: torch.device, dtype: str) -> AbstractContextManager[Any]:
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def packed_backend(config: SeedViTConfig, device: torch.device) -> str:
    """What `packed_attention` runs for this config on this device, with the varlen kernel's module."""
    if config.attention not in ("auto", "varlen"):
        return config.attention
    kernel = _flash_varlen()
    if device.type == "cuda" and kernel is not None:
        return f"varlen ({kernel.__module__})"
    return "sdpa_segments" if config.attention == "auto" else "varlen (unavailable)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward(model: SeedViT, batch: Batch, mode: str) -> ViTOutput:
    if mode == "packed":
        return model(batch.pixel_values, batch.grid_hw)
    return model.forward_padded(batch.pixel_values, batch.grid_hw)


def timed_step(model: SeedViT, batch: Batch, mode: str, device: torch.device, dtype: str,
               optimizer_step: Callable[[], None] | None = None) -> float:
    """Seconds for forward + backward (+ `optimizer_step`) of one batch, device work included."""
    synchronize(device)
    started = time.perf_counter()
    with autocast_for(device, dtype):
        output = forward(model, batch, mode)
    loss = output.pooled.float().pow(2).mean()
    loss.backward()
    if optimizer_step is not None:
        optimizer_step()
    model.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - started


def outputs_max_difference(model: SeedViT, batch: Batch, device: torch.device, dtype: str) -> float:
    """The largest |packed - padded| over the pooled tokens of one batch (a check, not timed)."""
    with torch.no_grad(), autocast_for(device, dtype):
        packed, padded = forward(model, batch, "packed"), forward(model, batch, "padded")
    return float((packed.pooled.float() - padded.pooled.float()).abs().max())


def run_row(config: SeedViTConfig, images_per_batch: int, batches: int, warmup: int, device: torch.device,
            dtype: str, seed: int, short_side: tuple[int, int]) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = SeedViT(config).to(device).train()
    generator = torch.Generator().manual_seed(seed)
    data = [make_batch(web_image_grids(images_per_batch, config, generator, short_side), config, generator, device)
            for _ in range(warmup + batches)]
    check = outputs_max_difference(model, data[0], device, dtype)
    seconds = {"packed": 0.0, "padded": 0.0}
    pair_ratios = []  # padded / packed seconds of each batch: neighbours in time, so load changes cancel
    for i, batch in enumerate(data):
        order = ("packed", "padded") if i % 2 == 0 else ("padded", "packed")
        elapsed = {mode: timed_step(model, batch, mode, device, dtype) for mode in order}
        if i >= warmup:
            for mode in order:
                seconds[mode] += elapsed[mode]
            pair_ratios.append(elapsed["padded"] / elapsed["packed"])
    timed = data[warmup:]
    real = sum(b.num_patches for b in timed)
    padded = sum(b.padded_patches for b in timed)
    images = images_per_batch * len(timed)
    packed_rate, padded_rate = real / seconds["packed"], real / seconds["padded"]
    return {"config": f"w{config.width} d{config.depth} h{config.num_heads}", "images_per_batch": images_per_batch,
            "batches": len(timed), "mean_patches_per_image": round(real / images, 1),
            "padding_waste_pct": round(100 * (padded - real) / padded, 1),
            "packed_ms_per_step": round(1000 * seconds["packed"] / len(timed), 1),
            "padded_ms_per_step": round(1000 * seconds["padded"] / len(timed), 1),
            "packed_tokens_per_s": round(packed_rate), "padded_tokens_per_s": round(padded_rate),
            "ratio_packed_over_padded": round(packed_rate / padded_rate, 2),
            "ratio_median_of_pairs": round(statistics.median(pair_ratios), 2),
            "max_abs_diff_packed_vs_padded": float(f"{check:.2e}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-pixels", type=int, default=512 * 512)
    parser.add_argument("--short-side", default="100,500", help="MIN,MAX pixels of the drawn images' short side")
    parser.add_argument("--images-per-batch", default="4,8", help="comma-separated; one table row each")
    parser.add_argument("--batches", type=int, default=5, help="timed batches per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per row")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = SeedViTConfig(width=args.width, depth=args.depth, num_heads=args.heads, max_pixels=args.max_pixels)
    low, high = (int(x) for x in args.short_side.split(","))
    rows = [run_row(config, int(n), args.batches, args.warmup, device, args.dtype, args.seed, (low, high))
            for n in args.images_per_batch.split(",") if n]
    backend = packed_backend(config, device)
    print(f"\n{args.device} {args.dtype}, torch threads {torch.get_num_threads()}, max_pixels {args.max_pixels}, "
          f"short side {low}..{high}, packed attention: {backend}, forward + backward")
    print(f"{'config':>12} {'img/batch':>9} {'patches/img':>11} {'waste %':>7} {'packed tok/s':>12} "
          f"{'padded tok/s':>12} {'ratio':>6} {'pair med':>8} {'packed ms':>9} {'padded ms':>9}")
    for r in rows:
        print(f"{r['config']:>12} {r['images_per_batch']:>9} {r['mean_patches_per_image']:>11.1f} "
              f"{r['padding_waste_pct']:>7.1f} {r['packed_tokens_per_s']:>12,} {r['padded_tokens_per_s']:>12,} "
              f"{r['ratio_packed_over_padded']:>6.2f} {r['ratio_median_of_pairs']:>8.2f} "
              f"{r['packed_ms_per_step']:>9.1f} {r['padded_ms_per_step']:>9.1f}")
    record(RESULTS, {"width": args.width, "depth": args.depth, "heads": args.heads, "max_pixels": args.max_pixels,
                     "warmup": args.warmup, "device": args.device, "dtype": args.dtype, "seed": args.seed,
                     "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "attention": backend, "short_side": [low, high], "max_aspect": MAX_ASPECT},
           rows)


if __name__ == "__main__":
    main()
