"""RL prompts: the training split's single-turn questions of both types (general: captions, scored by the
reward model; verifiable: counting, grounding/pointing, OCR, video grounding, scored by their verifier),
with their media as PNG bytes, and `PromptSampler`, which deals each step's batch with both types in it
(the mix of the config) from seeded per-type orders whose position is the sampler's checkpointable state."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from components.training.shards import DropCounter

KIND_TASKS = {"caption": "caption", "counting": "counting", "grounding": "grounding", "ocr": "ocr",
              "video_grounding": "video"}  # prompt kind -> the shard folder its samples come from
TYPE_OF_KIND = {"caption": "general", "counting": "verifiable", "grounding": "verifiable", "ocr": "verifiable",
                "video_grounding": "verifiable"}


def rl_prompts(shards_dir: Path, kinds: list[str], per_kind: int, holdout_fraction: float, frames_per_clip: int,
               counter: DropCounter) -> dict[str, list[dict[str, Any]]]:
    """Up to `per_kind` training-split prompts of each kind (one question of a sample asked alone with its
    media, the evaluation's item rules), grouped by prompt type; held-out samples are never read."""
    from components.training.shards import task_shards
    from components.vlm.training_prompts import training_turns

    pools: dict[str, list[dict[str, Any]]] = {"general": [], "verifiable": []}
    for task in sorted({KIND_TASKS[k] for k in kinds}):
        wanted = {k for k in kinds if KIND_TASKS[k] == task}
        if not task_shards(shards_dir, (task,)):
            counter[f"no_shards_{task}"] += 1
            continue
        asked = {k: 0 for k in wanted}
        for _, items, encoded, stamps in training_turns(shards_dir, task, holdout_fraction, frames_per_clip, wanted,
                                                        counter):
            if all(n >= per_kind for n in asked.values()):
                break
            for item in items:
                if asked[item.kind] >= per_kind:
                    continue
                asked[item.kind] += 1
                pools[TYPE_OF_KIND[item.kind]].append({
                    "prompt_id": f"{item.key}:{item.turn}", "key": item.key, "kind": item.kind,
                    "type": TYPE_OF_KIND[item.kind], "question": item.question, "reference": item.reference,
                    "images": encoded, "timestamps": stamps})
    return pools


def type_counts(size: int, mix: dict[str, float], available: dict[str, int]) -> dict[str, int]:
    """How many prompts of each type a batch of `size` holds: the mix's shares, rounded, with at least one
    of every type that has prompts and weight when the batch has room; a type without prompts gets none
    and its share goes to the other."""
    live = {t: w for t, w in mix.items() if w > 0 and available.get(t, 0) > 0}
    if not live:
        return {t: 0 for t in mix}
    total = sum(live.values())
    counts = {t: int(round(size * w / total)) for t, w in live.items()}
    if size >= len(live):
        for t in live:
            counts[t] = max(1, counts[t])
    while sum(counts.values()) > size:
        largest = max(counts, key=lambda t: counts[t])
        counts[largest] -= 1
    while sum(counts.values()) < size:
        counts[max(live, key=lambda t: live[t])] += 1
    return {t: counts.get(t, 0) for t in mix}


@dataclasses.dataclass
class SamplerState:
    """Where the sampler is: per type, the epoch and the position in that epoch's seeded order."""

    epoch: dict[str, int]
    position: dict[str, int]


class PromptSampler:
    """Deals batches of prompt rows, `type_counts` of each type per batch, each type read in a seeded
    shuffled order, epoch after epoch. `state`/`load_state` make the position part of a checkpoint."""

    def __init__(self, pools: dict[str, list[dict[str, Any]]], mix: dict[str, float], seed: int) -> None:
        self.pools, self.mix, self.seed = pools, mix, seed
        self.state = SamplerState({t: 0 for t in pools}, {t: 0 for t in pools})

    def _order(self, kind: str, epoch: int) -> list[int]:
        order = list(range(len(self.pools[kind])))
        random.Random(f"{self.seed}:{kind}:{epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[dict[str, Any]]:
        counts = type_counts(size, self.mix, {t: len(p) for t, p in self.pools.items()})
        batch = []
        for kind, count in counts.items():
            pool = self.pools.get(kind, [])
            for _ in range(count):
                if self.state.position[kind] >= len(pool):
                    self.state.epoch[kind] += 1
                    self.state.position[kind] = 0
                order = self._order(kind, self.state.epoch[kind])
                batch.append(pool[order[self.state.position[kind]]])
                self.state.position[kind] += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.state)

    def load_state(self, state: dict[str, Any]) -> None:
        self.state = SamplerState(dict(state["epoch"]), dict(state["position"]))
