"""Seed-ViT's full-size training step on one GPU, packed and padded: images/s, patches/s, step time, peak memory, MFU.

    python benchmarks/vit_gpu.py [--tokens 16384,32768] [--modes packed,padded] [--steps 10] [--warmup 3]
                                 [--device cuda] [--dtype bf16|fp32] [--peak-tflops 989] [--out PATH]
    .venv/bin/python benchmarks/vit_gpu.py --device cpu --tiny      # smoke test: toy sizes, a few steps

Plain torch and `components.vit` (plus vit_packing.py's batch helpers, which need nothing more): no Ray,
MLflow, DeepSpeed or open_clip, so it runs on a bare GPU machine. The model is the default
`SeedViTConfig` (532M: 1280 wide, 27 blocks, 16 heads of 80), fp32 weights under bf16 autocast, with
attention "auto" (on CUDA the varlen flash kernel: `flash_attn` when installed, else torch's
`varlen_attn`). One step is forward, a scalar loss on the pooled tokens, backward and an AdamW step
(fused on CUDA). Each step's batch is a fresh draw of web-like images (short side 200..1000 pixels,
aspect 1:3..3:1, resized by `native_size` under max_pixels 1024*1024) added while they fit in
--tokens patches; pixel values are random. Batches are built on the device before timing. "packed"
is `model(...)`; "padded" is `model.forward_padded(...)` (each image padded to the batch's longest,
one masked SDPA call) on the same weights and the same batches, with its own optimiser.

FLOPs: forward = sum over images of patches * `model.forward_flops_per_patch(config, image patches)`
(matmuls at 2 FLOPs per multiply-add, attention scores and values over each image's own length; it
matches torch's FlopCounterMode on the packed forward); a step counts 3x forward. The padded rows
count the same useful FLOPs, so their MFU is what the padding costs. MFU = FLOP/s / --peak-tflops
(989: H100 and H200 dense bf16). Peak memory is torch.cuda.max_memory_allocated over a mode's steps
(weights, gradients, AdamW state and activations). On CUDA a first check compares the packed
attention kernel with per-image SDPA on a small batch. Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `components` from a bare checkout (GPU machine)

from results_file import record  # noqa: E402
from vit_packing import Batch, budget_batch, packed_backend, synchronize, timed_step

import torch

from components.vit.config import SeedViTConfig
from components.vit.model import SeedViT, count_parameters, forward_flops_per_patch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "vit_gpu.json"
TINY = {"width": 96, "depth": 4, "num_heads": 4, "max_pixels": 224 * 224}
FULL_SHORT_SIDE, TINY_SHORT_SIDE = (200, 1000), (50, 250)


def step_flops(config: SeedViTConfig, batch: Batch) -> float:
    """Training FLOPs of one step: 3x the forward's, each image attending over its own patches."""
    lengths = (batch.grid_hw[:, 0] * batch.grid_hw[:, 1]).tolist()
    return 3.0 * sum(n * forward_flops_per_patch(config, n) for n in lengths)


def attention_check(model: SeedViT, device: torch.device, dtype: str) -> float | None:
    """Max |packed kernel - per-image SDPA| over the hidden states of a two-image batch (CUDA only)."""
    if device.type != "cuda":
        return None
    grid_hw = torch.tensor([[8, 12], [20, 6]], device=device)
    pixel_values = torch.randn(int((grid_hw[:, 0] * grid_hw[:, 1]).sum()), model.config.patch_dim, device=device)
    outputs = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        for backend in (model.config.attention, "sdpa_segments"):
            for block in model.blocks:
                block.attn.backend = backend
            outputs.append(model(pixel_values, grid_hw).hidden_states.float())
    for block in model.blocks:
        block.attn.backend = model.config.attention
    return float((outputs[0] - outputs[1]).abs().max())


