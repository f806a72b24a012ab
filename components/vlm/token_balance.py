"""Visual-token redistribution (the paper's infrastructure trick): within groups of data-parallel
workers, each step's images are pooled and reassigned greedily to the least-loaded worker, so no worker
waits on one that drew a few huge images.

Images vary from a few dozen to thousands of visual tokens, so equal image counts per worker leave the
slowest worker far above the mean. Greedy assignment in decreasing cost order (longest processing time
first) keeps every worker's load within one image of the mean: max <= mean + largest image. Images
never leave their group (the paper uses groups of 192 GPUs), which bounds the all-to-all traffic.

`balanced_image_features` does it in the VLM's data-parallel training step: every worker learns every
image's size, the plan is computed identically everywhere, the patches go where the plan sends them,
and the features come back, gradients included, to the worker whose sequences hold the images.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One image of a step: the worker that loaded it, its index there, and its cost (e.g. tokens)."""

    worker: int
    index: int
    cost: float


def greedy_assign(costs: Sequence[float], num_workers: int) -> list[int]:
    """Worker of each item: items in decreasing cost go to the currently least-loaded worker
    (ties: lower worker id; equal costs keep their input order, so the result is deterministic)."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if any(cost < 0 for cost in costs):
        raise ValueError("costs must be >= 0")
    heap = [(0.0, worker) for worker in range(num_workers)]
    owner = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, worker = heapq.heappop(heap)
        owner[item] = worker
        heapq.heappush(heap, (load + costs[item], worker))
    return owner


def round_robin_assign(costs: Sequence[float], num_workers: int) -> list[int]:
    """The baseline: item i to worker i mod num_workers (equal counts, blind to cost)."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    return [item % num_workers for item in range(len(costs))]


def redistribute(per_worker_costs: Sequence[Sequence[float]], group_size: int) -> list[list[ImageRef]]:
    """The images each worker processes this step, after greedy reassignment within groups of
    `group_size` consecutive workers (the last group may be smaller). Input: the cost of every image
    each worker loaded. Every image is assigned exactly once, inside its own group."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    world = len(per_worker_costs)
    assigned: list[list[ImageRef]] = [[] for _ in range(world)]
    for start in range(0, world, group_size):
        members = range(start, min(start + group_size, world))
        refs = [ImageRef(worker, index, float(cost)) for worker in members
                for index, cost in enumerate(per_worker_costs[worker])]
        for ref, slot in zip(refs, greedy_assign([r.cost for r in refs], len(members))):
            assigned[start + slot].append(ref)
    return assigned


def loads(assignment: Sequence[Sequence[ImageRef]]) -> list[float]:
    return [sum(ref.cost for ref in images) for images in assignment]


def imbalance(worker_loads: Sequence[float]) -> float:
    """max / mean load: 1.0 is perfect balance; the step takes as long as its slowest worker."""
    mean = sum(worker_loads) / len(worker_loads) if worker_loads else 0.0
    return max(worker_loads) / mean if mean > 0 else 1.0


@dataclasses.dataclass
class BalancedFeatures:
    """This worker's image features (its own images, in its own order) and the step's load figures."""

    features: torch.Tensor  # (visual tokens of this worker's images, LLM width), differentiable
    patches_before: list[float]  # every worker's ViT patches as loaded
    patches_after: list[float]  # every worker's ViT patches after redistribution (what it computed)


def _exchange(chunks: list[torch.Tensor], received_rows: list[int], largest: int) -> list[torch.Tensor]:
    """Chunk d of `chunks` to worker d; returns what each worker sent here (`received_rows[s]` rows from s),
    with gradients flowing back. Chunks are padded to the step's largest one (at least a row), as gloo's
    scatter, which torch's differentiable all-to-all uses on CPU, wants equal sizes."""
    from torch.distributed.nn.functional import all_to_all

    rows = max(1, largest)
    padded = [torch.cat([chunk, chunk.new_zeros(rows - chunk.shape[0], chunk.shape[1])]) for chunk in chunks]
    incoming = [torch.empty_like(padded[0]) for _ in chunks]
    return [received[:count] for received, count in zip(all_to_all(incoming, padded), received_rows)]


