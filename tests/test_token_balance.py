"""Visual-token redistribution: a partition of the step's images, inside each group, deterministic,
within the list-scheduling bound, and never worse than the count-balanced baseline on skewed mixes."""

from __future__ import annotations

import random
from typing import Any

import pytest

from components.vlm.token_balance import (greedy_assign, imbalance, loads, redistribute,
                                          round_robin_assign)


def skewed_costs(rng: random.Random, count: int) -> list[float]:
    """Mostly small images, a few very large ones (documents, high-resolution photos)."""
    return [rng.choice([64, 100, 256, 400]) if rng.random() < 0.9 else rng.choice([2000, 4096, 8000])
            for _ in range(count)]


def test_greedy_hand_example() -> None:
    # largest first: 7 -> w0, 5 -> w1, 4 -> w1 (5 < 7), 3 -> w0 (7 < 9), 1 -> w1 (9 < 10)
    assert greedy_assign([3, 7, 1, 5, 4], 2) == [0, 0, 1, 1, 1]
    assert loads_of([3, 7, 1, 5, 4], [0, 0, 1, 1, 1], 2) == [10, 10]


def loads_of(costs: list[float], owner: list[int], workers: int) -> list[float]:
    totals = [0.0] * workers
    for cost, worker in zip(costs, owner):
        totals[worker] += cost
    return totals


@pytest.mark.parametrize("seed", range(20))
def test_greedy_within_list_scheduling_bound_and_beats_round_robin(seed: int) -> None:
    rng = random.Random(seed)
    workers = rng.randint(2, 16)
    costs = skewed_costs(rng, rng.randint(workers, 8 * workers))
    greedy = loads_of(costs, greedy_assign(costs, workers), workers)
    baseline = loads_of(costs, round_robin_assign(costs, workers), workers)
    assert sum(greedy) == pytest.approx(sum(costs))
    assert max(greedy) <= sum(costs) / workers + max(costs) + 1e-9  # max <= mean + largest item
    assert max(greedy) <= max(baseline)
    assert max(greedy) >= max(max(costs), sum(costs) / workers) - 1e-9  # no schedule beats this


def test_redistribution_is_a_partition_inside_groups() -> None:
    rng = random.Random(0)
    per_worker = [skewed_costs(rng, rng.randint(0, 6)) for _ in range(10)]
    assignment = redistribute(per_worker, group_size=4)  # groups 0-3, 4-7, 8-9
    seen = sorted((ref.worker, ref.index) for images in assignment for ref in images)
    assert seen == sorted((w, i) for w, costs in enumerate(per_worker) for i in range(len(costs)))
    for worker, images in enumerate(assignment):
        assert all(ref.worker // 4 == worker // 4 for ref in images)  # never across groups
        assert all(ref.cost == per_worker[ref.worker][ref.index] for ref in images)
    assert redistribute(per_worker, group_size=4) == assignment  # deterministic


def test_group_of_one_moves_nothing_and_bigger_groups_balance_better() -> None:
    rng = random.Random(1)
    per_worker = [skewed_costs(rng, 8) for _ in range(32)]
    alone = redistribute(per_worker, group_size=1)
    assert all(ref.worker == worker for worker, images in enumerate(alone) for ref in images)
    ratios = [imbalance(loads(redistribute(per_worker, group_size=g))) for g in (1, 4, 32)]
    assert ratios[0] > ratios[1] > ratios[2] >= 1.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_workers"):
        greedy_assign([1.0], 0)
    with pytest.raises(ValueError, match="costs"):
        greedy_assign([-1.0], 2)
    with pytest.raises(ValueError, match="group_size"):
        redistribute([[1.0]], 0)
    assert imbalance([0.0, 0.0]) == 1.0


def _balanced_worker(rank: int, world: int, port: int, results: Any) -> None:
    """One of two gloo processes: the same tiny ViT + adapter on each; worker 0 loads three large images,
    worker 1 one small one (or none). Balanced features and gradients must equal computing locally."""
    import os

    import torch
    import torch.distributed as dist

    from components.vit.config import SeedViTConfig
    from components.vit.model import SeedViT
    from components.vlm.model import MlpAdapter
    from components.vlm.token_balance import balanced_image_features

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same weights on both workers, as data parallelism keeps them
    config = SeedViTConfig(width=32, depth=1, num_heads=2, min_pixels=3136, max_pixels=50176)
    module = torch.nn.Module()
    module.vit, module.adapter = SeedViT(config), MlpAdapter(32, 24)
    module.image_embeddings = lambda pixels, grid: module.adapter(module.vit(pixels, grid).pooled)
    outcome = {}
    cases = (("skewed", {0: [(8, 8), (8, 6), (6, 8)], 1: [(4, 4)]}), ("empty", {0: [(4, 6), (6, 4)], 1: []}),
             ("kept", {0: [(2, 6), (2, 6)], 1: [(2, 4), (2, 4), (2, 4)]}))  # greedy: 12+8+8 | 12+8, keeping 24 | 24
    for case, grids in cases:
        generator = torch.Generator().manual_seed(rank + 7)
        mine = grids[rank]
        pixels = torch.randn(sum(h * w for h, w in mine), config.patch_dim, generator=generator) if mine else None
        grid = torch.tensor(mine) if mine else None
        module.zero_grad()
        result = balanced_image_features(module, pixels, grid, group_size=2, merge_size=2)
        weights = torch.randn(result.features.shape, generator=generator)
        (result.features * weights).sum().backward()
        balanced = (result.features.detach().clone(),
                    [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()])
        module.zero_grad()
        if mine:  # the same loss computed where the images live; gradients summed over workers as DDP does
            local = module.image_embeddings(pixels, grid)
            (local * weights).sum().backward()
            assert torch.allclose(local.detach(), balanced[0], atol=1e-5), case
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]
        for g in grads:
            dist.all_reduce(g)
        summed_balanced = [g.clone() for g in balanced[1]]
        for g in summed_balanced:
            dist.all_reduce(g)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads, summed_balanced)), case
        outcome[case] = (result.patches_before, result.patches_after)
    results[rank] = outcome
    dist.destroy_process_group()


def test_balanced_features_and_gradients_equal_local_ones_over_two_processes() -> None:
    import multiprocessing

    from pipeline_runs import free_port

    context = multiprocessing.get_context("spawn")
    results = context.Manager().dict()
    port = free_port()
    workers = [context.Process(target=_balanced_worker, args=(rank, 2, port, results)) for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [worker.exitcode for worker in workers] == [0, 0]
    before, after = results[0]["skewed"]
    assert before == [64 + 48 + 48, 16] and sorted(after) == [80, 96]  # 64 | 48 + 48 first, then 16 to the lighter
    before, after = results[0]["empty"]
    assert before == [48, 0] and after == [24, 24]
    before, after = results[0]["kept"]
    assert before == after == [24, 24]  # greedy (28 on one worker) would not beat keeping: nothing moves