def run_mode(model: SeedViT, batches: list[Batch], mode: str, warmup: int, device: torch.device, dtype: str,
             peak_flops: float) -> dict[str, Any]:
    """Warm-up, then timed training steps of one mode with a fresh AdamW; the row's measurements."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    try:
        for i, batch in enumerate(batches):
            elapsed = timed_step(model, batch, mode, device, dtype, optimizer.step)
            if i >= warmup:
                seconds.append(elapsed)
    except torch.OutOfMemoryError as error:
        model.zero_grad(set_to_none=True)
        return {"mode": mode, "error": f"out of memory: {str(error).splitlines()[0]}"}
    finally:
        del optimizer
    timed = batches[warmup:]
    total = sum(seconds)
    images, patches = sum(len(b.grid_hw) for b in timed), sum(b.num_patches for b in timed)
    padded = sum(b.padded_patches for b in timed)
    flops = sum(step_flops(model.config, b) for b in timed)
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"mode": mode, "steps": len(timed), "images_per_step": round(images / len(timed), 1),
            "patches_per_step": round(patches / len(timed)),
            "padding_waste_pct": round(100 * (padded - patches) / padded, 1),
            "step_ms": round(1000 * total / len(timed), 1),
            "step_ms_median": round(1000 * statistics.median(seconds), 1),
            "images_per_s": round(images / total, 1), "patches_per_s": round(patches / total),
            "tflops": round(flops / total / 1e12, 2), "mfu_pct": round(100 * flops / total / peak_flops, 2),
            "peak_memory_gib": round(peak_memory, 2) if peak_memory is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=None, help="comma-separated patch budgets per step "
                        "(default 16384,32768; --tiny: 1024)")
    parser.add_argument("--modes", default="packed,padded")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 3; --tiny: 1)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="default bf16 on CUDA (the varlen kernel needs it), else fp32")
    parser.add_argument("--max-pixels", type=int, default=None, help="default: the config's (1024*1024)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak, for MFU")
    parser.add_argument("--tiny", action="store_true", help=f"a toy model {TINY} for a CPU smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; use --device cpu --tiny for a smoke test")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    sizes = dict(TINY) if args.tiny else {}
    if args.max_pixels is not None:
        sizes["max_pixels"] = args.max_pixels
    config = SeedViTConfig(**sizes)
    budgets = [int(t) for t in (args.tokens or ("1024" if args.tiny else "16384,32768")).split(",") if t]
    steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    short_side = TINY_SHORT_SIDE if args.tiny else FULL_SHORT_SIDE

    torch.manual_seed(args.seed)
    model = SeedViT(config).to(device).train()
    backend = packed_backend(config, device)
    check = attention_check(model, device, dtype)
    rows = []
    for budget in budgets:
        generator = torch.Generator().manual_seed(args.seed + budget)
        batches = [budget_batch(budget, config, generator, device, short_side) for _ in range(warmup + steps)]
        for mode in args.modes.split(","):
            row = {"token_budget": budget} | run_mode(model, batches, mode, warmup, device, dtype,
                                                      args.peak_tflops * 1e12)
            row["attention"] = backend if mode == "packed" else "sdpa (padded, key mask)"
            rows.append(row)
            synchronize(device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    checked = f", packed-kernel check {check:.2e}" if check is not None else ""
    print(f"\n{name}, torch {torch.__version__}, {dtype}, {count_parameters(model) / 1e6:.1f}M parameters "
          f"(w{config.width} d{config.depth} h{config.num_heads}), max_pixels {config.max_pixels}, AdamW, "
          f"MFU against {args.peak_tflops:g} TFLOP/s{checked}")
    print(f"{'budget':>7} {'mode':>6} {'img/step':>8} {'patches':>7} {'waste %':>7} {'step ms':>8} {'img/s':>7} "
          f"{'patches/s':>10} {'TFLOP/s':>8} {'MFU %':>6} {'peak GiB':>8}  attention")
    for r in rows:
        if "error" in r:
            print(f"{r['token_budget']:>7} {r['mode']:>6}  {r['error']}")
            continue
        memory = f"{r['peak_memory_gib']:>8.2f}" if r["peak_memory_gib"] is not None else f"{'-':>8}"
        print(f"{r['token_budget']:>7} {r['mode']:>6} {r['images_per_step']:>8.1f} {r['patches_per_step']:>7} "
              f"{r['padding_waste_pct']:>7.1f} {r['step_ms']:>8.1f} {r['images_per_s']:>7.1f} "
              f"{r['patches_per_s']:>10,} {r['tflops']:>8.2f} {r['mfu_pct']:>6.2f} {memory}  {r['attention']}")
    record(args.out, {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": dtype,
                             "tiny": args.tiny, "width": config.width, "depth": config.depth,
                             "heads": config.num_heads, "parameters": count_parameters(model),
                             "max_pixels": config.max_pixels, "short_side": list(short_side), "steps": steps,
                             "warmup": warmup, "seed": args.seed, "peak_tflops": args.peak_tflops,
                             "packed_attention": backend, "packed_kernel_check_max_abs_diff": check,
                             "flops": "3 x sum(patches * forward_flops_per_patch(config, patches)) per step"}, rows)


if __name__ == "__main__":
    main()