def _kept_features(module: Any, pixel_values: torch.Tensor | None, grid_hw: torch.Tensor | None,
                   kept: list[float]) -> BalancedFeatures:
    """Every worker runs its own images: no exchange."""
    device = module.adapter.fc1.weight.device
    if grid_hw is not None and len(grid_hw):
        features = module.image_embeddings(pixel_values.to(device, next(module.vit.parameters()).dtype),
                                           grid_hw.to(device))
    else:
        features = torch.zeros(0, module.adapter.fc2.out_features, device=device)
    return BalancedFeatures(features, kept, kept)


def balanced_image_features(module: Any, pixel_values: torch.Tensor | None, grid_hw: torch.Tensor | None,
                            group_size: int, merge_size: int) -> BalancedFeatures:
    """The images of every worker pooled within groups and run through the ViT + adapter where the greedy
    plan puts them; the features travel back to the worker that owns the images, with their gradients.
    When the plan's busiest worker would carry no less than the busiest one keeping its own images (greedy
    largest-first is not optimal: two workers and a few large images), every worker keeps its own.
    Every worker of the process group must call this at the same step, with or without images, and make
    its loss depend on the returned features (add `0 * features.sum()` where no image uses them). Every
    worker learns every image's grid (a small all-gather of lists), so all compute the same plan."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    grids = [tuple(int(v) for v in row) for row in grid_hw.tolist()] if grid_hw is not None else []
    all_grids: list[Any] = [None] * world
    dist.all_gather_object(all_grids, grids)
    patches = [[float(h * w) for h, w in worker] for worker in all_grids]
    plan = redistribute(patches, group_size)
    kept = [sum(worker) for worker in patches]
    if max(loads(plan), default=0.0) >= max(kept, default=0.0):  # greedy is no better than keeping: keep
        return _kept_features(module, pixel_values, grid_hw, kept)  # (every worker decides the same)
    # route[s][d]: the indices (in worker s's own order) of s's images that worker d computes
    route = [[[ref.index for ref in plan[dest] if ref.worker == src] for dest in range(world)] for src in range(world)]

    def size(src: int, indices: list[int], per_image: int = 1) -> int:
        return sum(all_grids[src][i][0] * all_grids[src][i][1] // per_image for i in indices)

    device = module.adapter.fc1.weight.device
    dtype = next(module.vit.parameters()).dtype
    patch_dim = module.vit.config.patch_dim
    own = list(torch.split(pixel_values.to(device, dtype), [h * w for h, w in grids])) if grids else []
    outgoing = [torch.cat([own[i] for i in route[rank][dest]]) if route[rank][dest]
                else torch.zeros(0, patch_dim, device=device, dtype=dtype) for dest in range(world)]
    largest = max(size(src, route[src][dest]) for src in range(world) for dest in range(world))
    received = _exchange(outgoing, [size(src, route[src][rank]) for src in range(world)], largest)
    order = [(src, i) for src in range(world) for i in route[src][rank]]
    width = module.adapter.fc2.out_features
    if order:
        grid = torch.tensor([all_grids[src][i] for src, i in order], device=device)
        computed = module.image_embeddings(torch.cat(received), grid)  # (tokens of `order`, width)
    else:  # nothing to compute here: a zero-size result that still gives every trainable part a gradient
        anchor = sum(((p * 0).sum() for p in module.parameters() if p.requires_grad), torch.zeros((), device=device))
        computed = anchor.reshape(1, 1).expand(0, width)
    pooled = merge_size ** 2
    back = list(torch.split(computed, [size(src, route[src][rank], pooled) for src in range(world)]))
    largest = max(size(src, route[src][dest], pooled) for src in range(world) for dest in range(world))
    returned = _exchange(back, [size(rank, route[rank][dest], pooled) for dest in range(world)], largest)
    pieces: dict[int, torch.Tensor] = {}
    for dest in range(world):
        counts = [grids[i][0] * grids[i][1] // pooled for i in route[rank][dest]]
        pieces |= dict(zip(route[rank][dest], torch.split(returned[dest], counts)))
    # with no images of its own a worker still ties the exchange into its loss, so that its backward pass
    # runs the all-to-all that carries the other workers' gradients to the images it computed
    features = torch.cat([pieces[i] for i in range(len(grids))]) if grids else torch.cat(returned)[:0]
    return BalancedFeatures(features, [sum(worker) for worker in patches], loads(plan))
