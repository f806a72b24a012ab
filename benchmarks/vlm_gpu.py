"""The VLM's training step on one GPU (Seed-ViT + adapter + MoE LLM), packed and padded: tokens/s, images/s,
ViT patches/s, step time, peak memory, MFU.

    python3 benchmarks/vlm_gpu.py [--max-tokens 8192] [--modes packed,padded] [--steps 10] [--warmup 3]
                                  [--llm-layers 6] [--llm-hidden 2048] [--llm-experts 64] [--llm-top-k 8]
                                  [--precision bf16|autocast|fp32] [--grad-checkpoint none|vit|llm|both]
                                  [--peak-tflops 989] [--out PATH]
    python3 benchmarks/vlm_gpu.py --device cpu --tiny      # smoke test: toy sizes, 2 timed steps per mode

Plain torch, transformers and `components.vit`/`components.vlm` (no Ray, MLflow, DeepSpeed or open_clip); the
repository root is put on sys.path, so it runs from a bare checkout on a GPU machine.

The model is `VisionLanguageModel` as the VLM stages build it: the default `SeedViTConfig` (532M: 1280 wide,
27 blocks, 16 heads; attention "auto", i.e. the varlen flash kernel on CUDA in half precision), the 2-layer
MLP adapter and an MoE LLM from `build_llm(LlmConfig(...))` (Hugging Face, SDPA attention, the experts
implementation transformers picks, `grouped_mm` in transformers 5). The LLM defaults to base.yaml's
(qwen3_moe, hidden 2048, 16 heads of 128 with 4 KV heads, 64 experts of width 768, top-8, vocab 32000) with
6 layers instead of 24: 1.94B parameters, 0.29B active per token without the embedding (65.5M, tied with
the LM head); with the 532M ViT and the 6.8M adapter, 2.48B in all, whose weights, gradients and AdamW
state take ~20 GB at 8 bytes per parameter, and the activations of an 8192-token pack
(70-90 % image tokens: 20-30k ViT patches at ~1.4 MB each across the 27 blocks, ~1.5 GB per LLM layer)
should fit in 80 GB (~72 GB estimated for the pack with the most patches). The script prints the exact
counts. Should a mode still run out of memory, its row says so and it is run again with every ViT block
checkpointed (recomputed in the backward; the rows say "ckpt vit", their MFU does not count the
recomputation), as are the rows after it; --no-oom-retry turns that off, --grad-checkpoint sets it up front.

Precision: --precision bf16 (default on CUDA) casts every parameter to bf16 (buffers stay fp32); gradients
and AdamW's moments are bf16 too (8 bytes per parameter). The forward and backward are those of DeepSpeed's
bf16 mode; that mode's fp32 master weights (16 bytes per parameter) and their slightly slower optimiser
step are not modelled. --precision autocast keeps fp32 weights under bf16 autocast (16 bytes per parameter);
note that transformers' grouped-mm experts cast their input to the weights' dtype, so the experts then run
in fp32. --precision fp32 (the CPU default) is plain fp32. One step is the stages' step without DeepSpeed:
`model(input_ids, position_ids, labels, pixel_values, grid_hw)` (the answer loss plus the router's balancing
loss, logits only where a label follows), backward, AdamW (fused on CUDA) over every parameter (stage 1
trains all three parts), zero_grad; torch.cuda.synchronize() before and after each timed step. Batches are
built and moved to the device before timing; pixel values are random (speed does not depend on them).

Data, as the stages make it: a stream of synthetic caption samples, each one image and one answer. Image
sizes are drawn from a mix of common sizes (224x224, 336x336, 448x448, 512x384, 640x480, 480x640, 800x600,
1024x768, 768x1024, each side jittered by 0.9..1.1x), their LLM token counts from `data.image_token_count`
(one per 28x28 pixels after the native-resolution resize, ~50..~1300) and their patch grids from the same
`native_size`. Answers are 8..512 words, log-uniform (a word is one token of the tokenizer). Samples are
encoded by the real `conversation.encode_sample` (ChatML, `<|image_pad|>` runs, loss on the answer only) with
a tiny byte-level BPE trained here by `tokenizer.train_tokenizer` on the word list (its ~530 ids are all
inside the LLM's vocabulary: only the special ids and the sequence lengths matter). "packed": `packing.Packer`
(best fit over a buffer of 16, max 32 images) packs them into --max-tokens sequences, one pack per step.
"padded": the same sample stream without packing: consecutive samples form a batch while rows x longest
sample stays within --max-tokens, each row padded to the longest (`build_pack` of one sample), and the ViT
runs `forward_padded` (every image padded to the batch's longest, one masked SDPA call). Both go through the
same `causal_lm_loss`, which runs the [B, T] rows as one row kept apart by position ids. Each mode gets a
fresh AdamW.

FLOPs of one step (useful work only: padding and recomputation are not counted; matmuls at
2 FLOPs per multiply-add; training = 3x forward):
    ViT      3 * sum over images of n * forward_flops_per_patch(vit, n), n = the image's patches
             (components.vit.model: 2 * weights + 4 * n * width per block, bidirectional within the image)
  + adapter  6 * adapter parameters * image tokens
  + LLM      6 * N_active * T  +  6 * vocab * hidden * P  +  3 * layers * 2 * heads * head_dim * sum L(L+1)
    with T the real LLM tokens of the step (text + image tokens, no padding), N_active the LLM's parameters
    a token uses apart from the embedding (attention, norms, router, top-k of the experts), P the positions
    whose logits are computed (those followed by a label), L each sample's length (causal attention:
    L(L+1)/2 query-key pairs, QK^T and AV at 2 * head_dim FLOPs per pair and head).
MFU = FLOPs / step time / --peak-tflops (989: H100 SXM dense bf16). Note the LLM's SDPA gets a [T, T]
block-diagonal mask, so its kernel computes every query-key pair of the pack (T^2) where L(L+1)/2 per sample
is counted. Tokens/s counts real LLM tokens (text + image tokens, not padding); patches/s real ViT patches.
Peak memory is torch.cuda.max_memory_allocated over a mode's steps. Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # packs vary in size: less fragmentation

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `components` without the editable install (a bare checkout on a GPU machine)

import torch  # noqa: E402
from results_file import record  # noqa: E402
from vit_packing import packed_backend, synchronize  # noqa: E402

from components.vit.config import SeedViTConfig  # noqa: E402
from components.vit.model import SeedViT, count_parameters, forward_flops_per_patch  # noqa: E402
from components.vit.preprocess import native_size  # noqa: E402
from components.vlm.config import LlmConfig  # noqa: E402
from components.vlm.model import IGNORE_INDEX, VisionLanguageModel, build_llm  # noqa: E402
from components.vlm.conversation import CAPTION_PROMPTS, BadSample, EncodedSample, encode_sample  # noqa: E402
from components.vlm.data import image_token_count  # noqa: E402
from components.vlm.packing import Packer, build_pack  # noqa: E402
from components.vlm.tokenizer import IMAGE_PLACEHOLDER, SpecialIds, train_tokenizer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "vlm_gpu.json"
FULL_LLM_LAYERS = 6  # base.yaml's LLM has 24: too big for AdamW and an 8192-token pack on one 80 GB GPU
TINY_VIT = {"width": 96, "depth": 4, "num_heads": 4, "max_pixels": 224 * 224}
TINY_LLM = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
            "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8, "experts_per_token": 2,
            "vocab_size": 512, "max_position_embeddings": 4096}
IMAGE_SIZES = ((224, 224), (336, 336), (448, 448), (512, 384), (640, 480), (480, 640), (800, 600), (1024, 768),
               (768, 1024))  # (width, height) before the jitter
JITTER = (0.9, 1.1)
MAX_IMAGES = 32  # per pack, as the stages' default
PACK_BUFFER = 16
WORDS = tuple("""the a an of and to in on with at by for from over under near behind beside man woman child dog
cat bird car bus train tree house street table chair window door sign text red blue green white black yellow
small large old young two three several sitting standing walking holding looking wearing shows picture image
photo scene people group water sky grass road building room light dark front left right top bottom""".split())


@dataclass(frozen=True)
class ImageSize:
    """An image's size: all `data.image_token_count` reads of a PIL image."""

    width: int
    height: int


