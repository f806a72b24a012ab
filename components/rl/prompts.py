"""RL prompts: the training split's single-turn questions of both types (general: captions, scored by the
reward model; verifiable: counting, grounding/pointing, OCR, video grounding, scored by their verifier),
with their media as PNG bytes, and `PromptSampler`, which deals each step's batch with both types in it
(the mix of the config), the kinds within a type by their shares (pool sizes, or for verifiable kinds the
online adaptation to their pass rates), from seeded per-kind orders whose position is the sampler's
checkpointable state."""

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


def signal_weight(pass_rate: float | None, floor: float) -> float:
    """A verifiable kind's share weight under online data-distribution adaptation: 4 p (1 - p) for its running
    pass rate p, the variance of a pass/fail reward scaled to 1 at p = 0.5, so a kind the policy always fails
    (or always passes), whose samples all score alike and teach nothing, gets little of the batch; never below
    `floor`, so it is still asked and its pass rate re-measured. An unmeasured kind (None) weighs 1."""
    if pass_rate is None:
        return 1.0
    return max(floor, 4.0 * pass_rate * (1.0 - pass_rate))


@dataclasses.dataclass
class SamplerState:
    """Where the sampler is: per prompt kind, the epoch and the position in that epoch's seeded order; per
    kind the smooth weighted round-robin's credit, and the running pass rate of each verifiable kind."""

    epoch: dict[str, int]
    position: dict[str, int]
    credit: dict[str, float]
    pass_rate: dict[str, float]


class PromptSampler:
    """Deals batches of prompt rows: `type_counts` of each type per batch, and within a type the kinds by
    smooth weighted round-robin (each slot adds every kind's share to its credit and takes the kind with the
    most, which pays 1), so shares hold exactly over steps without a random draw. Each kind is read in a
    seeded shuffled order, epoch after epoch.

    A kind's weight is its pool's size (the pooled prompts equally often), unless `adapt` is set: then the
    verifiable kinds' weights follow their running pass rates (`observe`, `signal_weight` with floor
    `adapt_floor`), Seed-Thinking v1.5's online data-distribution adaptation. `state_dict`/`load_state` make
    the positions, credits and pass rates part of a checkpoint."""

    def __init__(self, pools: dict[str, list[dict[str, Any]]], mix: dict[str, float], seed: int,
                 adapt: bool = False, adapt_floor: float = 0.1, adapt_momentum: float = 0.3) -> None:
        self.mix, self.seed = mix, seed
        self.adapt, self.adapt_floor, self.adapt_momentum = adapt, adapt_floor, adapt_momentum
        self.sizes = {t: len(p) for t, p in pools.items()}  # per type: how many prompts
        self.kinds: dict[str, dict[str, list[dict[str, Any]]]] = {t: {} for t in pools}
        for kind_type, rows in pools.items():
            for row in rows:
                self.kinds[kind_type].setdefault(str(row.get("kind", kind_type)), []).append(row)
        every = [k for per in self.kinds.values() for k in per]
        self.state = SamplerState({k: 0 for k in every}, {k: 0 for k in every}, {k: 0.0 for k in every}, {})

    def _order(self, kind: str, epoch: int) -> list[int]:
        rows = next(per[kind] for per in self.kinds.values() if kind in per)
        order = list(range(len(rows)))
        random.Random(f"{self.seed}:{kind}:{epoch}").shuffle(order)
        return order

    def shares(self, prompt_type: str) -> dict[str, float]:
        """Each kind's share of `prompt_type`'s slots now (they sum to 1)."""
        per = self.kinds.get(prompt_type, {})
        if self.adapt and prompt_type == "verifiable":
            weights = {k: signal_weight(self.state.pass_rate.get(k), self.adapt_floor) for k in per}
        else:
            weights = {k: float(len(rows)) for k, rows in per.items()}
        total = sum(weights.values())
        return {k: w / total for k, w in weights.items()} if total > 0 else {}

    def _next_kind(self, shares: dict[str, float]) -> str:
        credit = self.state.credit
        for kind, share in shares.items():
            credit[kind] = credit.get(kind, 0.0) + share
        chosen = max(sorted(shares), key=lambda k: credit[k])
        credit[chosen] -= 1.0
        return chosen

    def next_batch(self, size: int) -> list[dict[str, Any]]:
        counts = type_counts(size, self.mix, self.sizes)
        batch = []
        for prompt_type, count in counts.items():
            shares = self.shares(prompt_type)
            for _ in range(count):
                kind = self._next_kind(shares)
                rows = self.kinds[prompt_type][kind]
                if self.state.position[kind] >= len(rows):
                    self.state.epoch[kind] += 1
                    self.state.position[kind] = 0
                order = self._order(kind, self.state.epoch[kind])
                batch.append(rows[order[self.state.position[kind]]])
                self.state.position[kind] += 1
        return batch

    def observe(self, pass_rates: dict[str, float]) -> None:
        """A step's verifier pass rate per kind (kinds it did not ask are left out): the running rate moves
        `adapt_momentum` of the way to it (the first measurement sets it)."""
        for kind, rate in pass_rates.items():
            old = self.state.pass_rate.get(kind)
            self.state.pass_rate[kind] = rate if old is None else old + self.adapt_momentum * (rate - old)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.state)

    def load_state(self, state: dict[str, Any]) -> None:
        self.state = SamplerState(dict(state["epoch"]), dict(state["position"]), dict(state["credit"]),
                                  dict(state["pass_rate"]))
