"""Visual-token redistribution (the paper's infrastructure trick): within groups of data-parallel
workers, each step's images are pooled and reassigned greedily to the least-loaded worker, so no worker
waits on one that drew a few huge images.

Images vary from a few dozen to thousands of visual tokens, so equal image counts per worker leave the
slowest worker far above the mean. Greedy assignment in decreasing cost order (longest processing time
first) keeps every worker's load within one image of the mean: max <= mean + largest image. Images
never leave their group (the paper uses groups of 192 GPUs), which bounds the all-to-all traffic.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence


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