def synthetic_tokenizer(vocab_size: int) -> Any:
    """A tiny byte-level BPE in which every word of WORDS (after a space) is one token."""
    texts = [" ".join(WORDS)] * 8 + list(CAPTION_PROMPTS) * 4 + ["user\nassistant\nsystem\n"] * 4
    return train_tokenizer(texts, vocab_size=min(vocab_size, 1024), min_frequency=2)


def synthetic_samples(tokenizer: Any, vit: SeedViTConfig, answer_words: tuple[int, int], max_tokens: int,
                      seed: int) -> Iterator[EncodedSample]:
    """An endless seeded stream of one-image caption samples; `media` holds each image's patch grid (h, w)."""
    rng = random.Random(seed)
    factor = vit.patch_size * vit.merge_size
    index = 0
    while True:
        width, height = rng.choice(IMAGE_SIZES)
        size = ImageSize(round(width * rng.uniform(*JITTER)), round(height * rng.uniform(*JITTER)))
        tokens = image_token_count(size, vit)  # type: ignore[arg-type]
        h, w = native_size(size.height, size.width, factor, vit.min_pixels, vit.max_pixels)
        grid = (h // vit.patch_size, w // vit.patch_size)
        assert grid[0] * grid[1] == tokens * vit.merge_size ** 2
        words = round(math.exp(rng.uniform(math.log(answer_words[0]), math.log(answer_words[1]))))
        answer = " ".join(rng.choice(WORDS) for _ in range(words))
        turns = [(f"{IMAGE_PLACEHOLDER}\n{rng.choice(CAPTION_PROMPTS)}", answer)]
        index += 1
        try:
            yield encode_sample(key=f"synthetic-{index}", task="caption", turns=turns, tokenizer=tokenizer,
                                image_token_counts=[tokens], media=[grid], max_tokens=max_tokens)
        except BadSample:  # too long for the budget
            continue


@dataclass
class Batch:
    """One step's input on the device and what it holds."""

    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor
    position_ids: torch.Tensor
    pixel_values: torch.Tensor  # (patches, 3*14*14)
    grid_hw: torch.Tensor  # (images, 2)
    sample_lengths: list[int]
    image_tokens: int
    grids: list[tuple[int, int]]

    @property
    def llm_tokens(self) -> int:
        """Tokens the LLM runs, padding included."""
        return int(self.input_ids.numel())

    @property
    def real_tokens(self) -> int:
        return sum(self.sample_lengths)

    @property
    def patches(self) -> int:
        return sum(h * w for h, w in self.grids)

    @property
    def padded_patches(self) -> int:
        """ViT tokens when every image is padded to the batch's longest (forward_padded)."""
        return max(h * w for h, w in self.grids) * len(self.grids)

    @property
    def predicted(self) -> int:
        """Positions whose logits `causal_lm_loss` computes (followed by a label, rows flattened)."""
        return int((self.labels.reshape(-1)[1:] != IGNORE_INDEX).sum())


def make_batch(samples: list[EncodedSample], rows: list[Any], vit: SeedViTConfig, generator: torch.Generator,
               device: torch.device, pixel_dtype: torch.dtype) -> Batch:
    """`rows` (packing.Pack objects of equal length) stacked, with random pixels for the samples' images."""
    grids = [grid for sample in samples for grid in sample.media]
    pixels = torch.randn(sum(h * w for h, w in grids), vit.patch_dim, generator=generator)
    return Batch(input_ids=torch.stack([r.input_ids for r in rows]).to(device),
                 labels=torch.stack([r.labels for r in rows]).to(device),
                 position_ids=torch.stack([r.position_ids for r in rows]).to(device),
                 pixel_values=pixels.to(device=device, dtype=pixel_dtype),
                 grid_hw=torch.tensor(grids, dtype=torch.long).to(device),
                 sample_lengths=[s.length for s in samples],
                 image_tokens=sum(c for s in samples for c in s.image_token_counts), grids=grids)


def packed_batches(samples: Iterator[EncodedSample], count: int, max_tokens: int, pad_id: int, vit: SeedViTConfig,
                   generator: torch.Generator, device: torch.device, pixel_dtype: torch.dtype) -> list[Batch]:
    """`count` steps of one best-fit pack of max_tokens each."""
    packer = Packer(max_tokens, MAX_IMAGES, pad_id, PACK_BUFFER)
    packs: list[Any] = []
    while len(packs) < count:
        packs.extend(packer.add(next(samples)))
    return [make_batch(p.samples, [p], vit, generator, device, pixel_dtype) for p in packs[:count]]


def padded_batches(samples: Iterator[EncodedSample], count: int, max_tokens: int, pad_id: int,
                   vit: SeedViTConfig, generator: torch.Generator, device: torch.device,
                   pixel_dtype: torch.dtype) -> list[Batch]:
    """`count` steps of consecutive samples, one per row, padded to the longest, rows * longest <= max_tokens."""
    batches: list[Batch] = []
    group: list[EncodedSample] = []
    for sample in samples:
        longest = max([sample.length] + [s.length for s in group])
        if group and ((len(group) + 1) * longest > max_tokens or len(group) + 1 > MAX_IMAGES):
            width = max(s.length for s in group)
            rows = [build_pack([s], width, pad_id) for s in group]
            batches.append(make_batch(group, rows, vit, generator, device, pixel_dtype))
            if len(batches) == count:
                return batches
            group = []
        group.append(sample)
    raise AssertionError("the sample stream is endless")


@dataclass
class ParameterCounts:
    vit: int
    adapter: int
    llm_total: int  # embedding (tied with the LM head) counted once
    llm_embedding: int  # input embedding, plus an untied LM head
    llm_experts: int  # all experts' weights
    llm_active: int  # per token, without the embedding: attention, norms, router, top-k of the experts


def parameter_counts(model: VisionLanguageModel, llm_config: LlmConfig) -> ParameterCounts:
    llm = model.llm
    total = count_parameters(llm)
    embedding_weight = llm.get_input_embeddings().weight
    head = llm.get_output_embeddings()
    embedding = embedding_weight.numel()
    if head is not None and head.weight is not embedding_weight:
        embedding += head.weight.numel()
    experts = sum(p.numel() for name, p in llm.named_parameters() if ".experts." in name)
    idle = experts * (1 - llm_config.experts_per_token / llm_config.num_experts)
    return ParameterCounts(vit=count_parameters(model.vit), adapter=count_parameters(model.adapter),
                           llm_total=total, llm_embedding=embedding, llm_experts=experts,
                           llm_active=round(total - embedding - idle))


def step_flops(batch: Batch, vit: SeedViTConfig, llm_config: LlmConfig, counts: ParameterCounts) -> dict[str, float]:
    """Training FLOPs of one step by part (see the module docstring)."""
    vit_flops = 3.0 * sum(h * w * forward_flops_per_patch(vit, h * w) for h, w in batch.grids)
    adapter = 6.0 * counts.adapter * batch.image_tokens
    attention = 3.0 * llm_config.num_layers * 2 * llm_config.num_heads * llm_config.head_dim * sum(
        n * (n + 1) for n in batch.sample_lengths)
    llm = (6.0 * counts.llm_active * batch.real_tokens
           + 6.0 * llm_config.vocab_size * llm_config.hidden_size * batch.predicted + attention)
    return {"vit": vit_flops, "adapter": adapter, "llm": llm}


def build_model(vit: SeedViTConfig, llm_config: LlmConfig, pad_id: int, image_pad_id: int, device: torch.device,
                precision: str) -> VisionLanguageModel:
    """The VLM built on the device (initialised there), parameters cast to bf16 for --precision bf16."""
    with torch.device(device):
        model = VisionLanguageModel(SeedViT(vit), build_llm(llm_config, llm_config.vocab_size, pad_id), image_pad_id)
    model.to(device)
    if precision == "bf16":
        for parameter in model.parameters():  # buffers (rotary frequencies) stay fp32
            parameter.data = parameter.data.to(torch.bfloat16)
    return model.train()


def checkpoint_vit(model: VisionLanguageModel) -> None:
    """Activation checkpointing of every ViT block (packed and padded forwards)."""
    from torch.utils.checkpoint import checkpoint

    def wrap(function: Any) -> Any:
        return lambda *args: checkpoint(function, *args, use_reentrant=False)

    for block in model.vit.blocks:
        block.forward = wrap(block.forward)
        block.forward_padded = wrap(block.forward_padded)


@contextmanager
def padded_vit(vit: SeedViT) -> Iterator[None]:
    """The VLM's ViT call runs `forward_padded` (each image padded to the longest) instead of the packed one."""
    vit.forward = vit.forward_padded  # type: ignore[method-assign]
    try:
        yield
    finally:
        del vit.forward


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    if precision == "autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def timed_step(model: VisionLanguageModel, batch: Batch, mode: str, optimizer: torch.optim.Optimizer,
               device: torch.device, precision: str) -> tuple[float, float]:
    """(seconds, loss) of forward + backward + AdamW step + zero_grad, device work included."""
    synchronize(device)
    started = time.perf_counter()
    with autocast_for(device, precision), (padded_vit(model.vit) if mode == "padded" else nullcontext()):
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels,
                    pixel_values=batch.pixel_values, grid_hw=batch.grid_hw)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - started, float(out.loss.detach())


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_mode(model: VisionLanguageModel, batches: list[Batch], mode: str, warmup: int, device: torch.device,
             precision: str, vit: SeedViTConfig, llm_config: LlmConfig, counts: ParameterCounts,
             peak_flops: float) -> dict[str, Any]:
    """Warm-up, then timed steps of one mode with a fresh AdamW; the row's measurements."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=device.type == "cuda")
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, loss, error = [], float("nan"), None
    try:
        for i, batch in enumerate(batches):
            elapsed, loss = timed_step(model, batch, mode, optimizer, device, precision)
            if i >= warmup:
                seconds.append(elapsed)
    except torch.OutOfMemoryError as oom:
        error = f"out of memory: {str(oom).splitlines()[0]}"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    model.zero_grad(set_to_none=True)
    del optimizer
    free_memory(device)
    if error is not None:
        return {"mode": mode, "error": error, "peak_memory_gib": round(peak, 2) if peak is not None else None}
    timed = batches[warmup:]
    total = sum(seconds)
    per_step = len(timed)
    flops = [step_flops(b, vit, llm_config, counts) for b in timed]
    flops_total = sum(sum(f.values()) for f in flops)
    vit_flops = sum(f["vit"] for f in flops)
    real, llm_tokens = sum(b.real_tokens for b in timed), sum(b.llm_tokens for b in timed)
    images, patches = sum(len(b.grids) for b in timed), sum(b.patches for b in timed)
    vit_tokens = sum(b.padded_patches if mode == "padded" else b.patches for b in timed)
    on_gpu = device.type == "cuda"
    return {"mode": mode, "steps": per_step, "rows_per_step": round(sum(len(b.input_ids) for b in timed) / per_step, 1),
            "images_per_step": round(images / per_step, 1), "llm_tokens_per_step": round(llm_tokens / per_step),
            "real_tokens_per_step": round(real / per_step),
            "image_token_pct": round(100 * sum(b.image_tokens for b in timed) / real, 1),
            "llm_padding_pct": round(100 * (llm_tokens - real) / llm_tokens, 1),
            "vit_padding_pct": round(100 * (vit_tokens - patches) / vit_tokens, 1),
            "patches_per_step": round(patches / per_step),
            "step_ms": round(1000 * total / per_step, 1), "step_ms_median": round(1000 * statistics.median(seconds), 1),
            "tokens_per_s": round(real / total), "images_per_s": round(images / total, 1),
            "patches_per_s": round(patches / total), "tflop_per_step": round(flops_total / per_step / 1e12, 2),
            "vit_flop_pct": round(100 * vit_flops / flops_total, 1), "tflops": round(flops_total / total / 1e12, 2),
            "mfu_pct": round(100 * flops_total / total / peak_flops, 2) if on_gpu else None,
            "peak_memory_gib": round(peak, 2) if peak is not None else None, "last_loss": round(loss, 3)}


def millions(count: int) -> str:
    return f"{count / 1e6:,.1f}M" if count >= 1e5 else f"{count / 1e3:,.1f}k"


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| max tokens | mode | rows | img/step | real tok/step | img tok % | LLM pad % | ViT pad % | patches/step "
          "| step ms | tokens/s | images/s | patches/s | TFLOP/s | MFU % | ViT FLOP % | peak GiB | loss |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['max_tokens']} | {r['mode']} (ckpt {r['grad_checkpoint']}) | {r['error']} |")
            continue
        mode = r["mode"] if r["grad_checkpoint"] == "none" else f"{r['mode']} (ckpt {r['grad_checkpoint']})"
        mfu = f"{r['mfu_pct']:.2f}" if r["mfu_pct"] is not None else "n/a"
        memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        print(f"| {r['max_tokens']} | {mode} | {r['rows_per_step']:g} | {r['images_per_step']:g} "
              f"| {r['real_tokens_per_step']:,} | {r['image_token_pct']:.1f} | {r['llm_padding_pct']:.1f} "
              f"| {r['vit_padding_pct']:.1f} | {r['patches_per_step']:,} | {r['step_ms']:.1f} "
              f"| {r['tokens_per_s']:,} | {r['images_per_s']:.1f} | {r['patches_per_s']:,} | {r['tflops']:.2f} "
              f"| {mfu} | {r['vit_flop_pct']:.1f} | {memory} | {r['last_loss']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", default=None, help="comma-separated LLM tokens per step (one pack) "
                        "(default 8192; --tiny: 512)")
    parser.add_argument("--modes", default="packed,padded")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; --tiny: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 3; --tiny: 1)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=("bf16", "autocast", "fp32"), default=None,
                        help="bf16 weights (CUDA default), fp32 weights under bf16 autocast, or fp32 (CPU default)")
    parser.add_argument("--llm-type", default=None, help="transformers MoE model type (default qwen3_moe)")
    parser.add_argument("--llm-layers", type=int, default=None, help=f"default {FULL_LLM_LAYERS} (base.yaml: 24)")
    parser.add_argument("--llm-hidden", type=int, default=None, help="default 2048")
    parser.add_argument("--llm-heads", type=int, default=None, help="default 16 (head_dim 128)")
    parser.add_argument("--llm-kv-heads", type=int, default=None, help="default 4")
    parser.add_argument("--llm-experts", type=int, default=None, help="default 64")
    parser.add_argument("--llm-top-k", type=int, default=None, help="experts per token (default 8)")
    parser.add_argument("--llm-moe-width", type=int, default=None, help="each expert's MLP width (default 768)")
    parser.add_argument("--vit-depth", type=int, default=None, help="default 27 (the 532M Seed-ViT)")
    parser.add_argument("--answer-words", default=None, help="min,max answer length, log-uniform "
                        "(default 8,512; --tiny: 4,48)")
    parser.add_argument("--grad-checkpoint", choices=("none", "vit", "llm", "both"), default="none",
                        help="activation checkpointing (not counted in FLOPs): for configs that do not fit")
    parser.add_argument("--no-oom-retry", action="store_true", help="after an out-of-memory row, do not rerun it "
                        "(and the rows after it) with the ViT's blocks checkpointed")
    parser.add_argument("--experts", default=None, help="transformers experts implementation to set "
                        "(grouped_mm, batched_mm, eager; default: transformers' choice)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--tiny", action="store_true", help="toy ViT and LLM for a CPU smoke test")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; use --device cpu --tiny for a smoke test")
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    vit_sizes = dict(TINY_VIT) if args.tiny else {}
    if args.vit_depth is not None:
        vit_sizes["depth"] = args.vit_depth
    vit = SeedViTConfig(**vit_sizes)
    llm_sizes: dict[str, Any] = dict(TINY_LLM) if args.tiny else {"num_layers": FULL_LLM_LAYERS}
    for flag, field in (("llm_type", "model_type"), ("llm_layers", "num_layers"), ("llm_hidden", "hidden_size"),
                        ("llm_heads", "num_heads"), ("llm_kv_heads", "num_kv_heads"), ("llm_experts", "num_experts"),
                        ("llm_top_k", "experts_per_token"), ("llm_moe_width", "moe_intermediate_size")):
        if getattr(args, flag) is not None:
            llm_sizes[field] = getattr(args, flag)
    llm_config = LlmConfig(**llm_sizes)
    budgets = [int(t) for t in (args.max_tokens or ("512" if args.tiny else "8192")).split(",") if t]
    answer_words = tuple(int(x) for x in (args.answer_words or ("4,48" if args.tiny else "8,512")).split(","))
    steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"packed", "padded"}:
        raise SystemExit(f"--modes takes packed and/or padded, got {args.modes}")

    tokenizer = synthetic_tokenizer(llm_config.vocab_size)
    if len(tokenizer) > llm_config.vocab_size:
        raise SystemExit(f"the synthetic tokenizer has {len(tokenizer)} ids, more than vocab {llm_config.vocab_size}")
    special = SpecialIds.of(tokenizer)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = build_model(vit, llm_config, special.pad, special.image_pad, device, precision)
    if args.grad_checkpoint in ("vit", "both"):
        checkpoint_vit(model)
    if args.grad_checkpoint in ("llm", "both"):
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.experts and hasattr(model.llm, "set_experts_implementation"):
        model.llm.set_experts_implementation(args.experts)
    experts_impl = getattr(model.llm.config, "_experts_implementation", None) or "eager (module loop)"
    counts = parameter_counts(model, llm_config)
    build_seconds = time.perf_counter() - started
    pixel_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    total_params = counts.vit + counts.adapter + counts.llm_total
    print(f"{name}, torch {torch.__version__}, precision {precision}, built in {build_seconds:.0f} s")
    print(f"ViT {millions(counts.vit)} (w{vit.width} d{vit.depth} h{vit.num_heads}, attention "
          f"{packed_backend(vit, device)}), adapter {millions(counts.adapter)}, LLM {llm_config.model_type} "
          f"{millions(counts.llm_total)} total (embedding {millions(counts.llm_embedding)}, experts "
          f"{millions(counts.llm_experts)}), {millions(counts.llm_active)} active per token without the "
          f"embedding (h{llm_config.hidden_size} L{llm_config.num_layers} {llm_config.num_experts} experts "
          f"top-{llm_config.experts_per_token} width {llm_config.moe_intermediate_size}, vocab "
          f"{llm_config.vocab_size}, experts {experts_impl}); {total_params / 1e9:.3f}B parameters in all")

    rows: list[dict[str, Any]] = []
    checkpointing = args.grad_checkpoint
    for budget in budgets:
        for mode in modes:
            generator = torch.Generator().manual_seed(args.seed + budget)
            stream = synthetic_samples(tokenizer, vit, answer_words, budget, args.seed + budget)  # same for each mode
            build = packed_batches if mode == "packed" else padded_batches
            batches = build(stream, warmup + steps, budget, special.pad, vit, generator, device, pixel_dtype)
            while True:
                row = {"max_tokens": budget, "grad_checkpoint": checkpointing} | run_mode(
                    model, batches, mode, warmup, device, precision, vit, llm_config, counts, args.peak_tflops * 1e12)
                rows.append(row)
                if "error" not in row or args.no_oom_retry or checkpointing in ("vit", "both"):
                    break
                print(f"{mode} at {budget} tokens ran out of memory: checkpointing the ViT's blocks from here on")
                checkpoint_vit(model)
                checkpointing = "vit" if checkpointing == "none" else "both"
            del batches
            free_memory(device)
    print(f"\nMFU against {args.peak_tflops:g} TFLOP/s; FLOPs = ViT 3 x sum n*forward_flops_per_patch(n) + adapter "
          "6 x params x image tokens + LLM 6 x active x tokens + LM head 6 x vocab x hidden x predicted + "
          "causal attention; tokens/s are real LLM tokens (text + image), padding excluded")
    print_table(rows)
    record(args.out, {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "precision": precision,
                      "tiny": args.tiny, "vit": {"width": vit.width, "depth": vit.depth, "heads": vit.num_heads,
                                                 "max_pixels": vit.max_pixels,
                                                 "attention": packed_backend(vit, device)},
                      "llm": {"model_type": llm_config.model_type, "hidden": llm_config.hidden_size,
                              "layers": llm_config.num_layers, "heads": llm_config.num_heads,
                              "kv_heads": llm_config.num_kv_heads, "head_dim": llm_config.head_dim,
                              "experts": llm_config.num_experts, "top_k": llm_config.experts_per_token,
                              "moe_width": llm_config.moe_intermediate_size, "vocab": llm_config.vocab_size,
                              "experts_implementation": experts_impl, "attention": "sdpa"},
                      "parameters": {"vit": counts.vit, "adapter": counts.adapter, "llm_total": counts.llm_total,
                                     "llm_embedding": counts.llm_embedding, "llm_experts": counts.llm_experts,
                                     "llm_active_per_token": counts.llm_active, "total": total_params},
                      "answer_words": list(answer_words), "image_sizes": [list(s) for s in IMAGE_SIZES],
                      "max_images": MAX_IMAGES, "pack_buffer": PACK_BUFFER, "steps": steps, "warmup": warmup,
                      "grad_checkpoint": args.grad_checkpoint, "oom_retry": not args.no_oom_retry,
                      "seed": args.seed, "peak_tflops": args.peak_tflops,
                      "flops": "3*sum(n*forward_flops_per_patch(vit,n)) + 6*adapter*image_tokens + 6*llm_active*tokens"
                               " + 6*vocab*hidden*predicted + 3*layers*2*heads*head_dim*sum(L*(L+1))"}, rows)


if __name__ == "__main__":
    main()
